"""The exact-function control without rotation: channel scales folded into up/down and v/o."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
from llmcompressor.modifiers.transform import QuIPModifier

from fair_calib_llmc.io.loading import load_model
from fair_calib_llmc.io.reload import load_quantized, probe_logits
from fair_calib_llmc.models.configs import LM_HEAD
from fair_calib_llmc.pipeline import quantize
from fair_calib_llmc.recipe import RecipeError, load_recipe, read_recipe
from fair_calib_llmc.stage2.equivalent import channel_scales, reader_scales, rescale_pair
from fair_calib_llmc.stage2.equivalent_modifier import EquivalentRescaleModifier, rescale_pairs
from integration.experiments import load_experiments

from .helpers import masked_states, saved

pytestmark = pytest.mark.usefixtures("one_thread")

#: the control rows of integration/experiments.yaml and the shipped recipe (with --scheme)
#: each must equal after the rescale
CONTROLS = {
    "gptq-nvfp4-equivalent": ("gptq_w4a4", "NVFP4"),
    "hadamard32_gptq_mxfp4-equivalent": ("hadamard32_gptq_mxfp4", None),
}
#: the fp32 logits of the rescaled model stay this close to the original's, relative to the
#: largest logit (measured 1.3e-6 to 1.5e-6 on both families for eps 1e-3, 1e-2 and 0.1: float
#: rounding, not eps)
FP32_TOLERANCE = 1e-5


def _with_biases(model):
    """Nonzero biases wherever a layer has one (Dream's value projection): the rescale must
    scale a written channel's bias with its weight row."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    return model


def _rescaled(model, **fields):
    rescaled = copy.deepcopy(model)
    oneshot(model=rescaled, recipe=[EquivalentRescaleModifier(**fields)])
    return rescaled


@pytest.mark.integration
def test_the_rescaled_fp32_model_computes_the_same_logits(dllm, tokenizer, tmp_path):
    """Both families, each with grouped-query attention (2 key/value heads for 4 query heads):
    every output-projection column a value channel reaches is divided by its scale."""
    model = saved(_with_biases(dllm), tokenizer, tmp_path / "fp")
    expected = probe_logits(model)
    v, o, _ = rescale_pairs(model)[0]
    assert model.get_submodule(o).in_features == 2 * model.get_submodule(v).out_features  # GQA
    for eps in (1e-2, 0.1):
        diff = (probe_logits(_rescaled(model, eps=eps)) - expected).abs().max()
        assert diff < FP32_TOLERANCE * expected.abs().max(), (eps, diff)


@pytest.mark.integration
def test_the_rescale_changes_exactly_the_paired_weights(dllm, tokenizer, tmp_path):
    model = saved(_with_biases(dllm), tokenizer, tmp_path / "fp")
    rescaled = _rescaled(model, eps=1e-2)
    pairs = rescale_pairs(model)
    assert len(pairs) == 2 * model.config.num_hidden_layers
    paired = {name for writer, reader, _ in pairs for name in (writer, reader)}
    before = dict(model.named_parameters())
    changed = {n for n, p in rescaled.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {
        f"{name}.{kind}"
        for name in paired
        for kind in ("weight", "bias")
        if f"{name}.{kind}" in before
    }
    for _, reader, _ in pairs:  # the down projection among them, every layer
        old, new = before[f"{reader}.weight"], rescaled.get_submodule(reader).weight
        ratio = (old / new).double()  # column j divided by s_c(j): the same ratio down a column
        assert torch.allclose(ratio, ratio[:1].expand_as(ratio), rtol=1e-5)
        assert (ratio[0] - 1).abs().max() > 1e-3
    down = {reader for _, reader, head_dim in pairs if head_dim is None}
    assert len(down) == model.config.num_hidden_layers
    # seeded: the same seed folds the same scales, another seed others
    again, other = _rescaled(model, eps=1e-2), _rescaled(model, eps=1e-2, seed=1)
    name = f"{sorted(down)[0]}.weight"
    assert torch.equal(again.get_parameter(name), rescaled.get_parameter(name))
    assert not torch.equal(other.get_parameter(name), rescaled.get_parameter(name))


@pytest.mark.unit
def test_a_value_channel_divides_every_query_heads_column():
    """reader_scales follows repeat_kv: query head h reads key/value head h // n_rep."""
    scales = torch.tensor([1.0, 2.0, 3.0, 4.0])  # 2 kv heads of 2 channels
    assert reader_scales(scales, 8, head_dim=2).tolist() == [1, 2, 1, 2, 3, 4, 3, 4]
    assert reader_scales(scales, 4).tolist() == scales.tolist()
    with pytest.raises(ValueError, match="cannot read"):
        reader_scales(scales, 8)
    torch.manual_seed(0)
    up, down = torch.nn.Linear(6, 4, bias=True), torch.nn.Linear(8, 3)
    x = torch.randn(5, 6, dtype=torch.float64)
    up, down = up.double(), down.double()
    heads = lambda v: v.view(5, 2, 2).repeat_interleave(2, dim=1).flatten(1)  # noqa: E731
    expected = down(heads(up(x)))
    rescale_pair(up, down, channel_scales(4, 0.3, torch.Generator().manual_seed(0)), head_dim=2)
    assert torch.allclose(down(heads(up(x))), expected, atol=1e-12)


@pytest.mark.integration
@pytest.mark.parametrize("scheme", ["NVFP4", "MXFP4"])
def test_the_rescale_runs_once_before_an_rtn_quantizer_observes(
    scheme, llada, tokenizer, calibration_texts, tmp_path
):
    """Before RTN ``QuantizationModifier`` (NVFP4: a calibrating one; MXFP4: data-free): its
    weight scales are those of the model rescaled once, beforehand, by hand."""
    model = saved(llada, tokenizer, tmp_path / "fp")
    dataset = masked_states(model, tokenizer, calibration_texts, max_prompts=2)
    quantizer = dict(scheme=scheme, targets=["Linear"], ignore=[LM_HEAD])
    together = copy.deepcopy(model)
    oneshot(
        model=together,
        recipe=[EquivalentRescaleModifier(eps=1e-2), QuantizationModifier(**quantizer)],
        dataset=dataset,
    )
    by_hand = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    for writer, reader, head_dim in rescale_pairs(by_hand):
        w = by_hand.get_submodule(writer)
        scales = channel_scales(w.out_features, 1e-2, generator)
        rescale_pair(w, by_hand.get_submodule(reader), scales, head_dim)
    oneshot(model=by_hand, recipe=[QuantizationModifier(**quantizer)], dataset=dataset)
    down = [reader for _, reader, head_dim in rescale_pairs(model) if head_dim is None]
    for name in down:
        mine, reference = together.get_submodule(name), by_hand.get_submodule(name)
        assert torch.equal(mine.weight, reference.weight)
        assert torch.equal(mine.weight_scale, reference.weight_scale)
    assert not torch.equal(
        together.get_submodule(down[0]).weight, model.get_submodule(down[0]).weight
    )


@pytest.mark.integration
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("control", list(CONTROLS))
def test_a_control_checkpoint_reloads_with_identical_logits(
    control, dtype, llada, tokenizer, calibration_texts, tmp_path
):
    saved(llada, tokenizer, tmp_path / "fp")
    model, _ = load_model(tmp_path / "fp", dtype=dtype, device="cpu")
    result = quantize(
        model,
        tokenizer,
        load_experiments().recipe(control),
        calibration_texts,
        max_prompts=2,
        output_dir=tmp_path / "q",
    )
    assert isinstance(result.modifiers[0], EquivalentRescaleModifier) and result.modifiers[0]._done
    expected = probe_logits(result.model)
    assert torch.equal(probe_logits(load_quantized(tmp_path / "q", dtype=dtype)), expected)


@pytest.mark.unit
@pytest.mark.parametrize("control", list(CONTROLS))
def test_a_control_recipe_is_its_baseline_after_the_rescale(control):
    """What the benchmark compares the control row against is the baseline row's recipe."""
    data = load_experiments().recipe(control)
    first, *rest = data
    assert list(data[first]["equivalent_modifiers"]) == ["EquivalentRescaleModifier"]
    parent, scheme = CONTROLS[control]
    baseline = yaml.safe_load(read_recipe(parent)[0])
    if scheme is not None:
        baseline["gptq_stage"]["gptq_modifiers"]["GPTQModifier"]["scheme"] = scheme
    assert {stage: data[stage] for stage in rest} == baseline
    assert type(load_recipe(data).modifiers[0]).__name__ == "EquivalentRescaleModifier"


@pytest.mark.unit
@pytest.mark.parametrize("eps", [0, -0.01])
def test_a_non_positive_eps_fails_in_one_line_naming_the_fix(eps):
    with pytest.raises(ValueError, match="eps must be > 0"):
        EquivalentRescaleModifier(eps=eps)
    recipe = (
        "equivalent_stage:\n  equivalent_modifiers:\n"
        f"    EquivalentRescaleModifier:\n      eps: {eps}\n"
    )
    with pytest.raises(RecipeError) as err:
        load_recipe(recipe)
    assert "\n" not in str(err.value)
    assert "set a small positive eps such as 0.01" in str(err.value)


@pytest.mark.integration
def test_after_an_online_rotation_the_rescale_refuses(llada, tokenizer, tmp_path):
    """Block Hadamards on every linear's input do not commute with the scales: the rescale
    must come first in the recipe, and says so."""
    model = saved(llada, tokenizer, tmp_path / "fp")
    hadamards = QuIPModifier(
        rotations=["v"], transform_type="hadamard", transform_block_size=32, targets=["Linear"]
    )
    with pytest.raises(ValueError, match="first in the recipe"):
        oneshot(model=model, recipe=[hadamards, EquivalentRescaleModifier(eps=1e-2)])


@pytest.mark.integration
def test_listed_first_the_rescale_composes_with_flatquant(
    llada, tokenizer, calibration_texts, tmp_path, monkeypatch
):
    """The one tie-noise control before a FlatQuant pipeline (``flatquant_w4a4``: exact R1 / R2,
    learned per-layer transforms, GPTQ): the run completes and reloads, and in full precision
    the rescaled model (and the rescaled, rotated one FlatQuant starts learning from) computes
    the original's logits."""
    from fair_calib_llmc.recipe import with_overrides
    from fair_calib_llmc.stage2.flatquant import FlatQuantModifier

    model = saved(llada, tokenizer, tmp_path / "fp")
    expected = probe_logits(model)
    seen = {}
    rescale, learn = EquivalentRescaleModifier.on_calibration_start, FlatQuantModifier._learn

    def rescale_and_look(self, state, event, **kwargs):
        rescale(self, state, event, **kwargs)
        seen["rescaled"] = probe_logits(state.model)

    def look_and_learn(self, model, dataloader):
        seen["rotated"] = probe_logits(model)  # quantization stays off until GPTQ calibrates
        learn(self, model, dataloader)

    monkeypatch.setattr(EquivalentRescaleModifier, "on_calibration_start", rescale_and_look)
    monkeypatch.setattr(FlatQuantModifier, "_learn", look_and_learn)
    flat = with_overrides("flatquant_w4a4", {"FlatQuantModifier.epochs": 1})
    control = {
        "equivalent_stage": {"equivalent_modifiers": {"EquivalentRescaleModifier": {"eps": 0.1}}},
        **flat,
    }
    result = quantize(
        model,
        tokenizer,
        yaml.safe_dump(control, sort_keys=False),
        calibration_texts,
        max_prompts=4,
        output_dir=tmp_path / "q",
    )
    assert [type(m).__name__ for m in result.modifiers[:2]] == [
        "EquivalentRescaleModifier",
        "FlatQuantModifier",
    ]
    assert result.modifiers[0]._done and result.modifiers[1].learning_report["layers"]
    scale = expected.abs().max()
    assert (seen["rescaled"] - expected).abs().max() < FP32_TOLERANCE * scale
    assert (seen["rotated"] - expected).abs().max() < 1e-4 * scale  # the rotation test's bound
    reloaded = probe_logits(load_quantized(tmp_path / "q"))
    assert torch.equal(reloaded, probe_logits(result.model))
