"""LAPVQA captioning-pretrained ViT-L/14 vision encoder configuration."""

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig

_REMOTE_AUTO_MAP = {
    "AutoConfig": "configuration_lapvqa_vision.LapvqaVisionConfig",
    "AutoModel": "modeling_lapvqa_vision.LapvqaVisionModel",
}


@strict
class LapvqaVisionConfig(PreTrainedConfig):
    r"""
    Configuration of [`LapvqaVisionModel`]: the ViT-L/14 encoder of `dmusingu/lapvqa-pretrain-captioning`
    (timm's `VisionTransformer` layout: pre-norm blocks, GELU MLP, LayerNorm eps 1e-6, a CLS token).

    Args:
        hidden_size (`int`, defaults to 1024), num_hidden_layers (`int`, defaults to 24),
        num_attention_heads (`int`, defaults to 16), intermediate_size (`int`, defaults to 4096): ViT-L.
        patch_size (`int`, defaults to 14): square patches.
        image_size (`int`, defaults to 224): input side; the converter reads it from `pos_embed`
            (grid x patch_size), since the upstream card's 384 px contradicts its own 256 output tokens.
        num_channels (`int`, defaults to 3): input channels (grayscale X-rays are replicated by the processor).
        hidden_act (`str`, defaults to `"gelu"`): MLP activation (exact GELU, as `torch.nn.GELU`).
        layer_norm_eps (`float`, defaults to 1e-6): timm's ViT default.
        qkv_bias (`bool`, defaults to `True`): bias of the fused qkv projection.
        attention_dropout (`float`, defaults to 0.0): dropout on attention probabilities in training.
        conversion_info (`dict`, *optional*): source file and assumptions recorded by `lapvqa convert`.
    """

    model_type = "lapvqa_vision"
    base_config_key = "vision_config"

    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    patch_size: int = 14
    image_size: int = 224
    num_channels: int = 3
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    conversion_info: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.auto_map = {**_REMOTE_AUTO_MAP, **(getattr(self, "auto_map", None) or {})}

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    def validate_architecture(self):
        super().validate_architecture()
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})."
            )
        if self.image_size % self.patch_size != 0:
            raise ValueError(
                f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size}); "
                f"the nearest are {self.image_size // self.patch_size * self.patch_size} and "
                f"{(self.image_size // self.patch_size + 1) * self.patch_size}."
            )


__all__ = ["LapvqaVisionConfig"]
