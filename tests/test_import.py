"""``import fair_calib_llmc`` is quiet and light: no llm-compressor until something needs it,
and everything that needs llm-compressor registered as soon as it is imported."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.integration


def _python(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter, with llm-compressor's logging as a user has it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_COMPRESSOR_")}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env
    )


def test_import_prints_nothing_and_leaves_llmcompressor_out():
    out = _python(
        """
        import sys
        import fair_calib_llmc
        heavy = {"llmcompressor", "datasets", "compressed_tensors"} & {
            m.split(".")[0] for m in sys.modules
        }
        assert not heavy, heavy
        assert "transformers.modeling_utils" not in sys.modules  # the model code waits
        """
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == out.stderr == ""


LOAD = "AutoModel.from_pretrained(str(fair_calib_llmc.DEFAULT_MODEL_DIR))"


@pytest.mark.parametrize(
    "first",
    [
        "import fair_calib_llmc; from transformers import AutoModel",
        "from transformers import AutoModel; import fair_calib_llmc",
        "from transformers import PreTrainedModel; import fair_calib_llmc; "
        "from transformers import AutoModel",
        "import fair_calib_llmc; from fair_calib_llmc.models import LLaDAModelLM; "
        "from transformers import AutoModel",
        "import fair_calib_llmc; from fair_calib_llmc.models.dream import DreamModel; "
        "from transformers import AutoModel",
        "import fair_calib_llmc; from fair_calib_llmc.models import diffusion_spec; "
        "from transformers import AutoConfig, AutoModel",
        "from fair_calib_llmc.models import LLaDAModelLM; import fair_calib_llmc; "
        "from transformers import AutoModel",
    ],
)
def test_the_model_classes_register_whatever_is_imported_first(first):
    """The config and model classes register when transformers' Auto modules (or its modeling
    code, or ours) are imported, in any order: a checkpoint loads as the native class."""
    out = _python(
        f"""
        {first}
        from transformers import AutoConfig, AutoModelForCausalLM
        import fair_calib_llmc
        directory = str(fair_calib_llmc.DEFAULT_MODEL_DIR)
        assert type(AutoConfig.from_pretrained(directory)).__name__ == "LLaDAConfig"
        assert type({LOAD}) is fair_calib_llmc.LLaDAModelLM
        assert type(AutoModelForCausalLM.from_pretrained(directory)).__name__ == "LLaDAModelLM"
        """
    )
    assert out.returncode == 0, out.stderr[-3000:]


def test_llmcompressor_imported_later_knows_our_modifier_and_mappings():
    out = _python(
        """
        import fair_calib_llmc
        from llmcompressor.modifiers.factory import ModifierFactory
        from llmcompressor.modifiers.transform.spinquant.mappings import (
            SPINQUANT_MAPPING_REGISTRY,
        )
        from llmcompressor.recipe import Recipe

        recipe = Recipe.create_instance(
            "fair_stage:\\n  fair_modifiers:\\n    FAIRCalibModifier:\\n"
            "      targets: [Linear]\\n      scheme: W4A4_G128_PACKED\\n"
        )
        assert [type(m).__name__ for m in recipe.modifiers] == ["FAIRCalibModifier"]
        assert {"LLaDAModelLM", "DreamModel"} <= set(SPINQUANT_MAPPING_REGISTRY)
        loaded = fair_calib_llmc.load_recipe("fair_calib_w4a4")
        assert "FAIRCalibModifier" in [type(m).__name__ for m in loaded.modifiers]
        missing = [n for n in fair_calib_llmc.__all__ if not hasattr(fair_calib_llmc, n)]
        assert not missing, missing
        """
    )
    assert out.returncode == 0, out.stderr
    assert "No accelerator available" not in out.stdout + out.stderr


def test_our_lazy_import_of_llmcompressor_registers_too():
    """``fair_calib_llmc.FAIRCalibModifier`` imports llm-compressor from inside our module."""
    out = _python(
        """
        import fair_calib_llmc
        from llmcompressor.modifiers.factory import ModifierFactory
        assert ModifierFactory._registered_registry["FAIRCalibModifier"] is (
            fair_calib_llmc.FAIRCalibModifier
        )
        """
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""


def test_modules_the_hook_imports_do_not_import_llmcompressor_themselves():
    """The hook imports fair_calib_llmc.stage2.modifier and .rotations while llm-compressor finishes
    importing; a module of ours that they import and that imports llm-compressor at import
    time would be half-initialised then (``cannot import name ... partially initialized``)."""
    out = _python(
        """
        import ast, importlib, sys
        import fair_calib_llmc
        from pathlib import Path

        class NoLLMCompressor:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "llmcompressor":
                    raise ImportError(f"{name} imported")

        package = Path(fair_calib_llmc.__file__).parent
        needed = set()
        for hooked in ("stage2/modifier.py", "stage2/rotations.py"):
            for node in ast.walk(ast.parse((package / hooked).read_text())):
                if isinstance(node, ast.ImportFrom) and node.module.startswith("fair_calib"):
                    needed.add(node.module)
        sys.meta_path.insert(0, NoLLMCompressor())
        for name in sorted(needed):
            importlib.import_module(name)
        """
    )
    assert out.returncode == 0, out.stderr


def test_a_module_of_ours_imported_first_still_registers():
    out = _python(
        """
        from fair_calib_llmc.stage1.states import Stage1Settings
        from fair_calib_llmc.models.layers import named_decoder_layers
        from llmcompressor.modifiers.factory import ModifierFactory
        assert "FAIRCalibModifier" in ModifierFactory._registered_registry
        """
    )
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize(
    "name",
    # the subclassed module first (it failed before the fix), and the subclass first
    ["LearnedSpinQuantModifier", "FlatQuantModifier"],
)
def test_each_public_modifier_imported_first_registers_them_all(name):
    """A modifier module that imports llm-compressor itself (learned_rotations.base) must be
    whole before the registration hook imports the ones that subclass it (flatquant)."""
    out = _python(
        f"""
        from fair_calib_llmc import {name}
        from llmcompressor.modifiers.factory import ModifierFactory
        registered = ModifierFactory._registered_registry
        assert registered["{name}"] is {name}
        for other in ("FAIRCalibModifier", "LearnedSpinQuantModifier", "FlatQuantModifier",
                      "EquivalentRescaleModifier"):
            assert other in registered, other
        """
    )
    assert out.returncode == 0, out.stderr
