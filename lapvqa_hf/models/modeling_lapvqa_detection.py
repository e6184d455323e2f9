"""LAPVQA abnormality detection: a DETR-style set predictor over a frozen encoder's chest X-ray patch tokens."""

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithCrossAttentions
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_lapvqa_detection import LapvqaDetectionConfig
from .modeling_lapvqa_common import LapvqaAttention, LapvqaMLP, LapvqaPreNormEncoderMixin


@dataclass
class LapvqaDetectionOutput(ModelOutput):
    r"""
    Output of [`LapvqaDetectionModel`], laid out like transformers' `DetrObjectDetectionOutput`.

    Args:
        loss (`torch.Tensor`, *optional*): the DETR set loss, when `labels` are given: cross-entropy of the classes
            + `bbox_loss_coefficient` x L1 + `giou_loss_coefficient` x GIoU of the boxes of the Hungarian-matched
            queries (and the same for every decoder layer with `config.auxiliary_loss`).
        loss_dict (`dict[str, torch.Tensor]`, *optional*): its unweighted parts (`loss_ce`, `loss_bbox`, `loss_giou`,
            and `cardinality_error`, not trained), as DETR's.
        logits (`torch.Tensor` of shape `(batch_size, num_queries, num_labels + 1)`): class logits per query,
            the last column being no-object.
        pred_boxes (`torch.Tensor` of shape `(batch_size, num_queries, 4)`): boxes as (cx, cy, w, h) in [0, 1],
            relative to the image the encoder saw; `LapvqaImageProcessor.post_process_object_detection` turns
            them into pixel boxes of the original image.
        last_hidden_state (`torch.Tensor` of shape `(batch_size, num_queries, d_model)`): decoder output.
        decoder_hidden_states / decoder_attentions / cross_attentions (`tuple[torch.Tensor]`, *optional*):
            per-layer decoder outputs, self-attention and cross-attention weights, when requested.
        encoder_last_hidden_state (`torch.Tensor` of shape `(batch_size, num_patches, d_model)`): encoder output.
        encoder_hidden_states / encoder_attentions (`tuple[torch.Tensor]`, *optional*): per-layer encoder outputs
            and attention weights, when requested.
        auxiliary_outputs (`list[dict]`, *optional*): with `config.auxiliary_loss` and `labels`, the `logits` and
            `pred_boxes` of every decoder layer but the last.
    """

    loss: torch.Tensor | None = None
    loss_dict: dict | None = None
    logits: torch.Tensor | None = None
    pred_boxes: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    decoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    decoder_attentions: tuple[torch.Tensor, ...] | None = None
    cross_attentions: tuple[torch.Tensor, ...] | None = None
    encoder_last_hidden_state: torch.Tensor | None = None
    encoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    encoder_attentions: tuple[torch.Tensor, ...] | None = None
    auxiliary_outputs: list[dict] | None = None


class LapvqaDetectionDecoderLayer(GradientCheckpointingLayer):
    """`torch.nn.TransformerDecoderLayer`: self-attention over the queries, cross-attention to the encoded visual
    tokens, feed-forward; pre-norm or post-norm by `config.decoder_norm_first`. The text decoders' layer
    (`LapvqaDecoderLayer`) is this layer pre-norm, with a cache and its feed-forward as its own `fc1/2`: the published
    folders' layouts differ, so both stay, and `tests/test_shared_modeling.py` keeps them computing the same."""

    def __init__(self, config: LapvqaDetectionConfig):
        super().__init__()
        self.dropout = config.dropout
        self.norm_first = config.decoder_norm_first
        self.self_attn_layer_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.self_attn = LapvqaAttention(config, config.d_model, config.num_attention_heads)
        self.encoder_attn_layer_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.encoder_attn = LapvqaAttention(config, config.d_model, config.num_attention_heads, is_cross_attention=True)
        self.final_layer_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.mlp = LapvqaMLP(
            config.d_model, config.decoder_ffn_dim, config.activation_function, config.activation_dropout
        )

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        residual = hidden_states
        if self.norm_first:
            hidden_states = self.self_attn_layer_norm(hidden_states)
        hidden_states, _ = self.self_attn(hidden_states, **kwargs)
        hidden_states = residual + nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)
        if not self.norm_first:
            hidden_states = self.self_attn_layer_norm(hidden_states)

        residual = hidden_states
        if self.norm_first:
            hidden_states = self.encoder_attn_layer_norm(hidden_states)
        hidden_states, _ = self.encoder_attn(hidden_states, key_value_states=encoder_hidden_states, **kwargs)
        hidden_states = residual + nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)
        if not self.norm_first:
            hidden_states = self.encoder_attn_layer_norm(hidden_states)

        residual = hidden_states
        if self.norm_first:
            hidden_states = self.final_layer_norm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = residual + nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)
        if not self.norm_first:
            hidden_states = self.final_layer_norm(hidden_states)
        return hidden_states


