"""What ``integration/run_experiments.py`` does with processes and files, apart from deciding it.

* :class:`DriverLog`: progress lines with the seconds since the call started, in
  ``$OUT/driver.log`` (returned by the device call even when the rest is cut) and on stdout.
* :func:`run_under_deadline`: every benchmark process at once, each in its own session so a
  stop reaches its children; at the deadline SIGTERM, and SIGKILL :data:`KILL_AFTER` seconds
  later (a process busy in a CUDA call can outlive SIGTERM). While they run it reads each
  run's ``results.json`` (rewritten after every row) and logs every finished row, so the log
  has per-row timings (a row's seconds: since its process's previous row, the first row
  including the model load and the full-precision reference) even when a process is cut.
* :func:`pack_family`: a family-job's runs merged and packed in the layout the results pages
  read (``<family>.tgz`` holding ``pack-<family>/``).
* :func:`export_model` / :func:`restore_model`: a trained model as parts of at most
  :data:`PART_BYTES` (a returned file is at most 16 MiB) and back, in Python rather than
  ``tar | split``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

#: seconds between SIGTERM and SIGKILL at the deadline
KILL_AFTER = 15
#: seconds between two looks at the runs' results while they work
POLL_SECONDS = 2.0
#: the size of one returned model part (``split -b 15M``)
PART_BYTES = 15 * 2**20


class DriverLog:
    """Append-only progress log; every line also goes to stdout (the device call's tail)."""

    def __init__(self, path: Path, start: float):
        self.path, self.start = path, start
        path.write_text("")

    def __call__(self, line: str) -> None:
        stamped = f"[{time.monotonic() - self.start:5.0f}s] {line}"
        with open(self.path, "a") as f:
            f.write(stamped + "\n")
        print(stamped, flush=True)


@dataclass
class Run:
    """One integration/benchmark.py process: a family-job's seed (and method group)."""

    job: str  # <family>-<job>
    name: str  # seed<S> or seed<S>-g<K>
    command: list[str]
    out: Path  # its results directory
    log: Path  # its stdout and stderr
    process: subprocess.Popen | None = None
    stopped: bool = False  # stopped at the deadline (not a failure of its own)
    seen: set = field(default_factory=set)  # (row, seed) already logged
    last: float = 0.0  # when it started, then when its latest row was seen

    @property
    def label(self) -> str:
        return f"{self.job} {self.name}"


def run_under_deadline(runs: list[Run], env: dict, deadline: float | None, log) -> None:
    """Start every run, log rows as they finish, stop what is left at ``deadline``
    (``time.monotonic()``; ``None``: no limit)."""
    for run in runs:
        run.out.parent.mkdir(parents=True, exist_ok=True)
        with open(run.log, "w") as out:
            run.process = subprocess.Popen(
                run.command,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own process group: the stop reaches children
            )
        run.last = time.monotonic()
        log(f"{run.label}: started (pid {run.process.pid})")
    while any(run.process.poll() is None for run in runs):
        if deadline is not None and time.monotonic() >= deadline:
            _stop([run for run in runs if run.process.poll() is None], log)
            break
        _log_rows(runs, log)
        time.sleep(POLL_SECONDS)
    _log_rows(runs, log)
    for run in runs:
        code = run.process.wait()
        how = "stopped at the deadline" if run.stopped else f"exit {code}"
        log(f"{run.label}: {how}")


def _signal(run: Run, sig: int) -> None:
    try:
        os.killpg(run.process.pid, sig)
    except ProcessLookupError:  # already gone
        pass


def _stop(running: list[Run], log) -> None:
    """SIGTERM every running process group, SIGKILL those still there KILL_AFTER s later."""
    for run in running:
        run.stopped = True
        _signal(run, signal.SIGTERM)
    log(f"deadline: SIGTERM to {', '.join(r.label for r in running)}")
    end = time.monotonic() + KILL_AFTER
    while time.monotonic() < end and any(r.process.poll() is None for r in running):
        time.sleep(0.2)
    for run in running:
        if run.process.poll() is None:
            _signal(run, signal.SIGKILL)
            log(f"{run.label}: SIGKILL ({KILL_AFTER}s after SIGTERM)")


def finished_rows(results: Path) -> list[dict]:
    """The method rows of a run's ``results.json`` so far (none while it is being written)."""
    try:
        rows = json.loads(results.read_text())["rows"]
    except (OSError, ValueError, KeyError):
        return []
    return [row for row in rows if row.get("seed") is not None]


def _log_rows(runs: list[Run], log) -> None:
    for run in runs:
        for row in finished_rows(run.out / "results.json"):
            key = (row["name"], row["seed"])
            if key in run.seen:
                continue
            run.seen.add(key)
            took, run.last = time.monotonic() - run.last, time.monotonic()
            if "frontier_flip_rate" not in row:
                log(f"{run.label}: {row['name']} failed: {str(row.get('error'))[:200]}")
                continue
            log(
                f"{run.label}: {row['name']} (seed {row['seed']}) done in {took:.0f}s, "
                f"Stage I {row.get('stage1_seconds', 0):.1f}s, "
                f"Stage II {row.get('stage2_seconds', 0):.1f}s, "
                f"frontier flips {row['frontier_flip_rate']:.4f}"
                + (f" ({row['error']})" if row.get("error") else "")
            )


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} missing)"


