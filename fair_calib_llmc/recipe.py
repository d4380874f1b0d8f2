"""Recipes: shipped by name, local files by path, or YAML text, all checked before any work.

The shipped recipes live in the repository's top-level ``recipes/`` folder, which the wheel
installs as the ``fair_calib_llmc.recipes`` package (``[tool.setuptools.package-dir]``), so
``fair_calib_w4a4`` resolves the same way from a source checkout, an editable install and a
wheel. A recipe renamed keeps its old name as an alias (:data:`RECIPE_ALIASES`), so commands
written for it keep working; an alias is not a file and not a separate recipe.

:func:`load_recipe` tells the three forms apart without handing recipe text to the file
system: text has a line break or a ``key: value`` colon, a path ends in ``.yaml`` / ``.yml``
or names a directory, anything else is a shipped recipe's name. Errors name the file (and line)
they come from, on one line.

Two rewrites run on every recipe this module loads, so recipes and callers need not spell
them: :func:`with_lm_heads` leaves the LM heads of every model family unquantized (recipes do
not name a family's head), and :func:`with_overrides` sets any modifier field by
``"Modifier.field"`` and any Stage I setting by ``"stage1.field"`` (``--set`` on the command
line, ``--scheme`` through :func:`with_scheme`).
"""

from __future__ import annotations

import copy
import difflib
import os
import sys
from collections.abc import Mapping
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from llmcompressor.recipe import Recipe

# llm-compressor and compressed-tensors are imported where a recipe is parsed, not here: a
# missing or unreadable recipe, and scripts that only write recipes, fail or finish in a
# fraction of a second instead of after seconds of imports.

from fair_calib_llmc.models.configs import LM_HEADS

__all__ = [
    "RECIPE_ALIASES",
    "RecipeError",
    "check_recipe_shape",
    "load_recipe",
    "load_recipe_and_stage1",
    "read_recipe",
    "shipped_recipes",
    "with_lm_heads",
    "with_overrides",
    "with_scheme",
]

_SHAPE = "<name>_stage: {<group>_modifiers: {<ModifierClass>: {fields}}}"

