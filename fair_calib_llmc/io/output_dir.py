"""Which directory may receive a checkpoint or results: the checks that run before any work.

* :func:`check_output_dir` runs first (``quantize`` calls it before Stage I). It refuses an
  existing file, a non-empty directory (unless ``overwrite``), the model's own directory, the
  working directory and any directory that contains one of them (even with ``overwrite``), a
  place that cannot be written (read-only directory or mount, ``/proc``), and, when the
  expected size is known, a disk without room for it. It also clears what an earlier run of
  the same target left behind when it was killed (``.NAME.partial-*`` and ``.NAME.old-*``).
* :func:`check_results_dir` gives ``evaluate`` and ``diagnose`` the same rules for their
  results directories (which are written into, not replaced).

A mount point (a container volume, ``-v host:/out``) cannot be renamed over or moved aside
(``EBUSY``): the save's hidden files go inside it (:func:`work_dir`), so such a target is
checked for writability inside the mount, and a non-empty one cannot be replaced. The save
itself is :mod:`fair_calib_llmc.io.checkpoint`'s, the lock :mod:`fair_calib_llmc.io.output_lock`'s.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from loguru import logger

__all__ = [
    "OutputDirError",
    "check_output_dir",
    "check_results_dir",
    "expected_checkpoint_bytes",
    "make_dir",
    "make_name",
    "model_directory",
    "remove_stale_leftovers",
    "work_dir",
]


#: Free space asked for on top of the expected checkpoint size (config, tokenizer, recipe).
_SPACE_MARGIN = 1.1


class OutputDirError(ValueError):
    """The output directory cannot (or must not) receive the checkpoint."""


def model_directory(model) -> Path | None:
    """The local directory the model was loaded from (``config._name_or_path``), if any."""
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    path = Path(name).expanduser()
    return path.resolve() if name and path.is_dir() else None


def expected_checkpoint_bytes(model, weight_bits: int = 4) -> int:
    """A lower bound of the compressed checkpoint's size: ``weight_bits`` per linear weight
    (the LM head stays in full precision), every other tensor it will hold at its current
    size: parameters and buffers, each under every name it is saved under (an online
    transform shared by the layers, float64, is written once per layer)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    quantized = {
        id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head
    }
    tensors = [
        *(p for _, p in model.named_parameters(remove_duplicate=False)),
        *(b for _, b in model.named_buffers(remove_duplicate=False)),
    ]
    total = 0.0
    for p in tensors:
        per_element = weight_bits / 8 if id(p) in quantized else p.element_size()
        total += p.numel() * per_element
    return int(total)


@dataclass(frozen=True)
class _Writes:
    """What goes into an output directory, in the words of its error messages."""

    noun: str  # what cannot be written
    harm: str  # why a protected directory is refused
    replace: str  # what --overwrite does
    suffix: str  # of the suggested new directory's name


_CHECKPOINT = _Writes(
    "the checkpoint",
    "writing the checkpoint there would delete it",
    "to replace it (the old one is deleted only after the new checkpoint is in place)",
    "-w4a4",
)


_RESULTS = _Writes(
    "the results",
    "results written there would replace or mix with its files",
    "to write over its results files",
    "-evaluation",
)


def check_output_dir(
    output_dir: str | os.PathLike,
    *,
    model_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    expected_bytes: int | None = None,
) -> Path:
    """Return the resolved target or raise :class:`OutputDirError` naming the fix.

    :param model_dir: the directory the FP model was loaded from; never written to
    :param overwrite: allow replacing a non-empty directory (moved aside, deleted last)
    :param expected_bytes: checkpoint size to check the free disk space against
    """
    protected = {"the model's own directory": model_dir} if model_dir is not None else {}
    target = _check_target(output_dir, protected, overwrite, _CHECKPOINT)
    if is_mount(target) and _user_entries(target):
        raise OutputDirError(
            f"output directory {str(output_dir)!r} is a mount point and not empty; a mount "
            "point cannot be moved aside to replace it: empty it, or choose a new directory "
            f"inside it, e.g. {target / 'checkpoint'}"
        )
    _check_writable(_nearest_existing(work_dir(target)), str(output_dir), _CHECKPOINT)
    if expected_bytes:
        _check_space(_nearest_existing(target.parent), str(output_dir), expected_bytes)
    remove_stale_leftovers(target)
    return target


def check_results_dir(
    out_dir: str | os.PathLike,
    model_dirs: dict[str, str | os.PathLike],
    *,
    overwrite: bool = False,
    default: str | os.PathLike | None = None,
) -> Path:
    """:func:`check_output_dir`'s rules for the results of ``evaluate`` and ``diagnose``.

    Results (``results.md``, ``results.json``, plots) are written into the directory, so a
    non-empty one needs ``overwrite`` (its other files stay), and no directory inside a model
    directory is accepted, except ``default`` (evaluate's ``STUDENT/evaluation/``).

    :param model_dirs: name -> model directory (``{"the student's directory": ...}``)
    """
    target = _check_target(out_dir, model_dirs, overwrite, _RESULTS)
    allowed = Path(default).expanduser().resolve() if default is not None else None
    for what, path in model_dirs.items():
        path = Path(path).expanduser().resolve()
        if path in target.parents and target != allowed:
            raise OutputDirError(
                f"output directory {str(out_dir)!r} is inside {what} ({path}); results must "
                "not be written into a checkpoint: choose a directory outside it, e.g. "
                f"{path.parent / (path.name + _RESULTS.suffix)}"
            )
    _check_writable(_nearest_existing(target), str(out_dir), _RESULTS)
    return target


