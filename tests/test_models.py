"""Native LLaDA / Dream: bidirectionality, public checkpoint layout, save/reload, masks."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModel, AutoModelForCausalLM

from fair_calib_llmc.models import DreamModel, LLaDAModelLM, diffusion_spec

from .helpers import llada_config, save_with_tokenizer, tiny_causal_lm

pytestmark = pytest.mark.unit

# Key names of the public checkpoints (GSAI-ML/LLaDA-8B-Instruct, Dream-org/Dream-v0-*-7B),
# written out here by hand so the test does not derive them from our own modules.
LLADA_BLOCK_KEYS = {
    "attn_norm.weight": ("d", None),
    "q_proj.weight": ("d", "d"),
    "k_proj.weight": ("kv", "d"),
    "v_proj.weight": ("kv", "d"),
    "attn_out.weight": ("d", "d"),
    "ff_norm.weight": ("d", None),
    "ff_proj.weight": ("m", "d"),
    "up_proj.weight": ("m", "d"),
    "ff_out.weight": ("d", "m"),
}
DREAM_LAYER_KEYS = {
    "input_layernorm.weight": ("d", None),
    "post_attention_layernorm.weight": ("d", None),
    "self_attn.q_proj.weight": ("d", "d"),
    "self_attn.q_proj.bias": ("d", None),
    "self_attn.k_proj.weight": ("kv", "d"),
    "self_attn.k_proj.bias": ("kv", None),
    "self_attn.v_proj.weight": ("kv", "d"),
    "self_attn.v_proj.bias": ("kv", None),
    "self_attn.o_proj.weight": ("d", "d"),
    "mlp.gate_proj.weight": ("m", "d"),
    "mlp.up_proj.weight": ("m", "d"),
    "mlp.down_proj.weight": ("d", "m"),
}
DIMS = {"d": 64, "kv": 32, "m": 96, "v": 300}


def _tensor(shape, gen):
    dims = [DIMS[s] for s in shape if s is not None]
    return torch.randn(*dims, generator=gen) * 0.1


def _public_llada_dir(path, n_layers=2):
    gen = torch.Generator().manual_seed(0)
    sd = {
        "model.transformer.wte.weight": _tensor(("v", "d"), gen),
        "model.transformer.ln_f.weight": _tensor(("d", None), gen) + 1,
        "model.transformer.ff_out.weight": _tensor(("v", "d"), gen),
    }
    for i in range(n_layers):
        for key, shape in LLADA_BLOCK_KEYS.items():
            sd[f"model.transformer.blocks.{i}.{key}"] = _tensor(shape, gen)
    config = {  # the LLaDA-8B config.json field set, scaled down
        "activation_type": "silu",
        "alibi": False,
        "alibi_bias_max": 8.0,
        "architectures": ["LLaDAModelLM"],
        "attention_dropout": 0.0,
        "attention_layer_norm": False,
        "attention_layer_norm_with_affine": True,
        "auto_map": {
            "AutoConfig": "configuration_llada.LLaDAConfig",
            "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
            "AutoModel": "modeling_llada.LLaDAModelLM",
        },
        "bias_for_layer_norm": False,
        "block_group_size": 1,
        "block_type": "llama",
        "d_model": 64,
        "embedding_dropout": 0.0,
        "embedding_size": 300,
        "eos_token_id": 298,
        "flash_attention": False,
        "include_bias": False,
        "include_qkv_bias": False,
        "init_cutoff_factor": None,
        "init_device": "meta",
        "init_fn": "mitchell",
        "init_std": 0.02,
        "input_emb_norm": False,
        "layer_norm_type": "rms",
        "layer_norm_with_affine": True,
        "mask_token_id": 299,
        "max_sequence_length": 4096,
        "mlp_hidden_size": 96,
        "mlp_ratio": 4,
        "model_type": "llada",
        "multi_query_attention": None,
        "n_heads": 4,
        "n_kv_heads": 2,
        "n_layers": n_layers,
        "pad_token_id": 298,
        "precision": "amp_bf16",
        "residual_dropout": 0.0,
        "rms_norm_eps": 1e-05,
        "rope": True,
        "rope_full_precision": True,
        "rope_theta": 500000.0,
        "scale_logits": False,
        "transformers_version": "4.46.3",
        "use_cache": False,
        "vocab_size": 300,
        "weight_tying": False,
    }
    return _write(path, sd, config)


def _public_dream_dir(path, n_layers=2):
    gen = torch.Generator().manual_seed(1)
    sd = {
        "model.embed_tokens.weight": _tensor(("v", "d"), gen),
        "model.norm.weight": _tensor(("d", None), gen) + 1,
        "lm_head.weight": _tensor(("v", "d"), gen),
    }
    for i in range(n_layers):
        for key, shape in DREAM_LAYER_KEYS.items():
            sd[f"model.layers.{i}.{key}"] = _tensor(shape, gen)
    config = {  # the Dream-v0-Instruct-7B config.json field set, scaled down
        "architectures": ["DreamModel"],
        "attention_dropout": 0.0,
        "auto_map": {
            "AutoConfig": "configuration_dream.DreamConfig",
            "AutoModel": "modeling_dream.DreamModel",
        },
        "bos_token_id": 298,
        "eos_token_id": 298,
        "hidden_act": "silu",
        "hidden_size": 64,
        "initializer_range": 0.02,
        "intermediate_size": 96,
        "mask_token_id": 299,
        "max_position_embeddings": 131072,
        "max_window_layers": 28,
        "model_type": "Dream",
        "num_attention_heads": 4,
        "num_hidden_layers": n_layers,
        "num_key_value_heads": 2,
        "pad_token_id": 298,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.46.2",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 300,
    }
    return _write(path, sd, config)


def _write(path, state_dict, config):
    path.mkdir(parents=True, exist_ok=True)
    save_file(state_dict, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config))
    return path, state_dict


@pytest.mark.parametrize(
    "writer,cls,auto",
    [
        (_public_llada_dir, LLaDAModelLM, AutoModelForCausalLM),
        (_public_llada_dir, LLaDAModelLM, AutoModel),
        (_public_dream_dir, DreamModel, AutoModel),
        (_public_dream_dir, DreamModel, AutoModelForCausalLM),
    ],
)
def test_public_layout_loads_without_missing_or_unexpected_keys(tmp_path, writer, cls, auto):
    path, written = writer(tmp_path / "ckpt")
    model, info = auto.from_pretrained(path, output_loading_info=True, dtype=torch.float32)
    assert isinstance(model, cls)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    loaded = model.state_dict()
    for key, tensor in written.items():
        torch.testing.assert_close(loaded[key], tensor, rtol=0, atol=0)
    logits = model(torch.arange(10)[None]).logits
    assert logits.shape == (1, 10, 300) and torch.isfinite(logits).all()


def test_dream_rotary_is_initialised_after_from_pretrained(tmp_path):
    path, _ = _public_dream_dir(tmp_path / "dream")
    model = AutoModel.from_pretrained(path, dtype=torch.float32)
    rotary = model.model.rotary_emb
    expected = 1.0 / (1e6 ** (torch.arange(0, 16, 2, dtype=torch.float) / 16))
    torch.testing.assert_close(rotary.inv_freq, expected)


def test_forward_is_bidirectional(dllm):
    x = torch.randint(3, dllm.config.vocab_size, (1, 12))
    y = x.clone()
    y[0, -1] = (x[0, -1] + 1 - 3) % (dllm.config.vocab_size - 3) + 3
    with torch.no_grad():
        a, b = dllm(x).logits, dllm(y).logits
    assert (a[0, 0] - b[0, 0]).abs().max() > 1e-4, "position 0 did not see a later token"


def test_save_reload_logits_identical(dllm, tokenizer, tmp_path):
    x = torch.randint(3, dllm.config.vocab_size, (2, 16))
    with torch.no_grad():
        before = dllm(x).logits
    path = save_with_tokenizer(dllm, tokenizer, tmp_path / "m")
    reloaded = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        after = reloaded(x).logits
    assert torch.equal(before, after)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_padding_mask_forms(dllm, attn):
    """A 2-D long padding mask (what tokenizers return) works with eager and SDPA, and padded
    rows give the same logits as the unpadded sequence."""
    dllm.config._attn_implementation = attn
    x = torch.randint(3, dllm.config.vocab_size, (1, 10))
    padded = torch.cat([x, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 10), torch.zeros(1, 4)], dim=1).long()
    with torch.no_grad():
        ref = dllm(x).logits
        out = dllm(padded, attention_mask=mask).logits[:, :10]
        out_bool4d = dllm(padded, attention_mask=mask.bool()[:, None, None, :]).logits[:, :10]
        full = dllm(x, attention_mask=torch.ones(1, 10, dtype=torch.long)).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_bool4d, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(full, ref)


def test_unsupported_llada_variant_is_rejected(tokenizer):
    with pytest.raises(ValueError, match="block_type"):
        llada_config(tokenizer, block_type="sequential")


def test_mask_token_is_never_guessed(tokenizer):
    """No family default: the config states it, or the tokenizer's mask token is used (carried
    by the spec; quantize() records it in the saved config.json: test_pipeline), or
    diffusion_spec fails naming the fix."""
    from fair_calib_llmc.models import DreamConfig, LLaDAConfig, diffusion_spec

    assert LLaDAConfig().mask_token_id is None and DreamConfig().mask_token_id is None
    model = LLaDAModelLM(llada_config(tokenizer, mask_token_id=None))
    assert diffusion_spec(model, tokenizer).mask_token_id == tokenizer.mask_token_id
    assert model.config.mask_token_id is None  # the spec carries it, the config is untouched
    explicit = diffusion_spec(model, tokenizer, mask_token_id=7)  # e.g. lm-eval's argument
    assert explicit.mask_token_id == 7 and model.config.mask_token_id is None
    with pytest.raises(ValueError, match="no mask token.*LLaDA-8B: 126336"):
        diffusion_spec(LLaDAModelLM(llada_config(tokenizer, mask_token_id=None)))


def test_causal_model_is_not_a_diffusion_lm(tokenizer):
    causal = tiny_causal_lm(tokenizer)
    with pytest.raises(ValueError, match="not a diffusion language model"):
        diffusion_spec(causal, tokenizer)


def test_missing_mask_token_is_rejected(tokenizer):
    model = LLaDAModelLM(llada_config(tokenizer, mask_token_id=None))
    no_mask = copy.deepcopy(tokenizer)
    no_mask.mask_token = None
    with pytest.raises(ValueError, match="no mask token"):
        diffusion_spec(model, no_mask)
