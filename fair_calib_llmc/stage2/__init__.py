"""Stage II: what ``llmcompressor.oneshot`` runs on Stage I's states.

:mod:`.modifier` (``FAIRCalibModifier``, GPTQ with weighted FP targets), :mod:`.reconstruction`
(its maths), :mod:`.rotations` (SpinQuant mappings for LLaDA / Dream), :mod:`.learned_rotations`
(learned R1 / R2), :mod:`.flatquant` (``FlatQuantModifier``, FlatQuant-class per-layer
transforms), :mod:`.learning` (what both learners share), :mod:`.equivalent_modifier`
(``EquivalentRescaleModifier``, the tie-noise control) and
:mod:`.equivalent` (its maths).
"""
