"""The text decoder's configuration fields, once: the DiffVQA, VQA and captioning (report) heads' decoders are the
same pinned `torch.nn.TransformerDecoder`, and their configurations share these fields and checks."""

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig


@strict
class LapvqaTextDecoderConfig(PreTrainedConfig):
    r"""
    The fields of a LAPVQA text decoder (a pre-norm transformer decoder over a visual memory, GPT-2 vocabulary);
    the model configurations that have one subclass this.

    Args:
        hidden_size (`int`, defaults to 512): decoder width.
        num_hidden_layers (`int`, defaults to 6): decoder layers.
        num_attention_heads (`int`, defaults to 8): attention heads. Not recorded in the upstream weights
            (a pinned convention; a converter option, see docs/converting.md).
        intermediate_size (`int`, defaults to 2048): feed-forward width.
        hidden_act (`str`, defaults to `"relu"`): feed-forward activation. Not recorded in the upstream
            weights (a pinned convention; a converter option, see docs/converting.md).
        max_position_embeddings (`int`, defaults to 200): learned positions; prompt + generated text must fit.
        vocab_size (`int`, defaults to 50257): GPT-2 vocabulary.
        dropout / attention_dropout / activation_dropout (`float`, defaults to 0.1): as in
            `torch.nn.TransformerDecoderLayer(dropout=0.1)`; only active in training.
        layer_norm_eps (`float`, defaults to 1e-5): `torch.nn.LayerNorm`'s default.
        use_final_layer_norm (`bool`, defaults to `True`): whether a LayerNorm follows the last layer
            (`decoder.norm.*` in the upstream state dict).
        conversion_info (`dict`, *optional*): where the weights came from and which conventions were assumed at
            conversion time (see `lapvqa convert`).
    """

    keys_to_ignore_at_inference = ["cache", "past_key_values"]

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
    conversion_info: dict | None = None
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256
    pad_token_id: int | None = 50256
    tie_word_embeddings: bool = False

    def validate_architecture(self):
        super().validate_architecture()
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})."
            )


__all__ = ["LapvqaTextDecoderConfig"]
