"""Absolute paths of this directory's data, for the task YAMLs (``!function data_files.NAME``).

lm-eval hands ``dataset_kwargs.data_files`` to ``datasets`` as written, and ``datasets``
resolves a relative path against the working directory; lm-eval resolves ``!function`` against
the YAML's own directory, so the tasks run from anywhere.
"""

from pathlib import Path

_HERE = Path(__file__).resolve().parent

next_line = str(_HERE / "python_next_line.jsonl")
heldout = str(_HERE / "python_heldout.jsonl")
