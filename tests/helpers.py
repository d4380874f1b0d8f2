"""Shared test helpers: tiny LLaDA / Dream configs, save/reload, test-size Stage I.

Fixtures live in ``conftest.py``; plain functions live here so tests import them by name
(``from .helpers import saved``) instead of importing from ``conftest``.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import torch

from fair_calib_llmc.models import DreamConfig, LLaDAConfig

DATA = Path(__file__).with_name("data")


def fixture_texts(name: str) -> list[str]:
    """A frozen list of texts under ``tests/data/``: fixed, so editing a package docstring does
    not change any test's token ids."""
    return json.loads((DATA / f"{name}.json").read_text())


#: The package's sources as of commit 3db18fc, in sorted-path order: the text the test
#: tokenizer is trained on and the calibration text is cut from.
PACKAGE_SOURCES = fixture_texts("package_sources")


def llada_config(tokenizer, **overrides) -> LLaDAConfig:
    fields = dict(
        d_model=128,
        n_heads=4,
        n_kv_heads=2,
        n_layers=2,
        mlp_hidden_size=256,
        vocab_size=len(tokenizer),
        embedding_size=len(tokenizer),
        mask_token_id=tokenizer.mask_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_sequence_length=256,
        rope_theta=10000.0,
    )
    return LLaDAConfig(**{**fields, **overrides})


def dream_config(tokenizer, **overrides) -> DreamConfig:
    fields = dict(
        hidden_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        intermediate_size=256,
        vocab_size=len(tokenizer),
        mask_token_id=tokenizer.mask_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.eos_token_id,
        max_position_embeddings=256,
        rope_theta=10000.0,
    )
    return DreamConfig(**{**fields, **overrides})


def sharpen(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random init with larger weights so predictions are confident and input-dependent."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15 if "embed" not in name and "wte" not in name else 1.0)
    return model.eval()


def save_with_tokenizer(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def saved(model, tokenizer, path: Path):
    """Save and reload, so the model has a directory (``config._name_or_path``)."""
    from transformers import AutoModel

    save_with_tokenizer(model, tokenizer, path)
    return AutoModel.from_pretrained(path, dtype=torch.float32).eval()


def masked_states(model, tokenizer, texts, max_prompts: int, prompt_length: int = 16):
    """Stage I at test size: 16-token prompts, 16-step rollouts, 2 states per prompt."""
    from fair_calib_llmc import Stage1Settings, build_calibration_dataset
    from fair_calib_llmc.models import diffusion_spec
    from fair_calib_llmc.sampling.samplers import default_sampler

    sampler = default_sampler(diffusion_spec(model, tokenizer), gen_length=16)
    settings = Stage1Settings(sampler=sampler, prompt_length=prompt_length, states_per_prompt=2)
    dataset, _, _ = build_calibration_dataset(
        model, tokenizer, texts, settings, max_prompts=max_prompts
    )
    return dataset


def tiny_causal_lm(tokenizer):
    """A one-layer Llama: a causal LM, which every entry point must turn away."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        vocab_size=len(tokenizer),
    )
    return LlamaForCausalLM(config)


_HOLD_LOCK = """
import sys
from fair_calib_llmc.io.output_lock import output_lock

with output_lock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()  # until the test closes our stdin
"""


@contextlib.contextmanager
def output_locked_by_another_process(target: Path):
    """Another process holding :func:`fair_calib_llmc.io.output_lock.output_lock` on ``target``;
    yields its PID."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(target)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in proc.stdout:  # llm-compressor may log to stdout on import
            if line.strip() == "locked":
                break
        else:
            raise AssertionError(proc.stderr.read())
        yield proc.pid
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
