"""LAPVQA phrase-grounding head configuration."""

import math

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig

from .encoders import require_encoder_width

LOSS_WEIGHTS = ("bbox_loss_coefficient", "giou_loss_coefficient")

_REMOTE_AUTO_MAP = {
    "AutoConfig": "configuration_lapvqa_grounding.LapvqaGroundingConfig",
    "AutoModel": "modeling_lapvqa_grounding.LapvqaGroundingModel",
}


@strict
class LapvqaGroundingConfig(PreTrainedConfig):
    r"""
    Configuration of [`LapvqaGroundingModel`]: the upstream TransVG-style `VisualGroundingHead` (`dmusingu/lapvqa-pg`),
    which regresses one box per (image, phrase). The frozen encoder's patch tokens and the phrase's text embedding are
    projected to `d_model`; a learned [REG] token, the visual tokens and the phrase token form one sequence through a
    pre-norm transformer encoder; the output at [REG] gives, through an MLP and a sigmoid, the box (cx, cy, w, h) in
    [0, 1] relative to the image the encoder saw.

    The upstream card is silent on several details; these are pinned (docs/converting.md, docs/models.md) and recorded here
    so that a different convention can be chosen: `num_attention_heads=8`, `activation_function="relu"`, dropouts 0.1
    and `layer_norm_eps=1e-5` (PyTorch's `TransformerEncoderLayer` defaults), and the phrase feature (`text_recipe`,
    `text_normalize`). The FFN width, the learned positions and the final norm are read from the weights.

    Args:
        vis_dim (`int`, defaults to 1024): width of the frozen encoder's patch tokens.
        txt_dim (`int`, defaults to 768): width of the phrase feature (the text tower's projected embedding).
        d_model (`int`, defaults to 256): transformer width.
        encoder_layers (`int`, defaults to 3): encoder layers (pre-norm).
        num_attention_heads (`int`, defaults to 8): attention heads. Pinned; a converter option.
        encoder_ffn_dim (`int`, defaults to 2048): feed-forward width.
        activation_function (`str`, defaults to `"relu"`): feed-forward activation. Pinned; a converter option.
        encoder_final_layer_norm (`bool`, defaults to `True`): whether a LayerNorm follows the last layer
            (`encoder.norm.*` upstream).
        max_position_embeddings (`int`, *optional*): rows of the learned positions added to the sequence
            (`pos_emb` `[1, L, d_model]` upstream), so at most `L - 2` visual tokens; `None`: no positions.
        dropout / attention_dropout / activation_dropout (`float`, defaults to 0.1): only active in training.
        layer_norm_eps (`float`, defaults to 1e-5): epsilon of every LayerNorm.
        initializer_range (`float`, defaults to 0.02): std of the normal initialisation of fresh weights.
        encoder_name (`str`, *optional*): the frozen encoder the head was trained on; for the known ones
            (`lapvqa_hf.encoders.RECIPES`) `vis_dim` must match its width.
        feature_recipe (`dict`, *optional*): the frozen image encoder that feeds the head
            (`lapvqa_hf.encoders.EncoderRecipe`), recorded by `lapvqa convert`.
        text_recipe (`dict`, *optional*): the text tower that encodes the phrases (`TextRecipe`: `name`,
            `checkpoint`, `text_dim`, `revision`); its `text_dim` must be `txt_dim`.
        text_normalize (`bool`, defaults to `True`): whether the phrase feature is L2-normalised.
        conversion_info (`dict`, *optional*): where the weights came from and which conventions were assumed.
        training_results (`dict`, *optional*): the upstream checkpoint's own record (`epoch`, `val_miou`,
            `val_acc50`: validation mIoU and accuracy at IoU 0.5 at the saved epoch).
        bbox_loss_coefficient / giou_loss_coefficient (`float`, defaults to 5 / 2): weights of the L1 and the
            generalized-IoU box losses in the training loss (`labels`).

    The training loss is TransVG's: L1 of (cx, cy, w, h) summed over the four coordinates plus (1 - GIoU), each
    averaged over the batch. The upstream weights are unpublished; the defaults are DETR's (transformers'
    `DetrConfig`), pinned assumptions recorded in `config.json`.
    """

    model_type = "lapvqa_grounding"
    remote_auto_map = _REMOTE_AUTO_MAP  # what `auto_map` points to in saved folders (remote code)
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "encoder_layers"}

    vis_dim: int = 1024
    txt_dim: int = 768
    d_model: int = 256
    encoder_layers: int = 3
    num_attention_heads: int = 8
    encoder_ffn_dim: int = 2048
    activation_function: str = "relu"
    encoder_final_layer_norm: bool = True
    max_position_embeddings: int | None = None
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.1
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    encoder_name: str | None = None
    feature_recipe: dict | None = None
    text_recipe: dict | None = None
    text_normalize: bool = True
    conversion_info: dict | None = None
    training_results: dict | None = None
    bbox_loss_coefficient: float | int = 5
    giou_loss_coefficient: float | int = 2

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # Saved checkpoints load with `trust_remote_code=True` through these Auto classes.
        self.auto_map = {**self.remote_auto_map, **(getattr(self, "auto_map", None) or {})}

    def validate_architecture(self):
        super().validate_architecture()
        if self.d_model % self.num_attention_heads != 0:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by num_attention_heads ({self.num_attention_heads})."
            )
        if self.max_position_embeddings is not None and self.max_position_embeddings < 3:
            raise ValueError(
                f"max_position_embeddings must be at least 3 ([REG], a visual token, the phrase) or None, got "
                f"{self.max_position_embeddings}."
            )
        require_encoder_width(self.encoder_name, self.vis_dim)
        text_dim = (self.text_recipe or {}).get("text_dim", self.txt_dim)
        if text_dim != self.txt_dim:
            raise ValueError(
                f"the text tower {self.text_recipe.get('name')!r} gives {text_dim}-dim phrase features, but txt_dim "
                f"is {self.txt_dim}."
            )
        weights = {name: getattr(self, name) for name in LOSS_WEIGHTS}
        bad = {name: value for name, value in weights.items() if not (math.isfinite(value) and value >= 0)}
        if bad:
            raise ValueError(f"The loss weights must be finite and >= 0, got {bad}.")
        if not any(weights.values()):
            raise ValueError(f"At least one loss weight ({', '.join(LOSS_WEIGHTS)}) must be > 0, got all 0.")


__all__ = ["LapvqaGroundingConfig"]
