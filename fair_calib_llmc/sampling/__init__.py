"""The dLLM samplers (LLaDA, Dream) and their traces (:mod:`.samplers`)."""
