"""Calibration text from whatever a user has: a list of strings, a ``datasets.Dataset``, or a
local ``.json`` / ``.jsonl`` / ``.csv`` / ``.txt`` / ``.parquet`` file.

Files are read by ``datasets``' own packaged loaders (``json`` takes a list of records or
JSON lines, ``text`` one sample per line), so every format behaves as it does
in llm-compressor's own examples. What stays hand-written is the small part ``datasets`` does
not decide for us: picking the text column (and naming the columns found when it is missing)
and dropping empty lines, which would otherwise become empty calibration samples.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from datasets import Dataset
from loguru import logger

__all__ = [
    "check_prompt_count",
    "heldout_tokens",
    "leading_tokens",
    "load_texts",
    "prompts_from_texts",
]

#: file suffix -> ``datasets`` packaged loader
_LOADERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".txt": "text", ".parquet": "parquet"}
#: loader -> what a readable file of its kind holds (named in error messages)
_FORMATS = {
    "json": "a JSON list of records or one JSON record per line",
    "csv": "a header line naming the columns, then one sample per line",
    "text": "UTF-8 text, one sample per line",
    "parquet": "a parquet table",
}


def load_texts(dataset, text_column: str = "text") -> list[str]:
    """Non-empty calibration texts from ``dataset`` (see the module docstring)."""
    source = "calibration dataset"
    if isinstance(dataset, str) and ("\n" in dataset or len(dataset) > 255):
        # no file name has a line break or more than 255 characters: text, not a path
        raise ValueError(
            f"a str dataset names a file, but {dataset[:30]!r}... is text; pass texts as a "
            "list of strings ([text])"
        )
    if isinstance(dataset, (str, os.PathLike)) and not isinstance(dataset, Dataset):
        path = Path(dataset).expanduser()
        if path.is_dir():
            raise IsADirectoryError(
                f"calibration dataset {dataset} is a directory; pass one local "
                f"{'/'.join(_LOADERS)} file in it"
            )
        if not path.is_file():
            raise FileNotFoundError(
                f"no such calibration file: {dataset}; pass a local "
                f"{'/'.join(_LOADERS)} file (hub dataset names are not downloaded)"
            )
        dataset, source = _read_file(path), str(path)
    if isinstance(dataset, Dataset):
        if text_column not in dataset.column_names:
            raise ValueError(
                f"{source} has no {text_column!r} column (columns: "
                f"{', '.join(dataset.column_names) or 'none'}); pass --text-column NAME "
                "(text_column= in quantize()) naming the column that holds the text"
            )
        texts = dataset[text_column]
        if texts and not all(isinstance(t, str) for t in texts):
            kind = type(next(t for t in texts if not isinstance(t, str))).__name__
            raise ValueError(
                f"column {text_column!r} of {source} holds {kind}, not text; pass --text-column "
                f"naming a text column (columns: {', '.join(dataset.column_names)})"
            )
        return [t for t in texts if t.strip()]
    if isinstance(dataset, Sequence) and all(isinstance(t, str) for t in dataset):
        return [t for t in dataset if t.strip()]
    raise TypeError(
        f"unsupported calibration dataset type {type(dataset).__name__}; pass a list of "
        "strings, a datasets.Dataset with a text column, or a local "
        f"{'/'.join(_LOADERS)} path"
    )


def _read_file(path: Path) -> Dataset:
    from datasets import load_dataset
    from datasets.utils import logging as datasets_logging
    from datasets.utils.tqdm import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    loader = _LOADERS.get(path.suffix.lower())
    if loader is None:
        raise ValueError(
            f"cannot read calibration file {path}: unknown suffix {path.suffix!r}; use one of "
            f"{', '.join(_LOADERS)}"
        )
    size = path.stat().st_size
    if size == 0 or (size < 4096 and not path.read_bytes().strip()):
        raise ValueError(
            f"calibration file {path} is empty; pass a file with text ({_FORMATS[loader]})"
        )
    bars_were_disabled = are_progress_bars_disabled()
    verbosity = datasets_logging.get_verbosity()
    disable_progress_bars()
    datasets_logging.set_verbosity(datasets_logging.CRITICAL)  # the error below names why
    try:
        return load_dataset(loader, data_files=str(path), split="train")
    except Exception as err:  # datasets raises its own types for malformed files
        raise ValueError(f"cannot read calibration file {path}: {_reason(err, loader)}") from err
    finally:
        datasets_logging.set_verbosity(verbosity)
        if not bars_were_disabled:
            enable_progress_bars()


def _reason(err: BaseException, loader: str) -> str:
    """The innermost cause of a ``datasets`` error, named: its own message is often generic
    ("An error occurred while generating the dataset") or empty."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    if isinstance(err, UnicodeDecodeError):
        return f"it is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8"
    message = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {message}; the file must hold {_FORMATS[loader]}"


