"""LAPVQA differential-VQA head configuration."""

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig

from .encoders import require_encoder_width

_REMOTE_AUTO_MAP = {
    "AutoConfig": "configuration_lapvqa_diffvqa.LapvqaDiffVQAConfig",
    "AutoModel": "modeling_lapvqa_diffvqa.LapvqaDiffVQAModel",
    "AutoModelForCausalLM": "modeling_lapvqa_diffvqa.LapvqaDiffVQAModel",
}


@strict
class LapvqaDiffVQAConfig(PreTrainedConfig):
    r"""
    Configuration of [`LapvqaDiffVQAModel`]: the upstream `DiffVQAHead`, a 6-layer pre-norm transformer
    decoder that answers a question about the change between a prior (reference) and a current chest X-ray,
    given the frozen encoder's patch tokens of both images.

    Args:
        vis_dim (`int`, defaults to 768): width of the frozen encoder's patch tokens.
        hidden_size (`int`, defaults to 512): decoder width.
        num_hidden_layers (`int`, defaults to 6): decoder layers.
        num_attention_heads (`int`, defaults to 8): attention heads. Not recorded in the upstream weights
            (a pinned convention; a converter option, see docs/converting.md).
        intermediate_size (`int`, defaults to 2048): feed-forward width.
        hidden_act (`str`, defaults to `"relu"`): feed-forward activation. Not recorded in the upstream
            weights (a pinned convention; a converter option, see docs/converting.md).
        max_position_embeddings (`int`, defaults to 200): learned positions; question + answer must fit.
        vocab_size (`int`, defaults to 50257): GPT-2 vocabulary.
        dropout / attention_dropout / activation_dropout (`float`, defaults to 0.1): as in
            `torch.nn.TransformerDecoderLayer(dropout=0.1)`; only active in training.
        layer_norm_eps (`float`, defaults to 1e-5): `torch.nn.LayerNorm`'s default.
        use_final_layer_norm (`bool`, defaults to `True`): whether a LayerNorm follows the last layer
            (`decoder.norm.*` in the upstream state dict).
        encoder_name (`str`, *optional*): the frozen encoder the head was trained on (one of
            `lapvqa_hf.encoders.RECIPES`, whose width `vis_dim` must then be), so users feed it the right features.
        conversion_info (`dict`, *optional*): where the weights came from and which conventions were
            assumed at conversion time (see `lapvqa convert`).
        feature_recipe (`dict`, *optional*): the frozen encoder that feeds the head and how its features are taken
            (`lapvqa_hf.encoders.EncoderRecipe`: checkpoint, revision, input size, normalisation, output), recorded
            by `lapvqa convert` and `lapvqa_hf.train`.
    """

    model_type = "lapvqa_diffvqa"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]
    remote_auto_map = _REMOTE_AUTO_MAP  # what `auto_map` points to in saved folders (remote code)

    vis_dim: int = 768
    hidden_size: int = 512
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    intermediate_size: int = 2048
    hidden_act: str = "relu"
    max_position_embeddings: int = 200
    vocab_size: int = 50257
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.1
    layer_norm_eps: float = 1e-5
    use_final_layer_norm: bool = True
    initializer_range: float = 0.02
    use_cache: bool = True
    encoder_name: str | None = None
    conversion_info: dict | None = None
    feature_recipe: dict | None = None
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256
    pad_token_id: int | None = 50256
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # Saved checkpoints load with `trust_remote_code=True` through any of these Auto classes.
        self.auto_map = {**self.remote_auto_map, **(getattr(self, "auto_map", None) or {})}

    def validate_architecture(self):
        super().validate_architecture()
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})."
            )
        require_encoder_width(self.encoder_name, self.vis_dim)


__all__ = ["LapvqaDiffVQAConfig"]
