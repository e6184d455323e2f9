"""LAPVQA abnormality-detection head configuration."""

import math

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig

from .encoders import require_encoder_width

# VinDr-CXR's 14 local findings, in VinDr's `class_id` order; the no-object class follows them.
VINDR_CXR_CLASSES: tuple[str, ...] = (
    "Aortic enlargement",
    "Atelectasis",
    "Calcification",
    "Cardiomegaly",
    "Consolidation",
    "ILD",
    "Infiltration",
    "Lung Opacity",
    "Nodule/Mass",
    "Other lesion",
    "Pleural effusion",
    "Pleural thickening",
    "Pneumothorax",
    "Pulmonary fibrosis",
)

POSITION_EMBEDDING_TYPES = ("none",)
LOSS_WEIGHTS = (
    "class_cost",
    "bbox_cost",
    "giou_cost",
    "bbox_loss_coefficient",
    "giou_loss_coefficient",
    "eos_coefficient",
)

_REMOTE_AUTO_MAP = {
    "AutoConfig": "configuration_lapvqa_detection.LapvqaDetectionConfig",
    "AutoModel": "modeling_lapvqa_detection.LapvqaDetectionModel",
    "AutoModelForObjectDetection": "modeling_lapvqa_detection.LapvqaDetectionModel",
}


