"""Text that exists on every machine without a download: the Python standard library.

The file list is deterministic (sorted top-level ``*.py`` of the running interpreter's stdlib)
and split *by file* with a stable hash, so calibration and held-out text never share a file
with the training text. Because stdlib contents differ between Python versions, the built-in
default model ships its calibration / held-out chunks as package data
(:func:`shipped_texts`) instead of re-reading the stdlib.
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

from fair_calib_llmc.io.data import load_texts

__all__ = ["stdlib_split", "chunk_text", "shipped_texts", "ASSETS"]

ASSETS = Path(__file__).resolve().parent.parent / "assets"
_SPLITS = ("train", "calibration", "heldout")


def _split_of(name: str) -> str:
    bucket = int(hashlib.sha1(name.encode()).hexdigest(), 16) % 20
    return "heldout" if bucket == 0 else "calibration" if bucket == 1 else "train"


def stdlib_split(split: str, recursive: bool = False) -> list[str]:
    """Texts of the stdlib files assigned to ``split`` ('train', 'calibration', 'heldout').

    ``recursive`` adds the packages below the top level (tests included: many times the text).
    """
    if split not in _SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {_SPLITS}")
    root = Path(sysconfig.get_paths()["stdlib"])
    pattern = "**/*.py" if recursive else "*.py"
    names = {p: p.relative_to(root).as_posix() for p in root.glob(pattern)}
    names = {p: n for p, n in names.items() if "site-packages" not in n}
    files = sorted(p for p, n in names.items() if _split_of(n) == split)
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def chunk_text(texts: list[str], chunk_chars: int) -> list[str]:
    """Cut texts into consecutive pieces of ``chunk_chars`` characters (dropping short tails)."""
    return [
        t[i : i + chunk_chars]
        for t in texts
        for i in range(0, len(t) - chunk_chars + 1, chunk_chars)
    ]


def shipped_texts(split: str) -> list[str]:
    """Calibration or held-out chunks shipped with the package (``assets/data/<split>.jsonl``)."""
    path = ASSETS / "data" / f"{split}.jsonl"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing; rebuild it with integration/train_dllm.py --preset tiny"
        )
    return load_texts(path)
