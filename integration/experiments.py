"""The experiments file (``integration/experiments.yaml``): its rows, its jobs, their recipes.

A row is a recipe and how it differs from it (``overrides`` through
:func:`fair_calib_llmc.recipe.with_overrides`, ``control`` for the tie-noise control); a job is
an ordered list of rows. The file is read and checked here, in one place, so that the runner
(``integration/run_experiments.py``) and the tests see the same rows, and a typo in a row or a
job fails before a device call spends anything.

The control is built here rather than spelled in a recipe file per baseline: one rule (the
parent recipe, then :class:`~fair_calib_llmc.stage2.equivalent_modifier.EquivalentRescaleModifier`
prepended with its defaults) serves every baseline, with or without a rotation.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = ROOT / "integration" / "experiments.yaml"

#: the stage a control row prepends (first: the rescale must precede any online transform)
CONTROL_STAGE = "equivalent_stage"
_ROW_KEYS = {"recipe", "overrides", "control"}
_JOB_KEYS = {"rows", "args"}


class ExperimentsError(ValueError):
    """A bad experiments file, or a row or job it does not have; the message is one line."""


@dataclass(frozen=True)
class Row:
    """One benchmark row declared in the file (a built-in method has none)."""

    name: str
    recipe: str
    overrides: dict = field(default_factory=dict)
    control: bool = False


@dataclass(frozen=True)
class Job:
    """An ordered list of row names, and benchmark.py arguments of this job only."""

    name: str
    rows: tuple[str, ...]
    args: tuple[str, ...] = ()


@dataclass(frozen=True)
class Experiments:
    """The parsed file: declared rows and jobs, by name, in file order."""

    rows: dict[str, Row]
    jobs: dict[str, Job]
    source: str

    def job(self, name: str) -> Job:
        if name not in self.jobs:
            raise ExperimentsError(
                f"unknown job {name!r}; use one of {', '.join(self.jobs)} ({self.source})"
            )
        return self.jobs[name]

    def recipe(self, name: str) -> dict:
        """The recipe mapping of declared row ``name``: its parent with its overrides, and the
        control stage first where ``control`` is set."""
        from fair_calib_llmc.recipe import RecipeError, with_overrides

        row = self.rows[name]
        try:
            data = with_overrides(_resolve(row.recipe), row.overrides)
        except RecipeError as err:  # a missing recipe, or an override it has no field for
            raise RecipeError(f"row {name}: {err}") from None
        return with_control(data, f"row {name}") if row.control else data

    def write_recipes(self, names, folder: Path) -> dict[str, str]:
        """Write the recipe of every declared row among ``names`` into ``folder``; return
        ``{name: path}`` (built-in methods need none: benchmark.py knows them)."""
        folder.mkdir(parents=True, exist_ok=True)
        paths = {}
        for name in names:
            if name in self.rows:
                path = folder / f"{name}.yaml"
                path.write_text(yaml.safe_dump(self.recipe(name), sort_keys=False))
                paths[name] = str(path)
        return paths


def _resolve(recipe: str) -> str:
    """A shipped name as it is; a path from the repository root, whatever the working dir."""
    if recipe.endswith((".yaml", ".yml")) or "/" in recipe:
        return str(ROOT / recipe)
    return recipe


def with_control(data: dict, source: str = "the recipe") -> dict:
    """``data`` with the tie-noise control stage first: ``EquivalentRescaleModifier`` with its
    default ``eps`` and ``seed`` (read off the class, so the file and the modifier cannot
    disagree), then the recipe unchanged."""
    from fair_calib_llmc.stage2.equivalent_modifier import EquivalentRescaleModifier

    if CONTROL_STAGE in data:
        raise ExperimentsError(
            f"{source}: control: true, but the recipe already has {CONTROL_STAGE}"
        )
    fields = {k: EquivalentRescaleModifier.model_fields[k].default for k in ("eps", "seed")}
    stage = {"equivalent_modifiers": {"EquivalentRescaleModifier": fields}}
    return {CONTROL_STAGE: stage, **copy.deepcopy(data)}


def load_experiments(path: str | Path = EXPERIMENTS) -> Experiments:
    """Parse and check the file's shape: rows with a recipe, jobs of known rows. Whether each
    recipe loads is :func:`check_rows`' (it imports llm-compressor)."""
    from fair_calib_llmc.evaluation.demo import METHOD_RECIPES

    source = str(path)
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ExperimentsError(f"{source}: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict) or set(data) != {"rows", "jobs"}:
        raise ExperimentsError(f"{source}: write a mapping of exactly rows: and jobs:")
    rows = {name: _row(name, spec, source) for name, spec in (data["rows"] or {}).items()}
    shadowed = sorted(set(rows) & set(METHOD_RECIPES))
    if shadowed:
        raise ExperimentsError(
            f"{source}: rows {shadowed} reuse built-in method names; rename them (a built-in "
            "name runs its shipped recipe)"
        )
    known = set(rows) | set(METHOD_RECIPES)
    jobs = {name: _job(name, spec, known, source) for name, spec in (data["jobs"] or {}).items()}
    return Experiments(rows, jobs, source)


def _row(name: str, spec, source: str) -> Row:
    where = f"{source}: row {name}"
    if not isinstance(spec, dict) or "recipe" not in spec or set(spec) - _ROW_KEYS:
        raise ExperimentsError(f"{where}: write {{recipe: NAME_OR_PATH, overrides: {{}}, control}}")
    overrides = spec.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise ExperimentsError(f"{where}: overrides is a mapping of Modifier.field: value")
    if not isinstance(spec.get("control", False), bool):
        raise ExperimentsError(f"{where}: control is true or false")
    return Row(name, str(spec["recipe"]), overrides, spec.get("control", False))


def _job(name: str, spec, known: set[str], source: str) -> Job:
    where = f"{source}: job {name}"
    args = ()
    if isinstance(spec, dict):
        if "rows" not in spec or set(spec) - _JOB_KEYS:
            raise ExperimentsError(f"{where}: write a list of rows or {{rows: [...], args: [...]}}")
        spec, args = spec["rows"], tuple(str(a) for a in spec.get("args") or ())
    if not isinstance(spec, list) or not spec:
        raise ExperimentsError(f"{where}: list its rows")
    rows = tuple(str(r) for r in spec)
    unknown = [r for r in rows if r not in known]
    if unknown:
        raise ExperimentsError(f"{where}: {unknown} are neither declared rows nor built-in methods")
    if len(set(rows)) != len(rows):
        raise ExperimentsError(f"{where}: a row is listed twice")
    return Job(name, rows, args)


def check_rows(
    experiments: Experiments, rows, folder: Path, family: str | None = None
) -> dict[str, str]:
    """Write the recipes of ``rows`` into ``folder`` and load every one of them as the
    benchmark will (:func:`fair_calib_llmc.evaluation.demo.check_methods`, against the job's
    model ``family``); return the ``{name: path}`` of the written ones. A recipe that does not
    load, or whose Stage I sampler is another family's, raises
    :class:`~fair_calib_llmc.recipe.RecipeError` naming its row."""
    from fair_calib_llmc.evaluation.demo import METHOD_RECIPES, check_methods

    paths = experiments.write_recipes(rows, folder)
    check_methods(tuple(rows), {**METHOD_RECIPES, **paths}, family)
    return paths