def _check_target(output_dir, model_dirs: dict, overwrite: bool, writes: _Writes) -> Path:
    """The checks every output directory gets: not the working directory or a model
    directory, nor one containing them; not a file; not a non-empty directory without
    ``overwrite``; a parent that can exist."""
    shown = str(output_dir)
    target = Path(output_dir).expanduser().resolve()
    protected = {"the working directory": Path.cwd(), **model_dirs}
    for what, path in protected.items():
        path = Path(path).expanduser().resolve()
        if target == path or target in path.parents:
            relation = "is" if target == path else "contains"
            raise OutputDirError(
                f"output directory {shown!r} {relation} {what} ({path}); {writes.harm}: "
                f"choose a new directory, e.g. {path.parent / (path.name + writes.suffix)}"
            )
    if target.exists() and not target.is_dir():
        raise OutputDirError(
            f"output directory {shown!r} is an existing file; choose a directory path"
        )
    if _user_entries(target) and not overwrite:
        raise OutputDirError(
            f"output directory {shown!r} exists and is not empty; choose a new directory or "
            f"pass --overwrite (overwrite=True in Python) {writes.replace}"
        )
    parent = _nearest_existing(target.parent)
    if not parent.is_dir():
        raise OutputDirError(f"cannot create {shown!r}: {parent} is a file, not a directory")
    return target


def _check_space(directory: Path, shown: str, expected_bytes: int) -> None:
    free = shutil.disk_usage(directory).free
    if free < expected_bytes * _SPACE_MARGIN:
        raise OutputDirError(
            f"not enough disk space for {shown!r}: the checkpoint needs about "
            f"{expected_bytes * _SPACE_MARGIN / 2**20:.0f} MiB, {directory} has "
            f"{free / 2**20:.0f} MiB free; free space or choose another disk"
        )


def remove_stale_leftovers(target: Path) -> None:
    """Clear what a killed run of ``target`` left: partial saves, and a moved-aside old
    checkpoint (put back if the new one never arrived, deleted if it did)."""
    if not target.parent.is_dir():
        return
    name = glob.escape(target.name)
    for path in sorted(work_dir(target).glob(f".{name}.partial-*")):
        if _owner_alive(path):
            continue
        logger.warning(f"removing {path}: an unfinished save of {target} by a run that ended")
        shutil.rmtree(path, ignore_errors=True)
    for path in sorted(target.parent.glob(f".{name}.old-*")):
        if _owner_alive(path):
            continue
        if target.exists():
            logger.warning(f"removing {path}: the checkpoint {target} replaced it")
            shutil.rmtree(path, ignore_errors=True)
        else:
            logger.warning(f"restoring {target} from {path}: its replacement never arrived")
            os.rename(path, target)


def is_mount(path: Path) -> bool:
    """An existing directory that is a mount point: it cannot be renamed or replaced."""
    return path.is_dir() and os.path.ismount(path)


def work_dir(target: Path) -> Path:
    """Where the hidden partial directory (and the lock) of ``target`` live: beside it, or
    inside it when it is a mount point (its parent may be another, even read-only, file
    system, and a rename across file systems fails)."""
    return target if is_mount(target) else target.parent


def _user_entries(target: Path) -> list[Path]:
    """What ``target`` holds besides this module's own hidden files (a mount point holds its
    partial directories and lock): the entries a save would replace."""
    if not target.is_dir():
        return []
    ours = (f".{target.name}.partial-", f".{target.name}.lock")
    return [p for p in target.iterdir() if not p.name.startswith(ours)]


def _owner_alive(path: Path) -> bool:
    """Whether the process named in ``.NAME.partial-PID-XXXX`` still runs (on this host)."""
    pid = path.name.rsplit("-", 2)[-2]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_writable(directory: Path, shown: str, writes: _Writes) -> None:
    """Create and remove a hidden directory: the only test that sees read-only mounts,
    ``/proc`` and permissions the way the save will."""
    try:
        probe = make_dir(directory, ".fair-calib-llmc-probe-")
        probe.rmdir()
    except OSError as err:
        raise OutputDirError(
            f"cannot write {writes.noun} {shown!r}: {directory} is not writable "
            f"({err.strerror}); choose a directory you can write to"
        ) from None


def make_name(parent: Path, prefix: str) -> Path:
    return parent / f"{prefix}{secrets.token_hex(4)}"


def make_dir(parent: Path, prefix: str) -> Path:
    """``mkdtemp`` with the umask's permissions instead of 0700."""
    for _ in range(100):
        path = make_name(parent, prefix)
        try:
            path.mkdir(mode=0o777)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a unique directory {prefix}* in {parent}")