#: Former shipped names -> the shipped recipe each now names: ``load_recipe(alias)`` reads
#: exactly that recipe's text. The one place aliases live; :func:`shipped_recipes` lists
#: recipes (files) only, and the CLI's help shows aliases as such.
#: ``fair_calib_learned_w4a4`` became ``fair_calib_w4a4`` when the learned-rotation pipeline
#: was shipped under the flagship name (the fixed-rotation one is ``fair_calib_quarot_w4a4``).
RECIPE_ALIASES: dict[str, str] = {"fair_calib_learned_w4a4": "fair_calib_w4a4"}

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
    """Name -> YAML text of every recipe shipped with the package (one entry per file; the
    former names in :data:`RECIPE_ALIASES` are not listed)."""
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
    if not is_path and text in RECIPE_ALIASES:
        target = RECIPE_ALIASES[text]
        return shipped[target], f"shipped recipe {text!r} (alias of {target!r})"
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
    aliases = "".join(f"; {old} is an alias of {new}" for old, new in RECIPE_ALIASES.items())
    raise RecipeError(
        f"unknown recipe {text!r}: not a shipped recipe name ({', '.join(shipped)}{aliases}) "
        "and not a file; pass one of those names or a path to a .yaml recipe"
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


def _modifiers(data: dict):
    """``(class name, fields)`` of every modifier of a shape-checked recipe mapping."""
    for stage_key, stage in data.items():
        if stage_key in ("args", STAGE1_KEY) or not isinstance(stage, dict):
            continue
        for group in stage.values():
            yield from group.items()


def _modifier_fields(name: str) -> set[str] | None:
    """The fields llm-compressor accepts for modifier class ``name`` (ours included), or
    ``None`` where the class is unknown here (llm-compressor then rejects it itself)."""
    from llmcompressor.modifiers import ModifierFactory

    if not ModifierFactory._loaded:  # as llm-compressor's own Recipe.create_instance does
        ModifierFactory.refresh()
    for registry in (
        ModifierFactory._registered_registry,
        ModifierFactory._main_registry,
        ModifierFactory._experimental_registry,
    ):
        if name in registry:
            return set(registry[name].model_fields)
    return None


def with_overrides(
    recipe: dict | str | os.PathLike, overrides: Mapping[str, object], source: str | None = None
) -> dict:
    """A copy of ``recipe`` (a parsed mapping, or a shipped name, path or YAML text) with
    fields set by ``{"Modifier.field": value}``: the one way to vary a recipe, for ablation
    rows, tests and ``--set``. ``Modifier`` is a modifier class in the recipe (every modifier
    of that class is changed); ``field`` is one of that class's fields, set even where the
    recipe leaves it at its default; a dotted tail (``FAIRCalibModifier.stage1.prior.source``)
    reaches into a mapping field. ``stage1.<field>`` (``stage1.prior.position.commit_boost``)
    sets the recipe's top-level Stage I settings the same way, and the result must then parse
    as :class:`~fair_calib_llmc.stage1.states.Stage1Settings`, so an ablation of the prior is
    an override of the shipped recipe rather than a copy of it. An unknown modifier or field
    fails here, listing the valid names, so a typo cannot silently leave the recipe
    unchanged."""
    if isinstance(recipe, dict):
        data, source = copy.deepcopy(recipe), source or "the recipe"
    else:
        data, source = _parse(recipe)
    check_recipe_shape(data, source)
    stage1_changed = False
    for path, value in overrides.items():
        name, _, field_path = str(path).partition(".")
        if name == STAGE1_KEY:
            targets, valid = [data.setdefault(STAGE1_KEY, {})], _stage1_fields()
            stage1_changed = True
        else:
            targets = [fields for modifier, fields in _modifiers(data) if modifier == name]
            valid = _modifier_fields(name)
        if not targets:
            present = sorted({modifier for modifier, _ in _modifiers(data)})
            raise RecipeError(
                f"{source}: override {path!r}: no modifier {name!r} in the recipe; "
                f"use one of {', '.join(present)} or {STAGE1_KEY}"
            )
        if not field_path:
            raise RecipeError(f"{source}: override {path!r} names no field; write {name}.FIELD")
        keys = field_path.split(".")
        if valid is not None and keys[0] not in valid:
            raise RecipeError(
                f"{source}: override {path!r}: {name} has no field {keys[0]!r}; "
                f"valid fields: {', '.join(sorted(valid))}"
            )
        for fields in targets:
            node = fields
            for key in keys[:-1]:
                node = node.setdefault(key, {})
                if not isinstance(node, dict):
                    raise RecipeError(
                        f"{source}: override {path!r}: {key!r} is not a mapping in the recipe"
                    )
            node[keys[-1]] = copy.deepcopy(value)
    if stage1_changed:
        from fair_calib_llmc.stage1.states import Stage1Settings

        try:
            Stage1Settings.parse(data[STAGE1_KEY])
        except ValueError as err:
            raise RecipeError(f"{source}: after the overrides, {err}") from None
    return data


def _stage1_fields() -> set[str]:
    """The fields of a recipe's top-level ``stage1:`` (Stage I's settings)."""
    from fair_calib_llmc.stage1.states import Stage1Settings

    return set(Stage1Settings.model_fields)


def with_scheme(data: dict, scheme: str, source: str = "the recipe") -> dict:
    """``data`` (a parsed recipe) with every quantizing modifier's ``scheme`` set to
    ``scheme``, a compressed-tensors preset name (ours included): one recipe serves every
    format; :func:`with_overrides` of every modifier's ``scheme``. A modifier that spells out
    ``config_groups`` cannot be re-schemed, and a recipe without any ``scheme`` field has
    nothing to change; both fail here, before any work."""
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    import fair_calib_llmc.formats.schemes  # noqa: F401 - registers our presets

    name = scheme.upper()
    if name not in PRESET_SCHEMES:
        raise RecipeError(f"unknown scheme {scheme!r}; use one of {', '.join(PRESET_SCHEMES)}")
    changed = {}
    for modifier, fields in _modifiers(data):
        if "config_groups" in fields:
            raise RecipeError(
                f"{source}: {modifier} spells out config_groups, so --scheme cannot "
                "replace its scheme; edit the recipe or use one with a scheme: field"
            )
        if "scheme" in fields:
            changed[f"{modifier}.scheme"] = name
    if not changed:
        raise RecipeError(f"{source}: no modifier has a scheme: field for --scheme {name} to set")
    return with_overrides(data, changed, source)


def with_lm_heads(data: dict) -> dict:
    """``data`` with every model family's LM head (:data:`~fair_calib_llmc.models.configs.LM_HEADS`)
    added to the ``ignore`` of every modifier that has one (the quantizers, QuIP's block
    rotations): a W4A4 recipe leaves the head in full precision, and since LLaDA's head shares
    its leaf name with every down projection, a recipe spelling it per family would be easy to
    get wrong. Names already listed are kept once."""
    data = copy.deepcopy(data)
    for modifier, fields in _modifiers(data):
        valid = _modifier_fields(modifier)
        if valid is None or "ignore" not in valid:
            continue
        ignore = fields.get("ignore", [])
        ignore = [ignore] if isinstance(ignore, str) else list(ignore)
        fields["ignore"] = ignore + [head for head in LM_HEADS if head not in ignore]
    return data


def _parse(recipe: str | os.PathLike) -> tuple[dict, str]:
    """The parsed mapping and source of a shipped name, file or YAML text, shape-checked."""
    text, source = read_recipe(recipe)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise RecipeError(f"{source}{where}: invalid YAML: {problem}") from None
    check_recipe_shape(data, source)
    return data, source


def load_recipe(
    recipe: str | os.PathLike | dict | Recipe,
    scheme: str | None = None,
    overrides: Mapping[str, object] | None = None,
) -> Recipe:
    """Parse a shipped name, a file, YAML text or a parsed mapping into an llmcompressor
    ``Recipe``, after :func:`check_recipe_shape`; every error names the source. ``scheme``
    replaces the quantization scheme of every quantizing modifier (:func:`with_scheme`),
    ``overrides`` sets fields (:func:`with_overrides`), and the LM heads are left unquantized
    (:func:`with_lm_heads`)."""
    return load_recipe_and_stage1(recipe, scheme, overrides)[0]


def load_recipe_and_stage1(
    recipe: str | os.PathLike | dict | Recipe,
    scheme: str | None = None,
    overrides: Mapping[str, object] | None = None,
) -> tuple[Recipe, dict | None]:
    """:func:`load_recipe`, and the recipe's top-level ``stage1:`` mapping (Stage I settings
    any recipe may carry, read by :func:`fair_calib_llmc.quantize`, not by llm-compressor),
    from one read of the recipe; ``None`` where none is set or ``recipe`` is a parsed
    ``Recipe`` (which holds only modifiers, taken as they are)."""
    parsed = sys.modules.get("llmcompressor.recipe")  # a Recipe object exists only after it
    if parsed is not None and isinstance(recipe, parsed.Recipe):
        if scheme is not None or overrides:
            raise RecipeError(
                "scheme= and overrides= need a recipe name, path, text or mapping, not a "
                "Recipe object"
            )
        return recipe, None
    if isinstance(recipe, dict):
        data, source = copy.deepcopy(recipe), "<recipe mapping>"
        check_recipe_shape(data, source)
    else:
        data, source = _parse(recipe)
    if overrides:  # before stage1 is split off: an override may set it
        data = with_overrides(data, overrides, source)
    stage1 = data.get(STAGE1_KEY)
    data = {k: v for k, v in data.items() if k != STAGE1_KEY}  # not llm-compressor's
    if scheme is not None:
        data = with_scheme(data, scheme, source)
    text = yaml.safe_dump(with_lm_heads(data), sort_keys=False)
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
