"""Native transformers-5 implementation of Dream (Dream-org/Dream-v0-*-7B).

Dream is Qwen2.5 with bidirectional attention, trained as a masked diffusion LM from an
autoregressive initialisation. Its hub code breaks under transformers 5 (rope init registry,
``_tied_weights_keys`` as a list, ``inv_freq`` left uninitialised after ``from_pretrained``, a
2-D long mask handed to SDPA). Here the layers are transformers' own Qwen2 modules with
``is_causal=False``, so rotary init, attention kernels and weight names are first-party:
``model.embed_tokens``, ``model.layers.N.{self_attn,mlp,input_layernorm,post_attention_layernorm}``,
``model.norm``, ``lm_head``.

Logit alignment: like its AR parent, ``logits[:, i]`` predicts the token at ``i + 1``; the
samplers shift by one (see :func:`fair_calib_llmc.models.family.align_logits`).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2DecoderLayer,
    Qwen2PreTrainedModel,
    Qwen2RMSNorm,
    Qwen2RotaryEmbedding,
)

from fair_calib_llmc.models.backbone import BidirectionalStackMixin, DiffusionLMMixin
from fair_calib_llmc.models.configs import DreamConfig
from fair_calib_llmc.models.masking import BidirectionalMask
from fair_calib_llmc.models.registry import DREAM, DREAM_MASK_TOKEN_ID

__all__ = ["DreamConfig", "DreamModel", "DreamDecoderLayer", "DREAM_MASK_TOKEN_ID"]


class DreamDecoderLayer(Qwen2DecoderLayer):
    """A Qwen2 decoder layer whose attention is bidirectional."""

    def __init__(self, config: DreamConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.self_attn.is_causal = False


class DreamPreTrainedModel(Qwen2PreTrainedModel):
    config_class = DreamConfig
    config: DreamConfig
    _no_split_modules = [DREAM.decoder_layer]
    _can_record_outputs = None


class DreamBaseModel(BidirectionalStackMixin, DreamPreTrainedModel):
    def __init__(self, config: DreamConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(
            DreamDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(config=config)
        self.attention_mask = BidirectionalMask()
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def layer_stack(self) -> nn.ModuleList:
        return self.layers

    def final_norm(self) -> nn.Module:
        return self.norm


class DreamModel(DiffusionLMMixin, DreamPreTrainedModel):
    """Dream masked-diffusion LM (class name as in the hub's ``architectures``)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DreamConfig):
        super().__init__(config)
        self.model = DreamBaseModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def lm_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_states)
