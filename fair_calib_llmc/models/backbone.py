"""The forward pass LLaDA and Dream share: a bidirectional stack and an LM head on top.

Each family names its modules differently (``transformer.wte/blocks/ln_f`` vs
``embed_tokens/layers/norm``) but runs the same steps: embed, rotary position embeddings,
padding-only attention mask, every layer, final norm. The families expose their modules through
``get_input_embeddings``, ``layer_stack`` and ``final_norm`` and inherit the rest here. The
loop stays in a module ``forward`` so llm-compressor's sequential tracer can cut it per layer.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from fair_calib_llmc.models.masking import BidirectionalMask

__all__ = ["BidirectionalStackMixin", "DiffusionLMMixin"]


class BidirectionalStackMixin:
    """Base-model forward; subclasses set ``rotary_emb`` and define the three accessors.

    Every layer is called as transformers' own models call theirs,
    ``layer(hidden_states, attention_mask=mask, position_embeddings=...)``: only the hidden
    state is positional, so tools that capture a layer's inputs (AutoRound, llm-compressor's
    sequential pipeline) see one tensor argument and the rest as keywords.
    """

    attention_mask: BidirectionalMask
    rotary_emb: nn.Module

    def layer_stack(self) -> nn.ModuleList:
        raise NotImplementedError

    def final_norm(self) -> nn.Module:
        raise NotImplementedError

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if position_ids is None:
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)
            position_ids = position_ids.unsqueeze(0)
        mask = self.attention_mask(attention_mask, inputs_embeds)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)

        hidden_states = inputs_embeds
        all_hidden = (hidden_states,) if output_hidden_states else None
        for layer in self.layer_stack():
            hidden_states = layer(
                hidden_states, attention_mask=mask, position_embeddings=position_embeddings
            )
            if output_hidden_states:
                all_hidden = all_hidden + (hidden_states,)
        return self.final_norm()(hidden_states), all_hidden


class DiffusionLMMixin:
    """LM forward over ``self.model`` (a :class:`BidirectionalStackMixin`) and ``lm_logits``."""

    def lm_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        hidden_states, all_hidden = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            output_hidden_states=bool(output_hidden_states),
        )
        return CausalLMOutputWithPast(
            logits=self.lm_logits(hidden_states), hidden_states=all_hidden
        )
