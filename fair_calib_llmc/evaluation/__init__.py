"""Evaluating dLLM checkpoints the way users do.

* :mod:`~fair_calib_llmc.evaluation.harness`: an lm-evaluation-harness model named ``dllm``
  (``lm_eval --model dllm`` through ``python -m fair_calib_llmc.evaluation.harness`` or the
  ``lm-eval-dllm`` script, and ``lm_eval.simple_evaluate(model="dllm", ...)`` after
  ``import fair_calib_llmc``);
* :mod:`~fair_calib_llmc.evaluation.compare`: ``evaluate``, decision-level metrics of any
  student checkpoint against its teacher;
* :mod:`~fair_calib_llmc.evaluation.diagnose`: ``diagnose``, where W4A4 hurts a model.

Importing this package registers ``dllm`` with lm-eval's model registry as a lazy placeholder
(a "module:Class" string), so neither lm-eval's model code nor ours is imported until lm-eval
asks for the model; without lm-eval installed (it is the optional ``[eval]`` extra) nothing
happens.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

__all__ = ["LM_EVAL_MODEL_NAME", "LM_EVAL_TASKS", "register_lm_eval_model"]

#: The name users pass to ``lm_eval --model``.
LM_EVAL_MODEL_NAME = "dllm"
#: lm-eval tasks shipped with the package (held-out Python: next line, choice, perplexity);
#: ``lm-eval-dllm`` includes them unless given another ``--include_path``.
LM_EVAL_TASKS = Path(__file__).resolve().parent.parent / "assets" / "lm_eval_tasks"
_TARGET = "fair_calib_llmc.evaluation.harness:DiffusionHarnessLM"


def register_lm_eval_model() -> bool:
    """Register :data:`LM_EVAL_MODEL_NAME` with lm-eval (idempotent); False without lm-eval."""
    if importlib.util.find_spec("lm_eval") is None:
        return False
    from lm_eval.api.registry import model_registry

    if LM_EVAL_MODEL_NAME not in model_registry:
        model_registry.register(LM_EVAL_MODEL_NAME, target=_TARGET)
    return True


register_lm_eval_model()
