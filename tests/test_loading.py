"""Loading where users run: device and dtype defaults, clear errors for a wrong --model."""

from __future__ import annotations

import pytest
import torch

from fair_calib_llmc.io.default_model import DEFAULT_MODEL_DIR
from fair_calib_llmc.io.loading import load_model, resolve_device, resolve_dtype

from .helpers import save_with_tokenizer

pytestmark = pytest.mark.unit


def test_default_device_is_the_gpu_when_there_is_one():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None).type == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_missing_gpu_fails_with_the_fix():
    with pytest.raises(ValueError, match="--device cpu"):
        resolve_device("cuda")


def test_unknown_device_and_dtype():
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        resolve_device("gpu")
    with pytest.raises(ValueError, match="unknown dtype 'fp8'.*bfloat16"):
        resolve_dtype("fp8")


def test_auto_dtype_keeps_the_checkpoint_dtype(llada, tokenizer, tmp_path):
    save_with_tokenizer(llada.to(torch.bfloat16), tokenizer, tmp_path / "bf16")
    model, _ = load_model(tmp_path / "bf16", device="cpu")
    assert model.dtype == torch.bfloat16
    model, _ = load_model(tmp_path / "bf16", dtype="float32", device="cpu")
    assert model.dtype == torch.float32
    model, _ = load_model(DEFAULT_MODEL_DIR, dtype="bfloat16", device="cpu")
    assert model.dtype == torch.bfloat16


def test_wrong_model_path_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model directory: .*checkpoint directory"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_model(tmp_path / "empty")


def test_another_architecture_is_refused_from_its_config_before_loading(tmp_path, capsys):
    """A GPT-2 directory: one line naming the fix, no weights read (none exist here), no
    transformers load report."""
    import json
    import shutil

    checkpoint = tmp_path / "gpt2"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    shutil.copy(DEFAULT_MODEL_DIR / "tokenizer.json", checkpoint)
    with pytest.raises(ValueError, match="'gpt2' model, not a diffusion LM .*LLaDA or Dream"):
        load_model(checkpoint, device="cpu")
    assert "Loading weights" not in capsys.readouterr().err


def test_truncated_safetensors_names_the_fix(tmp_path):
    import shutil

    checkpoint = shutil.copytree(DEFAULT_MODEL_DIR, tmp_path / "cut")
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="damaged or truncated .*copy or download the checkpoint"):
        load_model(checkpoint, device="cpu")


@pytest.mark.integration
def test_unreachable_hub_fails_fast_with_the_fix(tmp_path):
    """A hub id used to cost ~55 s of retries; the endpoint here refuses at once (loopback)."""
    import os
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import time
        from fair_calib_llmc.io.loading import load_model
        from transformers import AutoModel, AutoTokenizer  # imports are not what is timed
        start = time.monotonic()
        try:
            load_model("some-org/some-dllm", device="cpu")
        except FileNotFoundError as err:
            print(f"{time.monotonic() - start:.1f}", err)
        """
    )
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path)}
    env.pop("HF_HUB_OFFLINE", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    seconds, message = out.stdout.strip().split(" ", 1)
    assert float(seconds) < 5, out.stdout
    assert message.startswith("the model hub cannot be reached and some-org/some-dllm is not")
    assert "pass --model a local checkpoint directory" in message
