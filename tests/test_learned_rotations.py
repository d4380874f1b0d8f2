"""Exact and learned rotations: the maths against references, the modifiers through oneshot."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import yaml
from compressed_tensors.quantization import QuantizationArgs
from datasets import Dataset
from llmcompressor import oneshot
from pydantic import ValidationError
from transformers import AutoModel

from fair_calib_llmc.models import DiffusionLMSpec
from fair_calib_llmc.models.configs import LM_HEAD
from fair_calib_llmc.pipeline import quantize
from fair_calib_llmc.recipe import load_recipe, shipped_recipes, with_overrides
from fair_calib_llmc.stage2.equivalent_modifier import EquivalentRescaleModifier
from fair_calib_llmc.stage2.learned_rotations import (
    ExactSpinQuantModifier,
    LearnedSpinQuantModifier,
)
from fair_calib_llmc.stage2.learned_rotations.cayley import CayleyAdam, cayley, orthogonality_error
from fair_calib_llmc.stage2.learned_rotations.objectives import masked_log_probs, output_kl
from fair_calib_llmc.stage2.learned_rotations.rotated_linear import (
    RotationSites,
    fuse_rotation,
    rotate,
    rotated_forward,
)
from fair_calib_llmc.stage2.learned_rotations.ste import ste_quantize

from .helpers import masked_states, saved

INT4_TOKEN = QuantizationArgs(
    num_bits=4, type="int", symmetric=True, strategy="token", dynamic=True
)
INT4_G16 = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=16)


def _orthogonal(n: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=dtype))[0]


def _probe(model) -> torch.Tensor:
    x = torch.arange(3, 40)[None] % model.config.vocab_size
    with torch.no_grad():
        return model(x).logits


def _learned_recipe(quantizer: str = "GPTQModifier", **learn) -> dict:
    """``spinquant_learned_gptq_w4a4`` learning for a few steps on the frontier-weighted layer
    MSE, varied by ``learn`` (LearnedSpinQuantModifier fields); ``QuantizationModifier`` puts
    ``rtn_w4a4``'s RTN stage in place of GPTQ."""
    fields = {"steps": 5, "objective": "layer_mse", "token_weights": "frontier", **learn}
    data = with_overrides(
        "spinquant_learned_gptq_w4a4",
        {f"LearnedSpinQuantModifier.{key}": value for key, value in fields.items()},
    )
    if quantizer == "QuantizationModifier":
        del data["gptq_stage"]
        data["rtn_stage"] = yaml.safe_load(shipped_recipes()["rtn_w4a4"])["rtn_stage"]
    return data


def _learned_on_a_copy(model, tokenizer, recipe: str, dataset, **oneshot_args) -> dict:
    """The rotations a learned-rotation recipe learns on a copy of ``model``, in order."""
    recipe = load_recipe(recipe)
    oneshot(
        model=copy.deepcopy(model),
        processor=tokenizer,
        recipe=recipe,
        dataset=dataset,
        shuffle_calibration_samples=False,
        **oneshot_args,
    )
    return recipe.modifiers[0]._learned


# --- plain maths ------------------------------------------------------------------------------
@pytest.mark.unit
def test_ste_quantize_has_compressed_tensors_values_and_a_scale_aware_gradient():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, dtype=torch.float64, requires_grad=True)
    y = ste_quantize(torch.nn.Linear(16, 4), x, INT4_TOKEN)
    scale = x.detach().abs().amax(-1, keepdim=True) / 7.5  # symmetric int4: [-8, 7], range 15
    assert torch.equal(y.detach(), (x.detach() / scale).round().clamp(-8, 7) * scale)

    c = torch.randn_like(x)
    (y * c).sum().backward()
    # d/dx of m * round_ste(x / m), m the token's |max|: identity plus, at each token's
    # extreme, sign(x) times the rounding residual's weighted sum
    peak = x.detach().abs().amax(-1, keepdim=True)
    residual = (y.detach() - x.detach()) / peak
    expected = c.clone()
    at_peak = x.detach().abs() == peak
    expected += at_peak * x.detach().sign() * (c * residual).sum(-1, keepdim=True)
    assert torch.allclose(x.grad, expected)


