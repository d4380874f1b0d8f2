"""Run jobs of the experiment matrix (``integration/experiments.yaml``) in one device call.

    python integration/run_experiments.py [--family F] [FAMILY:]JOB... [--rows SPEC=ROW,ROW]
        [--groups [SPEC=]N] [--budget S] [--seeds 0 1 2] [--export-models] [--check-only]
        [--device cuda|cpu] [--model-dir FAMILY=PATH] [--out DIR] [-- BENCHMARK ARGS...]

e.g. ``run_experiments.py dream:learned llada:ag128 llada:ag32 --groups 2``. A JOB without a
family takes ``--family`` (llada). What one call does, in order:

1. carried wheels: where ``.whl/`` exists and the device is not the CPU, they are installed into
   /tmp/site (the device image has torch, the rest comes as wheels) before the package is
   imported, and every process gets ``PYTHONPATH=/tmp/site:<checkout>``;
2. every job, row, group and model directory named is checked, and every row's recipe written
   to ``$OUT/<family>-<job>/recipes/`` and loaded, before any work: a typo must not cost the
   call (``--check-only`` stops here);
3. the reload preflight (``integration/check_reload.py``), once per machine: every checkpoint
   must reload exactly on the device before any benchmark starts;
4. each family's reference model (``train_dllm.REFERENCE_PRESETS``), one family at a time (two
   trainings side by side took as long as both in a row): reused where the machine still has
   it, else restored from ``.models/model-<family>.tgz.part*``, else trained. Training takes
   about half a call, so ``--export-models`` returns each model trained here as
   ``$OUT/model-<family>.tgz.partNN`` for a later call to carry instead (its rows then pair
   on the same files, whatever the training's determinism: retrained models have matched to
   the last digit so far, though cuDNN attention's backward warns it is non-deterministic);
5. one ``integration/benchmark.py`` process per job x seed x method group, all at once on the
   one device (small models leave it mostly idle; more than its memory holds are refused in
   step 2, :func:`check_gpu_memory`), stopped ``--budget`` seconds after the call
   started, less 30 s for merging and packing; every row finished by then is kept;
6. each job's runs merged (``integration/merge_results.py``) into ``<family>-<job>/<family>.tgz``
   (``pack-<family>/``: results.md/json, per-run results-*.json, logs, training_log.json,
   the rows' recipes); then everything written into ``$OUT`` but ``driver.log`` and the model
   parts is packed as ``$OUT/jobs.tgz`` (a device call returns at most 8 files).

``$OUT/driver.log`` has the progress: checks, model times, every finished row with its Stage I
/ II seconds, each process's exit. Exit 2 on bad input (one line naming the fix), 1 if a job
failed (no model, no finished row, a failed merge or a process that crashed), else 0.
Replaces the former side_by_side.sh, reference_benchmark.sh, *_benchmark.sh and
recipe_variant(s) scripts.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SITE = Path("/tmp/site")
#: GPU memory one benchmark process holds at 256 evaluation prompts, at its peak (it decodes
#: every prompt in one batch, so the part above a 1 GiB base scales with them); the
#: measurement is in docs/results.md ("The runner's process count")
PROCESS_GIB_AT_256 = 6.5


class UsageError(Exception):
    """Bad input, found before any work; the message names the fix."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the usage block
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def parse_args(argv):
    parser = _Parser(prog="run_experiments.py", description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("specs", nargs="+", metavar="[FAMILY:]JOB", help="the jobs, each once")
    add("--family", default="llada", help="the family of a JOB written without one")
    add("--rows", action="append", default=[], metavar="SPEC=ROW,ROW", help="a job's rows")
    add("--groups", action="append", default=[], metavar="[SPEC=]N", help="processes a seed")
    add("--seeds", nargs="+", type=int, default=[0, 1, 2])
    add("--budget", type=float, default=560, help="seconds for the call (0: no deadline)")
    add("--eval-prompts", type=int, default=256)
    add("--calibration-prompts", type=int, default=64)
    add("--export-models", action="store_true", help="return each model trained here")
    add("--check-only", action="store_true", help="check the rows and recipes, then stop")
    add("--device", default="cuda")
    add("--model-dir", action="append", default=[], metavar="FAMILY=PATH", help="no training")
    add("--out", default=os.environ.get("OUT"), help="the folder that comes back ($OUT)")
    add("--scratch", default="/tmp", help="models and preflight mark (wd/), work dirs")
    add("--experiments", default=str(ROOT / "integration" / "experiments.yaml"))
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: len(argv) - len(extra) - (1 if extra else 0)])
    if "--" in argv and not extra:
        parser.error("nothing after --; put integration/benchmark.py arguments there")
    if args.budget < 0:
        parser.error("--budget takes seconds >= 0 (0: no deadline)")
    if not args.out:
        parser.error("set --out (or $OUT) to the folder that comes back")
    args.extra = extra
    return args


