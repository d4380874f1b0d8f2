"""Tiny LLaDA / Dream models built from configs, with an offline tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import fair_calib_llmc  # noqa: F401  (registers the Auto classes)
from fair_calib_llmc.models import DreamConfig, DreamModel, LLaDAConfig, LLaDAModelLM
from fair_calib_llmc.tokenization import train_bpe_tokenizer

PACKAGE_SOURCES = sorted((Path(fair_calib_llmc.__file__).parent).rglob("*.py"))


@pytest.fixture(scope="session")
def tokenizer():
    return train_bpe_tokenizer((p.read_text() for p in PACKAGE_SOURCES), vocab_size=320)


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


def _sharpen(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random init with larger weights so predictions are confident and input-dependent."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15 if "embed" not in name and "wte" not in name else 1.0)
    return model.eval()


@pytest.fixture
def llada(tokenizer):
    return _sharpen(LLaDAModelLM(llada_config(tokenizer)), seed=0)


@pytest.fixture
def dream(tokenizer):
    return _sharpen(DreamModel(dream_config(tokenizer)), seed=1)


@pytest.fixture(params=["llada", "dream"])
def dllm(request, llada, dream):
    return {"llada": llada, "dream": dream}[request.param]


def save_with_tokenizer(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def calibration_texts():
    """Real text the tokenizer knows: this package's sources, in 400-character pieces."""
    text = "\n".join(p.read_text() for p in PACKAGE_SOURCES)
    return [text[i : i + 400] for i in range(0, 400 * 12, 400)]


def saved(model, tokenizer, path: Path):
    """Save and reload (llm-compressor re-reads the config from ``name_or_path``)."""
    from transformers import AutoModel

    save_with_tokenizer(model, tokenizer, path)
    return AutoModel.from_pretrained(path, dtype=torch.float32).eval()


def masked_states(model, tokenizer, texts, max_prompts: int):
    """Stage I at test size: 16-token prompts, 16-step rollouts, 2 states per prompt."""
    from fair_calib_llmc import Stage1Settings, build_calibration_dataset
    from fair_calib_llmc.models import diffusion_spec
    from fair_calib_llmc.sampling import default_sampler

    sampler = default_sampler(diffusion_spec(model, tokenizer), gen_length=16)
    settings = Stage1Settings(sampler=sampler, prompt_length=16, states_per_prompt=2)
    dataset, _, _ = build_calibration_dataset(
        model, tokenizer, texts, settings, max_prompts=max_prompts
    )
    return dataset
