"""The device steps of one ``integration/run_experiments.py`` call, after every input checked.

Kept apart from the runner's argument and row checks so that those (and ``--check-only``)
read as the list of what is refused, and these as the order a call spends its time in:
the reload preflight, the models, the benchmark processes under the deadline, the packing.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

from integration.experiment_runs import (
    Run,
    export_model,
    pack_family,
    pack_out,
    restore_model,
    run_under_deadline,
    tail,
)

ROOT = Path(__file__).resolve().parent.parent
#: what the preflight checks: the scheme families the jobs run, through GPTQ
PREFLIGHT = ["--schemes", "W4A4_G128_PACKED", "NVFP4", "--methods", "gptq"]
#: seconds of the budget left for merging and packing once the benchmarks stop
RESERVE = 30


def _python(script: str, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "integration" / script), *args]


def preflight(device: str, wd: Path, out: Path, env: dict, log) -> bool:
    """Every checkpoint must reload exactly on the device before any benchmark starts (a
    reload left on the CPU once failed every row of four calls); once per machine: a warm one
    keeps the mark in ``wd``."""
    mark = wd / "preflight.ok"
    if mark.exists():
        log("preflight: passed earlier on this machine")
        return True
    with open(out / "preflight.log", "w") as f:
        done = subprocess.run(
            _python("check_reload.py", "--device", device, *PREFLIGHT),
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )
    if done.returncode != 0:
        return False
    mark.touch()
    log("preflight: every reload exact")
    return True


def models(args, families, given, presets, wd: Path, out: Path, env, log) -> dict[str, Path]:
    """Each family's model directory (only those that exist): given, reused, restored from
    ``.models/`` or trained, one family at a time."""
    found = {}
    for family in families:
        if family in given:
            found[family] = given[family]
            log(f"model-{family}: {given[family]} (--model-dir)")
            continue
        model = wd / f"model-{family}"
        parts = sorted((ROOT / ".models").glob(f"model-{family}.tgz.part*"))
        if not (model / "config.json").is_file() and parts:
            restore_model(parts, wd)
            log(f"model-{family}: restored from .models ({len(parts)} parts)")
        elif (model / "config.json").is_file():
            log(f"model-{family}: reused")
        else:
            train = _python("train_dllm.py", "--preset", presets[family], "--device", args.device)
            began = time.monotonic()
            with open(wd / f"train-{family}.log", "w") as f:
                code = subprocess.run(
                    train + ["--out", str(model)], stdout=f, stderr=subprocess.STDOUT, env=env
                ).returncode
            took = time.monotonic() - began
            log(f"model-{family}: trained in {took:.0f}s, preset {presets[family]} (exit {code})")
            if code != 0:
                log(tail(wd / f"train-{family}.log", 10))
            elif args.export_models:
                written = export_model(model, out)
                log(f"model-{family}: exported as {len(written)} parts")
        if (model / "config.json").is_file():
            found[family] = model
    return found


def benchmark_runs(plan, model: Path, args, work: Path) -> list[Run]:
    """One process per seed and method group of ``plan`` (benchmark.py interleaves the rows
    over the groups, so each starts at the front of the list)."""
    command = _python("benchmark.py", "--model", str(model), "--corpus", "stdlib")
    methods = ["--methods", *plan.rows]
    for name, path in plan.recipes.items():
        methods += ["--recipe", f"{name}={path}"]
    sizes = ["--eval-prompts", str(args.eval_prompts)]
    sizes += ["--calibration-prompts", str(args.calibration_prompts)]
    runs = []
    for seed in args.seeds:
        for group in range(1, plan.groups + 1):
            name = f"seed{seed}" + (f"-g{group}" if plan.groups > 1 else "")
            split = ["--method-group", f"{group}/{plan.groups}"] if plan.groups > 1 else []
            bench = work / f"bench-{plan.family}" / name
            runs.append(
                Run(
                    job=plan.name,
                    name=name,
                    command=command
                    + ["--seeds", str(seed), "--out", str(bench)]
                    + methods
                    + sizes
                    + list(plan.job.args)
                    + args.extra
                    + split,
                    out=bench,
                    log=work / f"bench-{plan.family}-{name}.log",
                )
            )
    return runs


def run_call(args, plans, given, presets, env, out: Path, log, start: float, names) -> int:
    """Preflight, models, benchmarks under the deadline, packing; the call's exit status."""
    scratch = Path(args.scratch).resolve()
    wd = scratch / "wd"
    wd.mkdir(parents=True, exist_ok=True)
    if not preflight(args.device, wd, out, env, log):
        log(tail(out / "preflight.log", 10))
        message = f"preflight failed: reloads are not exact on {args.device} ({out}/preflight.log)"
        log(message)
        print(message, file=sys.stderr)
        pack_out(out, names)
        return 1
    families = list(dict.fromkeys(plan.family for plan in plans))  # in the order given
    found = models(args, families, given, presets, wd, out, env, log)
    status, runs = 0, {}
    for plan in plans:
        if plan.family not in found:
            log(f"== {plan.name} skipped: no model-{plan.family}")
            status = 1
            continue
        work = scratch / f"w-{plan.name}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        train_log = wd / f"train-{plan.family}.log"
        if train_log.is_file():
            shutil.copy(train_log, work)
        runs[plan.name] = (work, benchmark_runs(plan, found[plan.family], args, work))
    deadline = None
    if args.budget > 0:
        deadline = max(start + args.budget - RESERVE, time.monotonic() + 1)
        log(f"benchmarks stop at {deadline - start:.0f}s (budget {args.budget:.0f}s)")
    every = [run for _, job_runs in runs.values() for run in job_runs]
    run_under_deadline(every, env, deadline, log)
    for run in every:
        if not run.stopped and run.process.returncode != 0:
            status = 1
            log(f"== {run.label} failed (exit {run.process.returncode}):\n{tail(run.log, 15)}")
    for plan in plans:
        if plan.name not in runs:
            continue
        work, job_runs = runs[plan.name]
        recipes = out / plan.name / "recipes"
        dest = out / plan.name / f"{plan.family}.tgz"
        if not pack_family(job_runs, plan.family, work, found[plan.family], dest, recipes, env):
            status = 1
            log(f"{plan.name}: no finished row, or the merge failed ({work}/merge-*.log)")
        log(f"{plan.name}: packed {dest.name}")
    if args.device != "cpu":
        try:
            smi = ["nvidia-smi", "--query-gpu=name,memory.used", "--format=csv"]
            log(subprocess.run(smi, capture_output=True, text=True).stdout.strip())
        except OSError:
            pass
    pack_out(out, names)
    log(f"done (exit {status})")
    return status