@pytest.mark.integration
@pytest.mark.parametrize("scheme", ["NVFP4", "MXFP4"])
def test_ste_quantize_of_fp4_weights_is_the_deployed_rtn_weight(
    scheme, llada, tokenizer, calibration_texts, tmp_path
):
    """Learning against FP4 sees the weights the checkpoint holds: for NVFP4 with the global
    scale compressed-tensors derives from the weight, for MXFP4 with its E8M0 block scales."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from llmcompressor.modifiers.quantization import QuantizationModifier

    model = saved(llada, tokenizer, tmp_path / "fp")
    data = masked_states(model, tokenizer, calibration_texts, max_prompts=1)
    recipe = QuantizationModifier(scheme=scheme, targets=["Linear"], ignore=[LM_HEAD])
    oneshot(model=model, processor=tokenizer, recipe=recipe, dataset=data)
    module = model.model.transformer.blocks[0].ff_out
    args = module.quantization_scheme.weights
    global_scale = getattr(module, "weight_global_scale", None)
    deployed = fake_quantize(
        module.weight, module.weight_scale, None, args, global_scale=global_scale
    )
    assert torch.equal(ste_quantize(module, module.weight.detach(), args), deployed)


@pytest.mark.unit
def test_cayley_adam_stays_orthogonal_and_solves_a_procrustes_problem():
    target = _orthogonal(24, seed=1, dtype=torch.float32)
    target[:, 0] *= torch.linalg.det(target).sign()  # reachable from I: a rotation, det +1
    q = torch.eye(24).requires_grad_(True)
    optimiser = CayleyAdam([q], lr=0.05, total_steps=300)
    start = float((q.detach() - target).pow(2).sum())
    for _ in range(300):
        (q - target).pow(2).sum().backward()
        optimiser.step()
        optimiser.zero_grad()
    assert orthogonality_error(q.detach()) < 1e-5
    assert float((q.detach() - target).pow(2).sum()) < 0.01 * start
    a = torch.randn(8, 8, dtype=torch.float64)
    assert orthogonality_error(cayley(a - a.T)) < 1e-12


@pytest.mark.unit
@pytest.mark.parametrize("shift", [False, True])
def test_output_kl_is_the_weighted_kl_at_the_masked_positions(shift):
    """Column by column: position i's prediction is column i (LLaDA) or i - 1 (Dream), and so
    is its loss_mask weight; the mask token is never a prediction."""
    spec = DiffusionLMSpec(
        family="dream" if shift else "llada", mask_token_id=0, shift_logits=shift
    )
    torch.manual_seed(0)
    ids = torch.tensor([[5, 6, 0, 0, 7, 0]])
    teacher, student = torch.randn(2, 1, 6, 9).unbind(0)
    weights = torch.rand(1, 6)
    expected, total = 0.0, 0.0
    for i in (2, 3, 5):
        column = i - 1 if shift else i
        p = teacher[0, column, 1:].log_softmax(-1)  # mask token (id 0) excluded
        q = student[0, column, 1:].log_softmax(-1)
        expected += weights[0, column] * (p.exp() * (p - q)).sum()
        total += weights[0, column]
    kl = output_kl(student, masked_log_probs(teacher, ids, spec), ids, weights, spec)
    assert torch.allclose(kl, expected / total, atol=1e-5)


@pytest.mark.unit
@pytest.mark.parametrize("weights_in_loop", [False, True])
def test_rotated_forward_is_the_fused_layer(weights_in_loop):
    """The training forward (weights untouched) equals the fused, fake-quantized layer with
    its output mapped back to the unrotated basis."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 32, bias=True).double()
    sites = RotationSites(q_in=_orthogonal(64, 2), q_out=_orthogonal(16, 3))  # 2 blocks of 16
    x = torch.randn(2, 5, 64, dtype=torch.float64)
    weight_args = INT4_G16 if weights_in_loop else None
    trained = rotated_forward(layer, sites, INT4_TOKEN, weight_args)(x)

    fused = copy.deepcopy(layer)
    fuse_rotation(fused, sites)
    weight = ste_quantize(fused, fused.weight, weight_args) if weights_in_loop else fused.weight
    inputs = ste_quantize(fused, rotate(x, sites.q_in), INT4_TOKEN)
    expected = rotate(F.linear(inputs, weight, fused.bias), sites.q_out.T)
    assert torch.allclose(trained, expected, atol=1e-10)


