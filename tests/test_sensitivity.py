"""Decision sensitivity: the gradient it squares is the loss's real gradient (finite
differences), it vanishes with nothing decided, and Stage I turns it into token weights that
reach the context of a decision."""

from __future__ import annotations

import pytest
import torch

from fair_calib_llmc.models import diffusion_spec
from fair_calib_llmc.models.family import align_logits
from fair_calib_llmc.sampling.samplers import default_sampler
from fair_calib_llmc.stage1.prior import PriorSettings
from fair_calib_llmc.stage1.sensitivity import layer_sensitivity
from fair_calib_llmc.stage1.states import Stage1Settings, build_calibration_dataset

pytestmark = pytest.mark.unit


def _case(model, tokenizer, n=3, length=20):
    spec = diffusion_spec(model, tokenizer)
    gen = torch.Generator().manual_seed(0)
    states = torch.randint(3, 300, (n, length), generator=gen)
    states[:, 12:] = spec.mask_token_id
    targets = torch.randint(3, 300, (n, length), generator=gen)
    weights = torch.zeros(n, length)
    weights[:, 12:15] = torch.rand(n, 3, generator=gen) + 0.5
    return spec, states, targets, weights


def _loss(model, embeds, targets, weights, spec):
    logits = align_logits(model(inputs_embeds=embeds).logits, spec)  # float64 throughout
    logits[..., spec.mask_token_id] = float("-inf")
    log_p = logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return float(-(weights * log_p).sum())


def test_first_layer_sensitivity_is_the_squared_gradient(dllm, tokenizer):
    """||dL/dh_t||^2 at the first layer's input (the embeddings), checked against a central
    finite difference of the loss along the gradient's own direction."""
    model = dllm.double()
    spec, states, targets, weights = _case(model, tokenizer, n=1)
    per_layer = layer_sensitivity(model, states, targets, weights, spec)
    assert per_layer.shape == (model.config.num_hidden_layers, 1, states.shape[1])
    embeds = model.get_input_embeddings()(states).detach().requires_grad_(True)
    logits = align_logits(model(inputs_embeds=embeds).logits.float(), spec)
    logits[..., spec.mask_token_id] = float("-inf")
    loss = -(weights * logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0]).sum()
    (grad,) = torch.autograd.grad(loss, embeds)
    eps = 1e-3  # RMSNorm computes in float32 even in a float64 model: a coarse check
    for t in (0, 5, 13):  # a prompt token, another, a decided position
        direction = torch.zeros_like(embeds)
        direction[0, t] = grad[0, t] / grad[0, t].norm()
        with torch.no_grad():
            up = _loss(model, embeds + eps * direction, targets, weights, spec)
            down = _loss(model, embeds - eps * direction, targets, weights, spec)
        slope = (up - down) / (2 * eps)  # = ||grad_t||
        assert per_layer[0, 0, t] == pytest.approx(slope**2, rel=2e-2)
        assert per_layer[0, 0, t] > 0  # every position feeds the decisions (bidirectional)


def test_nothing_decided_means_no_sensitivity(llada, tokenizer):
    spec, states, targets, weights = _case(llada, tokenizer)
    assert torch.equal(
        layer_sensitivity(llada, states, targets, torch.zeros_like(weights), spec),
        torch.zeros(llada.config.num_hidden_layers, *states.shape),
    )
    with pytest.raises(ValueError, match="same \\(N, L\\) shape"):
        layer_sensitivity(llada, states, targets[:, :5], weights, spec)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_stage_one_weights_follow_the_decision_into_the_context(
    family, llada, dream, tokenizer, calibration_texts
):
    model = {"llada": llada, "dream": dream}[family]
    spec = diffusion_spec(model, tokenizer)

    def weights(source):
        settings = Stage1Settings(
            sampler=default_sampler(spec, gen_length=16),
            prompt_length=16,
            states_per_prompt=4,
            prior=PriorSettings(source=source),
        )
        dataset, _, stats = build_calibration_dataset(
            model, tokenizer, calibration_texts, settings, max_prompts=4
        )
        return torch.tensor(dataset["loss_mask"]), stats

    by_state, _ = weights("state")
    by_sensitivity, stats = weights("sensitivity")
    assert by_sensitivity.shape == by_state.shape
    assert torch.isfinite(by_sensitivity).all()
    assert by_sensitivity.mean() == pytest.approx(1.0, rel=1e-4)  # normalised like the others
    # the prompt is context: uniform under "state", graded by how much decisions read it
    prompt = slice(0, 15)  # Dream: column 15 decides the first answer position
    assert torch.unique(by_state[:, prompt]).numel() == 1
    assert by_sensitivity[:, prompt].std() > 0.05
    assert 0 < stats.frontier_mass_share < 1
