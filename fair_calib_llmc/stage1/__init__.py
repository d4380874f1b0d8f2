"""Stage I: calibration rows (masked-stage states or clean text) weighed by one source.

:mod:`.states` (settings and the calibration dataset), :mod:`.sources` (the weight-source
contract), :mod:`.prior` (the frontier prior), :mod:`.position` (the paper's static position
prior).
"""
