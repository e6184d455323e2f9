"""LAPVQA captioning model: the ViT-L/14 encoder and a 6-layer report decoder, trained on MIMIC-CXR reports."""

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions
from transformers.modeling_utils import PreTrainedModel

from .configuration_lapvqa_captioning import LapvqaCaptioningConfig
from .modeling_lapvqa_diffvqa import LapvqaCrossAttentionGenerationMixin, LapvqaTextDecoder
from .modeling_lapvqa_vision import LapvqaVisionModel


class LapvqaCaptioningPreTrainedModel(PreTrainedModel):
    config: LapvqaCaptioningConfig
    base_model_prefix = "decoder"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["LapvqaDecoderLayer", "LapvqaVisionLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True


class LapvqaCaptioningModel(LapvqaCaptioningPreTrainedModel, LapvqaCrossAttentionGenerationMixin):
    """Generates a radiology report from a chest X-ray.

    The encoder's patch tokens are projected to the decoder width and form the memory every decoder layer
    attends to; `generate(pixel_values=...)` starts from `[bos]`, encodes the image once and caches the
    cross-attention keys/values. `image_features=` (the encoder's stored patch tokens) replaces `pixel_values`
    when the encoder has already been run, e.g. to fine-tune the decoder on extracted features.
    """

    _tied_weights_keys = {"lm_head.weight": "decoder.embed_tokens.weight"}
    main_input_name = "input_ids"

    def __init__(self, config: LapvqaCaptioningConfig):
        super().__init__(config)
        self.vision_model = LapvqaVisionModel(config.vision_config)
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.hidden_size)
        self.decoder = LapvqaTextDecoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _visual_memory_length(self, model_kwargs: dict) -> int | None:
        image_features, pixel_values = model_kwargs.get("image_features"), model_kwargs.get("pixel_values")
        if image_features is not None:
            return image_features.shape[1]
        if pixel_values is None:
            return None
        patch = self.config.vision_config.patch_size
        return (pixel_values.shape[-2] // patch) * (pixel_values.shape[-1] // patch)

    def get_image_features(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """The decoder's memory: projected patch tokens `[B, grid², hidden_size]`."""
        patch_tokens = self.vision_model(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        return self.visual_projection(patch_tokens.last_hidden_state)

    def encode_visual(
        self,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
    ) -> torch.Tensor:
        """The decoder's memory `[B, N, hidden_size]` from the image, or from the encoder's stored patch tokens."""
        if (pixel_values is None) == (image_features is None):
            problem = "Got both pixel_values and" if pixel_values is not None else "Missing pixel_values or"
            raise ValueError(
                f"{problem} image_features: pass exactly one on the first step, before the cross-attention "
                "keys/values are cached: the image (from LapvqaImageProcessor) or the encoder's patch tokens "
                "(e.g. stored by `lapvqa extract-features --encoder lapvqa-vit-l14`)."
            )
        if pixel_values is not None:
            return self.get_image_features(pixel_values, interpolate_pos_encoding)
        width = self.config.vision_config.hidden_size
        if image_features.ndim != 3 or image_features.shape[-1] != width:
            raise ValueError(
                f"`image_features` must be the encoder's patch tokens of shape [batch, num_patches, {width}] "
                f"(LapvqaVisionModel's last_hidden_state), got {list(image_features.shape)}."
            )
        return self.visual_projection(image_features.to(self.visual_projection.weight.dtype))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        interpolate_pos_encoding: bool = False,
        **kwargs,
    ) -> CausalLMOutputWithCrossAttentions:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `[batch, seq]`): `[bos] + report_ids (+ [eos])`; with a cache,
                only the tokens not yet seen.
            attention_mask (`torch.Tensor` of shape `[batch, past + seq]`, *optional*): 0 on padding.
            pixel_values (`torch.Tensor` of shape `[batch, 3, image_size, image_size]`): from
                `LapvqaImageProcessor`; needed on the first step (or `image_features`), ignored once the visual
                memory is cached.
            image_features (`torch.Tensor` of shape `[batch, num_patches, vision hidden_size]`): instead of
                `pixel_values`, the frozen encoder's patch tokens (`LapvqaVisionModel`'s `last_hidden_state`, as
                `lapvqa extract-features --encoder lapvqa-vit-l14` stores them); the encoder is then not run.
            labels (`torch.LongTensor` of shape `[batch, seq]`, *optional*): targets aligned with `input_ids`
                (shifted inside the loss); -100 is ignored.
            interpolate_pos_encoding (`bool`): let the encoder accept other image sizes (see `LapvqaVisionModel`).
        """
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        past_key_values, memory_is_cached = self._with_cross_attention_cache(past_key_values, self.config, use_cache)
        encoder_hidden_states = None
        if not memory_is_cached:
            encoder_hidden_states = self.encode_visual(pixel_values, image_features, interpolate_pos_encoding)
            batch_size = (input_ids if input_ids is not None else inputs_embeds).shape[0]
            if encoder_hidden_states.shape[0] != batch_size:
                source = "pixel_values" if pixel_values is not None else "image_features"
                raise ValueError(
                    f"{source} holds {encoder_hidden_states.shape[0]} images but the text holds {batch_size}."
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


__all__ = ["LapvqaCaptioningModel", "LapvqaCaptioningPreTrainedModel"]
