"""LAPVQA captioning model (ViT-L/14 encoder + report decoder) configuration."""

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig

from .configuration_lapvqa_vision import LapvqaVisionConfig

_REMOTE_AUTO_MAP = {
    "AutoConfig": "configuration_lapvqa_captioning.LapvqaCaptioningConfig",
    "AutoModel": "modeling_lapvqa_captioning.LapvqaCaptioningModel",
    "AutoModelForImageTextToText": "modeling_lapvqa_captioning.LapvqaCaptioningModel",
}


@strict
class LapvqaCaptioningConfig(PreTrainedConfig):
    r"""
    Configuration of [`LapvqaCaptioningModel`] (`dmusingu/lapvqa-pretrain-captioning`): a [`LapvqaVisionConfig`]
    encoder and a report decoder built like the DiffVQA decoder (same field names, see
    [`LapvqaDiffVQAConfig`]) without the frame embedding. A report is `[bos] + report_ids + [eos]`, and
    `max_position_embeddings` (read from the weights) bounds its length.

    Args:
        vision_config (`dict` or `LapvqaVisionConfig`, *optional*): the encoder.
        hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, hidden_act,
        max_position_embeddings, vocab_size, dropout, attention_dropout, activation_dropout, layer_norm_eps,
        use_final_layer_norm: the decoder, as in `LapvqaDiffVQAConfig`. Heads and activation are not recorded
        in the upstream weights (pinned: 8, relu; converter options).
        conversion_info (`dict`, *optional*): source file and assumptions recorded by `lapvqa convert`.
    """

    model_type = "lapvqa_captioning"
    sub_configs_defaults = {"vision_config": LapvqaVisionConfig}
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    vision_config: dict | PreTrainedConfig | None = None
    hidden_size: int = 512
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    intermediate_size: int = 2048
    hidden_act: str = "relu"
    max_position_embeddings: int = 256
    vocab_size: int = 50257
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.1
    layer_norm_eps: float = 1e-5
    use_final_layer_norm: bool = True
    initializer_range: float = 0.02
    use_cache: bool = True
    conversion_info: dict | None = None
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256
    pad_token_id: int | None = 50256
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.auto_map = {**_REMOTE_AUTO_MAP, **(getattr(self, "auto_map", None) or {})}

    def validate_architecture(self):
        super().validate_architecture()
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})."
            )


__all__ = ["LapvqaCaptioningConfig"]
