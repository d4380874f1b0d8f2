"""Recipes by shipped name, path or YAML text; every error names its source on one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from llmcompressor.recipe import Recipe

from fair_calib_llmc.models.configs import LM_HEAD, LM_HEADS
from fair_calib_llmc.recipe import (
    RECIPE_ALIASES,
    RecipeError,
    check_recipe_shape,
    load_recipe,
    load_recipe_and_stage1,
    read_recipe,
    shipped_recipes,
    with_overrides,
    with_scheme,
)

pytestmark = pytest.mark.unit

REPO_RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def test_shipped_names_are_the_repository_recipes():
    shipped = shipped_recipes()
    assert set(shipped) == {p.stem for p in REPO_RECIPES.glob("*.yaml")}
    for name, text in shipped.items():
        assert text == (REPO_RECIPES / f"{name}.yaml").read_text()
        assert isinstance(load_recipe(name), Recipe)
    # an alias is a name, not a recipe: no file of its own, listed once under its target
    assert not set(RECIPE_ALIASES) & set(shipped)
    assert set(RECIPE_ALIASES.values()) <= set(shipped)


def test_the_former_learned_name_is_an_alias_of_the_flagship():
    """``fair_calib_learned_w4a4`` (published commands use it) reads ``fair_calib_w4a4``'s
    text, and loads and overrides as it does; errors name the alias the user typed."""
    assert RECIPE_ALIASES == {"fair_calib_learned_w4a4": "fair_calib_w4a4"}
    text, source = read_recipe("fair_calib_learned_w4a4")
    assert text == shipped_recipes()["fair_calib_w4a4"] == read_recipe("fair_calib_w4a4")[0]
    assert source == "shipped recipe 'fair_calib_learned_w4a4' (alias of 'fair_calib_w4a4')"
    assert load_recipe("fair_calib_learned_w4a4") == load_recipe("fair_calib_w4a4")
    assert load_recipe_and_stage1("fair_calib_learned_w4a4", scheme="nvfp4") == (
        load_recipe_and_stage1("fair_calib_w4a4", scheme="nvfp4")
    )
    steps = {"LearnedSpinQuantModifier.steps": 3}
    assert with_overrides("fair_calib_learned_w4a4", steps) == with_overrides(
        "fair_calib_w4a4", steps
    )
    with pytest.raises(RecipeError) as err:
        with_overrides("fair_calib_learned_w4a4", {"GPTQModifier.block_size": 64})
    assert str(err.value).startswith(
        "shipped recipe 'fair_calib_learned_w4a4' (alias of 'fair_calib_w4a4'): "
    )


def _modifier_classes(name: str) -> list[str]:
    return [type(m).__name__ for m in load_recipe(name).modifiers]


def test_the_flagship_learns_its_rotations_and_the_quarot_recipe_fixes_them():
    """fair_calib_w4a4 is the learned-rotation pipeline; fair_calib_quarot_w4a4 the same
    Stage II on fixed rotations, and fair_calib_uniform_w4a4 that one's uniform ablation."""
    assert _modifier_classes("fair_calib_w4a4") == [
        "LearnedSpinQuantModifier",
        "FAIRCalibModifier",
    ]
    assert _modifier_classes("fair_calib_quarot_w4a4") == [
        "ExactSpinQuantModifier",
        "FAIRCalibModifier",
    ]
    shipped = {name: yaml.safe_load(shipped_recipes()[name]) for name in shipped_recipes()}
    flagship, quarot = shipped["fair_calib_w4a4"], shipped["fair_calib_quarot_w4a4"]
    assert flagship["fair_stage"] == quarot["fair_stage"]  # one Stage II
    rotate = quarot["rotate_stage"]["rotate_modifiers"]["ExactSpinQuantModifier"]
    learned = flagship["rotate_stage"]["rotate_modifiers"]["LearnedSpinQuantModifier"]
    assert learned["learn"] == ["R1", "R2"] and learned["token_weights"] == "frontier"
    assert {k: learned[k] for k in rotate} == rotate  # starts where the fixed rotations are
    uniform = with_overrides(quarot, {"FAIRCalibModifier.use_token_weights": False})
    assert load_recipe("fair_calib_uniform_w4a4") == load_recipe(uniform)
    assert load_recipe("fair_calib_uniform_w4a4") != load_recipe(quarot)


def test_long_yaml_text_is_not_taken_for_a_path():
    text = shipped_recipes()["fair_calib_w4a4"]
    assert len(text) > 255  # longer than a file name may be
    assert read_recipe(text) == (text, "<recipe text>")
    modifiers = [type(m).__name__ for m in load_recipe(text).modifiers]
    assert modifiers == ["LearnedSpinQuantModifier", "FAIRCalibModifier"]


