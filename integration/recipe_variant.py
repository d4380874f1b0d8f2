"""Write a copy of a recipe with some modifier fields changed: the ablation rows of a sweep.

    python integration/recipe_variant.py recipes/fair_calib_w4a4.yaml out.yaml \\
        FAIRCalibModifier.target_strength=0.25 FAIRCalibModifier.stage1.prior.source=table

Each override is ``<ModifierClass>.<field path>=<YAML value>``, applied by
:func:`fair_calib_llmc.recipe.with_overrides` (the one way to vary a recipe, also behind
``fair-calib-llmc quantize --set``): an unknown modifier or field is an error naming the valid
ones (a typo must not silently produce the unchanged recipe).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from fair_calib_llmc.recipe import RecipeError, with_overrides


def parse_override(override: str) -> tuple[str, object]:
    """``"Modifier.field=value"`` -> ``("Modifier.field", value read as YAML)``."""
    path, sep, raw = override.partition("=")
    if not sep:
        raise SystemExit(f"{override!r}: write Modifier.field=value")
    return path, yaml.safe_load(raw)


def write_variant(parent: str, out: str, overrides: list[str]) -> None:
    try:
        recipe = with_overrides(parent, dict(parse_override(o) for o in overrides))
    except RecipeError as err:
        raise SystemExit(str(err)) from None
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
