"""Writing a compressed checkpoint without ever losing a user's files.

Checks kept apart from the save, so the cheap ones run before any calibration work:

* :func:`check_output_dir` runs first (``quantize`` calls it before Stage I). It refuses an
  existing file, a non-empty directory (unless ``overwrite``), the model's own directory, the
  working directory and any directory that contains one of them (even with ``overwrite``), a
  place that cannot be written (read-only directory or mount, ``/proc``), and, when the
  expected size is known, a disk without room for it. It also clears what an earlier run of
  the same target left behind when it was killed (``.NAME.partial-*`` and ``.NAME.old-*``).
* :func:`check_results_dir` gives ``evaluate`` and ``diagnose`` the same rules for their
  results directories (which are written into, not replaced).
* :func:`save_atomically` writes into a hidden sibling ``.NAME.partial-PID-XXXX`` and renames
  it into place only after ``save_pretrained`` succeeded. An existing checkpoint is moved
  aside first and deleted only once the new one is in place (and moved back if the rename
  fails). SIGTERM and Ctrl-C during the save remove the partial directory before the process
  ends; after SIGKILL the next run of the same target removes it (and says so).

Two runs into one target: :func:`output_lock` holds ``.NAME.lock`` (beside the target, inside
it for a mount point) from the check to the save (``quantize`` takes it right after
:func:`check_output_dir`); a second run fails at once, naming the PID that holds it.

A mount point (a container volume, ``-v host:/out``) cannot be renamed over or moved aside
(``EBUSY``): the partial directory goes inside it instead and its files are moved up into place
(``config.json`` last). Such a target is checked for writability inside the mount, and a
non-empty one cannot be replaced.

The result carries the permissions a plain ``mkdir`` / ``open`` would give under the user's
umask: ``tempfile.mkdtemp`` makes its directory 0700 and safetensors writes shards 0600, which
would hide a shared checkpoint from the engine's service account.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import os
import secrets
import shutil
import signal
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from compressed_tensors.distributed import is_distributed, is_source_process
from loguru import logger
from safetensors import SafetensorError

from fair_calib_llmc.distributed import on_source_rank

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

#: Lock files this process holds (path -> [descriptor, depth]): re-entrant, because an flock
#: taken twice by one process through two descriptors would refuse the second.
_HELD_LOCKS: dict[Path, list[int]] = {}

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
    if _is_mount(target) and _user_entries(target):
        raise OutputDirError(
            f"output directory {str(output_dir)!r} is a mount point and not empty; a mount "
            "point cannot be moved aside to replace it: empty it, or choose a new directory "
            f"inside it, e.g. {target / 'checkpoint'}"
        )
    _check_writable(_nearest_existing(_work_dir(target)), str(output_dir), _CHECKPOINT)
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
    partial = _make_dir(_work_dir(target), f".{target.name}.partial-{os.getpid()}-")
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
        _remove_held_lock_files()
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
        return target, _make_dir(_work_dir(target), f".{target.name}.partial-{os.getpid()}-")

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


@contextlib.contextmanager
def output_lock(target: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive ``flock`` on ``.NAME.lock`` beside ``target`` for the ``with`` block.

    Without it two runs into one directory both pass :func:`check_output_dir`, both calibrate,
    and the last to save wins (or, without ``overwrite``, the second learns of the first only
    after its calibration). The lock is taken without waiting: a second run fails at once
    with :class:`OutputDirError` naming the holder's PID. Re-entrant within one process (the
    CLI, ``quantize()`` and ``save_atomically`` each take it); the kernel drops it when the
    process dies, so a killed run never leaves a stale lock (only, after SIGKILL, a file that
    the next run takes over).
    """
    target = Path(target).expanduser().resolve()
    path = _work_dir(target) / f".{target.name}.lock"
    if path in _HELD_LOCKS:
        _HELD_LOCKS[path][1] += 1
        try:
            yield target
        finally:
            _HELD_LOCKS[path][1] -= 1
        return
    created = _make_parents(target)
    try:
        _HELD_LOCKS[path] = [_acquire_lock(path, target), 1]
        try:
            yield target
        finally:
            fd = _HELD_LOCKS.pop(path)[0]
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # before unlocking: a waiting run then locks a fresh file
            os.close(fd)
    finally:
        for directory in reversed(created):  # a run that saved nothing leaves no directories
            with contextlib.suppress(OSError):
                directory.rmdir()


def _make_parents(target: Path) -> list[Path]:
    """Create ``target``'s missing parents (the lock lives there); return them, outermost
    first."""
    missing = [p for p in reversed(target.parents) if not p.exists()]
    target.parent.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_held_lock_files() -> None:
    """Before the process ends by a signal: the kernel drops its locks but not the files, and
    ``with`` blocks do not unwind."""
    for path in _HELD_LOCKS:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _acquire_lock(path: Path, target: Path) -> int:
    """Open, lock (without waiting) and sign ``path`` with this PID; return its descriptor."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            who = f"PID {holder}" if holder.isdigit() else "another process"
            raise OutputDirError(
                f"output directory {str(target)!r} is being written by another run "
                f"({who}, lock {path}); wait for it to finish or choose another directory"
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)  # the holder removed the file between our open and lock: take a fresh one


def remove_stale_leftovers(target: Path) -> None:
    """Clear what a killed run of ``target`` left: partial saves, and a moved-aside old
    checkpoint (put back if the new one never arrived, deleted if it did)."""
    if not target.parent.is_dir():
        return
    name = glob.escape(target.name)
    for path in sorted(_work_dir(target).glob(f".{name}.partial-*")):
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


# --- helpers ---------------------------------------------------------------------------------
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
    old = _make_name(target.parent, f".{target.name}.old-{os.getpid()}-")
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


def _is_mount(path: Path) -> bool:
    """An existing directory that is a mount point: it cannot be renamed or replaced."""
    return path.is_dir() and os.path.ismount(path)


def _work_dir(target: Path) -> Path:
    """Where the hidden partial directory (and the lock) of ``target`` live: beside it, or
    inside it when it is a mount point (its parent may be another, even read-only, file
    system, and a rename across file systems fails)."""
    return target if _is_mount(target) else target.parent


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
        probe = _make_dir(directory, ".fair-calib-llmc-probe-")
        probe.rmdir()
    except OSError as err:
        raise OutputDirError(
            f"cannot write {writes.noun} {shown!r}: {directory} is not writable "
            f"({err.strerror}); choose a directory you can write to"
        ) from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _make_name(parent: Path, prefix: str) -> Path:
    return parent / f"{prefix}{secrets.token_hex(4)}"


def _make_dir(parent: Path, prefix: str) -> Path:
    """``mkdtemp`` with the umask's permissions instead of 0700."""
    for _ in range(100):
        path = _make_name(parent, prefix)
        try:
            path.mkdir(mode=0o777)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a unique directory {prefix}* in {parent}")


def _apply_umask(directory: Path) -> None:
    mask = _umask()
    directory.chmod(0o777 & ~mask)
    for path in directory.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)
