"""Quantization formats: the W4A4 schemes (:mod:`.schemes`) and the transformers backport that
re-attaches online transforms on load (:mod:`.transform_loading`)."""
