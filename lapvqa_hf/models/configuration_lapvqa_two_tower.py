"""LAPVQA two-tower (image / report) pretraining models' configuration: `lapvqa-pretrain-contrastive` and
`lapvqa-pretrain-sigmoid`."""

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig

from .configuration_lapvqa_vision import LapvqaVisionConfig

_REMOTE_AUTO_MAP = {
    "AutoConfig": "configuration_lapvqa_two_tower.LapvqaTwoTowerConfig",
    "AutoModel": "modeling_lapvqa_two_tower.LapvqaTwoTowerModel",
}
POOLINGS = {"image_pooling": ("cls", "mean"), "text_pooling": ("eot", "mean")}


@strict
class LapvqaTwoTowerTextConfig(PreTrainedConfig):
    r"""
    Configuration of [`LapvqaTwoTowerTextModel`]: the report encoder of the two-tower models, a bidirectional
    pre-norm transformer encoder (PyTorch's `TransformerEncoder(norm_first=True)`) over GPT-2 tokens.

    Args:
        vocab_size (`int`, defaults to 50257): GPT-2's vocabulary.
        hidden_size (`int`, defaults to 512), num_hidden_layers (`int`, defaults to 6),
        num_attention_heads (`int`, defaults to 8), intermediate_size (`int`, defaults to 2048): sizes (the
            converter reads all but the heads from the weights).
        max_position_embeddings (`int`, defaults to 77): learned positions; texts longer than this are truncated
            by the processor.
        hidden_act (`str`, defaults to `"gelu"`): FFN activation (a pin: not in the weights).
        use_final_layer_norm (`bool`, defaults to `True`): the encoder's final `LayerNorm`.
        text_pooling (`str`, defaults to `"eot"`): the text embedding is the final hidden state at the eot token
            (the last non-padding token; the tokenizer appends it), or `"mean"` over the non-padding tokens.
        dropout / attention_dropout / activation_dropout (`float`, defaults to 0.1): active in training only.
        layer_norm_eps (`float`, defaults to 1e-5): PyTorch's LayerNorm default.
    """

    model_type = "lapvqa_two_tower_text"
    base_config_key = "text_config"

    vocab_size: int = 50257
    hidden_size: int = 512
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    intermediate_size: int = 2048
    max_position_embeddings: int = 77
    hidden_act: str = "gelu"
    use_final_layer_norm: bool = True
    text_pooling: str = "eot"
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.1
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256
    pad_token_id: int | None = 50256

    def validate_architecture(self):
        super().validate_architecture()
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})."
            )
        if self.text_pooling not in POOLINGS["text_pooling"]:
            raise ValueError(f"text_pooling must be one of {POOLINGS['text_pooling']}, got {self.text_pooling!r}.")


@strict
class LapvqaTwoTowerConfig(PreTrainedConfig):
    r"""
    Configuration of [`LapvqaTwoTowerModel`]: the captioning ViT-L/14 ([`LapvqaVisionConfig`]) and the report
    encoder ([`LapvqaTwoTowerTextConfig`]), each projected (bias-free) into a shared space, as CLIP.

    Args:
        text_config (`dict` or [`LapvqaTwoTowerTextConfig`], *optional*): the report encoder.
        vision_config (`dict` or [`LapvqaVisionConfig`], *optional*): the image encoder.
        projection_dim (`int`, defaults to 512): width of the shared space.
        image_pooling (`str`, defaults to `"cls"`): the image embedding is the normed CLS token, or `"mean"` of the
            normed patch tokens (a pin: not in the weights).
        use_logit_bias (`bool`, defaults to `False`): `logit_bias` present (the sigmoid model: logits = exp(scale) *
            cosine + bias, SigLIP's pairwise sigmoid loss) or absent (the contrastive model: CLIP's symmetric
            cross-entropy).
        logit_scale_init_value (`float`, defaults to 2.6592), logit_bias_init_value (`float`, defaults to -10.0):
            initial values when training from scratch.
        conversion_info (`dict`, *optional*): source file and assumptions recorded by `lapvqa convert`.
    """

    model_type = "lapvqa_two_tower"
    sub_configs_defaults = {"text_config": LapvqaTwoTowerTextConfig, "vision_config": LapvqaVisionConfig}

    text_config: dict | LapvqaTwoTowerTextConfig | None = None
    vision_config: dict | LapvqaVisionConfig | None = None
    projection_dim: int = 512
    image_pooling: str = "cls"
    use_logit_bias: bool = False
    logit_scale_init_value: float = 2.6592
    logit_bias_init_value: float = -10.0
    initializer_range: float = 0.02
    initializer_factor: float = 1.0
    conversion_info: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.auto_map = {**_REMOTE_AUTO_MAP, **(getattr(self, "auto_map", None) or {})}

    def validate_architecture(self):
        super().validate_architecture()
        if self.image_pooling not in POOLINGS["image_pooling"]:
            raise ValueError(f"image_pooling must be one of {POOLINGS['image_pooling']}, got {self.image_pooling!r}.")


__all__ = ["LapvqaTwoTowerConfig", "LapvqaTwoTowerTextConfig"]
