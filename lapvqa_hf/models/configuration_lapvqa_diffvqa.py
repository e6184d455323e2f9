"""LAPVQA differential-VQA head configuration."""

from huggingface_hub.dataclasses import strict

from .configuration_lapvqa_common import LapvqaTextDecoderConfig
from .encoders import require_encoder_width

_REMOTE_AUTO_MAP = {
    "AutoConfig": "configuration_lapvqa_diffvqa.LapvqaDiffVQAConfig",
    "AutoModel": "modeling_lapvqa_diffvqa.LapvqaDiffVQAModel",
    "AutoModelForCausalLM": "modeling_lapvqa_diffvqa.LapvqaDiffVQAModel",
}


@strict
class LapvqaDiffVQAConfig(LapvqaTextDecoderConfig):
    r"""
    Configuration of [`LapvqaDiffVQAModel`]: the upstream `DiffVQAHead`, a 6-layer pre-norm transformer
    decoder that answers a question about the change between a prior (reference) and a current chest X-ray,
    given the frozen encoder's patch tokens of both images. The decoder's fields are
    [`LapvqaTextDecoderConfig`]'s (`hidden_size`, `num_hidden_layers`, `num_attention_heads`, ...).

    Args:
        vis_dim (`int`, defaults to 768): width of the frozen encoder's patch tokens.
        encoder_name (`str`, *optional*): the frozen encoder the head was trained on (one of
            `lapvqa_hf.encoders.RECIPES`, whose width `vis_dim` must then be), so users feed it the right features.
        feature_recipe (`dict`, *optional*): the frozen encoder that feeds the head and how its features are taken
            (`lapvqa_hf.encoders.EncoderRecipe`: checkpoint, revision, input size, normalisation, output), recorded
            by `lapvqa convert` and `lapvqa_hf.train`.
        encoder_finetuned (`bool`, defaults to `False`): whether the encoder was trained with the head (the
            `*-native` files). The off-the-shelf encoder does not reproduce such a head, so its pipeline refuses to
            run from images until the fine-tuned encoder is named (`feature_recipe`'s checkpoint, or `encoder=`);
            from features of that encoder the model runs as it is.
        encoder_config (`dict`, *optional*): the architecture of the encoder the folder holds beside the head (the
            config of `feature_recipe`'s model class, as a dict). Set, the model holds that encoder as
            `vision_model`, loads its weights with the head's, and takes images (`pixel_values`, or
            `prior_pixel_values` / `current_pixel_values` for DiffVQA) as well as patch tokens: a native head
            converted with its fine-tuned encoder, or one fine-tuned end to end (`lapvqa train`, inputs "pixels").
    """

    model_type = "lapvqa_diffvqa"
    remote_auto_map = _REMOTE_AUTO_MAP  # what `auto_map` points to in saved folders (remote code)

    vis_dim: int = 768
    encoder_name: str | None = None
    feature_recipe: dict | None = None
    encoder_finetuned: bool = False
    encoder_config: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # Saved checkpoints load with `trust_remote_code=True` through any of these Auto classes.
        self.auto_map = {**self.remote_auto_map, **(getattr(self, "auto_map", None) or {})}

    def validate_architecture(self):
        super().validate_architecture()
        require_encoder_width(self.encoder_name, self.vis_dim)
        if self.encoder_config is not None and self.feature_recipe is None:
            raise ValueError(
                "encoder_config describes an encoder held by the model, which needs feature_recipe to say which "
                "encoder class it is and how its patch tokens are taken."
            )


__all__ = ["LapvqaDiffVQAConfig"]
