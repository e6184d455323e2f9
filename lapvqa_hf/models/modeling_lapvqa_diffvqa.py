"""LAPVQA differential-VQA head: a pre-norm transformer decoder over prior + current chest X-ray features."""

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions
from transformers.utils.generic import can_return_tuple

from .configuration_lapvqa_diffvqa import LapvqaDiffVQAConfig
from .modeling_lapvqa_common import (
    LapvqaCrossAttentionGenerationMixin,
    LapvqaHeldEncoderMixin,
    LapvqaLinear,
    LapvqaPreTrainedModel,
    LapvqaTextDecoder,
    resolve_cache_argument,
    take_card_image_features,
)

PRIOR_FRAME, CURRENT_FRAME = 0, 1


class LapvqaDiffVQAModel(LapvqaPreTrainedModel, LapvqaCrossAttentionGenerationMixin, LapvqaHeldEncoderMixin):
    """The upstream `DiffVQAHead`: answers a question about the change between a prior and a current X-ray.

    The visual memory is `[vis_proj(prior) + frame_emb(0) ; vis_proj(current) + frame_emb(1)]`
    (`[B, N_prior + N_current, hidden]`); the decoder attends to it at every layer. Inputs follow the upstream
    layout `question + [bos] + answer + [eos]`, and `generate()` continues `question + [bos]`. The upstream card's
    names for the two images' features, `ref_vis` (prior) and `curr_vis` (current), are accepted too. A model that
    holds its encoder (`config.encoder_config`) takes the images themselves as `prior_pixel_values` /
    `current_pixel_values`.
    """

    config: LapvqaDiffVQAConfig
    _tied_weights_keys = {"lm_head.weight": "decoder.embed_tokens.weight"}
    main_input_name = "input_ids"

    def __init__(self, config: LapvqaDiffVQAConfig):
        super().__init__(config)
        self.vision_model = self._held_encoder()
        self.visual_projection = LapvqaLinear(config.vis_dim, config.hidden_size)
        self.frame_embeddings = nn.Embedding(2, config.hidden_size)
        self.decoder = LapvqaTextDecoder(config)
        self.lm_head = LapvqaLinear(config.hidden_size, config.vocab_size, bias=False)
        self.loss_type = "ForCausalLM"  # transformers' causal-LM loss (`self.loss_function`), shifted labels
        self.post_init()

    def encode_visual(self, prior_image_features: torch.Tensor, current_image_features: torch.Tensor) -> torch.Tensor:
        """Projects both images' patch tokens and tags them with their frame: `[B, N_prior + N_current, hidden]`."""
        self._check_visual_features(prior_image_features, current_image_features)
        dtype = self.visual_projection.weight.dtype
        prior = self.visual_projection(prior_image_features.to(dtype)) + self.frame_embeddings.weight[PRIOR_FRAME]
        current = self.visual_projection(current_image_features.to(dtype)) + self.frame_embeddings.weight[CURRENT_FRAME]
        return torch.cat([prior, current], dim=1)

    def _check_visual_features(self, prior: torch.Tensor | None, current: torch.Tensor | None) -> None:
        named = {"prior_image_features": prior, "current_image_features": current}
        if prior is None or current is None:
            missing = " and ".join(name for name, t in named.items() if t is None)
            raise ValueError(
                f"Missing {missing}: both images' patch tokens `[batch, num_patches, {self.config.vis_dim}]` are "
                "required on the first step, before the cross-attention keys/values are cached."
            )
        for name, features in named.items():
            if features.ndim != 3 or features.shape[-1] != self.config.vis_dim:
                raise ValueError(
                    f"`{name}` must be patch tokens of shape [batch, num_patches, {self.config.vis_dim}] "
                    f"(vis_dim of the {self.config.encoder_name or 'configured'} encoder), got {list(features.shape)}."
                )
        if prior.shape[0] != current.shape[0]:
            raise ValueError(
                f"`prior_image_features` and `current_image_features` must hold the same number of samples, got "
                f"{prior.shape[0]} and {current.shape[0]}."
            )

    def generate(self, *args, **kwargs):
        """transformers' `generate()`; the upstream card's `ref_vis` / `curr_vis` name the images here too."""
        images = take_card_image_features(
            kwargs,
            prior_image_features=kwargs.pop("prior_image_features", None),
            current_image_features=kwargs.pop("current_image_features", None),
        )
        return super().generate(*args, **kwargs, **{name: value for name, value in images.items() if value is not None})

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        prior_image_features: torch.Tensor | None = None,
        current_image_features: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        prior_pixel_values: torch.Tensor | None = None,
        current_pixel_values: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithCrossAttentions:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `[batch, seq]`): `question + [bos] (+ answer + [eos])`;
                with a cache, only the tokens not yet seen.
            attention_mask (`torch.Tensor` of shape `[batch, past + seq]`, *optional*): 0 on (left) padding.
                Needed for padded batches, since pad, bos and eos share the id 50256.
            prior_image_features / current_image_features (`torch.Tensor` of shape `[batch, N, vis_dim]`): the
                frozen encoder's patch tokens of the prior and the current image (N may differ; the upstream card
                calls them `ref_vis` and `curr_vis`, names accepted too). Ignored once cached.
            prior_pixel_values / current_pixel_values (`torch.Tensor` of shape `[batch, channels, height, width]`,
                *optional*): the images as the encoder's processor prepares them, instead of their patch tokens,
                where the model holds its encoder (`config.encoder_config`). Ignored once cached.
            cache (`Cache`, *optional*): the self- and cross-attention cache of earlier steps, as `generate()`
                passes it; `past_key_values` is its name before transformers 5.24 and is accepted too.
            labels (`torch.LongTensor` of shape `[batch, seq]`, *optional*): targets aligned with `input_ids`
                (shifted inside the loss); -100 is ignored (mask the question with it).
            logits_to_keep (`int` or `torch.Tensor`): compute logits for the last N positions only (0 = all).
        """
        images = take_card_image_features(
            kwargs, prior_image_features=prior_image_features, current_image_features=current_image_features
        )
        cache = resolve_cache_argument(self, cache, past_key_values, kwargs)
        memory = None
        if not self._memory_is_cached(cache):
            prior = self._features_or_pixels(
                images["prior_image_features"], prior_pixel_values, "prior_image_features or prior_pixel_values"
            )
            current = self._features_or_pixels(
                images["current_image_features"], current_pixel_values, "current_image_features or current_pixel_values"
            )
            memory = self.encode_visual(prior, current)
        return self._decode_with_memory(
            memory,
            "The visual features hold",
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


__all__ = ["LapvqaDiffVQAModel"]