@dataclass
class Plan:
    """One family-job of the call: its rows in order and processes per seed."""

    family: str
    job: object  # experiments.Job
    rows: tuple[str, ...]
    groups: int
    recipes: dict | None = None  # row -> written recipe path (declared rows only)

    @property
    def name(self) -> str:
        return f"{self.family}-{self.job.name}"


def _key(spec: str, default: str, families, experiments) -> tuple[str, str]:
    family, sep, job = spec.rpartition(":")
    family = family if sep else default
    if family not in families:
        raise UsageError(f"unknown family in {spec} ({', '.join(families)}); write FAMILY:JOB")
    if job not in experiments.jobs:
        raise UsageError(
            f"unknown job {family}:{job}; use one of {', '.join(experiments.jobs)} "
            f"(jobs of {experiments.source})"
        )
    return family, job


def make_plans(args, experiments, families) -> list[Plan]:
    """The call's jobs with their rows and groups, every name checked (UsageError)."""
    keys = []
    for spec in args.specs:
        key = _key(spec, args.family, families, experiments)
        if key in keys:
            raise UsageError(f"{':'.join(key)} given twice; name each job once")
        keys.append(key)

    def target(option: str, spec: str) -> tuple[str, str]:
        key = _key(spec, args.family, families, experiments)
        if key not in keys:
            raise UsageError(f"{option} {spec}: {':'.join(key)} is not a job of this call")
        return key

    rows = {}
    for item in args.rows:
        spec, sep, names = item.partition("=")
        if not sep or not names:
            raise UsageError(f"--rows {item}: write --rows [FAMILY:]JOB=ROW,ROW")
        key = target("--rows", spec)
        if key in rows:
            raise UsageError(f"--rows {spec} given twice; list all its rows once")
        job = experiments.jobs[key[1]]
        picked = tuple(names.split(","))
        if len(set(picked)) != len(picked):
            raise UsageError(f"--rows {spec}: a row is named twice; name each row once")
        for name in picked:
            if name not in job.rows:
                raise UsageError(
                    f"--rows {spec}: {name} is not a row of job {job.name} "
                    f"(its rows: {' '.join(job.rows)})"
                )
        rows[key] = picked
    groups, default_groups = {}, 1
    for item in args.groups:
        spec, sep, count = item.rpartition("=")
        if not count.isdigit() or int(count) < 1:
            raise UsageError(f"--groups {item}: write --groups N or --groups [FAMILY:]JOB=N")
        if sep:
            groups[target("--groups", spec)] = int(count)
        else:
            default_groups = int(count)
    plans = []
    for key in keys:
        job = experiments.jobs[key[1]]
        picked = rows.get(key, job.rows)
        count = min(groups.get(key, default_groups), len(picked))  # no empty group
        plans.append(Plan(key[0], job, picked, count))
    return plans


