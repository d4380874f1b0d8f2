"""FlatQuant-class Stage II: per-layer learned affine transforms, trained block by block.

:mod:`.base` holds the modifier (lifecycle); :mod:`.learner` the per-layer training loop;
:mod:`.transforms` the maths of a transformed linear layer; :mod:`.sites` which modules of
a decoder layer each transform touches; :mod:`.clipping` learned weight clipping;
:mod:`.online` the learned blocks saved as compressed-tensors online transforms.
"""

from fair_calib_llmc.stage2.flatquant.base import FlatQuantModifier

__all__ = ["FlatQuantModifier"]
