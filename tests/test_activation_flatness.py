"""integration/activation_flatness.py: the statistics that say whether a linear's inputs have
outliers left for a learned transform to remove."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme

from integration.experiments import ROOT

pytestmark = pytest.mark.unit


@pytest.fixture
def flatness_module(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "integration"))  # its sibling import (seed_runs)
    import fair_calib_llmc.formats.schemes  # noqa: F401 - registers W4A4_G128_PACKED
    from integration import activation_flatness

    return activation_flatness


def test_the_error_is_compressed_tensors_per_token_int4_and_a_rotation_removes_an_outlier(
    flatness_module,
):
    args = preset_name_to_scheme("W4A4_G128_PACKED", ["Linear"]).input_activations
    x = torch.randn(2048, 256, generator=torch.Generator().manual_seed(0))
    # by hand: symmetric int4 per token, step = absmax / 7.5, codes -8..7
    step = x.abs().amax(-1, keepdim=True) / 7.5
    by_hand = ((x / step).round().clamp(-8, 7) * step - x).pow(2).sum() / x.pow(2).sum()
    assert flatness_module.quantization_error(x, args) == pytest.approx(float(by_hand), 1e-5)
    assert flatness_module.kurtosis(x) == pytest.approx(3.0, abs=0.1)  # Gaussian

    x[:, 3] *= 30  # one outlier channel: coarse steps for every other entry of each token
    stats = flatness_module.flatness(x, args, torch.Generator().manual_seed(1))
    assert stats["channel_peak"] > 20 and stats["kurtosis"] > 20
    assert stats["error"] > 5 * stats["error_rotated"]
    assert stats["error_rotated"] < 1.1 * stats["error_gaussian"]
    assert stats["kurtosis_rotated"] < 3.3