class LapvqaDetectionPreTrainedModel(PreTrainedModel):
    config: LapvqaDetectionConfig
    base_model_prefix = "model"
    main_input_name = "image_features"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LapvqaTransformerEncoderLayer", "LapvqaDetectionDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, LapvqaDetectionModel):
            init.normal_(module.object_queries, mean=0.0, std=self.config.initializer_range)


class LapvqaDetectionEncoder(LapvqaPreNormEncoderMixin, LapvqaDetectionPreTrainedModel):
    """Pre-norm transformer encoder over the projected visual tokens, with an optional final LayerNorm."""


class LapvqaDetectionDecoder(LapvqaDetectionPreTrainedModel):
    """Transformer decoder refining the object queries against the encoded visual tokens."""

    _can_record_outputs = {
        "hidden_states": LapvqaDetectionDecoderLayer,
        "attentions": OutputRecorder(LapvqaAttention, index=1, layer_name="self_attn"),
        "cross_attentions": OutputRecorder(LapvqaAttention, index=1, layer_name="encoder_attn"),
    }

    def __init__(self, config: LapvqaDetectionConfig):
        super().__init__(config)
        self.layers = nn.ModuleList([LapvqaDetectionDecoderLayer(config) for _ in range(config.decoder_layers)])
        self.layer_norm = (
            nn.LayerNorm(config.d_model, eps=config.layer_norm_eps) if config.decoder_final_layer_norm else None
        )
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self, inputs_embeds: torch.Tensor, encoder_hidden_states: torch.Tensor, **kwargs
    ) -> BaseModelOutputWithCrossAttentions:
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, encoder_hidden_states, **kwargs)
        if self.layer_norm is not None:
            hidden_states = self.layer_norm(hidden_states)
        return BaseModelOutputWithCrossAttentions(last_hidden_state=hidden_states)


class LapvqaDetectionMLPPredictionHead(nn.Module):
    """The box head: Linear -> ReLU -> Linear (`box_head.0` / `box_head.2` upstream); the caller applies sigmoid."""

    def __init__(self, config: LapvqaDetectionConfig):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(config.d_model, config.d_model), nn.Linear(config.d_model, 4)])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.layers[1](nn.functional.relu(self.layers[0](hidden_states)))


def _is_integer(tensor: torch.Tensor) -> bool:
    return not (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool)


