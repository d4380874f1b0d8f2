"""One call from raw text to a compressed-tensors checkpoint: :func:`quantize`.

``quantize`` checks everything cheap first (recipe shape, model family, mask token, data),
runs Stage I (teacher rollouts -> masked-stage states with frontier weights), hands the states
to the real ``llmcompressor.oneshot`` with ``use_loss_mask=True``, and writes the checkpoint
atomically: into a temporary sibling directory that is renamed into place only after
``save_pretrained`` succeeded, so a failed run never leaves a half-written checkpoint.

Baseline recipes (RTN, GPTQ, rotation + GPTQ) go through the same function and get the same
masked-stage states, so methods differ only in the algorithm.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.recipe import Recipe
from loguru import logger

from fair_calib_llmc.calibration import (
    Stage1Settings,
    WeightStats,
    build_calibration_dataset,
    load_texts,
)
from fair_calib_llmc.models.family import diffusion_spec
from fair_calib_llmc.modifier import FAIRCalibModifier, check_finite_weights
from fair_calib_llmc.prior import PositionPrior

__all__ = [
    "check_recipe_shape",
    "load_recipe",
    "quantize",
    "QuantizeResult",
    "save_atomically",
]


def check_recipe_shape(recipe: dict) -> None:
    """Fail loudly on recipes llm-compressor would parse to zero modifiers.

    llm-compressor only reads ``<name>_stage: <group>_modifiers: <ClassName>: {fields}`` and
    silently ignores anything else.
    """
    shape = "<name>_stage:\n  <group>_modifiers:\n    <ModifierClass>: {fields}"
    if not isinstance(recipe, dict) or not recipe:
        raise ValueError(f"a recipe must be a YAML mapping of the shape\n{shape}")
    n_modifiers = 0
    for stage_key, stage in recipe.items():
        if stage_key == "args":
            continue
        if not stage_key.endswith("_stage") or not isinstance(stage, dict):
            raise ValueError(
                f"recipe key {stage_key!r} is not a '<name>_stage' mapping; llm-compressor "
                f"would silently ignore it. Use the shape\n{shape}"
            )
        for group_key, group in stage.items():
            if not group_key.endswith("_modifiers") or not isinstance(group, dict):
                raise ValueError(
                    f"recipe key {stage_key}.{group_key} is not a '<group>_modifiers' mapping; "
                    f"llm-compressor would silently ignore it. Use the shape\n{shape}"
                )
            for name, fields in group.items():
                if not isinstance(fields, dict):
                    raise ValueError(f"modifier {name!r} needs a mapping of fields")
                n_modifiers += 1
    if n_modifiers == 0:
        raise ValueError(f"the recipe declares no modifier; use the shape\n{shape}")


def load_recipe(recipe: str | os.PathLike | Recipe) -> Recipe:
    """Parse a recipe file or YAML string after :func:`check_recipe_shape`."""
    if isinstance(recipe, Recipe):
        return recipe
    text = Path(recipe).read_text() if Path(str(recipe)).is_file() else str(recipe)
    check_recipe_shape(yaml.safe_load(text))
    return Recipe.create_instance(text)


@dataclass
class QuantizeResult:
    model: object
    calibration: Dataset
    prior: PositionPrior
    weight_stats: WeightStats
    stage1_seconds: float
    stage2_seconds: float
    output_dir: Path | None


def quantize(
    model,
    tokenizer,
    recipe,
    dataset,
    *,
    output_dir: str | os.PathLike | None = None,
    max_prompts: int | None = 64,
    text_column: str = "text",
    seed: int = 0,
    batch_size: int = 16,
) -> QuantizeResult:
    """Stage I + ``oneshot`` + atomic compressed save. See the module docstring.

    ``batch_size`` masked-stage states go through each layer at once: they all have the
    same length (prompt + answer), so batching costs no padding and no truncation.
    """
    recipe = load_recipe(recipe)
    diffusion_spec(model, tokenizer)
    check_finite_weights(model)
    fair = next((m for m in recipe.modifiers if isinstance(m, FAIRCalibModifier)), None)
    stage1 = fair.stage1 if fair else Stage1Settings()  # baselines: the same states
    texts = load_texts(dataset, text_column)

    start = time.monotonic()
    calibration, prior, weight_stats = build_calibration_dataset(
        model, tokenizer, texts, stage1, max_prompts=max_prompts, seed=seed
    )
    stage1_seconds = time.monotonic() - start

    start = time.monotonic()
    model = oneshot(
        model=model,
        processor=tokenizer,
        recipe=recipe,
        dataset=calibration,
        use_loss_mask=fair is not None,
        num_calibration_samples=len(calibration),
        shuffle_calibration_samples=False,
        batch_size=batch_size,  # every state has the same length: batching drops nothing
        max_seq_length=max(len(x) for x in calibration["input_ids"]),
    )
    stage2_seconds = time.monotonic() - start
    logger.info(f"Stage I {stage1_seconds:.1f}s, Stage II (oneshot) {stage2_seconds:.1f}s")

    saved = None
    if output_dir is not None:
        saved = save_atomically(model, tokenizer, output_dir)
    return QuantizeResult(
        model, calibration, prior, weight_stats, stage1_seconds, stage2_seconds, saved
    )


def save_atomically(model, tokenizer, output_dir: str | os.PathLike) -> Path:
    """``save_pretrained(save_compressed=True)`` into a temp sibling, then rename into place."""
    target = Path(output_dir).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        model.save_pretrained(tmp, save_compressed=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
