"""Write a copy of a recipe with some modifier fields changed: the ablation rows of a sweep.

    python integration/recipe_variant.py recipes/fair_calib_w4a4.yaml out.yaml \\
        FAIRCalibModifier.target_strength=0.25 FAIRCalibModifier.stage1.prior.source=table

Each override is ``<ModifierClass>.<field path>=<YAML value>``; a path that does not exist in
the recipe is an error (a typo must not silently produce the unchanged recipe).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from fair_calib_llmc.recipe import check_recipe_shape


def apply_override(recipe: dict, override: str) -> None:
    path, _, raw = override.partition("=")
    modifier, *fields = path.split(".")
    found = [
        group[modifier]
        for stage in recipe.values()
        if isinstance(stage, dict)
        for group in stage.values()
        if isinstance(group, dict) and modifier in group
    ]
    if not found or not fields:
        raise SystemExit(f"{override!r}: no modifier {modifier!r} (or no field) in the recipe")
    node = found[0]
    for key in fields[:-1]:
        if not isinstance(node.get(key), dict):
            raise SystemExit(f"{override!r}: {key!r} is not a mapping in the recipe")
        node = node[key]
    if fields[-1] not in node:
        raise SystemExit(f"{override!r}: field {fields[-1]!r} is not set in the recipe")
    node[fields[-1]] = yaml.safe_load(raw)


def write_variant(parent: str, out: str, overrides: list[str]) -> None:
    recipe = yaml.safe_load(Path(parent).read_text())
    for override in overrides:
        apply_override(recipe, override)
    check_recipe_shape(recipe)
    Path(out).write_text(yaml.safe_dump(recipe, sort_keys=False))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("recipe", nargs="?")
    parser.add_argument("out", nargs="?")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument(
        "--batch",
        help="a file of variants, one per line: recipe, out and overrides separated by tabs "
        "(one process writes them all: integration/recipe_variants.sh)",
    )
    args = parser.parse_args(argv)
    if args.batch:
        for line in Path(args.batch).read_text().splitlines():
            parent, out, *overrides = line.split("\t")
            write_variant(parent, out, overrides)
    elif args.recipe and args.out and args.overrides:
        write_variant(args.recipe, args.out, args.overrides)
    else:
        parser.error("give RECIPE OUT OVERRIDE... or --batch FILE")


if __name__ == "__main__":
    main()
