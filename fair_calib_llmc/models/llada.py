"""Native transformers-5 implementation of LLaDA (GSAI-ML/LLaDA-8B-*).

The public checkpoints ship OLMo-derived remote code that no longer runs under transformers 5.
This module re-implements the ``block_type="llama"`` variant they use, keeping the checkpoint
contract unchanged so that a real LLaDA checkpoint directory loads with zero missing/unexpected
keys and no ``trust_remote_code``:

* config fields are LLaDA's own (``d_model``, ``n_heads``, ``mlp_hidden_size``, ...), with the
  standard transformers names mapped onto them;
* parameters are named ``model.transformer.{wte,blocks.N.*,ln_f,ff_out}``; note that the LM head
  ``model.transformer.ff_out`` and every block's down projection ``blocks.N.ff_out`` share a leaf
  name, so ignore lists must use ``re:^model\\.transformer\\.ff_out$`` (see :data:`LM_HEAD`);
* attention is bidirectional; a 2-D padding mask is turned into a 4-D mask SDPA accepts.

Rotary embedding, RMSNorm and the attention kernels are transformers' own (Llama's), so the
rotary ``inv_freq`` buffer is rebuilt by ``PreTrainedModel._init_weights`` after
``from_pretrained`` like any first-party model.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from fair_calib_llmc.models.backbone import BidirectionalStackMixin, DiffusionLMMixin
from fair_calib_llmc.models.configs import LLaDAConfig
from fair_calib_llmc.models.masking import BidirectionalMask
from fair_calib_llmc.models.registry import LLADA, LLADA_MASK_TOKEN_ID, LM_HEAD

__all__ = ["LLaDAConfig", "LLaDAModelLM", "LLaDABlock", "LM_HEAD", "LLADA_MASK_TOKEN_ID"]


class LLaDABlock(nn.Module):
    """One LLaDA ``llama`` block: pre-norm bidirectional attention and a gated MLP.

    Linear names are LLaDA's: ``q_proj k_proj v_proj attn_out`` (attention) and
    ``ff_proj`` (gate), ``up_proj``, ``ff_out`` (down).
    """

    def __init__(self, config: LLaDAConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.n_heads // config.n_kv_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        qkv_bias = config.include_bias or config.include_qkv_bias
        kv_dim = config.n_kv_heads * self.head_dim
        self.attn_norm = LlamaRMSNorm(config.d_model, eps=config.rms_norm_eps)
        self.q_proj = nn.Linear(config.d_model, config.d_model, bias=qkv_bias)
        self.k_proj = nn.Linear(config.d_model, kv_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(config.d_model, kv_dim, bias=qkv_bias)
        self.attn_out = nn.Linear(config.d_model, config.d_model, bias=config.include_bias)
        self.ff_norm = LlamaRMSNorm(config.d_model, eps=config.rms_norm_eps)
        self.ff_proj = nn.Linear(config.d_model, config.mlp_hidden_size, bias=config.include_bias)
        self.up_proj = nn.Linear(config.d_model, config.mlp_hidden_size, bias=config.include_bias)
        self.ff_out = nn.Linear(config.mlp_hidden_size, config.d_model, bias=config.include_bias)
        self.act = ACT2FN[config.activation_type]

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        x = self.attn_norm(hidden_states)
        q = self.q_proj(x).view(hidden_shape).transpose(1, 2)
        k = self.k_proj(x).view(hidden_shape).transpose(1, 2)
        v = self.v_proj(x).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        att, _ = attention(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling)
        hidden_states = hidden_states + self.attn_out(att.reshape(*input_shape, -1))

        x = self.ff_norm(hidden_states)
        x = self.act(self.ff_proj(x)) * self.up_proj(x)
        return hidden_states + self.ff_out(x)


class LLaDAPreTrainedModel(PreTrainedModel):
    config_class = LLaDAConfig
    config: LLaDAConfig
    base_model_prefix = "model"
    _no_split_modules = [LLADA.decoder_layer]
    _supports_sdpa = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        else:
            super()._init_weights(module)


class LLaDAModel(BidirectionalStackMixin, LLaDAPreTrainedModel):
    """The ``model`` attribute of :class:`LLaDAModelLM`: holds ``transformer`` (a ModuleDict)."""

    def __init__(self, config: LLaDAConfig):
        super().__init__(config)
        vocab = config.padded_vocab_size
        modules = {
            "wte": nn.Embedding(vocab, config.d_model),
            "blocks": nn.ModuleList(LLaDABlock(config, i) for i in range(config.n_layers)),
            "ln_f": LlamaRMSNorm(config.d_model, eps=config.rms_norm_eps),
        }
        if not config.weight_tying:
            modules["ff_out"] = nn.Linear(config.d_model, vocab, bias=config.include_bias)
        self.transformer = nn.ModuleDict(modules)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.attention_mask = BidirectionalMask()
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def layer_stack(self) -> nn.ModuleList:
        return self.transformer.blocks

    def final_norm(self) -> nn.Module:
        return self.transformer.ln_f


class LLaDAModelLM(DiffusionLMMixin, LLaDAPreTrainedModel):
    """LLaDA masked-diffusion LM. ``logits[:, i]`` predicts the token at position ``i``."""

    def __init__(self, config: LLaDAConfig):
        super().__init__(config)
        self.model = LLaDAModel(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.transformer.wte = value

    def get_output_embeddings(self) -> nn.Module | None:
        return None if self.config.weight_tying else self.model.transformer.ff_out

    def lm_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.config.weight_tying:
            logits = nn.functional.linear(hidden_states, self.model.transformer.wte.weight)
        else:
            logits = self.model.transformer.ff_out(hidden_states)
        if self.config.scale_logits:
            logits = logits * (1.0 / self.config.d_model**0.5)
        return logits