def pack_family(
    job_runs: list[Run],
    family: str,
    work: Path,
    model: Path,
    dest: Path,
    recipes: Path,
    env: dict,
) -> bool:
    """Merge a family-job's runs (integration/merge_results.py, in the call's ``env``: on the
    device the package and its wheels import only through its PYTHONPATH) and write ``dest``
    = ``<family>.tgz`` of ``pack-<family>/``: the training log(s), every run's log and its
    own ``results-<run>.json`` (a failed merge loses nothing), the merged ``results.*`` and
    ``flips.png``, and the rows' recipes. False where no run has results or the merge failed."""
    pack = work / f"pack-{family}"
    pack.mkdir(parents=True, exist_ok=True)
    done = sorted((r for r in job_runs if (r.out / "results.json").is_file()), key=lambda r: r.name)
    merged = work / f"bench-{family}" / "merged"
    ok = bool(done)
    if done:
        with open(work / f"merge-{family}.log", "w") as out:
            merge = subprocess.run(
                [sys.executable, str(Path(__file__).with_name("merge_results.py")), str(merged)]
                + [str(r.out) for r in done],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        ok = merge.returncode == 0
    copies = [work / f"train-{family}.log", work / f"merge-{family}.log"]
    copies += [r.log for r in job_runs] + [model / "training_log.json"]
    copies += [merged / name for name in ("results.json", "results.md", "flips.png")]
    for path in copies:
        if path.is_file():
            shutil.copy(path, pack / path.name)
    for run in done:
        shutil.copy(run.out / "results.json", pack / f"results-{run.name}.json")
    shutil.copytree(recipes, pack / "recipes", dirs_exist_ok=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dest, "w:gz") as tar:
        tar.add(pack, arcname=pack.name)
    return ok


def pack_out(out: Path, names: list[str]) -> None:
    """Everything the runner wrote into ``out`` but driver.log (and the model parts) as one
    ``jobs.tgz``: a device call returns at most 8 files. Other files in ``out`` stay."""
    packed = [name for name in names if (out / name).exists()]
    if not packed:
        return
    with tarfile.open(out / "jobs.tgz", "w:gz") as tar:
        for name in packed:
            tar.add(out / name, arcname=name)
    for name in packed:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


class _Parts(io.RawIOBase):
    """A write-only stream cut into ``<prefix>NN`` files of at most :data:`PART_BYTES`."""

    def __init__(self, prefix: Path):
        self.prefix, self.index, self.file, self.left = prefix, 0, None, 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data)
        while view:
            if self.left == 0:
                if self.file:
                    self.file.close()
                self.file = open(f"{self.prefix}{self.index:02d}", "wb")
                self.index, self.left = self.index + 1, PART_BYTES
            n = min(self.left, len(view))
            self.file.write(view[:n])
            view, self.left = view[n:], self.left - n
        return len(data)

    def close(self) -> None:
        if self.file:
            self.file.close()
        super().close()


def export_model(model: Path, out: Path) -> list[Path]:
    """``out/<model dir name>.tgz.partNN``: the model directory, gzipped tar, in parts."""
    parts = _Parts(out / f"{model.name}.tgz.part")
    with tarfile.open(fileobj=parts, mode="w|gz") as tar:
        tar.add(model, arcname=model.name)
    parts.close()
    return sorted(out.glob(f"{model.name}.tgz.part*"))


class _Joined(io.RawIOBase):
    """The concatenation of ``paths``, read in order (``cat parts``)."""

    def __init__(self, paths: list[Path]):
        self.paths, self.file = list(paths), None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while True:
            if self.file is None:
                if not self.paths:
                    return 0
                self.file = open(self.paths.pop(0), "rb")
            n = self.file.readinto(buffer)
            if n:
                return n
            self.file.close()
            self.file = None


def restore_model(parts: list[Path], into: Path) -> None:
    """Unpack parts written by :func:`export_model` into ``into``."""
    with tarfile.open(fileobj=io.BufferedReader(_Joined(sorted(parts))), mode="r|gz") as tar:
        if hasattr(tarfile, "data_filter"):  # refuse links and paths out of ``into``
            tar.extractall(into, filter="data")
        else:
            tar.extractall(into)
