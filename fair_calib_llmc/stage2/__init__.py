"""Stage II: what ``llmcompressor.oneshot`` runs on Stage I's states.

:mod:`.modifier` (``FAIRCalibModifier``, GPTQ with weighted FP targets), :mod:`.reconstruction`
(its maths), :mod:`.rotations` (SpinQuant mappings for LLaDA / Dream), :mod:`.learned_rotations`
(learned R1 / R2 / R4).
"""
