"""CoCa ViT-L/14 vision tower configuration (open_clip's `coca_ViT-L-14`, converted to Transformers)."""

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig

_REMOTE_AUTO_MAP = {
    "AutoConfig": "configuration_lapvqa_coca.LapvqaCocaVisionConfig",
    "AutoModel": "modeling_lapvqa_coca.LapvqaCocaVisionModel",
}


@strict
class LapvqaCocaVisionConfig(PreTrainedConfig):
    r"""
    Configuration of [`LapvqaCocaVisionModel`]: CoCa's image tower as open_clip builds it for `coca_ViT-L-14`. The
    trunk is CLIP's vision transformer (the field names are `CLIPVisionConfig`'s, and the trunk is built from
    transformers' CLIP modules); an attentional pooler then reads it with `num_pooler_queries` learned queries.

    Args:
        hidden_size (`int`, defaults to 1024), num_hidden_layers (`int`, defaults to 24),
        num_attention_heads (`int`, defaults to 16), intermediate_size (`int`, defaults to 4096): the ViT-L trunk
            (open_clip: width, layers, width // 64 heads, 4 x width MLP).
        patch_size (`int`, defaults to 14), image_size (`int`, defaults to 224), num_channels (`int`, defaults to 3).
        hidden_act (`str`, defaults to `"gelu"`): exact GELU (open_clip's `nn.GELU`; OpenAI CLIP used quick GELU).
        layer_norm_eps (`float`, defaults to 1e-5): every LayerNorm, trunk and pooler (open_clip's default).
        attention_dropout (`float`, defaults to 0.0): dropout on the trunk's attention probabilities in training.
        projection_dim (`int`, defaults to 768): width of the pooled tokens and of the image embedding (CoCa's
            `embed_dim`).
        num_pooler_queries (`int`, defaults to 256): learned queries of the attentional pooler. open_clip's CoCa
            keeps the first pooled query as the contrastive image embedding and gives the other 255 as the tokens
            its text decoder (and the LAPVQA heads) attend to.
        pooler_num_attention_heads (`int`, defaults to 8): heads of the pooler's cross-attention.
        initializer_range (`float`, defaults to 0.02), initializer_factor (`float`, defaults to 1.0): CLIP's
            initialisation of random weights.
        conversion_info (`dict`, *optional*): source file and assumptions recorded by `lapvqa convert`.
    """

    model_type = "lapvqa_coca_vision"

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 14
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    projection_dim: int = 768
    num_pooler_queries: int = 256
    pooler_num_attention_heads: int = 8
    initializer_range: float = 0.02
    initializer_factor: float = 1.0
    conversion_info: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.auto_map = {**_REMOTE_AUTO_MAP, **(getattr(self, "auto_map", None) or {})}

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def validate_architecture(self):
        super().validate_architecture()
        for width, heads, what in (
            (self.hidden_size, self.num_attention_heads, "num_attention_heads"),
            (self.projection_dim, self.pooler_num_attention_heads, "pooler_num_attention_heads"),
        ):
            if width % heads:
                raise ValueError(f"{what} ({heads}) must divide the width it attends over ({width}).")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size}).")
        if self.num_pooler_queries < 2:
            raise ValueError(
                f"num_pooler_queries must be at least 2 (one image embedding and the tokens), got "
                f"{self.num_pooler_queries}."
            )


__all__ = ["LapvqaCocaVisionConfig"]
