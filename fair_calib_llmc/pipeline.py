"""One call from raw text to a compressed-tensors checkpoint: :func:`quantize`.

``quantize`` checks everything cheap first (recipe shape, model family, mask token, Stage I
settings against the model, data), runs Stage I (teacher rollouts -> masked-stage states, or
clean text, with per-token weights from one source), hands the rows
to the real ``llmcompressor.oneshot`` with ``use_loss_mask=True``, and writes the checkpoint
atomically (:mod:`fair_calib_llmc.io.checkpoint`). The output directory is checked before Stage I,
so a path that cannot or must not be written fails in seconds, not after calibration.

Baseline recipes (RTN, GPTQ, rotation + GPTQ) go through the same function and get the same
masked-stage states, so methods differ only in the algorithm.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.core import active_session, reset_session
from llmcompressor.recipe import Recipe
from loguru import logger

from fair_calib_llmc.distributed import on_source_rank
from fair_calib_llmc.fx_registry_leak import release_traced_model
from fair_calib_llmc.io.checkpoint import save_atomically
from fair_calib_llmc.io.data import load_texts
from fair_calib_llmc.io.loading import load_model
from fair_calib_llmc.io.output_dir import (
    check_output_dir,
    expected_checkpoint_bytes,
    model_directory,
)
from fair_calib_llmc.io.output_lock import output_lock
from fair_calib_llmc.io.reload import restore_decompressed
from fair_calib_llmc.models.family import diffusion_spec
from fair_calib_llmc.recipe import RecipeError, load_recipe_and_stage1
from fair_calib_llmc.stage1.sources import WeightSource
from fair_calib_llmc.stage1.states import (
    Stage1Settings,
    WeightStats,
    build_calibration_dataset,
    check_prompt_count,
)
from fair_calib_llmc.stage2.modifier import FAIRCalibModifier, check_finite_weights

__all__ = [
    "quantize",
    "QuantizeResult",
    "refuse_quantized_model",
    "kept_dtype",
    "restore_model_dtype",
    "session_released",
    "stage1_settings",
]


@dataclass
class QuantizeResult:
    model: object
    calibration: Dataset
    #: Stage I's weight source and its estimate (:mod:`fair_calib_llmc.stage1.sources`)
    prior: WeightSource
    weight_stats: WeightStats
    stage1_seconds: float
    stage2_seconds: float
    output_dir: Path | None
    #: the modifiers that ran (their state after ``oneshot``, e.g. a learner's report)
    modifiers: list | None = None


def stage1_settings(
    recipe: Recipe,
    stage1: Stage1Settings | dict | None = None,
    recipe_level: dict | None = None,
    prompt_length: int | None = None,
) -> Stage1Settings:
    """The Stage I settings of a :func:`quantize` run, from one of (first found):

    1. ``quantize(stage1=...)``;
    2. the recipe's own top-level ``stage1:`` mapping (any recipe may carry one, baselines
       included; :func:`fair_calib_llmc.recipe.load_recipe_and_stage1`), or, for backward
       compatibility, ``FAIRCalibModifier.stage1`` (a recipe sets at most one of the two);
    3. the defaults (:class:`Stage1Settings`).

    ``prompt_length`` (``--prompt-length``) then overrides that one field. Every recipe goes
    through this, so a baseline's states are built exactly as FAIR-Calib's when the settings
    agree.
    """
    fair = next((m for m in recipe.modifiers if isinstance(m, FAIRCalibModifier)), None)
    in_modifier = fair is not None and "stage1" in fair.model_fields_set
    if recipe_level is not None and in_modifier:
        raise RecipeError(
            "the recipe sets Stage I twice (a top-level stage1: and FAIRCalibModifier.stage1); "
            "keep one, the top-level stage1:"
        )
    if stage1 is None:
        if recipe_level is not None:
            stage1 = recipe_level
        elif fair is not None:
            stage1 = fair.stage1
        else:
            stage1 = Stage1Settings()
    try:
        stage1 = Stage1Settings.parse(stage1)
        if prompt_length is not None:
            stage1 = Stage1Settings.parse({**stage1.model_dump(), "prompt_length": prompt_length})
    except ValueError as err:  # a recipe's (or stage1=) settings: a recipe error, one line
        raise RecipeError(str(err)) from None
    return stage1


@contextmanager
def config_on_disk(model) -> Iterator[None]:
    """Give a model built in memory a ``config._name_or_path`` for the duration.

    llm-compressor re-reads the config from ``config._name_or_path`` (``oneshot``'s model
    check, and the compressed save, which re-writes the original ``config.json``); a model that
    was never saved has none and would fail with a hub lookup of ``''``. Its current config is
    written to a temporary directory instead, and the name is cleared again afterwards.
    """
    if getattr(model.config, "_name_or_path", ""):
        yield
        return
    with tempfile.TemporaryDirectory(prefix="fair-calib-llmc-config-") as tmp:
        model.config.save_pretrained(tmp)
        model.config._name_or_path = model.name_or_path = tmp
        try:
            yield
        finally:
            model.config._name_or_path = model.name_or_path = ""


def refuse_quantized_model(model) -> None:
    """``oneshot`` turns the model into a quantized one in place (quantization schemes and
    observers on its modules, fused rotations, compressed weights after a save); quantizing it
    again fails deep inside llm-compressor (``'Linear' object has no attribute 'weight'``) or
    quantizes quantized weights. Refuse it first, naming the fix."""
    quantized = getattr(model, "transform_config", None) is not None or any(
        getattr(module, "quantization_scheme", None) is not None
        or getattr(module, "quantization_status", None) is not None
        for module in model.modules()
    )
    if quantized:
        raise ValueError(
            f"this {type(model).__name__} went through quantize()/oneshot already (it holds "
            "quantization schemes or fused rotations); load the full-precision model again and "
            "quantize that"
        )


@contextmanager
def session_released(recipe: Recipe) -> Iterator[None]:
    """Reset llm-compressor's active session when the block ends (also on an error).

    ``oneshot`` leaves its process-wide session holding the model (``state.model``) and the
    recipe's modifiers, which hold the model's modules (GPTQ's per-module dicts, hooks'
    handles), until the next ``oneshot`` resets it: a model the caller dropped stays in (GPU)
    memory, and a sweep peaks with two models. The block covers ``oneshot`` and the
    compressed save, which reads the session's recipe (``recipe.yaml``). The modifiers stay
    readable from :attr:`QuantizeResult.modifiers`; the session keeps a copy of the recipe
    built from its YAML (modifiers that never ran, holding nothing), so a later
    ``result.model.save_pretrained`` still writes the recipe that made the model.
    """
    try:
        yield
    finally:
        reset_session()
        active_session().lifecycle.recipe = Recipe.create_instance(recipe.yaml())


def kept_dtype(module: torch.nn.Module, dtype: torch.dtype) -> torch.dtype:
    """The dtype ``module``'s own floating tensors keep after :func:`quantize`: an online
    transform's (SpinQuant / QuIP R3, R4: a compressed-tensors transform module applied at run
    time) is its scheme's ``precision`` (float64 unless the recipe says otherwise, and so it is
    saved); every other tensor's is the model's ``dtype``."""
    args, scheme = getattr(module, "args", None), getattr(module, "scheme", None)
    is_online = getattr(args, "is_online", None)
    if scheme is not None and callable(is_online) and is_online():
        return scheme.precision
    return dtype


@torch.no_grad()
def restore_model_dtype(model, dtype: torch.dtype) -> int:
    """Give every floating parameter and buffer ``oneshot`` left in another dtype the one it
    keeps (:func:`kept_dtype`): the model's ``dtype``, or an online transform's precision.

    auto-round optimises in bfloat16 where the CPU or GPU has it (its ``amp``) and casts the
    whole model, online Hadamards included: a float32 model's forward then fails (``float !=
    BFloat16``), and the transforms came back float32 on such a machine but float64 on one
    without bfloat16. Casting a Hadamard (entries +-1) back to float64 is exact. Wider
    floating tensors that are not transforms stay; integer ones (zero points, packed weights)
    are never touched. Each tensor is replaced through its module's (offload) dict, as
    compressed-tensors' update would copy into the old dtype; a tensor shared by several
    modules stays shared. Returns the tensors cast.
    """
    cast: dict[int, torch.Tensor] = {}
    for module in model.modules():
        target = kept_dtype(module, dtype)
        bits = torch.finfo(target).bits
        for tensors in (module._parameters, module._buffers):
            for name in list(tensors):
                tensor = tensors[name]
                if tensor is None or not tensor.is_floating_point() or tensor.dtype == target:
                    continue
                if target == dtype and torch.finfo(tensor.dtype).bits > bits:
                    continue
                if id(tensor) not in cast:
                    data = tensor.data.to(target)
                    cast[id(tensor)] = (
                        torch.nn.Parameter(data, requires_grad=tensor.requires_grad)
                        if isinstance(tensor, torch.nn.Parameter)
                        else data
                    )
                del tensors[name]  # an offload cache offloads a new key anew, in its dtype
                tensors[name] = cast[id(tensor)]
    return len(cast)


@contextmanager
def _claimed_output_dir(model, model_dir, output_dir, overwrite) -> Iterator[Path | None]:
    """The checked output directory (``None``: no save), locked until the block ends, so a
    second run into it fails before its Stage I instead of racing this one's save. Under
    torchrun it is checked and locked on the rank that writes."""
    if output_dir is None:
        yield None
        return
    with contextlib.ExitStack() as claim:
        yield on_source_rank(
            lambda: claim.enter_context(
                output_lock(
                    check_output_dir(
                        output_dir,
                        model_dir=model_dir,
                        overwrite=overwrite,
                        expected_bytes=expected_checkpoint_bytes(model),
                    )
                )
            )
        )


def _check_arguments(model, *, seed, batch_size) -> None:
    """One line for arguments that would otherwise fail deep inside a run (``model=None`` an
    AttributeError, ``seed='x'`` a torch error, ``batch_size=0`` after Stage I)."""
    if model is None or not (isinstance(model, (str, os.PathLike, torch.nn.Module))):
        raise TypeError(
            f"quantize() needs a model (a LLaDA / Dream torch module, or its checkpoint "
            f"directory), got {type(model).__name__}"
        )
    for name, value in (("seed", seed), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an integer, got {value!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")


def quantize(
    model,
    tokenizer,
    recipe,
    dataset,
    *,
    output_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    max_prompts: int | None = 64,
    text_column: str = "text",
    seed: int = 0,
    batch_size: int = 16,
    prompt_length: int | None = None,
    scheme: str | None = None,
    overrides: Mapping[str, object] | None = None,
    stage1: Stage1Settings | dict | None = None,
) -> QuantizeResult:
    """Stage I + ``oneshot`` + atomic compressed save. See the module docstring.

    :param model: a LLaDA / Dream model, or the path of a checkpoint directory (loaded with
        :func:`fair_calib_llmc.io.loading.load_model`: on the GPU if there is one, in its dtype)
    :param tokenizer: the model's tokenizer (``None`` with a path: the checkpoint's own)
    :param stage1: Stage I settings (:class:`~fair_calib_llmc.stage1.states.Stage1Settings`
        or its fields as a mapping), for any recipe, baselines included; see
        :func:`stage1_settings` for where they come from when not given
    :param prompt_length: tokens of each text used as a rollout prompt (overrides only that
        field of the Stage I settings)
    :param output_dir: where to save the compressed checkpoint (``None``: do not save)
    :param overwrite: replace a non-empty ``output_dir`` (the old one is deleted only after the
        new checkpoint is in place); the model's own directory is never replaced
    :param batch_size: masked-stage states that go through each layer at once; they all have
        the same length (prompt + answer), so batching costs no padding and no truncation
    :param scheme: replace the quantization scheme of the recipe's quantizing modifiers (a
        compressed-tensors preset name such as ``NVFP4``, ``MXFP4`` or
        ``W4A4_G128_AG128_PACKED``; see :func:`fair_calib_llmc.recipe.with_scheme`)
    :param overrides: recipe fields to set, ``{"Modifier.field": value}`` or
        ``{"stage1.field": value}``
        (:func:`fair_calib_llmc.recipe.with_overrides`; ``--set`` on the command line)
    """
    check_prompt_count(max_prompts)
    _check_arguments(model, seed=seed, batch_size=batch_size)
    recipe, recipe_level = load_recipe_and_stage1(recipe, scheme=scheme, overrides=overrides)
    if isinstance(model, (str, os.PathLike)):
        if output_dir is not None:  # before loading, which takes minutes at 8B size
            check_output_dir(output_dir, model_dir=Path(model).expanduser(), overwrite=overwrite)
        model, own_tokenizer = load_model(model)
        tokenizer = own_tokenizer if tokenizer is None else tokenizer
    refuse_quantized_model(model)
    if not callable(tokenizer):
        raise ValueError(
            f"quantize() needs the model's tokenizer, got {type(tokenizer).__name__}; pass "
            "tokenizer=AutoTokenizer.from_pretrained(MODEL_DIR) (or the model as a path)"
        )
    # once for the run: a causal or mask-less model fails here, first; Stage I, the
    # modifiers and the save take this spec (the model's config is not written to)
    spec = diffusion_spec(model, tokenizer)
    check_finite_weights(model)
    stage1 = stage1_settings(recipe, stage1, recipe_level, prompt_length)
    stage1.sampler_for(spec)  # the settings against this model, before any work
    model_dir = model_directory(model)
    with _claimed_output_dir(model, model_dir, output_dir, overwrite) as output_dir:
        fair = next((m for m in recipe.modifiers if isinstance(m, FAIRCalibModifier)), None)
        for modifier in recipe.modifiers:
            if hasattr(modifier, "_diffusion_spec"):  # ours: the run's spec, not the config's
                modifier._diffusion_spec = spec
        if any(type(m).__name__ == "AutoRoundModifier" for m in recipe.modifiers):
            # auto-round refuses pipeline batches of several states (it exits the process); it
            # groups states itself with AutoRoundModifier.batch_size
            batch_size = 1
        texts = load_texts(dataset, text_column)

        start = time.monotonic()
        calibration, prior, weight_stats = build_calibration_dataset(
            model, tokenizer, texts, stage1, max_prompts=max_prompts, seed=seed, spec=spec
        )
        stage1_seconds = time.monotonic() - start

        dtype = model.dtype
        with config_on_disk(model), session_released(recipe):
            start = time.monotonic()
            try:
                model = oneshot(
                    model=model,
                    processor=tokenizer,
                    recipe=recipe,
                    dataset=calibration,
                    use_loss_mask=fair is not None,
                    num_calibration_samples=len(calibration),
                    shuffle_calibration_samples=False,
                    batch_size=batch_size,
                    max_seq_length=max(len(x) for x in calibration["input_ids"]),
                )
            finally:
                release_traced_model(model)
            restore_model_dtype(model, dtype)
            stage2_seconds = time.monotonic() - start
            logger.info(f"Stage I {stage1_seconds:.1f}s, Stage II (oneshot) {stage2_seconds:.1f}s")

            saved = None
            if output_dir is not None:
                saved = save_atomically(
                    model,
                    tokenizer,
                    output_dir,
                    overwrite=overwrite,
                    model_dir=model_dir,
                    # the checkpoint states the mask token it was calibrated with
                    config_updates={"mask_token_id": spec.mask_token_id},
                )
                # the compressed save leaves the model compressed, to decompress at its next
                # forward: FP4 weights would come back in bf16 whatever the model's dtype
                restore_decompressed(model)
        return QuantizeResult(
            model,
            calibration,
            prior,
            weight_stats,
            stage1_seconds,
            stage2_seconds,
            saved,
            list(recipe.modifiers),
        )