# --- exact rotations ----------------------------------------------------------------------------
@pytest.mark.integration
def test_exact_rotations_keep_the_full_precision_model(
    dllm, tokenizer, calibration_texts, tmp_path
):
    """Hadamards (R1, R2 fused, R4 online), after the tie-noise control's equivalent rescale
    listed first, leave the fp32 model's logits as they were; upstream SpinQuant's embedding
    centring does not."""
    model = saved(dllm, tokenizer, tmp_path / "fp")
    expected = _probe(model)
    dataset = masked_states(model, tokenizer, calibration_texts, max_prompts=2)

    def rotated(*modifiers):
        m = copy.deepcopy(model)
        oneshot(model=m, processor=tokenizer, recipe=list(modifiers), dataset=dataset)
        return _probe(m)

    rotations = dict(rotations=["R1", "R2", "R4"], transform_type="random-hadamard")
    scale = expected.abs().max()
    exact = rotated(EquivalentRescaleModifier(eps=0.1), ExactSpinQuantModifier(**rotations))
    assert (exact - expected).abs().max() < 1e-4 * scale
    # the R4 engines fuse: Sylvester blocks online, R1 / R2 still random-hadamard
    fused_r4 = ExactSpinQuantModifier(**rotations, r4_transform_type="hadamard", r4_block_size=32)
    assert (rotated(fused_r4) - expected).abs().max() < 1e-4 * scale
    from llmcompressor.modifiers.transform import SpinQuantModifier

    upstream = rotated(SpinQuantModifier(**rotations))
    assert (upstream - expected).abs().max() > 1e-2 * scale


# --- learned rotations --------------------------------------------------------------------------
@pytest.mark.integration
def test_learned_rotation_checkpoint_reloads_exactly(dllm, tokenizer, calibration_texts, tmp_path):
    model = saved(dllm, tokenizer, tmp_path / "fp")
    recipe = load_recipe(_learned_recipe(steps=6))
    result = quantize(
        model, tokenizer, recipe, calibration_texts, max_prompts=4, output_dir=tmp_path / "q"
    )
    learner = recipe.modifiers[0]
    report = learner.learning_report
    assert report["after"]["frontier"] < report["before"]["frontier"]  # it lowers its objective
    assert report["steps"] == 6 and 0 < report["optimise_seconds"] < report["seconds"]
    r1, r2 = learner._learned["R1"], learner._learned["R2"]
    assert len(r2) == model.config.num_hidden_layers
    for q in [r1, *r2]:
        assert orthogonality_error(q.detach()) < 1e-5
    assert (r1.detach() - torch.eye(r1.shape[0])).abs().max() > 1e-3  # it moved
    expected = _probe(result.model)
    reloaded = AutoModel.from_pretrained(tmp_path / "q", dtype=torch.float32).eval()
    assert torch.equal(_probe(reloaded), expected)