def check_gpu_memory(processes: int, eval_prompts: int, total_gib: float) -> None:
    """Refuse, before any work, more benchmark processes than the device's memory holds (a
    process that runs out fails, and its rows are lost)."""
    need = processes * (1.0 + (PROCESS_GIB_AT_256 - 1.0) * eval_prompts / 256)
    if need > total_gib:
        raise UsageError(
            f"{processes} benchmark processes at {eval_prompts} evaluation prompts need about "
            f"{need:.0f} GiB of GPU memory, the device has {total_gib:.0f}: use fewer --groups "
            "or seeds, or split the jobs over calls"
        )


def model_dirs(args, families) -> dict[str, Path]:
    """``--model-dir FAMILY=PATH``: a model to use as it is (a smoke run on a small model)."""
    dirs = {}
    for item in args.model_dir:
        family, sep, path = item.partition("=")
        if not sep or family not in families:
            raise UsageError(f"--model-dir {item}: write FAMILY=PATH ({', '.join(families)})")
        if not (Path(path) / "config.json").is_file():
            raise UsageError(f"--model-dir {item}: no config.json in {path}")
        dirs[family] = Path(path).resolve()
    return dirs


def install_wheels(out: Path, env: dict) -> str:
    """The carried wheels into /tmp/site, importable here and in every process started; a
    line for the driver log (pip's own output is in ``$OUT/pip.log``)."""
    wheels = sorted(str(p) for p in (ROOT / ".whl").glob("*.whl"))
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
    pip += ["--no-compile", "--no-cache-dir", "--upgrade", "--target", str(SITE), *wheels]
    with open(out / "pip.log", "w") as log:
        code = subprocess.run(pip, stdout=log, stderr=subprocess.STDOUT).returncode
    env["PYTHONPATH"] = f"{SITE}{os.pathsep}{ROOT}"
    sys.path[:0] = [str(SITE)]
    importlib.invalidate_caches()
    return f"wheels: {len(wheels)} into {SITE} (pip exit {code})"


def main(argv=None) -> int:
    start = time.monotonic()
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env, wheels = dict(os.environ), None
    if (ROOT / ".whl").is_dir() and args.device != "cpu":
        wheels = install_wheels(out, env)  # before anything below imports the package
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from integration.experiment_runs import DriverLog
    from integration.experiments import ExperimentsError, check_rows, load_experiments
    from integration.train_dllm import REFERENCE_PRESETS

    log = DriverLog(out / "driver.log", start)
    log(f"jobs: {' '.join(args.specs)} (default family {args.family}), device {args.device}")
    if wheels:
        log(wheels)
    try:
        experiments = load_experiments(args.experiments)
        plans = make_plans(args, experiments, list(REFERENCE_PRESETS))
        given = model_dirs(args, list(REFERENCE_PRESETS))
        if args.device != "cpu":
            import torch

            if torch.cuda.is_available():  # not on the machine that only checks the rows
                total = torch.cuda.get_device_properties(0).total_memory / 2**30
                processes = sum(len(args.seeds) * plan.groups for plan in plans)
                check_gpu_memory(processes, args.eval_prompts, total)
        for plan in plans:
            shutil.rmtree(out / plan.name, ignore_errors=True)
            plan.recipes = check_rows(
                experiments, plan.rows, out / plan.name / "recipes", plan.family
            )
            log(f"== {plan.name}: rows {' '.join(plan.rows)}; {plan.groups} group(s) a seed")
            log(f"{plan.name}: {len(plan.rows)} rows, every recipe loads")
    except (UsageError, ExperimentsError, ValueError) as err:  # RecipeError is a ValueError
        message = str(err).splitlines()[0]
        log(f"bad input: {message}")
        print(f"run_experiments.py: {message}", file=sys.stderr)
        return 2
    names = ["pip.log", "preflight.log"] + [plan.name for plan in plans]
    if args.check_only:
        from integration.experiment_runs import pack_out

        pack_out(out, names)
        log("check only: done")
        return 0
    from integration.experiment_steps import run_call

    return run_call(args, plans, given, REFERENCE_PRESETS, env, out, log, start, names)


if __name__ == "__main__":
    sys.exit(main())