def test_path_and_path_object(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(shipped_recipes()["rtn_w4a4"])
    assert read_recipe(str(path))[1] == str(path)
    assert read_recipe(path)[1] == str(path)


@pytest.mark.parametrize("missing", ["missing.yaml", "no/such/dir/recipe.yml"])
def test_missing_file_says_so(missing):
    with pytest.raises(RecipeError, match=f"no such recipe file: {missing}$"):
        load_recipe(missing)
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(Path(missing))


def test_unknown_name_lists_the_shipped_ones():
    with pytest.raises(RecipeError, match="unknown recipe 'fair_calib'.*fair_calib_w4a4") as err:
        load_recipe("fair_calib")
    assert all(name in str(err.value) for name in shipped_recipes())
    assert "fair_calib_learned_w4a4 is an alias of fair_calib_w4a4" in str(err.value)


def test_yaml_error_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("fair_stage:\n  fair_modifiers:\n    FAIRCalibModifier: {scheme: [W4A4\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert str(err.value).startswith(f"{path}:4:")
    assert "\n" not in str(err.value)


def test_modifier_field_error_names_the_file(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text(
        "gptq_stage:\n  gptq_modifiers:\n    GPTQModifier:\n      scheme: W4A4\n"
        "      dampening_frac: lots\n"
    )
    with pytest.raises(RecipeError, match=f"^{path}: .*dampening_frac") as err:
        load_recipe(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "recipe,where",
    [
        ({"FAIRCalibModifier": {"scheme": "W4A4"}}, "FAIRCalibModifier"),
        ({"fair_stage": {"FAIRCalibModifier": {"scheme": "W4A4"}}}, "fair_stage.FAIRCalibModifier"),
        ({"fair_stage": {"fair_modifiers": {}}}, "no modifier"),
        ("just a string", "must be a YAML mapping"),
    ],
)
def test_recipe_of_the_wrong_shape_fails_loudly(recipe, where):
    with pytest.raises(RecipeError, match=where):
        check_recipe_shape(recipe)


def test_unknown_scheme_lists_the_valid_names():
    text = "q_stage:\n  q_modifiers:\n    QuantizationModifier:\n      scheme: W4A5\n"
    with pytest.raises(RecipeError, match="scheme.*valid names: .*NVFP4.*W4A4_G128_PACKED"):
        load_recipe(text)


@pytest.mark.integration
def test_shipped_names_work_from_a_source_checkout_on_pythonpath(tmp_path):
    """Without an install nothing maps recipes/ to fair_calib_llmc.recipes; ``-S`` keeps the
    editable install's finder (a .pth file) out, site-packages stay importable."""
    import shutil
    import subprocess
    import sys
    import sysconfig

    checkout = tmp_path / "checkout"
    repo = REPO_RECIPES.parent
    shutil.copytree(
        repo / "fair_calib_llmc",
        checkout / "fair_calib_llmc",
        ignore=shutil.ignore_patterns("__pycache__", "model.safetensors"),
    )
    shutil.copytree(REPO_RECIPES, checkout / "recipes")
    paths = [str(checkout), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    code = (
        f"import fair_calib_llmc.recipe as r; assert r.__file__.startswith({str(checkout)!r}); "
        "print(sorted(r.shipped_recipes())); r.load_recipe('rtn_w4a4'); "
        "alias = r.read_recipe('fair_calib_learned_w4a4')[0]; "
        "assert alias == r.shipped_recipes()['fair_calib_w4a4']"
    )
    out = subprocess.run(
        [sys.executable, "-S", "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": ":".join(paths), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    assert "'fair_calib_w4a4'" in out.stdout and "'rtn_w4a4'" in out.stdout


def test_no_shipped_recipe_names_a_family_head():
    for name, text in shipped_recipes().items():
        assert "ff_out" not in text and "lm_head" not in text, name


def test_the_loader_leaves_every_family_head_unquantized():
    """Every modifier with an ``ignore`` (quantizers, QuIP's block rotations) gets both heads,
    once, beside what the recipe lists; modifiers without one are left alone."""
    for name in shipped_recipes():
        for modifier in load_recipe(name).modifiers:
            ignore = getattr(modifier, "ignore", None)
            if "ignore" not in type(modifier).model_fields:
                continue
            ignore = [ignore] if isinstance(ignore, str) else ignore
            assert all(ignore.count(head) == 1 for head in LM_HEADS), (name, modifier, ignore)
    text = (
        "q_stage:\n  q_modifiers:\n    QuantizationModifier:\n      scheme: W4A4\n"
        "      targets: [Linear]\n      ignore: [lm_head, 're:.*blocks\\.0\\..*']\n"
    )
    (modifier,) = load_recipe(text).modifiers
    assert modifier.ignore == ["lm_head", r"re:.*blocks\.0\..*", LM_HEAD]


def test_overrides_set_fields_the_recipe_leaves_at_their_default():
    data = with_overrides(
        "fair_calib_w4a4",
        {
            "LearnedSpinQuantModifier.steps": 3,
            "LearnedSpinQuantModifier.r4_block_size": 32,
            "FAIRCalibModifier.stage1.prior.source": "uniform",
        },
    )
    rotate = data["rotate_stage"]["rotate_modifiers"]["LearnedSpinQuantModifier"]
    assert rotate["steps"] == 3 and rotate["r4_block_size"] == 32
    fair = data["fair_stage"]["fair_modifiers"]["FAIRCalibModifier"]
    assert fair["stage1"]["prior"]["source"] == "uniform"
    recipe = load_recipe(data)
    assert recipe.modifiers[0].steps == 3 and recipe.modifiers[0].r4_block_size == 32
    # the shipped recipe itself is untouched
    assert load_recipe("fair_calib_w4a4").modifiers[0].steps == 100


def test_load_recipe_takes_overrides_and_keeps_the_top_level_stage1():
    text = (
        "stage1: {prompt_length: 16}\n"
        "gptq_stage:\n  gptq_modifiers:\n    GPTQModifier: {scheme: W4A4, targets: [Linear]}\n"
    )
    recipe, stage1 = load_recipe_and_stage1(text, overrides={"GPTQModifier.block_size": 64})
    assert stage1 == {"prompt_length": 16}
    assert recipe.modifiers[0].block_size == 64


def test_stage1_overrides_set_the_recipes_stage1_and_are_checked_as_stage1_settings():
    """stage1.<field> reaches the recipe's top-level Stage I settings (an ablation of the
    prior is an override, not a copy of the recipe); the result must parse as Stage1Settings,
    and a bad field or value fails in one line naming it."""
    boost = {"stage1.prior.position.commit_boost": 4.0, "stage1.prompt_length": 16}
    data = with_overrides("fair_calib_flatquant_w4a4", boost)
    assert data["stage1"]["prior"]["position"]["commit_boost"] == 4.0
    assert data["stage1"]["prior"]["position"]["commit_schedule"] == "early"  # kept
    _, stage1 = load_recipe_and_stage1("fair_calib_flatquant_w4a4", overrides=boost)
    assert stage1 == data["stage1"] and stage1["prompt_length"] == 16
    shipped = yaml.safe_load(shipped_recipes()["fair_calib_flatquant_w4a4"])
    assert shipped["stage1"]["prior"]["position"]["commit_boost"] == 1.0  # file untouched
    # a recipe without stage1: gets one
    assert with_overrides("rtn_w4a4", {"stage1.prompt_length": 8})["stage1"] == {"prompt_length": 8}
    for override, value, message in [
        ("stage1.inptus", "text", "stage1 has no field 'inptus'; valid fields: .*inputs"),
        (
            "stage1.prior.position.comit_boost",
            2,
            "stage1.prior.position.comit_boost: Extra inputs.*valid: .*commit_boost",
        ),
        ("stage1.prior.position.commit_schedule", "sideways", "commit_schedule: .*'early'"),
        ("stage1", 1, "names no field"),
    ]:
        with pytest.raises(RecipeError, match=message) as err:
            with_overrides("fair_calib_flatquant_w4a4", {override: value})
        assert str(err.value).startswith("shipped recipe 'fair_calib_flatquant_w4a4': ")
        assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "override,message",
    [
        ("GPTQModifer.block_size", "no modifier 'GPTQModifer'.*use one of .*GPTQModifier"),
        ("GPTQModifier.blocksize", "no field 'blocksize'; valid fields: .*block_size"),
        ("GPTQModifier", "names no field"),
    ],
)
def test_unknown_modifier_or_field_is_one_line_listing_the_valid_names(override, message):
    with pytest.raises(RecipeError, match=message) as err:
        with_overrides("quarot_gptq_w4a4", {override: 64})
    assert str(err.value).startswith("shipped recipe 'quarot_gptq_w4a4': ")
    assert "\n" not in str(err.value)


def test_with_scheme_is_an_override_of_every_scheme_field():
    data = yaml.safe_load(shipped_recipes()["quarot_gptq_w4a4"])
    assert with_scheme(data, "nvfp4") == with_overrides(data, {"GPTQModifier.scheme": "NVFP4"})