def check_prompt_count(count: int | None, name: str = "max_prompts") -> None:
    """Refuse a count of prompts that is not a positive integer (``None``: no limit).

    :func:`prompts_from_texts` stops once it holds ``count`` prompts, so 0 or -1 would quietly
    run one prompt; this fails first, before any work.
    """
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ValueError(f"{name} must be a positive integer (or None: every text), got {count!r}")


def leading_tokens(tokenizer, text: str, count: int) -> list[int]:
    """The first ``count`` token ids of ``text`` (fewer if it has fewer), tokenizing only a
    prefix: a corpus of one multi-megabyte line took minutes and gigabytes to tokenize whole
    for 32 tokens. The prefix grows (doubling) until the first ``count`` ids no longer change
    when it doubles, so a token cut at the prefix's end is never kept."""

    def ids(chars: int) -> list[int]:
        return tokenizer(text[:chars], add_special_tokens=False)["input_ids"]

    chars = 8 * count + 64
    first = ids(chars)
    while chars < len(text):
        longer = ids(2 * chars)
        if len(first) > count and longer[:count] == first[:count]:
            return first[:count]
        chars, first = 2 * chars, longer
    return first[:count]


def prompts_from_texts(
    texts: Sequence[str],
    tokenizer,
    prompt_length: int,
    max_prompts: int | None = None,
    *,
    need: str | None = None,
) -> list[torch.Tensor]:
    """The first ``prompt_length`` tokens of every text that has that many (one prompt per
    text); fewer than ``max_prompts`` are logged with the reason.

    :param need: why the cut is ``prompt_length`` tokens long and how to shorten it, named
        in the error when no text is long enough (default: the rollout prompt's settings)
    """
    check_prompt_count(max_prompts)
    prompts, short = [], 0
    for text in texts:
        ids = leading_tokens(tokenizer, text, prompt_length)
        if len(ids) >= prompt_length:
            prompts.append(torch.tensor(ids[:prompt_length]))
        else:
            short += 1
        if max_prompts is not None and len(prompts) >= max_prompts:
            break
    if not prompts:
        raise ValueError(
            f"the calibration set is empty or too short: none of its {len(texts)} texts has "
            f"{prompt_length} tokens. "
            + (
                need
                or "Pass longer texts or a shorter prompt (--prompt-length, prompt_length= in "
                "quantize(), or FAIRCalibModifier.stage1.prompt_length)."
            )
        )
    if max_prompts is not None and len(prompts) < max_prompts:
        logger.warning(
            f"asked for {max_prompts} prompts of {prompt_length} tokens, {len(prompts)} usable: "
            f"{len(texts)} texts (one prompt each, a long text is cut), {short} of them shorter "
            f"than {prompt_length} tokens"
        )
    return prompts


def heldout_tokens(tokenizer, texts: Sequence[str], length: int) -> list[torch.Tensor]:
    """The first ``length`` tokens of each held-out text (the ELBO perplexity's input); texts
    of fewer than two tokens are left out."""
    tokens = [torch.tensor(leading_tokens(tokenizer, text, length)) for text in texts]
    return [t for t in tokens if t.numel() > 1]
