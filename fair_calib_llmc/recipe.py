"""Recipes: shipped by name, local files by path, or YAML text, all checked before any work.

The shipped recipes live in the repository's top-level ``recipes/`` folder, which the wheel
installs as the ``fair_calib_llmc.recipes`` package (``[tool.setuptools.package-dir]``), so
``fair_calib_w4a4`` resolves the same way from a source checkout, an editable install and a
wheel.

:func:`load_recipe` tells the three forms apart without handing recipe text to the file
system: text has a line break or a ``key: value`` colon, a path ends in ``.yaml`` / ``.yml``
or names a directory, anything else is a shipped recipe's name. Errors name the file (and line)
they come from, on one line.
"""

from __future__ import annotations

import difflib
import os
import sys
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from llmcompressor.recipe import Recipe

# llm-compressor and compressed-tensors are imported where a recipe is parsed, not here: a
# missing or unreadable recipe, and scripts that only write recipes, fail or finish in a
# fraction of a second instead of after seconds of imports.

__all__ = [
    "RecipeError",
    "check_recipe_shape",
    "load_recipe",
    "load_recipe_and_stage1",
    "read_recipe",
    "shipped_recipes",
    "with_scheme",
]

_SHAPE = "<name>_stage: {<group>_modifiers: {<ModifierClass>: {fields}}}"

#: The recipe-level key of Stage I's settings (any recipe, baselines included); read by
#: :func:`fair_calib_llmc.quantize`, not by llm-compressor.
STAGE1_KEY = "stage1"


class RecipeError(ValueError):
    """A recipe that cannot be found, parsed or applied; the message names its source."""


def _recipe_folder():
    """``fair_calib_llmc.recipes`` where the package is installed (wheel or editable), else
    the checkout's own ``recipes/`` (the package imported from a source tree on PYTHONPATH,
    where nothing maps the folder to that name)."""
    try:
        return files("fair_calib_llmc.recipes")
    except ModuleNotFoundError:
        checkout = Path(__file__).resolve().parent.parent / "recipes"
        if checkout.is_dir():
            return checkout
        raise RecipeError(
            f"no shipped recipes: fair_calib_llmc.recipes is not installed and {checkout} does "
            "not exist; install the package (pip install .) or pass a recipe .yaml path"
        ) from None


def shipped_recipes() -> dict[str, str]:
    """Name -> YAML text of every recipe shipped with the package."""
    folder = _recipe_folder()
    return {
        entry.name.removesuffix(".yaml"): entry.read_text()
        for entry in sorted(folder.iterdir(), key=lambda e: e.name)
        if entry.name.endswith(".yaml")
    }


def read_recipe(recipe: str | os.PathLike) -> tuple[str, str]:
    """Return ``(yaml_text, source)`` for a shipped name, a file path or YAML text."""
    if not isinstance(recipe, (str, os.PathLike)):
        raise RecipeError(
            f"a recipe is a shipped name, a .yaml path, YAML text or an llmcompressor Recipe; "
            f"got {type(recipe).__name__}"
        )
    text = os.fspath(recipe)
    is_path = isinstance(recipe, os.PathLike) or text.endswith((".yaml", ".yml"))
    if not is_path and ("\n" in text or ": " in text or text.rstrip().endswith(":")):
        return text, "<recipe text>"
    is_path = is_path or os.sep in text
    shipped = shipped_recipes()
    if not is_path and text in shipped:
        return shipped[text], f"shipped recipe {text!r}"
    path = Path(text).expanduser()
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8"), str(path)
        except UnicodeDecodeError:
            raise RecipeError(
                f"{path}: not a text recipe (not UTF-8); pass a YAML recipe file"
            ) from None
    if is_path:
        raise RecipeError(f"no such recipe file: {text}")
    raise RecipeError(
        f"unknown recipe {text!r}: not a shipped recipe name ({', '.join(shipped)}) and not a "
        "file; pass one of those names or a path to a .yaml recipe"
    )


def check_recipe_shape(recipe: dict, source: str = "the recipe") -> None:
    """Fail loudly on recipes llm-compressor would parse to zero modifiers.

    llm-compressor only reads ``<name>_stage: <group>_modifiers: <ClassName>: {fields}`` and
    silently ignores anything else.
    """
    if not isinstance(recipe, dict) or not recipe:
        raise RecipeError(f"{source}: a recipe must be a YAML mapping of the shape {_SHAPE}")
    n_modifiers = 0
    for stage_key, stage in recipe.items():
        if stage_key == "args":
            continue
        if stage_key == STAGE1_KEY:
            if not isinstance(stage, dict):
                raise RecipeError(
                    f"{source}: {STAGE1_KEY}: must be a mapping of Stage I settings "
                    "(fair_calib_llmc.Stage1Settings' fields)"
                )
            continue
        if not str(stage_key).endswith("_stage") or not isinstance(stage, dict):
            raise RecipeError(
                f"{source}: key {stage_key!r} is not a '<name>_stage' mapping, which "
                f"llm-compressor would silently ignore; use the shape {_SHAPE}"
            )
        for group_key, group in stage.items():
            if not str(group_key).endswith("_modifiers") or not isinstance(group, dict):
                raise RecipeError(
                    f"{source}: key {stage_key}.{group_key} is not a '<group>_modifiers' "
                    f"mapping, which llm-compressor would silently ignore; use the shape {_SHAPE}"
                )
            for name, fields in group.items():
                if not isinstance(fields, dict):
                    raise RecipeError(f"{source}: modifier {name!r} needs a mapping of fields")
                n_modifiers += 1
    if n_modifiers == 0:
        raise RecipeError(f"{source}: the recipe declares no modifier; use the shape {_SHAPE}")


