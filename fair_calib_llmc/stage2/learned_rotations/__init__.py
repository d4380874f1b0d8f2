"""Rotations for LLaDA and Dream: exact SpinQuant rotations and learned R1 / R2 (Stage II v3).

:mod:`.base` holds the modifiers (lifecycle); :mod:`.learner` the rotation learner (training
loop, report, the context managers it runs under); :mod:`.rotated_linear`, :mod:`.cayley`,
:mod:`.ste` and :mod:`.objectives` the plain maths they use.
"""

from fair_calib_llmc.stage2.learned_rotations.base import (
    ExactSpinQuantModifier,
    LearnedSpinQuantModifier,
)
from fair_calib_llmc.stage2.learned_rotations.learner import rotation_sites

__all__ = ["ExactSpinQuantModifier", "LearnedSpinQuantModifier", "rotation_sites"]
