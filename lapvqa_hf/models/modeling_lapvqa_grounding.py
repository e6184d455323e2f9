"""LAPVQA phrase grounding: a TransVG-style box regressor over a frozen encoder's chest X-ray patch tokens and a
phrase's text embedding."""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.loss.loss_for_object_detection import center_to_corners_format, generalized_box_iou
from transformers.modeling_outputs import BaseModelOutput
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput
from transformers.utils.generic import can_return_tuple

from .configuration_lapvqa_grounding import LapvqaGroundingConfig
from .modeling_lapvqa_common import LapvqaPreNormEncoderMixin


@dataclass
class LapvqaGroundingOutput(ModelOutput):
    r"""
    Output of [`LapvqaGroundingModel`].

    Args:
        loss (`torch.Tensor`, *optional*): TransVG's loss, when `labels` are given: `bbox_loss_coefficient` x L1 +
            `giou_loss_coefficient` x (1 - GIoU), each averaged over the batch.
        loss_dict (`dict[str, torch.Tensor]`, *optional*): its unweighted parts, `loss_bbox` and `loss_giou`.
        pred_boxes (`torch.Tensor` of shape `(batch_size, 4)`): one box per (image, phrase) as (cx, cy, w, h) in
            [0, 1], relative to the image the encoder saw; `LapvqaImageProcessor.boxes_to_original` (after
            `center_to_corners_format`) gives pixel boxes of the original image.
        pred_box_logits (`torch.Tensor` of shape `(batch_size, 4)`): the box head's output before the sigmoid.
        last_hidden_state (`torch.Tensor` of shape `(batch_size, 1 + num_patches + 1, d_model)`): the encoder's output
            over [REG], the visual tokens and the phrase token.
        hidden_states / attentions (`tuple[torch.Tensor]`, *optional*): per-layer outputs and attention weights, when
            requested.
    """

    loss: torch.Tensor | None = None
    loss_dict: dict | None = None
    pred_boxes: torch.Tensor | None = None
    pred_box_logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


def grounding_loss(
    pred_boxes: torch.Tensor, target_boxes: torch.Tensor, config: LapvqaGroundingConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """TransVG's loss of (cx, cy, w, h) boxes, in float32: L1 summed over the coordinates and (1 - GIoU), each averaged
    over the batch (the GIoU of transformers' DETR loss), weighted by the config's coefficients."""
    pred_boxes, target_boxes = pred_boxes.float(), target_boxes.float()
    loss_bbox = nn.functional.l1_loss(pred_boxes, target_boxes, reduction="none").sum(dim=-1).mean()
    giou = generalized_box_iou(center_to_corners_format(pred_boxes), center_to_corners_format(target_boxes))
    loss_giou = (1 - torch.diag(giou)).mean()
    loss = config.bbox_loss_coefficient * loss_bbox + config.giou_loss_coefficient * loss_giou
    return loss, {"loss_bbox": loss_bbox, "loss_giou": loss_giou}


class LapvqaGroundingPreTrainedModel(PreTrainedModel):
    config: LapvqaGroundingConfig
    base_model_prefix = "model"
    main_input_name = "image_features"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LapvqaTransformerEncoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, LapvqaGroundingModel):
            init.normal_(module.reg_token, mean=0.0, std=self.config.initializer_range)
            if module.position_embeddings is not None:
                init.normal_(module.position_embeddings, mean=0.0, std=self.config.initializer_range)


class LapvqaGroundingEncoder(LapvqaPreNormEncoderMixin, LapvqaGroundingPreTrainedModel):
    """Pre-norm transformer encoder over [REG; visual tokens; phrase token], with an optional final LayerNorm."""


class LapvqaGroundingMLPPredictionHead(nn.Module):
    """The box head: Linear -> ReLU -> Linear (`box_head.0` / `box_head.2` upstream); the caller applies sigmoid."""

    def __init__(self, config: LapvqaGroundingConfig):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(config.d_model, config.d_model), nn.Linear(config.d_model, 4)])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.layers[1](nn.functional.relu(self.layers[0](hidden_states)))


