"""CoCa ViT-L/14 vision tower, Transformers-native: CLIP's vision transformer and CoCa's attentional pooler.

open_clip's `coca_ViT-L-14` image tower is OpenAI CLIP's ViT (patch convolution without bias, CLS token, learned
positions, `ln_pre`, pre-norm blocks) followed by an attentional pooler: learned queries cross-attend to the
trunk's tokens, `ln_post` normalises the result, the first pooled query (projected) is the contrastive image
embedding and the others are the tokens CoCa's text decoder reads. The trunk here is transformers' own CLIP
modules; only the pooler is written out.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.clip.modeling_clip import (
    CLIPAttention,
    CLIPEncoder,
    CLIPEncoderLayer,
    CLIPPreTrainedModel,
    CLIPVisionEmbeddings,
)
from transformers.utils.output_capturing import capture_outputs

from .configuration_lapvqa_coca import LapvqaCocaVisionConfig
from .modeling_lapvqa_common import LapvqaAttention


@dataclass
class LapvqaCocaVisionOutput(BaseModelOutputWithPooling):
    r"""
    last_hidden_state (`torch.Tensor` of shape `[batch, num_pooler_queries - 1, projection_dim]`):
        CoCa's image tokens (open_clip's `output_tokens`): the pooled queries after the first, normalised.
    pooler_output (`torch.Tensor` of shape `[batch, projection_dim]`):
        The first pooled query, normalised, before the projection.
    image_embeds (`torch.Tensor` of shape `[batch, projection_dim]`):
        The contrastive image embedding: `pooler_output` through the visual projection (unnormalised).
    hidden_states, attentions: the trunk's, on request (`output_hidden_states`, `output_attentions`).
    """

    image_embeds: torch.Tensor | None = None


class LapvqaCocaAttentionalPooler(nn.Module):
    """`num_pooler_queries` learned queries (normalised) read the normalised trunk tokens."""

    def __init__(self, config: LapvqaCocaVisionConfig):
        super().__init__()
        self.query = nn.Parameter(torch.empty(config.num_pooler_queries, config.projection_dim))
        self.query_layernorm = nn.LayerNorm(config.projection_dim, eps=config.layer_norm_eps)
        self.context_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        # `torch.nn.MultiheadAttention` with `kdim = vdim = hidden_size`, as open_clip has it
        self.attention = LapvqaAttention(
            config,
            config.projection_dim,
            config.pooler_num_attention_heads,
            is_cross_attention=True,
            kv_input_size=config.hidden_size,
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        context = self.context_layernorm(hidden_states)
        queries = self.query_layernorm(self.query).expand(hidden_states.shape[0], -1, -1)
        return self.attention(queries, key_value_states=context)[0]


class LapvqaCocaVisionPreTrainedModel(CLIPPreTrainedModel):
    config: LapvqaCocaVisionConfig
    base_model_prefix = "coca_vision"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["CLIPEncoderLayer", "CLIPVisionEmbeddings", "LapvqaCocaAttentionalPooler"]
    _can_compile_fullgraph = True
    _can_record_outputs = {"hidden_states": CLIPEncoderLayer, "attentions": CLIPAttention}

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)  # CLIP's initialisation of the trunk; LayerNorms and Linears
        factor = self.config.initializer_factor
        if isinstance(module, LapvqaCocaAttentionalPooler):
            init.normal_(module.query, std=self.config.projection_dim**-0.5 * factor)
        elif isinstance(module, LapvqaCocaVisionModel):
            init.normal_(module.visual_projection.weight, std=self.config.projection_dim**-0.5 * factor)


class LapvqaCocaVisionModel(LapvqaCocaVisionPreTrainedModel):
    """CoCa's image tower. `last_hidden_state` holds the image tokens the LAPVQA CoCa heads take as
    `image_features` / `prior_image_features` / `current_image_features` (`[batch, 255, 768]` for ViT-L/14); `image_embeds` is CoCa's contrastive embedding."""

    def __init__(self, config: LapvqaCocaVisionConfig):
        super().__init__(config)
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = CLIPEncoder(config)
        self.attentional_pooler = LapvqaCocaAttentionalPooler(config)
        self.post_layernorm = nn.LayerNorm(config.projection_dim, eps=config.layer_norm_eps)
        self.visual_projection = nn.Linear(config.projection_dim, config.projection_dim, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Conv2d:
        return self.embeddings.patch_embedding

    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False, **kwargs
    ) -> LapvqaCocaVisionOutput:
        r"""
        Args:
            pixel_values (`torch.Tensor` of shape `[batch, 3, image_size, image_size]`): from the folder's image
                processor (open_clip's evaluation transform as a `CLIPImageProcessor`).
            interpolate_pos_encoding (`bool`, defaults to `False`): accept other image sizes by resampling the
                learned position grid (CLIP's interpolation); CoCa was not trained so.
        """
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"`pixel_values` must be [batch, {self.config.num_channels}, height, width], got "
                f"{list(pixel_values.shape)}."
            )
        hidden_states = self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        hidden_states = self.pre_layrnorm(hidden_states)
        hidden_states = self.encoder(inputs_embeds=hidden_states, **kwargs).last_hidden_state
        pooled = self.post_layernorm(self.attentional_pooler(hidden_states))
        return LapvqaCocaVisionOutput(
            last_hidden_state=pooled[:, 1:],
            pooler_output=pooled[:, 0],
            image_embeds=self.visual_projection(pooled[:, 0]),
        )


__all__ = ["LapvqaCocaVisionModel", "LapvqaCocaVisionPreTrainedModel"]