@strict
class LapvqaDetectionConfig(PreTrainedConfig):
    r"""
    Configuration of [`LapvqaDetectionModel`]: the upstream `DetectionHead` (`dmusingu/lapvqa-ad`), a DETR-style set
    predictor that finds VinDr-CXR abnormalities in a frozen encoder's patch tokens. The visual tokens are projected
    to `d_model`, pass a pre-norm transformer encoder, and `num_queries` learned object queries attend to them in a
    transformer decoder; each query yields class logits over `id2label` + no-object (the last index) and a box
    (cx, cy, w, h) in [0, 1] relative to the image the encoder saw.

    The upstream card is silent on several details; these are pinned (docs/models.md, recorded here so that
    a different convention can be chosen): `num_attention_heads=8`, `activation_function="relu"`,
    `decoder_norm_first=True` (pre-norm, like the encoder), `position_embedding_type="none"` (the object queries
    are the decoder's input, and neither they nor the visual tokens get positional encodings, unlike DETR),
    dropouts 0.1 and `layer_norm_eps=1e-5` (PyTorch's `TransformerEncoderLayer` defaults). The FFN widths and the
    final encoder / decoder norms are read from the weights at conversion time.

    Args:
        vis_dim (`int`, defaults to 1152): width of the frozen encoder's patch tokens.
        d_model (`int`, defaults to 256): transformer width.
        encoder_layers (`int`, defaults to 2): encoder layers (pre-norm).
        decoder_layers (`int`, defaults to 3): decoder layers.
        num_attention_heads (`int`, defaults to 8): attention heads of every layer. Pinned; a converter option.
        encoder_ffn_dim / decoder_ffn_dim (`int`, defaults to 2048): feed-forward widths.
        num_queries (`int`, defaults to 20): object queries, i.e. the most findings one image can yield.
        activation_function (`str`, defaults to `"relu"`): feed-forward activation. Pinned; a converter option.
        decoder_norm_first (`bool`, defaults to `True`): pre-norm (`True`) or post-norm decoder layers. Pinned;
            a converter option.
        encoder_final_layer_norm / decoder_final_layer_norm (`bool`, defaults to `True`): whether a LayerNorm
            follows the last encoder / decoder layer (`encoder.norm.*` / `decoder.norm.*` upstream).
        position_embedding_type (`str`, defaults to `"none"`): positional encoding of the visual tokens and the
            queries. Only `"none"` is implemented; recorded so that the assumption travels with the weights.
        dropout / attention_dropout / activation_dropout (`float`, defaults to 0.1): only active in training.
        layer_norm_eps (`float`, defaults to 1e-5): epsilon of every LayerNorm.
        initializer_range (`float`, defaults to 0.02): std of the normal initialisation of fresh weights.
        encoder_name (`str`, *optional*): the frozen encoder the head was trained on; for the known ones
            (`lapvqa_hf.encoders.RECIPES`) `vis_dim` must match its width.
        feature_recipe (`dict`, *optional*): the frozen encoder that feeds the head and how its features are taken
            (`lapvqa_hf.encoders.EncoderRecipe`), recorded by `lapvqa convert`.
        conversion_info (`dict`, *optional*): where the weights came from and which conventions were assumed.
        radiologists (`str`, *optional*): how VinDr-CXR's radiologists' boxes were combined for training
            (`"fused"` or `"all"`), set by `lapvqa_hf.train`; `lapvqa evaluate` scores against the same.
        training_results (`dict`, *optional*): the upstream checkpoint's own record (`epoch`, `val_map40`,
            `val_map50`: validation mAP at IoU 0.4 / 0.5 at the saved epoch).
        id2label / label2id: the 14 VinDr-CXR classes in VinDr's `class_id` order (default).
        is_encoder_decoder (`bool`, defaults to `True`): as DETR's config; outputs carry `encoder_*` and `decoder_*`
            hidden states and attentions (the head does not generate).
        class_cost / bbox_cost / giou_cost (`float`, defaults to 1 / 5 / 2): weights of the class probability, the L1
            box distance and the generalized IoU in the Hungarian matching cost of training (`labels`).
        bbox_loss_coefficient / giou_loss_coefficient (`float`, defaults to 5 / 2): weights of the L1 and GIoU box
            losses in the training loss (the class cross-entropy weighs 1).
        eos_coefficient (`float`, defaults to 0.1): cross-entropy weight of the no-object class.
        auxiliary_loss (`bool`, defaults to `False`): also apply the loss to every decoder layer's output (through the
            final decoder LayerNorm and the same heads), as DETR's `auxiliary_loss`.

    The training loss is transformers' DETR loss (`ForObjectDetectionLoss`). The upstream card gives neither its
    matching costs nor its loss weights: the defaults above are transformers' `DetrConfig` defaults (those of the
    DETR paper), pinned assumptions recorded in `config.json`.
    """

    model_type = "lapvqa_detection"
    remote_auto_map = _REMOTE_AUTO_MAP  # what `auto_map` points to in saved folders (remote code)
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "encoder_layers"}

    vis_dim: int = 1152
    d_model: int = 256
    encoder_layers: int = 2
    decoder_layers: int = 3
    num_attention_heads: int = 8
    encoder_ffn_dim: int = 2048
    decoder_ffn_dim: int = 2048
    num_queries: int = 20
    activation_function: str = "relu"
    decoder_norm_first: bool = True
    encoder_final_layer_norm: bool = True
    decoder_final_layer_norm: bool = True
    position_embedding_type: str = "none"
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.1
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    encoder_name: str | None = None
    feature_recipe: dict | None = None
    conversion_info: dict | None = None
    radiologists: str | None = None
    training_results: dict | None = None
    is_encoder_decoder: bool = True  # as DETR: outputs carry `encoder_*` and `decoder_*` hidden states / attentions
    # Training (`labels`): transformers' DetrConfig defaults, since the upstream values are unpublished.
    class_cost: float | int = 1
    bbox_cost: float | int = 5
    giou_cost: float | int = 2
    bbox_loss_coefficient: float | int = 5
    giou_loss_coefficient: float | int = 2
    eos_coefficient: float | int = 0.1
    auxiliary_loss: bool = False

    def __post_init__(self, **kwargs):
        if self.id2label is None and "num_labels" not in kwargs:
            self.id2label = dict(enumerate(VINDR_CXR_CLASSES))
            self.label2id = {name: index for index, name in self.id2label.items()}
        super().__post_init__(**kwargs)
        # Saved checkpoints load with `trust_remote_code=True` through any of these Auto classes.
        self.auto_map = {**self.remote_auto_map, **(getattr(self, "auto_map", None) or {})}

    def validate_architecture(self):
        super().validate_architecture()
        if self.d_model % self.num_attention_heads != 0:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by num_attention_heads ({self.num_attention_heads})."
            )
        if self.position_embedding_type not in POSITION_EMBEDDING_TYPES:
            raise ValueError(
                f"position_embedding_type={self.position_embedding_type!r} is not implemented; "
                f"expected one of {POSITION_EMBEDDING_TYPES}."
            )
        require_encoder_width(self.encoder_name, self.vis_dim)
        weights = {name: getattr(self, name) for name in LOSS_WEIGHTS}
        bad = {name: value for name, value in weights.items() if not (math.isfinite(value) and value >= 0)}
        if bad:
            raise ValueError(f"The matching costs and loss weights must be finite and >= 0, got {bad}.")
        if self.class_cost == self.bbox_cost == self.giou_cost == 0:
            raise ValueError("At least one matching cost (class_cost, bbox_cost, giou_cost) must be > 0, got all 0.")


__all__ = ["VINDR_CXR_CLASSES", "LapvqaDetectionConfig"]