class LapvqaGroundingModel(LapvqaGroundingPreTrainedModel):
    """The upstream `VisualGroundingHead`: one box per (image, phrase) from a frozen encoder's patch tokens and the
    phrase's text embedding.

    The sequence `[reg_token ; visual_projection(image_features) ; text_projection(text_features)]`
    (`[B, 1 + N + 1, d_model]`, plus the first `1 + N + 1` learned positions where the model has them) passes the
    encoder; the output at [REG] gives, through `bbox_predictor` and a sigmoid, the box (cx, cy, w, h) in [0, 1].
    """

    def __init__(self, config: LapvqaGroundingConfig):
        super().__init__(config)
        self.visual_projection = nn.Linear(config.vis_dim, config.d_model)
        self.text_projection = nn.Linear(config.txt_dim, config.d_model)
        self.reg_token = nn.Parameter(torch.zeros(1, 1, config.d_model))
        positions = config.max_position_embeddings
        self.position_embeddings = nn.Parameter(torch.zeros(1, positions, config.d_model)) if positions else None
        self.encoder = LapvqaGroundingEncoder(config)
        self.bbox_predictor = LapvqaGroundingMLPPredictionHead(config)
        self.post_init()

    def _check_inputs(self, image_features: torch.Tensor | None, text_features: torch.Tensor | None) -> None:
        config = self.config
        expected = f"[batch, num_patches, {config.vis_dim}]"
        encoder = config.encoder_name or "configured"
        if image_features is None or text_features is None:
            raise ValueError(
                f"`image_features` (the {encoder} encoder's patch tokens {expected}) and `text_features` (one phrase "
                f"embedding per image, [batch, {config.txt_dim}]) are both required."
            )
        shape = list(image_features.shape)
        if len(shape) != 3 or shape[-1] != config.vis_dim or 0 in shape:
            raise ValueError(
                f"`image_features` must be non-empty patch tokens of shape {expected} (vis_dim of the {encoder} "
                f"encoder), got {shape}."
            )
        if list(text_features.shape) != [shape[0], config.txt_dim]:
            raise ValueError(
                f"`text_features` must be one phrase embedding per image, [{shape[0]}, {config.txt_dim}], got "
                f"{list(text_features.shape)}."
            )
        limit = config.max_position_embeddings
        if limit is not None and shape[1] + 2 > limit:
            raise ValueError(
                f"{shape[1]} visual tokens + [REG] + the phrase need {shape[1] + 2} positions, more than the {limit} "
                f"learned positions of this model: it takes at most {limit - 2} visual tokens."
            )

    def _check_labels(self, labels, batch_size: int) -> None:
        expected = f"a float tensor [{batch_size}, 4] of target boxes (cx, cy, w, h) normalised to [0, 1]"
        if not torch.is_tensor(labels) or not labels.is_floating_point() or list(labels.shape) != [batch_size, 4]:
            found = f"{labels.dtype} {list(labels.shape)}" if torch.is_tensor(labels) else type(labels).__name__
            raise ValueError(f"`labels` must be {expected}, got {found}.")
        if not (torch.isfinite(labels).all() and labels.min() >= 0 and labels.max() <= 1):
            raise ValueError(
                f"`labels` must be {expected}, got values from {labels.min().item()} to {labels.max().item()}."
            )

    @can_return_tuple
    def forward(
        self,
        image_features: torch.Tensor | None = None,
        text_features: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> LapvqaGroundingOutput:
        r"""
        Args:
            image_features (`torch.Tensor` of shape `[batch, num_patches, vis_dim]`): the frozen encoder's patch
                tokens (the encoder named by `config.feature_recipe`).
            text_features (`torch.Tensor` of shape `[batch, txt_dim]`): each image's phrase, embedded by the text
                tower named by `config.text_recipe` (`get_text_features`, L2-normalised with `config.text_normalize`).
            labels (`torch.Tensor` of shape `[batch, 4]`, *optional*): target boxes (cx, cy, w, h) normalised to
                [0, 1] by the image size. Gives `loss` and `loss_dict`.
        """
        self._check_inputs(image_features, text_features)
        if labels is not None:
            self._check_labels(labels, image_features.shape[0])
        dtype = self.visual_projection.weight.dtype
        visual = self.visual_projection(image_features.to(dtype))
        phrase = self.text_projection(text_features.to(dtype)).unsqueeze(1)
        hidden_states = torch.cat([self.reg_token.expand(len(visual), -1, -1), visual, phrase], dim=1)
        if self.position_embeddings is not None:
            hidden_states = hidden_states + self.position_embeddings[:, : hidden_states.shape[1]]
        encoder_outputs: BaseModelOutput = self.encoder(inputs_embeds=hidden_states, **kwargs)
        pred_box_logits = self.bbox_predictor(encoder_outputs.last_hidden_state[:, 0])
        pred_boxes = pred_box_logits.sigmoid()
        loss, loss_dict = None, None
        if labels is not None:
            loss, loss_dict = grounding_loss(pred_boxes, labels.to(pred_boxes.device), self.config)
        return LapvqaGroundingOutput(
            loss=loss,
            loss_dict=loss_dict,
            pred_boxes=pred_boxes,
            pred_box_logits=pred_box_logits,
            last_hidden_state=encoder_outputs.last_hidden_state,
            hidden_states=encoder_outputs.hidden_states,
            attentions=encoder_outputs.attentions,
        )


__all__ = ["LapvqaGroundingModel", "LapvqaGroundingOutput", "LapvqaGroundingPreTrainedModel", "grounding_loss"]