class LapvqaDetectionModel(LapvqaDetectionPreTrainedModel):
    """The upstream `DetectionHead`: VinDr-CXR abnormality boxes from a frozen encoder's patch tokens.

    `image_features` `[B, N, vis_dim]` are projected to `d_model` and encoded; `num_queries` learned object queries
    are decoded against them (no positional encodings, see the config); each query gives class logits (the last
    being no-object) and a sigmoid box (cx, cy, w, h) in [0, 1].
    """

    def __init__(self, config: LapvqaDetectionConfig):
        super().__init__(config)
        self.visual_projection = nn.Linear(config.vis_dim, config.d_model)
        self.encoder = LapvqaDetectionEncoder(config)
        self.object_queries = nn.Parameter(torch.zeros(1, config.num_queries, config.d_model))
        self.decoder = LapvqaDetectionDecoder(config)
        self.class_labels_classifier = nn.Linear(config.d_model, config.num_labels + 1)
        self.bbox_predictor = LapvqaDetectionMLPPredictionHead(config)
        self.loss_type = "ForObjectDetection"  # transformers' DETR loss (`self.loss_function`)
        self.post_init()

    def _check_image_features(self, image_features: torch.Tensor | None) -> None:
        expected = f"[batch, num_patches, {self.config.vis_dim}]"
        encoder = self.config.encoder_name or "configured"
        if image_features is None:
            raise ValueError(f"`image_features` are required: the {encoder} encoder's patch tokens {expected}.")
        shape = list(image_features.shape)
        if len(shape) != 3 or shape[-1] != self.config.vis_dim or 0 in shape:
            raise ValueError(
                f"`image_features` must be non-empty patch tokens of shape {expected} (vis_dim of the {encoder} "
                f"encoder), got {shape}."
            )

    def _check_labels(self, labels, batch_size: int) -> None:
        """`labels` as transformers' DETR takes them, or a one-line `ValueError` saying what was expected."""
        expected = (
            f"a list of {batch_size} dicts (one per image) of `class_labels` (LongTensor [n]) and `boxes` (FloatTensor "
            "[n, 4], normalised (cx, cy, w, h))"
        )
        if not isinstance(labels, list | tuple) or len(labels) != batch_size:
            found = f"{len(labels)} items" if isinstance(labels, list | tuple) else type(labels).__name__
            raise ValueError(f"`labels` must be {expected}, got {found}.")
        num_labels = self.config.num_labels
        for index, target in enumerate(labels):
            name = f"labels[{index}]"
            if not isinstance(target, Mapping) or not {"class_labels", "boxes"} <= target.keys():
                found = sorted(target.keys()) if isinstance(target, Mapping) else type(target).__name__
                raise ValueError(f"{name} must be a dict of `class_labels` and `boxes`, got {found}.")
            classes, boxes = target["class_labels"], target["boxes"]
            if not torch.is_tensor(classes) or classes.ndim != 1 or not _is_integer(classes):
                found = list(classes.shape) if torch.is_tensor(classes) else type(classes).__name__
                raise ValueError(f"{name}['class_labels'] must be a 1-D integer tensor of class ids, got {found}.")
            if len(classes) and not 0 <= classes.min() <= classes.max() < num_labels:
                raise ValueError(
                    f"{name}['class_labels'] must be class ids in [0, {num_labels}) (the no-object class "
                    f"{num_labels} is no target), got {classes.tolist()}."
                )
            shape = [len(classes), 4]
            if not torch.is_tensor(boxes) or not boxes.is_floating_point() or list(boxes.shape) != shape:
                found = f"{boxes.dtype} {list(boxes.shape)}" if torch.is_tensor(boxes) else type(boxes).__name__
                raise ValueError(
                    f"{name}['boxes'] must be a float tensor {shape} (one (cx, cy, w, h) box per class label), got "
                    f"{found}."
                )
            if len(boxes) and not (torch.isfinite(boxes).all() and boxes.min() >= 0 and boxes.max() <= 1):
                raise ValueError(
                    f"{name}['boxes'] must be (cx, cy, w, h) normalised to [0, 1] by the image size, got values from "
                    f"{boxes.min().item()} to {boxes.max().item()}."
                )

    @can_return_tuple
    def forward(
        self, image_features: torch.Tensor | None = None, labels: list[dict] | None = None, **kwargs
    ) -> LapvqaDetectionOutput:
        r"""
        Args:
            image_features (`torch.Tensor` of shape `[batch, num_patches, vis_dim]`): the frozen encoder's patch
                tokens (the encoder named by `config.encoder_name`).
            labels (`list[dict]`, *optional*): as transformers' DETR: one dict per image with `class_labels`
                (`torch.LongTensor` `[n]`, ids of `config.id2label`) and `boxes` (`torch.FloatTensor` `[n, 4]`,
                (cx, cy, w, h) normalised to [0, 1] by the image size; `n` may be 0). Gives `loss` and `loss_dict`.
        """
        self._check_image_features(image_features)
        if labels is not None:
            self._check_labels(labels, image_features.shape[0])
            if self.config.auxiliary_loss:  # every decoder layer's output is needed
                kwargs["output_hidden_states"] = True
        hidden_states = self.visual_projection(image_features.to(self.visual_projection.weight.dtype))
        encoder_outputs: BaseModelOutput = self.encoder(inputs_embeds=hidden_states, **kwargs)
        queries = self.object_queries.expand(image_features.shape[0], -1, -1)
        decoder_outputs: BaseModelOutputWithCrossAttentions = self.decoder(
            inputs_embeds=queries, encoder_hidden_states=encoder_outputs.last_hidden_state, **kwargs
        )
        sequence_output = decoder_outputs.last_hidden_state
        logits = self.class_labels_classifier(sequence_output)
        pred_boxes = self.bbox_predictor(sequence_output).sigmoid()

        loss, loss_dict, auxiliary_outputs = None, None, None
        if labels is not None:
            outputs_class, outputs_coord = None, None
            if self.config.auxiliary_loss:
                # As DETR: each layer's output through the final decoder norm (the last one has had it) and the heads.
                norm = self.decoder.layer_norm or nn.Identity()
                intermediate = [norm(state) for state in decoder_outputs.hidden_states[1:-1]] + [sequence_output]
                intermediate = torch.stack(intermediate)
                outputs_class = self.class_labels_classifier(intermediate).float()
                outputs_coord = self.bbox_predictor(intermediate).sigmoid().float()
            targets = [
                {
                    "class_labels": t["class_labels"].to(self.device, torch.long),
                    "boxes": t["boxes"].to(self.device, torch.float32),
                }
                for t in labels
            ]
            # In float32 whatever the model's dtype, as the matcher's costs and the GIoU need.
            loss, loss_dict, auxiliary_outputs = self.loss_function(
                logits.float(), targets, self.device, pred_boxes.float(), self.config, outputs_class, outputs_coord
            )
        return LapvqaDetectionOutput(
            loss=loss,
            loss_dict=loss_dict,
            logits=logits,
            pred_boxes=pred_boxes,
            last_hidden_state=sequence_output,
            decoder_hidden_states=decoder_outputs.hidden_states,
            decoder_attentions=decoder_outputs.attentions,
            cross_attentions=decoder_outputs.cross_attentions,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states,
            encoder_attentions=encoder_outputs.attentions,
            auxiliary_outputs=auxiliary_outputs,
        )


__all__ = ["LapvqaDetectionModel", "LapvqaDetectionOutput", "LapvqaDetectionPreTrainedModel"]
