"""LAPVQA captioning model: the ViT-L/14 encoder and a 6-layer report decoder, trained on MIMIC-CXR reports."""

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPooling, CausalLMOutputWithCrossAttentions
from transformers.modeling_utils import PreTrainedModel
from transformers.utils.generic import can_return_tuple

from .configuration_lapvqa_captioning import LapvqaCaptioningConfig
from .modeling_lapvqa_common import (
    LapvqaCrossAttentionGenerationMixin,
    LapvqaLinear,
    LapvqaTextDecoder,
    resolve_cache_argument,
)
from .modeling_lapvqa_vision import LapvqaVisionModel

# What the image encoder may be asked for when it runs inside the captioning model's forward.
_IMAGE_OUTPUT_FLAGS = ("output_attentions", "output_hidden_states")


@dataclass
class LapvqaCaptioningOutput(CausalLMOutputWithCrossAttentions):
    r"""
    [`CausalLMOutputWithCrossAttentions`] plus `image_outputs`: the encoder's output when this step ran it (see
    [`LapvqaCaptioningModel.get_image_features`]); `None` when the memory came from `image_features` or the cache.
    """

    image_outputs: BaseModelOutputWithPooling | None = None


class LapvqaCaptioningPreTrainedModel(PreTrainedModel):
    config: LapvqaCaptioningConfig
    base_model_prefix = "decoder"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["LapvqaDecoderLayer", "LapvqaVisionLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
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
        self.visual_projection = LapvqaLinear(config.vision_config.hidden_size, config.hidden_size)
        self.decoder = LapvqaTextDecoder(config)
        self.lm_head = LapvqaLinear(config.hidden_size, config.vocab_size, bias=False)
        self.loss_type = "ForCausalLM"  # transformers' causal-LM loss (`self.loss_function`), shifted labels
        self.post_init()

    @can_return_tuple
    def get_image_features(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False, **kwargs
    ) -> BaseModelOutputWithPooling:
        """Runs the encoder: `last_hidden_state` holds its patch tokens `[B, grid², vision hidden_size]`, and
        `pooler_output` the decoder's memory, those tokens projected to `[B, grid², hidden_size]` (as transformers'
        vision-language models return projected image features). `hidden_states` / `attentions` on request."""
        image_outputs = self.vision_model(
            pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, return_dict=True, **kwargs
        )
        image_outputs.pooler_output = self.visual_projection(image_outputs.last_hidden_state)
        return image_outputs

    def encode_visual(
        self,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        **image_output_flags,
    ) -> tuple[torch.Tensor, BaseModelOutputWithPooling | None]:
        """The decoder's memory `[B, N, hidden_size]`, from the image (with the encoder's outputs, see
        `get_image_features`) or from the encoder's stored patch tokens (then no encoder outputs)."""
        if (pixel_values is None) == (image_features is None):
            problem = "Got both pixel_values and" if pixel_values is not None else "Missing pixel_values or"
            raise ValueError(
                f"{problem} image_features: pass exactly one on the first step, before the cross-attention "
                "keys/values are cached: the image (from LapvqaImageProcessor) or the encoder's patch tokens "
                "(e.g. stored by `lapvqa extract-features --encoder lapvqa-vit-l14`)."
            )
        if pixel_values is not None:
            image_outputs = self.get_image_features(
                pixel_values, interpolate_pos_encoding, return_dict=True, **image_output_flags
            )
            return image_outputs.pooler_output, image_outputs
        width = self.config.vision_config.hidden_size
        if image_features.ndim != 3 or image_features.shape[-1] != width:
            raise ValueError(
                f"`image_features` must be the encoder's patch tokens of shape [batch, num_patches, {width}] "
                f"(LapvqaVisionModel's last_hidden_state), got {list(image_features.shape)}."
            )
        return self.visual_projection(image_features.to(self.visual_projection.weight.dtype)), None

    def prepare_inputs_for_generation(self, *args, **kwargs) -> dict:
        """GenerationMixin's, except that the image reaches every step until its cross-attention keys/values are
        cached: transformers forwards `pixel_values` to the first step of `generate()` only, and not even there to
        an assistant model (assisted decoding), which then had no image to draft from."""
        model_inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        cache = model_inputs.get("cache", model_inputs.get("past_key_values"))
        if kwargs.get("pixel_values") is not None and not self._memory_is_cached(cache):
            model_inputs["pixel_values"] = kwargs["pixel_values"]
        return model_inputs

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        interpolate_pos_encoding: bool = False,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> LapvqaCaptioningOutput:
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
            cache (`Cache`, *optional*): the self- and cross-attention cache of earlier steps, as `generate()`
                passes it; `past_key_values` is its name before transformers 5.24 and is accepted too.
            labels (`torch.LongTensor` of shape `[batch, seq]`, *optional*): targets aligned with `input_ids`
                (shifted inside the loss); -100 is ignored.
            interpolate_pos_encoding (`bool`): let the encoder accept other image sizes (see `LapvqaVisionModel`).
        """
        cache = resolve_cache_argument(self, cache, past_key_values, kwargs)
        memory = image_outputs = None
        if not self._memory_is_cached(cache):
            flags = {name: kwargs[name] for name in _IMAGE_OUTPUT_FLAGS if name in kwargs}
            memory, image_outputs = self.encode_visual(pixel_values, image_features, interpolate_pos_encoding, **flags)
        outputs = self._decode_with_memory(
            memory,
            "pixel_values holds" if pixel_values is not None else "image_features holds",
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
        return LapvqaCaptioningOutput(**outputs, image_outputs=image_outputs)


__all__ = ["LapvqaCaptioningModel", "LapvqaCaptioningOutput", "LapvqaCaptioningPreTrainedModel"]
