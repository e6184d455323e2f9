"""LAPVQA captioning-pretrained ViT-L/14: the collection's frozen chest X-ray feature extractor."""

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import PreTrainedModel
from transformers.utils.output_capturing import capture_outputs

from .configuration_lapvqa_vision import LapvqaVisionConfig
from .modeling_lapvqa_common import LapvqaAttention, LapvqaMLP


class LapvqaVisionEmbeddings(nn.Module):
    """Patch embedding (a strided convolution), a CLS token and learned absolute positions."""

    def __init__(self, config: LapvqaVisionConfig):
        super().__init__()
        self.config = config
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.position_embedding = nn.Parameter(torch.zeros(1, 1 + config.num_patches, config.hidden_size))

    def interpolate_pos_encoding(self, height: int, width: int) -> torch.Tensor:
        """Bicubic resampling of the patch position grid to `height x width` patches (CLS position kept)."""
        grid = self.config.grid_size
        if (height, width) == (grid, grid):
            return self.position_embedding
        cls_position, patch_positions = self.position_embedding[:, :1], self.position_embedding[:, 1:]
        patch_positions = patch_positions.reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        patch_positions = nn.functional.interpolate(
            patch_positions.float(), size=(height, width), mode="bicubic", align_corners=False
        ).to(cls_position.dtype)
        return torch.cat([cls_position, patch_positions.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        self._check_pixel_values(pixel_values, interpolate_pos_encoding)
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        height, width = patches.shape[-2:]
        embeddings = patches.flatten(2).transpose(1, 2)
        cls_tokens = self.cls_token.expand(embeddings.shape[0], -1, -1)
        embeddings = torch.cat([cls_tokens, embeddings], dim=1)
        if interpolate_pos_encoding:
            return embeddings + self.interpolate_pos_encoding(height, width)
        return embeddings + self.position_embedding

    def _check_pixel_values(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool) -> None:
        config = self.config
        if pixel_values.ndim != 4 or pixel_values.shape[1] != config.num_channels:
            raise ValueError(
                f"`pixel_values` must be [batch, {config.num_channels}, height, width], got {list(pixel_values.shape)}."
            )
        height, width = pixel_values.shape[-2:]
        if interpolate_pos_encoding:
            if height % config.patch_size or width % config.patch_size:
                raise ValueError(
                    f"With interpolate_pos_encoding=True the image sides must be multiples of the patch size "
                    f"{config.patch_size}, got {height}x{width}."
                )
        elif (height, width) != (config.image_size, config.image_size):
            raise ValueError(
                f"This encoder was trained on {config.image_size}x{config.image_size} images, got {height}x{width}. "
                "Resize with LapvqaImageProcessor, or pass interpolate_pos_encoding=True to resample the positions."
            )


class LapvqaVisionLayer(GradientCheckpointingLayer):
    """A pre-norm ViT block: `x + attn(norm1(x))`, then `x + mlp(norm2(x))`."""

    def __init__(self, config: LapvqaVisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        # timm's fused `qkv`, split into q/k/v projections; bidirectional
        self.self_attn = LapvqaAttention(
            config, config.hidden_size, config.num_attention_heads, qkv_bias=config.qkv_bias
        )
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = LapvqaMLP(config.hidden_size, config.intermediate_size, config.hidden_act)

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        attn_output, _ = self.self_attn(self.layer_norm1(hidden_states), **kwargs)
        hidden_states = hidden_states + attn_output
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


class LapvqaVisionPreTrainedModel(PreTrainedModel):
    config: LapvqaVisionConfig
    base_model_prefix = "vision_model"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["LapvqaVisionLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    _can_record_outputs = {"hidden_states": LapvqaVisionLayer, "attentions": LapvqaAttention}

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, LapvqaVisionEmbeddings):
            nn.init.trunc_normal_(module.position_embedding, std=self.config.initializer_range)
            nn.init.trunc_normal_(module.cls_token, std=1e-6)


class LapvqaVisionModel(LapvqaVisionPreTrainedModel):
    """The ViT-L/14 encoder alone.

    `last_hidden_state` holds the patch tokens after the final norm, CLS dropped (`[B, grid², hidden]`): the
    features the downstream LAPVQA heads take as `image_features` (or `prior_image_features` / `current_image_features`). `pooler_output` is the normed CLS token.
    """

    def __init__(self, config: LapvqaVisionConfig):
        super().__init__(config)
        self.embeddings = LapvqaVisionEmbeddings(config)
        self.layers = nn.ModuleList([LapvqaVisionLayer(config) for _ in range(config.num_hidden_layers)])
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Conv2d:
        return self.embeddings.patch_embedding

    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False, **kwargs
    ) -> BaseModelOutputWithPooling:
        r"""
        Args:
            pixel_values (`torch.Tensor` of shape `[batch, channels, image_size, image_size]`): from
                `LapvqaImageProcessor`.
            interpolate_pos_encoding (`bool`, defaults to `False`): accept other image sizes (multiples of the
                patch size) by bicubic resampling of the learned position grid; the encoder was not trained so.
        """
        hidden_states = self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        for layer in self.layers:
            hidden_states = layer(hidden_states, **kwargs)
        hidden_states = self.post_layernorm(hidden_states)
        return BaseModelOutputWithPooling(last_hidden_state=hidden_states[:, 1:], pooler_output=hidden_states[:, 0])


__all__ = ["LapvqaVisionModel", "LapvqaVisionPreTrainedModel"]
