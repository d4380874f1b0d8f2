"""Stage I: full-precision rollouts -> frontier prior -> weighted masked-stage states.

:mod:`.states` (settings and the calibration dataset), :mod:`.prior` (the position prior),
:mod:`.sensitivity` (per-layer output sensitivity).
"""