def with_scheme(data: dict, scheme: str, source: str = "the recipe") -> dict:
    """``data`` (a parsed recipe) with every quantizing modifier's ``scheme`` set to
    ``scheme``, a compressed-tensors preset name (ours included): one recipe serves every
    format. A modifier that spells out ``config_groups`` cannot be re-schemed, and a recipe
    without any ``scheme`` field has nothing to change; both fail here, before any work."""
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    import fair_calib_llmc.formats.schemes  # noqa: F401 - registers our presets

    name = scheme.upper()
    if name not in PRESET_SCHEMES:
        raise RecipeError(f"unknown scheme {scheme!r}; use one of {', '.join(PRESET_SCHEMES)}")
    changed = []
    for stage_key, stage in data.items():
        if stage_key == "args":
            continue
        for group in stage.values():
            for modifier, fields in group.items():
                if "config_groups" in fields:
                    raise RecipeError(
                        f"{source}: {modifier} spells out config_groups, so --scheme cannot "
                        "replace its scheme; edit the recipe or use one with a scheme: field"
                    )
                if "scheme" in fields:
                    fields["scheme"] = name
                    changed.append(modifier)
    if not changed:
        raise RecipeError(f"{source}: no modifier has a scheme: field for --scheme {name} to set")
    return data


def load_recipe(recipe: str | os.PathLike | Recipe, scheme: str | None = None) -> Recipe:
    """Parse a shipped name, a file or YAML text into an llmcompressor ``Recipe``, after
    :func:`check_recipe_shape`; every error names the source. ``scheme`` replaces the
    quantization scheme of every quantizing modifier (:func:`with_scheme`)."""
    return load_recipe_and_stage1(recipe, scheme)[0]


def load_recipe_and_stage1(
    recipe: str | os.PathLike | Recipe, scheme: str | None = None
) -> tuple[Recipe, dict | None]:
    """:func:`load_recipe`, and the recipe's top-level ``stage1:`` mapping (Stage I settings
    any recipe may carry, read by :func:`fair_calib_llmc.quantize`, not by llm-compressor),
    from one read of the recipe; ``None`` where none is set or ``recipe`` is a parsed
    ``Recipe`` (which holds only modifiers)."""
    parsed = sys.modules.get("llmcompressor.recipe")  # a Recipe object exists only after it
    if parsed is not None and isinstance(recipe, parsed.Recipe):
        if scheme is not None:
            raise RecipeError("scheme= needs a recipe name, path or text, not a Recipe object")
        return recipe, None
    text, source = read_recipe(recipe)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise RecipeError(f"{source}{where}: invalid YAML: {problem}") from None
    check_recipe_shape(data, source)
    stage1 = data.get(STAGE1_KEY)
    if scheme is not None or stage1 is not None:
        data = {k: v for k, v in data.items() if k != STAGE1_KEY}  # not llm-compressor's
        data = with_scheme(data, scheme, source) if scheme is not None else data
        text = yaml.safe_dump(data, sort_keys=False)
    from llmcompressor.recipe import Recipe
    from pydantic import ValidationError

    import fair_calib_llmc  # noqa: F401 - registers the project's modifiers with the factory

    try:
        parsed = Recipe.create_instance(text)
    except ValidationError as err:
        details = "; ".join(_field_error(e, err.title) for e in err.errors())
        raise RecipeError(f"{source}: {err.title}: {details}") from err
    except (ValueError, TypeError, KeyError) as err:
        message = str(err).splitlines()[0]
        if "No modifier of type" in message:
            names = modifier_names()
            close = difflib.get_close_matches(
                message.split("'")[1] if "'" in message else "", names, 1
            )
            hint = f" Did you mean {close[0]}?" if close else ""
            message += f"{hint} Valid modifiers: {', '.join(names)}"
        raise RecipeError(f"{source}: {message}") from err
    _check_modifier_settings(parsed, source)
    return parsed, stage1


def _check_modifier_settings(recipe: Recipe, source: str) -> None:
    """Settings llm-compressor accepts but that cannot work: a negative ``dampening_frac``
    makes every Hessian inversion fail, and GPTQ then falls back to RTN without a word."""
    for modifier in recipe.modifiers:
        damp = getattr(modifier, "dampening_frac", None)
        if damp is not None and damp < 0:
            raise RecipeError(
                f"{source}: {type(modifier).__name__}.dampening_frac must be 0 or more (a "
                f"fraction of the Hessian's mean diagonal, e.g. 0.01), got {damp}"
            )


def modifier_names() -> list[str]:
    """Every modifier class a recipe may name: llm-compressor's and the project's."""
    from llmcompressor.modifiers.factory import ModifierFactory

    if not ModifierFactory._loaded:
        ModifierFactory.refresh()
    names = {*ModifierFactory._main_registry, *ModifierFactory._registered_registry}
    return sorted(names - {"Modifier"})


def _field_error(error: dict, title: str) -> str:
    """``field.path: message``, with the valid names where the field is a scheme name."""
    where = ".".join(str(p) for p in error["loc"]) or title
    message = error["msg"]
    if error["loc"] and error["loc"][-1] == "scheme" and "unknown scheme" not in message:
        from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

        message += f" (valid names: {', '.join(PRESET_SCHEMES)})"
    return f"{where}: {message}"
