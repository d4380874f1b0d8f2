"""One run per output directory: an exclusive ``flock`` on ``.NAME.lock`` beside the target.

:func:`output_lock` is held from the check to the save (``quantize`` takes it right after
:func:`~fair_calib_llmc.io.output_dir.check_output_dir`); a second run into the same target
fails at once, naming the PID that holds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from fair_calib_llmc.io.output_dir import OutputDirError, work_dir

__all__ = ["output_lock", "remove_held_lock_files"]

#: Lock files this process holds (path -> [descriptor, depth]): re-entrant, because an flock
#: taken twice by one process through two descriptors would refuse the second.
_HELD_LOCKS: dict[Path, list[int]] = {}


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
    path = work_dir(target) / f".{target.name}.lock"
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


def remove_held_lock_files() -> None:
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
