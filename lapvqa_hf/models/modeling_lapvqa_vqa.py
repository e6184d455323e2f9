"""LAPVQA single-image VQA head: the DiffVQA decoder over one chest X-ray's frozen features."""

import torch
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions
from transformers.utils.generic import can_return_tuple

from .configuration_lapvqa_vqa import LapvqaVQAConfig
from .modeling_lapvqa_common import (
    LapvqaCrossAttentionGenerationMixin,
    LapvqaLinear,
    LapvqaPreTrainedModel,
    LapvqaTextDecoder,
    resolve_cache_argument,
)


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
        self.visual_projection = LapvqaLinear(config.vis_dim, config.hidden_size)
        self.decoder = LapvqaTextDecoder(config)
        self.lm_head = LapvqaLinear(config.hidden_size, config.vocab_size, bias=False)
        self.loss_type = "ForCausalLM"  # transformers' causal-LM loss (`self.loss_function`), shifted labels
        self.post_init()

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

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
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
            cache (`Cache`, *optional*): the self- and cross-attention cache of earlier steps, as `generate()`
                passes it; `past_key_values` is its name before transformers 5.24 and is accepted too.
            labels (`torch.LongTensor` of shape `[batch, seq]`, *optional*): targets aligned with `input_ids`
                (shifted inside the loss); -100 is ignored (mask the question with it).
            logits_to_keep (`int` or `torch.Tensor`): compute logits for the last N positions only (0 = all).
        """
        cache = resolve_cache_argument(self, cache, past_key_values, kwargs)
        memory = None if self._memory_is_cached(cache) else self.encode_visual(image_features)
        return self._decode_with_memory(
            memory,
            "`image_features` holds",
            input_ids=input_ids,
            attention_mask=attention_mask,
            cache=cache,
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
            use_cache=use_cache,
            labels=labels,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )


__all__ = ["LapvqaVQAModel"]