@pytest.mark.integration
def test_gradient_checkpointing_learns_the_same_rotations(
    llada, tokenizer, calibration_texts, tmp_path
):
    model = saved(llada, tokenizer, tmp_path / "fp")
    dataset = masked_states(model, tokenizer, calibration_texts, max_prompts=2)

    def learned(checkpointing: bool) -> torch.Tensor:
        recipe = _learned_recipe(steps=3, learn=["R1", "R2"], gradient_checkpointing=checkpointing)
        learned = _learned_on_a_copy(model, tokenizer, recipe, dataset)
        return torch.cat(
            [learned["R1"].detach().flatten()] + [q.detach().flatten() for q in learned["R2"]]
        )

    torch.testing.assert_close(learned(True), learned(False), atol=1e-5, rtol=0)


@pytest.mark.integration
def test_an_r4_block_that_does_not_divide_the_width_fails_before_work(
    llada, tokenizer, calibration_texts, tmp_path
):
    model = saved(llada, tokenizer, tmp_path / "fp")
    dataset = masked_states(model, tokenizer, calibration_texts, max_prompts=2)
    recipe = _learned_recipe(learn=["R1"], r4_block_size=96)  # the fixed R4's block
    with pytest.raises(ValueError, match="r4_block_size 96 does not divide"):
        oneshot(model=model, processor=tokenizer, recipe=load_recipe(recipe), dataset=dataset)


def _states_with_weights(model, tokenizer, texts) -> Dataset:
    """Stage I states whose weights sit on the first four positions only (a case where a
    weighted and an unweighted objective must disagree)."""
    states = masked_states(model, tokenizer, texts, max_prompts=2)
    weights = [[8.0 if i < 4 else 0.01 for i in range(len(w))] for w in states["loss_mask"]]
    return states.remove_columns("loss_mask").add_column("loss_mask", weights)


@pytest.mark.integration
def test_frontier_and_uniform_weights_learn_different_rotations(
    llada, tokenizer, calibration_texts, tmp_path
):
    model = saved(llada, tokenizer, tmp_path / "fp")
    dataset = _states_with_weights(model, tokenizer, calibration_texts)

    def learned_r1(token_weights: str) -> torch.Tensor:
        recipe = _learned_recipe(steps=4, token_weights=token_weights)
        return _learned_on_a_copy(model, tokenizer, recipe, dataset, batch_size=4)["R1"].detach()

    uniform, frontier = learned_r1("uniform"), learned_r1("frontier")
    assert torch.equal(learned_r1("uniform"), uniform)  # deterministic: the gap is the weights
    assert (frontier - uniform).abs().max() > 1e-3


@pytest.mark.unit
@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(learn=["R3"], rotations=["R1", "R3"]), "R3 rotates queries and keys"),
        (dict(learn=["R2"], rotations=["R1"]), "must also be listed in rotations"),
        (dict(learn=[]), "use ExactSpinQuantModifier"),
        (dict(transform_block_size=32), "block-diagonal R1"),
        (dict(transform_type="random-matrix"), "not orthogonal"),
        (dict(steps=0), "steps"),
        (dict(learn=["R1", "R4"]), "R4 the down-projection input"),
    ],
)
def test_settings_that_cannot_be_learned_fail_at_once(fields, message):
    with pytest.raises((ValueError, ValidationError), match=message):
        LearnedSpinQuantModifier(**{"rotations": ["R1", "R2", "R4"], **fields})


@pytest.mark.integration
def test_learning_without_stage1_weights_or_a_quantizer_fails_before_work(
    llada, tokenizer, calibration_texts, tmp_path
):
    model = saved(llada, tokenizer, tmp_path / "fp")
    dataset = masked_states(model, tokenizer, calibration_texts, max_prompts=2)
    unweighted = dataset.remove_columns("loss_mask")
    with pytest.raises(ValueError, match="no Stage I weights"):
        oneshot(
            model=model,
            processor=tokenizer,
            recipe=load_recipe(_learned_recipe()),
            dataset=unweighted,
        )
    alone = [LearnedSpinQuantModifier(rotations=["R1", "R2"], learn=["R1"], steps=2)]
    with pytest.raises(ValueError, match="found no quantized layers"):
        oneshot(model=model, processor=tokenizer, recipe=alone, dataset=dataset)
