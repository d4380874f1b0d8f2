"""Text, models and checkpoints in and out: :mod:`.data`, :mod:`.corpus`, :mod:`.tokenization`,
:mod:`.loading`, :mod:`.default_model`, :mod:`.checkpoint`, :mod:`.reload`."""
