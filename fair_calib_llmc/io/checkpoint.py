"""Writing a compressed checkpoint without ever losing a user's files.

:func:`save_atomically` writes into a hidden sibling ``.NAME.partial-PID-XXXX`` and renames it
into place only after ``save_pretrained`` succeeded. An existing checkpoint is moved aside
first and deleted only once the new one is in place (and moved back if the rename fails).
SIGTERM and Ctrl-C during the save remove the partial directory before the process ends; after
SIGKILL the next run of the same target removes it (and says so).

The checks that run before any work live in :mod:`fair_calib_llmc.io.output_dir` and the
one-run-per-target lock in :mod:`fair_calib_llmc.io.output_lock`; their public names are
re-exported here, where callers have always imported them.

A mount point (a container volume, ``-v host:/out``) cannot be renamed over: the partial
directory goes inside it instead and its files are moved up into place (``config.json`` last).

The result carries the permissions a plain ``mkdir`` / ``open`` would give under the user's
umask: ``tempfile.mkdtemp`` makes its directory 0700 and safetensors writes shards 0600, which
would hide a shared checkpoint from the engine's service account.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from compressed_tensors.distributed import is_distributed, is_source_process
from loguru import logger
from safetensors import SafetensorError

from fair_calib_llmc.distributed import on_source_rank
from fair_calib_llmc.io.output_dir import (
    OutputDirError,
    check_output_dir,
    check_results_dir,
    expected_checkpoint_bytes,
    make_dir,
    make_name,
    model_directory,
    remove_stale_leftovers,
    work_dir,
)
from fair_calib_llmc.io.output_lock import output_lock, remove_held_lock_files

__all__ = [
    "OutputDirError",
    "check_output_dir",
    "check_results_dir",
    "expected_checkpoint_bytes",
    "model_directory",
    "output_lock",
    "remove_stale_leftovers",
    "save_atomically",
]


def save_atomically(
    model,
    tokenizer,
    output_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    model_dir: str | os.PathLike | None = None,
    config_updates: dict | None = None,
) -> Path:
    """``save_pretrained(save_compressed=True)`` into a hidden sibling, then rename into place.

    ``config_updates`` are written into the saved ``config.json`` (not into the model's
    config): :func:`fair_calib_llmc.quantize` states the mask token it used there.

    Repeats the cheap :func:`check_output_dir` checks (the directory may have changed since).
    Under ``torchrun`` every rank must call this: llm-compressor's compressed save is
    collective (the ranks compress modules in parallel) and only the source rank writes, so
    the source rank alone prepares, fills and renames the directory.
    """
    model_dir = model_dir if model_dir is not None else model_directory(model)
    if is_distributed():
        return _save_distributed(model, tokenizer, output_dir, overwrite, model_dir, config_updates)
    # the size now, transforms and all: the check before calibration saw the model without them
    target = check_output_dir(
        output_dir,
        model_dir=model_dir,
        overwrite=overwrite,
        expected_bytes=(
            expected_checkpoint_bytes(model) if isinstance(model, torch.nn.Module) else None
        ),
    )
    with output_lock(target):
        try:
            return _save_locked(model, tokenizer, target, config_updates)
        except (OSError, SafetensorError) as err:
            if isinstance(err, OSError) and err.errno != errno.ENOSPC:
                raise
            if isinstance(err, SafetensorError) and "No space left" not in str(err):
                raise
            raise OSError(
                errno.ENOSPC,
                f"the disk filled while saving {target} (the partial checkpoint was removed); "
                "free space there or pass another output directory",
            ) from None


def _update_config(directory: Path, updates: dict | None) -> None:
    if not updates:
        return
    path = directory / "config.json"
    config = json.loads(path.read_text())
    if any(config.get(key) != value for key, value in updates.items()):
        path.write_text(json.dumps({**config, **updates}, indent=2, sort_keys=True) + "\n")


def _save_locked(model, tokenizer, target: Path, config_updates: dict | None = None) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = make_dir(work_dir(target), f".{target.name}.partial-{os.getpid()}-")
    try:
        with _raise_on_sigterm():
            with warnings.catch_warnings():
                # transformers warns about "offloaded modules (50GB default)" because
                # llm-compressor dispatches the model through accelerate hooks to save it
                warnings.filterwarnings("ignore", message=".*offloaded modules.*")
                model.save_pretrained(partial, save_compressed=True)
            _update_config(partial, config_updates)
            tokenizer.save_pretrained(partial)
            _apply_umask(partial)
            _swap_into_place(partial, target)
    except _Terminated:
        shutil.rmtree(partial, ignore_errors=True)
        logger.warning(f"SIGTERM while saving {target}: removed the partial checkpoint")
        remove_held_lock_files()
        signal.raise_signal(signal.SIGTERM)  # the default action again: end the process
        raise
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return target


def _save_distributed(model, tokenizer, output_dir, overwrite, model_dir, config_updates) -> Path:
    def begin() -> tuple[Path, Path]:
        target = check_output_dir(output_dir, model_dir=model_dir, overwrite=overwrite)
        target.parent.mkdir(parents=True, exist_ok=True)
        return target, make_dir(work_dir(target), f".{target.name}.partial-{os.getpid()}-")

    def finish() -> None:
        _update_config(partial, config_updates)
        tokenizer.save_pretrained(partial)
        _apply_umask(partial)
        _swap_into_place(partial, target)

    target, partial = on_source_rank(begin)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*offloaded modules.*")
            model.save_pretrained(partial, save_compressed=True)  # collective
        on_source_rank(finish)
    except BaseException:
        if is_source_process():
            shutil.rmtree(partial, ignore_errors=True)
        raise
    return target


class _Terminated(BaseException):
    """Raised by the SIGTERM handler so the partial directory is removed on the way out."""


@contextlib.contextmanager
def _raise_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into :class:`_Terminated` while it would otherwise kill the process.

    Only where SIGTERM has its default action (and in the main thread, where Python runs
    handlers): a program with its own handler keeps it, and its handler's exception still
    removes the partial directory.
    """
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM)
    if not main or previous != signal.SIG_DFL:
        yield
        return

    def handler(signum, frame):
        raise _Terminated()

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _swap_into_place(partial: Path, target: Path) -> None:
    if partial.parent == target:  # a mount point: the partial directory is inside it
        _move_contents_up(partial, target)
        return
    if not target.exists() or not any(target.iterdir()):
        os.replace(partial, target)  # a missing or empty target: one atomic rename
        return
    old = make_name(target.parent, f".{target.name}.old-{os.getpid()}-")
    os.rename(target, old)
    try:
        os.rename(partial, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _move_contents_up(partial: Path, target: Path) -> None:
    """Move the partial checkpoint's entries into ``target`` (which contains it), ``config.json``
    last so that no loader sees a checkpoint before all its files are there; on failure (or
    SIGTERM) the entries already moved go back, so the caller's cleanup removes them all."""
    names = sorted(os.listdir(partial), key=lambda name: name == "config.json")
    moved = []
    try:
        for name in names:
            os.rename(partial / name, target / name)
            moved.append(name)
    except BaseException:
        for name in reversed(moved):
            os.rename(target / name, partial / name)
        raise
    partial.rmdir()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _apply_umask(directory: Path) -> None:
    mask = _umask()
    directory.chmod(0o777 & ~mask)
    for path in directory.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)
