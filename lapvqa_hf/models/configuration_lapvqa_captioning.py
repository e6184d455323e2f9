"""LAPVQA captioning model (ViT-L/14 encoder + report decoder) configuration."""

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig

from .configuration_lapvqa_common import LapvqaTextDecoderConfig
from .configuration_lapvqa_vision import LapvqaVisionConfig

_REMOTE_AUTO_MAP = {
    "AutoConfig": "configuration_lapvqa_captioning.LapvqaCaptioningConfig",
    "AutoModel": "modeling_lapvqa_captioning.LapvqaCaptioningModel",
    "AutoModelForImageTextToText": "modeling_lapvqa_captioning.LapvqaCaptioningModel",
}


@strict
class LapvqaCaptioningConfig(LapvqaTextDecoderConfig):
    r"""
    Configuration of [`LapvqaCaptioningModel`] (`dmusingu/lapvqa-pretrain-captioning`): a [`LapvqaVisionConfig`]
    encoder and a report decoder built like the DiffVQA decoder (the fields of [`LapvqaTextDecoderConfig`])
    without the frame embedding. A report is `[bos] + report_ids + [eos]`, and
    `max_position_embeddings` (read from the weights) bounds its length.

    Args:
        vision_config (`dict` or `LapvqaVisionConfig`, *optional*): the encoder.
        hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, hidden_act,
        max_position_embeddings, vocab_size, dropout, attention_dropout, activation_dropout, layer_norm_eps,
        use_final_layer_norm: the decoder, as in `LapvqaDiffVQAConfig`. Heads and activation are not recorded
        in the upstream weights (pinned: 8, relu; converter options).
        conversion_info (`dict`, *optional*): source file and assumptions recorded by `lapvqa convert`.
        feature_recipe (`dict`, *optional*): the encoder features the decoder was trained on, where training read
            stored features (`lapvqa_hf.train`, inputs "features"); None when trained from pixels or converted.
        report_sections (`list[str]`, *optional*): the MIMIC-CXR report sections the decoder was trained to write,
            set by `lapvqa_hf.train`; `lapvqa evaluate` scores against the same.
    """

    model_type = "lapvqa_captioning"
    sub_configs_defaults = {"vision_config": LapvqaVisionConfig}

    vision_config: dict | PreTrainedConfig | None = None
    max_position_embeddings: int = 256
    feature_recipe: dict | None = None
    report_sections: list[str] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.auto_map = {**_REMOTE_AUTO_MAP, **(getattr(self, "auto_map", None) or {})}


__all__ = ["LapvqaCaptioningConfig"]
