"""The LLaDA and Dream configurations, apart from the model code.

A configuration is all ``AutoConfig`` needs, and it imports only transformers' configuration
code; the model classes (:mod:`.llada`, :mod:`.dream`) import its modeling code, which
``import transformers`` defers and which costs seconds. Keeping them apart lets
:mod:`fair_calib_llmc.registration` register the configurations when ``AutoConfig`` is imported
and the models when ``AutoModel`` is, so ``import fair_calib_llmc`` stays cheap.
"""

from __future__ import annotations

from transformers.configuration_utils import PreTrainedConfig
from transformers.models.qwen2.configuration_qwen2 import Qwen2Config

# the per-family constants live in the registry; re-exported here, where they were defined
from fair_calib_llmc.models.registry import (
    DREAM,
    DREAM_MASK_TOKEN_ID,
    LLADA,
    LLADA_MASK_TOKEN_ID,
    LM_HEAD,
    LM_HEADS,
)

__all__ = [
    "CONFIGS",
    "LLaDAConfig",
    "DreamConfig",
    "LLADA_MASK_TOKEN_ID",
    "DREAM_MASK_TOKEN_ID",
    "LM_HEAD",
    "LM_HEADS",
]


_SUPPORTED = {
    "block_type": ("llama",),
    "layer_norm_type": ("rms",),
    "activation_type": ("silu", "gelu", "relu"),
}


class LLaDAConfig(PreTrainedConfig):
    """LLaDA configuration with the field names of the public ``config.json``.

    ``mask_token_id`` has no default: the public checkpoints set it (LLaDA-8B:
    :data:`LLADA_MASK_TOKEN_ID`); without it :func:`~fair_calib_llmc.models.diffusion_spec`
    takes the tokenizer's mask token or fails, instead of guessing another model's id.
    """

    model_type = LLADA.model_type
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "num_hidden_layers": "n_layers",
        "intermediate_size": "mlp_hidden_size",
        "max_position_embeddings": "max_sequence_length",
    }

    def __init__(
        self,
        d_model: int = 4096,
        n_heads: int = 32,
        n_kv_heads: int | None = None,
        n_layers: int = 32,
        mlp_ratio: int = 4,
        mlp_hidden_size: int | None = None,
        activation_type: str = "silu",
        block_type: str = "llama",
        layer_norm_type: str = "rms",
        rms_norm_eps: float = 1e-5,
        rope: bool = True,
        rope_theta: float = 500000.0,
        alibi: bool = False,
        max_sequence_length: int = 4096,
        include_bias: bool = False,
        include_qkv_bias: bool = False,
        scale_logits: bool = False,
        vocab_size: int = 126464,
        embedding_size: int | None = 126464,
        weight_tying: bool = False,
        init_std: float = 0.02,
        mask_token_id: int | None = None,
        eos_token_id: int | None = 126081,
        pad_token_id: int | None = 126081,
        use_cache: bool = False,
        **kwargs,
    ):
        self.d_model = d_model
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads if n_kv_heads is not None else n_heads
        self.n_layers = n_layers
        self.mlp_ratio = mlp_ratio
        self.mlp_hidden_size = mlp_hidden_size if mlp_hidden_size else mlp_ratio * d_model
        self.activation_type = activation_type
        self.block_type = block_type
        self.layer_norm_type = layer_norm_type
        self.rms_norm_eps = rms_norm_eps
        self.rope = rope
        self.rope_theta = rope_theta
        self.alibi = alibi
        self.max_sequence_length = max_sequence_length
        self.include_bias = include_bias
        self.include_qkv_bias = include_qkv_bias
        self.scale_logits = scale_logits
        self.vocab_size = vocab_size
        self.embedding_size = embedding_size
        self.weight_tying = weight_tying
        self.init_std = init_std
        self.mask_token_id = mask_token_id
        self.use_cache = use_cache
        # What transformers' Llama rotary embedding reads.
        self.rope_parameters = {"rope_type": "default", "rope_theta": float(rope_theta)}
        self.head_dim = d_model // n_heads
        kwargs.setdefault("tie_word_embeddings", weight_tying)
        super().__init__(eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)
        self._check_supported()

    def _check_supported(self) -> None:
        for field, allowed in _SUPPORTED.items():
            value = getattr(self, field)
            if value not in allowed:
                raise ValueError(
                    f"LLaDAConfig.{field}={value!r} is not supported by fair_calib_llmc; "
                    f"use one of {allowed} (the public LLaDA-8B checkpoints use "
                    f"{allowed[0]!r})."
                )
        if not self.rope or self.alibi:
            raise ValueError(
                "LLaDAConfig: only rotary position embeddings are supported "
                "(set rope=True, alibi=False, as in the public LLaDA checkpoints)."
            )
        if self.d_model % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"LLaDAConfig: d_model ({self.d_model}) must be divisible by n_heads "
                f"({self.n_heads}) and n_heads by n_kv_heads ({self.n_kv_heads})."
            )

    @property
    def padded_vocab_size(self) -> int:
        return self.embedding_size or self.vocab_size


class DreamConfig(Qwen2Config):
    """Qwen2 configuration plus Dream's ``mask_token_id`` (``model_type`` is ``"Dream"``).

    ``mask_token_id`` has no default (Dream-v0's config sets :data:`DREAM_MASK_TOKEN_ID`); see
    :class:`~fair_calib_llmc.models.LLaDAConfig`.
    """

    model_type = DREAM.model_type
    mask_token_id: int | None = None


#: every family's configuration class
CONFIGS = (LLaDAConfig, DreamConfig)
