"""LAPVQA two-tower pretraining models (`lapvqa-pretrain-contrastive`, `lapvqa-pretrain-sigmoid`): the captioning
ViT-L/14 and a bidirectional report encoder projected into one space, as CLIP (symmetric cross-entropy) and SigLIP
(pairwise sigmoid) are."""

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import capture_outputs

from .configuration_lapvqa_two_tower import LapvqaTwoTowerConfig, LapvqaTwoTowerTextConfig
from .modeling_lapvqa_common import LapvqaAttention, LapvqaTransformerEncoderLayer
from .modeling_lapvqa_vision import LapvqaVisionModel


def contrastive_loss(logits_per_text: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy over `[texts, images]` logits whose matching pairs lie on the diagonal."""
    targets = torch.arange(len(logits_per_text), device=logits_per_text.device)
    return (
        nn.functional.cross_entropy(logits_per_text, targets) + nn.functional.cross_entropy(logits_per_text.T, targets)
    ) / 2


def sigmoid_loss(logits_per_text: torch.Tensor) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss: every (text, image) pair is a binary problem, matching pairs on the diagonal
    positive; summed over pairs, averaged over texts."""
    signs = 2 * torch.eye(*logits_per_text.shape, dtype=logits_per_text.dtype, device=logits_per_text.device) - 1
    return -nn.functional.logsigmoid(signs * logits_per_text).sum() / len(logits_per_text)


@dataclass
class LapvqaTwoTowerOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `(1,)`, *optional*, returned when `return_loss` is `True`):
        The pretraining loss: pairwise sigmoid where the model has `logit_bias`, symmetric cross-entropy otherwise.
    logits_per_image (`torch.FloatTensor` of shape `(image_batch_size, text_batch_size)`):
        Scaled cosine similarities (plus the bias of the sigmoid model) between images and texts.
    logits_per_text (`torch.FloatTensor` of shape `(text_batch_size, image_batch_size)`):
        The transpose of `logits_per_image`.
    text_embeds / image_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
        The projected, L2-normalised embeddings.
    text_model_output / vision_model_output (`BaseModelOutputWithPooling`): the towers' own outputs.
    """

    loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_model_output: BaseModelOutputWithPooling = None
    vision_model_output: BaseModelOutputWithPooling = None

    def to_tuple(self) -> tuple[Any]:
        return tuple(
            self[k].to_tuple() if k in ("text_model_output", "vision_model_output") else self[k] for k in self.keys()
        )


class LapvqaTwoTowerTextEmbeddings(nn.Module):
    """Token embeddings plus learned positions 0..T-1 (texts are right-padded)."""

    def __init__(self, config: LapvqaTwoTowerTextConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        if length > self.config.max_position_embeddings:
            raise ValueError(
                f"The text has {length} tokens, more than the {self.config.max_position_embeddings} learned positions "
                "of this encoder: truncate it (the processor does with truncation=True)."
            )
        positions = torch.arange(length, device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(positions)


class LapvqaTwoTowerPreTrainedModel(PreTrainedModel):
    config: LapvqaTwoTowerConfig
    base_model_prefix = "lapvqa_two_tower"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["LapvqaTransformerEncoderLayer", "LapvqaVisionLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_record_outputs = {"hidden_states": LapvqaTransformerEncoderLayer, "attentions": LapvqaAttention}

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, LapvqaTwoTowerModel):
            module.logit_scale.fill_(self.config.logit_scale_init_value)
            if module.logit_bias is not None:
                module.logit_bias.fill_(self.config.logit_bias_init_value)


class LapvqaTwoTowerTextModel(LapvqaTwoTowerPreTrainedModel):
    """The report encoder alone. `last_hidden_state` holds every token's final hidden state; `pooler_output` the
    text's pooled state (`config.text_pooling`: at the eot token, or the mean over non-padding tokens), before the
    projection."""

    config: LapvqaTwoTowerTextConfig
    main_input_name = "input_ids"
    input_modalities = ("text",)

    def __init__(self, config: LapvqaTwoTowerTextConfig):
        super().__init__(config)
        self.embeddings = LapvqaTwoTowerTextEmbeddings(config)
        self.layers = nn.ModuleList(
            LapvqaTransformerEncoderLayer(
                config, config.hidden_size, config.num_attention_heads, config.intermediate_size, config.hidden_act
            )
            for _ in range(config.num_hidden_layers)
        )
        self.final_layer_norm = (
            nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.use_final_layer_norm else None
        )
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.token_embedding

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.token_embedding = value

    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> BaseModelOutputWithPooling:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `[batch, length]`): `text ids + [eot]`, right-padded (the
                processor builds them).
            attention_mask (`torch.Tensor` of shape `[batch, length]`, *optional*): 1 for tokens, 0 for padding.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden_states = self.embeddings(input_ids)
        encoder_mask = create_bidirectional_mask(
            config=self.config, inputs_embeds=hidden_states, attention_mask=attention_mask
        )
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask=encoder_mask, **kwargs)
        if self.final_layer_norm is not None:
            hidden_states = self.final_layer_norm(hidden_states)
        return BaseModelOutputWithPooling(
            last_hidden_state=hidden_states, pooler_output=self.pool(hidden_states, attention_mask)
        )

    def pool(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.config.text_pooling == "mean":
            mask = attention_mask.unsqueeze(-1).to(hidden_states.dtype)
            return (hidden_states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last_token = (positions * attention_mask.to(positions.dtype)).argmax(dim=1)  # the eot the tokenizer appended
        return hidden_states[torch.arange(len(hidden_states), device=hidden_states.device), last_token]


class LapvqaTwoTowerModel(LapvqaTwoTowerPreTrainedModel):
    """Image and report towers in one space. `get_image_features` / `get_text_features` give the projected,
    unnormalised embeddings (in `pooler_output`, as CLIPModel); `forward` the normalised embeddings, the logits of
    every image against every text, and with `return_loss=True` the loss the weights were trained with."""

    config: LapvqaTwoTowerConfig

    def __init__(self, config: LapvqaTwoTowerConfig):
        super().__init__(config)
        self.vision_model = LapvqaVisionModel(config.vision_config)
        self.text_model = LapvqaTwoTowerTextModel(config.text_config)
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=False)
        self.text_projection = nn.Linear(config.text_config.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        self.logit_bias = nn.Parameter(torch.tensor(config.logit_bias_init_value)) if config.use_logit_bias else None
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.text_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.text_model.set_input_embeddings(value)

    def similarity(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """Logits of every image against every text, `[images, texts]`: exp(logit_scale) x cosine (+ logit_bias),
        from projected features (`get_image_features` / `get_text_features`, normalised here)."""
        image_embeds = nn.functional.normalize(image_features, dim=-1)
        text_embeds = nn.functional.normalize(text_features, dim=-1).to(image_embeds.dtype)
        logits = self.logit_scale.exp() * image_embeds @ text_embeds.T
        return logits + self.logit_bias if self.logit_bias is not None else logits

    @can_return_tuple
    def get_text_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> BaseModelOutputWithPooling:
        """The text tower's output, its `pooler_output` projected into the shared space (not normalised)."""
        text_outputs = self.text_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        text_outputs.pooler_output = self.text_projection(text_outputs.pooler_output)
        return text_outputs

    @can_return_tuple
    def get_image_features(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False, **kwargs
    ) -> BaseModelOutputWithPooling:
        """The image tower's output, its `pooler_output` the pooled image (`config.image_pooling`) projected into
        the shared space (not normalised)."""
        vision_outputs = self.vision_model(
            pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, **kwargs
        )
        if self.config.image_pooling == "mean":
            pooled = vision_outputs.last_hidden_state.mean(dim=1)
        else:
            pooled = vision_outputs.pooler_output
        vision_outputs.pooler_output = self.visual_projection(pooled)
        return vision_outputs

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        return_loss: bool | None = None,
        interpolate_pos_encoding: bool = False,
        **kwargs,
    ) -> LapvqaTwoTowerOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `[texts, length]`): right-padded `text + [eot]` (the processor).
            pixel_values (`torch.FloatTensor` of shape `[images, 3, size, size]`): from the image processor.
            attention_mask (`torch.Tensor` of shape `[texts, length]`, *optional*): 1 for tokens, 0 for padding.
            return_loss (`bool`, *optional*): also return the loss of image i matching text i.
        """
        if input_ids is None or pixel_values is None:
            raise ValueError(
                "LapvqaTwoTowerModel.forward takes both input_ids and pixel_values; for one tower use "
                "get_text_features or get_image_features."
            )
        vision_outputs = self.get_image_features(
            pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, **kwargs
        )
        text_outputs = self.get_text_features(input_ids, attention_mask, **kwargs)
        image_embeds = nn.functional.normalize(vision_outputs.pooler_output, dim=-1)
        text_embeds = nn.functional.normalize(text_outputs.pooler_output, dim=-1)
        logits_per_text = self.similarity(image_embeds, text_embeds).T
        loss = None
        if return_loss:
            if len(input_ids) != len(pixel_values):
                raise ValueError(
                    f"return_loss=True pairs text i with image i: got {len(input_ids)} texts and {len(pixel_values)} "
                    "images."
                )
            loss = sigmoid_loss(logits_per_text) if self.logit_bias is not None else contrastive_loss(logits_per_text)
        return LapvqaTwoTowerOutput(
            loss=loss,
            logits_per_image=logits_per_text.T,
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            text_model_output=text_outputs,
            vision_model_output=vision_outputs,
        )


__all__ = [
    "LapvqaTwoTowerModel",
    "LapvqaTwoTowerOutput",
    "LapvqaTwoTowerPreTrainedModel",
    "LapvqaTwoTowerTextModel",
    "contrastive_loss",
    "sigmoid_loss",
]
