"""LAPVQA single-image VQA head: the DiffVQA decoder over one chest X-ray's frozen features."""

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions

from .configuration_lapvqa_vqa import LapvqaVQAConfig
from .modeling_lapvqa_diffvqa import LapvqaCrossAttentionGenerationMixin, LapvqaPreTrainedModel, LapvqaTextDecoder


class LapvqaVQAModel(LapvqaPreTrainedModel, LapvqaCrossAttentionGenerationMixin):
    """The upstream `VQAHead`: answers a question about one chest X-ray.

    The visual memory is `vis_proj(image_features)` (`[B, N, hidden]`, no frame embedding); the decoder attends
    to it at every layer. Inputs follow the upstream layout `question_ids + [bos] + answer_ids + [eos]`, and
    `generate()` continues `question_ids + [bos]`, computing the cross-attention keys/values once.
    """

    config: LapvqaVQAConfig
    _tied_weights_keys = {"lm_head.weight": "decoder.embed_tokens.weight"}
    main_input_name = "input_ids"

    def __init__(self, config: LapvqaVQAConfig):
        super().__init__(config)
        self.visual_projection = nn.Linear(config.vis_dim, config.hidden_size)
        self.decoder = LapvqaTextDecoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _visual_memory_length(self, model_kwargs: dict) -> int | None:
        image_features = model_kwargs.get("image_features")
        return None if image_features is None else image_features.shape[1]

    def encode_visual(self, image_features: torch.Tensor | None) -> torch.Tensor:
        """Projects the image's patch tokens to the decoder width: `[B, N, hidden]`."""
        if image_features is None:
            raise ValueError(
                f"Missing image_features: the image's patch tokens `[batch, num_patches, {self.config.vis_dim}]` are "
                "required on the first step, before the cross-attention keys/values are cached."
            )
        if image_features.ndim != 3 or image_features.shape[-1] != self.config.vis_dim:
            raise ValueError(
                f"`image_features` must be patch tokens of shape [batch, num_patches, {self.config.vis_dim}] "
                f"(vis_dim of the {self.config.encoder_name or 'configured'} encoder), "
                f"got {list(image_features.shape)}."
            )
        return self.visual_projection(image_features.to(self.visual_projection.weight.dtype))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithCrossAttentions:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `[batch, seq]`): `question + [bos] (+ answer + [eos])`;
                with a cache, only the tokens not yet seen.
            attention_mask (`torch.Tensor` of shape `[batch, past + seq]`, *optional*): 0 on (left) padding.
                Needed for padded batches, since pad, bos and eos share the id 50256.
            image_features (`torch.Tensor` of shape `[batch, N, vis_dim]`): the frozen encoder's patch tokens of
                the image. Ignored once cached.
            labels (`torch.LongTensor` of shape `[batch, seq]`, *optional*): targets aligned with `input_ids`
                (shifted inside the loss); -100 is ignored (mask the question with it).
            logits_to_keep (`int` or `torch.Tensor`): compute logits for the last N positions only (0 = all).
        """
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        past_key_values, memory_is_cached = self._with_cross_attention_cache(past_key_values, self.config, use_cache)
        encoder_hidden_states = None if memory_is_cached else self.encode_visual(image_features)
        batch_size = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        if encoder_hidden_states is not None and encoder_hidden_states.shape[0] != batch_size:
            raise ValueError(
                f"`image_features` holds {encoder_hidden_states.shape[0]} samples but the text holds {batch_size}."
            )

        return self._decode_with_memory(
            encoder_hidden_states,
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
            use_cache=use_cache,
            labels=labels,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )


__all__ = ["LapvqaVQAModel"]
