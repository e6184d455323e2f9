"""The layers every LAPVQA model shares, once: the attention (eager or any transformers backend), the linear layer
that packs its weight for oneDNN at CPU inference, the feed-forward block, PyTorch-layout encoder and decoder layers,
the text decoder of the question-answering and report heads, and the glue that gives those heads `generate()` with
a self- and a cross-attention cache.

Shipped with every model folder as remote code: it imports only transformers, torch and its siblings, relatively.
"""

import functools
import warnings
from collections.abc import Callable
from dataclasses import fields

import torch
import transformers
from torch import nn
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache, StaticCache
from transformers.configuration_utils import PreTrainedConfig
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutput,
    BaseModelOutputWithPastAndCrossAttentions,
    CausalLMOutputWithCrossAttentions,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils.generic import TransformersKwargs, can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_lapvqa_common import LapvqaTextDecoderConfig
from .encoders import EncoderRecipe, build_encoder, patch_tokens

# transformers 5.24 renamed the cache that `generate()` hands to `forward` and reads back from the outputs from
# `past_key_values` to `cache`. The forwards accept both names; outputs carry the cache under the installed name.
CACHE_OUTPUT_FIELD = (
    "cache" if "cache" in {f.name for f in fields(CausalLMOutputWithCrossAttentions)} else "past_key_values"
)

# Keyword arguments the forwards pass down to the decoder layers and attention functions, on top of their named ones.
DECODER_FORWARD_KWARGS = frozenset(TransformersKwargs.__annotations__) | {
    "output_attentions",
    "output_hidden_states",
    "return_dict",
}


def resolve_cache_argument(
    model: nn.Module, cache: Cache | None, past_key_values: Cache | None, kwargs: dict
) -> Cache | None:
    """The cache passed as `cache` (transformers >= 5.24) or `past_key_values` (older releases).

    Any other keyword this model does not know is an error, never dropped: a cache that a future transformers
    passes under a new name would otherwise be ignored and every generated token would see only itself.
    """
    if cache is not None and past_key_values is not None:
        raise ValueError("Pass the cache once, as `cache` (or its older name `past_key_values`), not as both.")
    if past_key_values is not None and CACHE_OUTPUT_FIELD == "cache":
        warnings.warn(
            f"`past_key_values` is deprecated in transformers {transformers.__version__}: pass the cache as `cache`.",
            FutureWarning,
            stacklevel=3,
        )
    unknown = sorted(set(kwargs) - DECODER_FORWARD_KWARGS)
    if unknown:
        caches = [name for name in unknown if isinstance(kwargs[name], Cache)]
        what = f"a Cache as {caches}" if caches else f"unknown argument(s) {unknown}"
        raise TypeError(
            f"{type(model).__name__}.forward() received {what} from transformers {transformers.__version__}, which "
            "this model's code does not understand (it takes the cache as `cache` or `past_key_values`). Update "
            "lapvqa-hf and re-save the model folder, or install a transformers release this code was tested with "
            "(see `transformers_versions_tested` in the folder's config.json)."
        )
    return cache if cache is not None else past_key_values


# The upstream model card's names for the DiffVQA head's two images, accepted beside this package's.
CARD_IMAGE_FEATURE_NAMES = {"ref_vis": "prior_image_features", "curr_vis": "current_image_features"}


def take_card_image_features(kwargs: dict, **features: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
    """`features` (by this package's names), with any given under the upstream card's names (`ref_vis`,
    `curr_vis`) taken out of `kwargs` in their place; one image under both names is an error."""
    for card_name, name in CARD_IMAGE_FEATURE_NAMES.items():
        if card_name in kwargs:
            if features.get(name) is not None:
                raise ValueError(f"Pass the image's features once, as `{name}` (or the card's `{card_name}`).")
            features[name] = kwargs.pop(card_name)
    return features


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    # At least float32, and float64 stays float64 (the converters verify in float64).
    softmax_dtype = torch.promote_types(query.dtype, torch.float32)
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=softmax_dtype).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


@functools.cache
def _onednn_linear_dtypes() -> tuple[torch.dtype, ...]:
    """The weight dtypes `LapvqaLinear` runs through oneDNN's inner product on this CPU: none without oneDNN, or where
    this torch lacks the private ops it uses (inductor's own; tests/test_cpu_decoding.py names them)."""
    ops = ("_reorder_linear_weight", "_linear_pointwise", "_is_mkldnn_acl_supported", "_is_mkldnn_bf16_supported")
    if not torch.backends.mkldnn.is_available() or not all(hasattr(torch.ops.mkldnn, op) for op in ops):
        return ()
    if torch.ops.mkldnn._is_mkldnn_acl_supported():
        return ()
    return (torch.float32, torch.bfloat16) if torch.ops.mkldnn._is_mkldnn_bf16_supported() else (torch.float32,)


class LapvqaLinear(nn.Linear):
    """`nn.Linear` (same parameters and state dict) that, at inference on CPU, multiplies by a copy of its weight
    packed once for oneDNN's inner product, as `torch.compile` does for frozen weights.

    A decode step multiplies a few rows by every weight: oneDNN reads a packed weight at close to the memory
    bandwidth, where `F.linear` (MKL's GEMM in fp32, oneDNN's matmul re-laying out the weight on every call in
    bf16) reads it 1.5-3x slower. The copy is made on the first such call and again whenever the weight is
    replaced, modified in place or converted; autograd, autocast, compilation, other devices and dtypes run
    `nn.Linear.forward`.
    """

    _packed_weight: tuple[nn.Parameter, int, torch.Tensor] | None = None  # (weight, its version, packed copy)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if (
            torch.compiler.is_compiling()  # first: what follows is not traceable
            or torch.is_grad_enabled()
            or not input.is_cpu
            or input.dtype != weight.dtype
            or weight.dtype not in _onednn_linear_dtypes()
            or type(weight) is not nn.Parameter  # tensor subclasses (quantized, sharded)
            or weight.is_inference()  # has no version to tell whether the packed copy is stale
            or not torch.backends.mkldnn.enabled
            or torch.is_autocast_enabled("cpu")
        ):
            return super().forward(input)
        cached = self._packed_weight
        if cached is None or cached[0] is not weight or cached[1] != weight._version:
            self._packed_weight = cached = (weight, weight._version, torch.ops.mkldnn._reorder_linear_weight(weight))
        return torch.ops.mkldnn._linear_pointwise(input, cached[2], self.bias, "none", [], "")

    def _apply(self, fn, recurse: bool = True):
        self._packed_weight = None  # `.to()`, `.float()`, ... may swap the weight's data under the same Parameter
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("_packed_weight", None)  # an opaque oneDNN tensor: neither copied nor pickled, packed again
        return state


class LapvqaAttention(nn.Module):
    """Multi-head attention with `torch.nn.MultiheadAttention`'s maths, split into q/k/v projections: the one
    attention of every LAPVQA model (text decoders, the DETR-style detection head, the ViT, CoCa's pooler).

    Self-attention (causal in the text decoders) appends to the cache when one is given; cross-attention projects
    its memory (`key_value_states`, `kv_input_size` wide, default `hidden_size`) once per sequence and reads it back
    from the cache on every later step. Runs through transformers' attention interface (eager, SDPA, flash, flex).
    The text decoders pass `linear=LapvqaLinear` (decoding multiplies a few rows by every weight); the encoders keep
    `nn.Linear`, whose large matrix products need no packed copy of their weights.
    """

    def __init__(
        self,
        config: PreTrainedConfig,
        hidden_size: int,
        num_heads: int,
        layer_idx: int | None = None,
        is_cross_attention: bool = False,
        is_causal: bool = False,
        qkv_bias: bool = True,
        kv_input_size: int | None = None,
        linear: type[nn.Linear] = nn.Linear,
    ):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.is_cross_attention = is_cross_attention
        self.is_causal = is_causal
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = getattr(config, "attention_dropout", 0.0)
        kv_input_size = kv_input_size or hidden_size
        self.q_proj = linear(hidden_size, hidden_size, bias=qkv_bias)
        self.k_proj = linear(kv_input_size, hidden_size, bias=qkv_bias)
        self.v_proj = linear(kv_input_size, hidden_size, bias=qkv_bias)
        self.out_proj = linear(hidden_size, hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_value_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: EncoderDecoderCache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        query_states = self.q_proj(hidden_states).view(*input_shape, -1, self.head_dim).transpose(1, 2)

        layer_cache = None
        cross_is_cached = False
        if cache is not None:
            if self.is_cross_attention:
                cross_is_cached = bool(cache.is_updated.get(self.layer_idx, False))
                layer_cache = cache.cross_attention_cache
            else:
                layer_cache = cache.self_attention_cache

        if cross_is_cached:
            key_states = layer_cache.layers[self.layer_idx].keys
            value_states = layer_cache.layers[self.layer_idx].values
        else:
            source = key_value_states if key_value_states is not None else hidden_states
            kv_shape = (*source.shape[:-1], -1, self.head_dim)
            key_states = self.k_proj(source).view(kv_shape).transpose(1, 2)
            value_states = self.v_proj(source).view(kv_shape).transpose(1, 2)
            if layer_cache is not None:
                key_states, value_states = layer_cache.update(key_states, value_states, self.layer_idx)
                if self.is_cross_attention:
                    cache.is_updated[self.layer_idx] = True

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        if (
            cross_is_cached
            and query_states.is_cpu
            and query_states.dtype == torch.bfloat16
            and self.config._attn_implementation == "sdpa"
        ):
            # Decoding over the cached memory in bf16 on CPU: SDPA's flash kernel takes 2-3x longer than eager's
            # two batched matmuls for a one-token query. Cross-attention has no mask to convert.
            attention_interface = eager_attention_forward
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = self.out_proj(attn_output.reshape(*input_shape, -1).contiguous())
        return attn_output, attn_weights


class LapvqaMLP(nn.Module):
    """The feed-forward block: `fc2(dropout(act(fc1(x))))`."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str, activation_dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)
        self.activation_fn = ACT2FN[hidden_act]
        self.activation_dropout = activation_dropout

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.activation_fn(self.fc1(hidden_states))
        hidden_states = nn.functional.dropout(hidden_states, p=self.activation_dropout, training=self.training)
        return self.fc2(hidden_states)


class LapvqaTransformerEncoderLayer(GradientCheckpointingLayer):
    """`torch.nn.TransformerEncoderLayer(norm_first=True)`: bidirectional self-attention, then feed-forward, each
    pre-norm, with PyTorch's layout (`self_attn`, `linear1/2` as `mlp.fc1/2`, `norm1/2` as `self_attn_layer_norm` /
    `final_layer_norm`). `attention_mask` (4-D, additive) masks padding where the sequence has it."""

    def __init__(self, config: PreTrainedConfig, hidden_size: int, num_heads: int, intermediate_size: int,
                 hidden_act: str):  # fmt: skip
        super().__init__()
        self.dropout = config.dropout
        self.self_attn_layer_norm = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.self_attn = LapvqaAttention(config, hidden_size, num_heads)
        self.final_layer_norm = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.mlp = LapvqaMLP(hidden_size, intermediate_size, hidden_act, config.activation_dropout)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        attn_output, _ = self.self_attn(
            self.self_attn_layer_norm(hidden_states), attention_mask=attention_mask, **kwargs
        )
        hidden_states = hidden_states + nn.functional.dropout(attn_output, p=self.dropout, training=self.training)
        mlp_output = self.mlp(self.final_layer_norm(hidden_states))
        return hidden_states + nn.functional.dropout(mlp_output, p=self.dropout, training=self.training)


class LapvqaDecoderLayer(GradientCheckpointingLayer):
    """`torch.nn.TransformerDecoderLayer(norm_first=True)` of the text decoders: causal self-attention (cached),
    cross-attention to the visual memory (cached once), feed-forward, with PyTorch's layout (`linear1/2` as the
    layer's own `fc1/2`, as published folders hold them). The detection head's decoder layer is the same layer
    with its feed-forward in `mlp` and a post-norm option; `tests/test_shared_modeling.py` keeps the two equal.
    """

    def __init__(self, config: "LapvqaTextDecoderConfig", layer_idx: int):
        super().__init__()
        self.dropout = config.dropout
        self.activation_dropout = config.activation_dropout
        self.self_attn_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = LapvqaAttention(
            config, config.hidden_size, config.num_attention_heads, layer_idx, is_causal=True, linear=LapvqaLinear
        )
        self.encoder_attn_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder_attn = LapvqaAttention(
            config, config.hidden_size, config.num_attention_heads, layer_idx, is_cross_attention=True,
            linear=LapvqaLinear,
        )  # fmt: skip
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.fc1 = LapvqaLinear(config.hidden_size, config.intermediate_size)
        self.fc2 = LapvqaLinear(config.intermediate_size, config.hidden_size)
        self.activation_fn = ACT2FN[config.hidden_act]

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        cache: EncoderDecoderCache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            self.self_attn_layer_norm(hidden_states),
            attention_mask=attention_mask,
            cache=cache,
            **kwargs,
        )
        hidden_states = residual + nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)

        residual = hidden_states
        hidden_states, _ = self.encoder_attn(
            self.encoder_attn_layer_norm(hidden_states),
            key_value_states=encoder_hidden_states,
            cache=cache,
            **kwargs,
        )
        hidden_states = residual + nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)

        residual = hidden_states
        hidden_states = self.activation_fn(self.fc1(self.final_layer_norm(hidden_states)))
        hidden_states = nn.functional.dropout(hidden_states, p=self.activation_dropout, training=self.training)
        hidden_states = self.fc2(hidden_states)
        hidden_states = residual + nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)
        return hidden_states


class LapvqaPreNormEncoderMixin:
    """The pre-norm transformer encoder of the box heads (detection, grounding), once: `encoder_layers`
    `LapvqaTransformerEncoderLayer`s of width `d_model`, then an optional final LayerNorm
    (`encoder_final_layer_norm`). Mixed into each head's own `PreTrainedModel`, which gives it its config class."""

    _can_record_outputs = {
        "hidden_states": LapvqaTransformerEncoderLayer,
        "attentions": OutputRecorder(LapvqaAttention, index=1),
    }

    def __init__(self, config: PreTrainedConfig):
        super().__init__(config)
        self.layers = nn.ModuleList(
            [
                LapvqaTransformerEncoderLayer(
                    config,
                    config.d_model,
                    config.num_attention_heads,
                    config.encoder_ffn_dim,
                    config.activation_function,
                )  # fmt: skip
                for _ in range(config.encoder_layers)
            ]
        )
        self.layer_norm = (
            nn.LayerNorm(config.d_model, eps=config.layer_norm_eps) if config.encoder_final_layer_norm else None
        )
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(self, inputs_embeds: torch.Tensor, **kwargs) -> BaseModelOutput:
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, **kwargs)
        if self.layer_norm is not None:
            hidden_states = self.layer_norm(hidden_states)
        return BaseModelOutput(last_hidden_state=hidden_states)


class LapvqaPreTrainedModel(PreTrainedModel):
    """What the text-decoder models share (DiffVQA, VQA, the text decoder itself): attention backends, gradient
    checkpointing, cache placement, and the decoder's recordable outputs."""

    config: LapvqaTextDecoderConfig
    base_model_prefix = "decoder"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LapvqaDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    _can_record_outputs = {
        "hidden_states": LapvqaDecoderLayer,
        "attentions": OutputRecorder(LapvqaAttention, index=1, layer_name="self_attn"),
        "cross_attentions": OutputRecorder(LapvqaAttention, index=1, layer_name="encoder_attn"),
    }


class LapvqaTextDecoder(LapvqaPreTrainedModel):
    """Token + learned position embeddings, pre-norm decoder layers attending to a visual memory, final norm."""

    def __init__(self, config: LapvqaTextDecoderConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList([LapvqaDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.use_final_layer_norm else None
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        cache: EncoderDecoderCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        past_key_values: EncoderDecoderCache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPastAndCrossAttentions:
        """Decodes text conditioned on `encoder_hidden_states` (the projected visual memory, `[B, M, hidden]`).

        `encoder_hidden_states` may be omitted once `cache` holds the cross-attention keys/values.
        Positions are learned and absolute: left padding is handled by counting them from `attention_mask`.
        """
        cache = resolve_cache_argument(self, cache, past_key_values, kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = EncoderDecoderCache(DynamicCache(config=self.config), DynamicCache(config=self.config))
        if not use_cache:
            cache = None

        seq_length = inputs_embeds.shape[1]
        past_seen = cache.get_seq_length() if cache is not None else 0
        if not torch.compiler.is_compiling():
            self._check_positions(past_seen, seq_length)
        if position_ids is None:
            if attention_mask is not None and attention_mask.ndim == 2:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq_length:]
            else:
                position_ids = torch.arange(seq_length, device=inputs_embeds.device).unsqueeze(0) + past_seen

        hidden_states = inputs_embeds + self.embed_positions(position_ids)
        causal_mask = create_causal_mask(  # the cache goes positionally: its keyword was renamed in 5.24
            self.config,
            inputs_embeds,
            attention_mask,
            cache.self_attention_cache if cache is not None else None,
            position_ids=position_ids,
        )
        for layer in self.layers:
            hidden_states = layer(hidden_states, causal_mask, encoder_hidden_states, cache=cache, **kwargs)
        if self.norm is not None:
            hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=hidden_states, **{CACHE_OUTPUT_FIELD: cache})

    def _check_positions(self, past_seen: int, seq_length: int) -> None:
        limit = self.config.max_position_embeddings
        if past_seen + seq_length > limit:
            raise ValueError(
                f"The sequence needs {past_seen + seq_length} positions ({past_seen} cached + {seq_length} new), "
                f"{past_seen + seq_length - limit} more than the {limit} learned positions of this model. "
                "Shorten the question or lower `max_new_tokens`."
            )


class LapvqaCrossAttentionGenerationMixin(GenerationMixin):
    """Shared by the LAPVQA decoder models (a `self.decoder` attending to a visual memory, then `self.lm_head`):
    the cross-attention cache over the memory, the language-modeling outputs, and `generate()`'s position limits.
    """

    @staticmethod
    def _memory_is_cached(cache: Cache | None) -> bool:
        """Whether an earlier step already stored the visual memory's cross-attention keys/values in `cache`."""
        return isinstance(cache, EncoderDecoderCache) and bool(cache.is_updated.get(0, False))

    def _with_cross_attention_cache(self, cache: Cache | None, memory_length: int) -> EncoderDecoderCache:
        """Pairs the self-attention cache `generate()` builds for a decoder-only model with a cross-attention cache.

        Beside a compileable (static) self-attention cache the cross part is static too, sized to the memory, so
        that compiled decoding sees fixed shapes; otherwise it is dynamic.
        """
        if cache is None:
            return EncoderDecoderCache(DynamicCache(config=self.config), DynamicCache(config=self.config))
        if isinstance(cache, EncoderDecoderCache):
            return cache
        if cache.is_compileable:
            return EncoderDecoderCache(cache, StaticCache(config=self.config, max_cache_len=memory_length))
        return EncoderDecoderCache(cache, DynamicCache(config=self.config))

    def _decode_with_memory(
        self,
        memory: torch.Tensor | None,
        memory_source: str,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        num_items_in_batch: torch.Tensor | None = None,
        **decoder_inputs,
    ) -> CausalLMOutputWithCrossAttentions:
        """Runs `self.decoder` over the visual `memory` (`None` once cached), then `self.lm_head` and the shifted LM
        loss on `labels`. `memory_source` names the input the memory came from (with its verb), for error messages."""
        batch_size = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        if memory is not None and memory.shape[0] != batch_size:
            raise ValueError(f"{memory_source} {memory.shape[0]} samples but the text holds {batch_size}.")
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if use_cache and memory is not None:
            cache = self._with_cross_attention_cache(cache, memory.shape[1])
        outputs: BaseModelOutputWithPastAndCrossAttentions = self.decoder(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            encoder_hidden_states=memory,
            cache=cache,
            use_cache=use_cache,
            return_dict=True,
            **decoder_inputs,
        )
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(outputs.last_hidden_state[:, slice_indices, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size, num_items_in_batch=num_items_in_batch
            )
        return CausalLMOutputWithCrossAttentions(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            cross_attentions=outputs.cross_attentions,
            **{CACHE_OUTPUT_FIELD: getattr(outputs, CACHE_OUTPUT_FIELD)},
        )

    def _validate_generated_length(self, generation_config, input_ids_length, has_default_max_length):
        limit = self.config.max_position_embeddings
        if input_ids_length > limit:
            raise ValueError(
                f"The prompt has {input_ids_length} tokens, {input_ids_length - limit} more than the {limit} learned "
                "positions of this model. Shorten the question."
            )
        # The last generated token is never fed back, so max_length tokens need max_length - 1 positions.
        needed = generation_config.max_length - 1
        if needed > limit:
            room = limit - input_ids_length + 1
            raise ValueError(
                f"The prompt ({input_ids_length} tokens) plus {generation_config.max_length - input_ids_length} new "
                f"tokens needs {needed} positions, {needed - limit} more than the {limit} learned positions of this "
                f"model. Use max_new_tokens <= {room} for this prompt."
            )
        super()._validate_generated_length(generation_config, input_ids_length, has_default_max_length)


class LapvqaHeldEncoderMixin:
    """What the heads fed by an encoder's patch tokens (DiffVQA, VQA, report generation) add when their folder holds
    that encoder too (`config.encoder_config`, a native head converted with its fine-tuned encoder or one trained end
    to end): the encoder as `vision_model`, and images turned into patch tokens as `config.feature_recipe` says."""

    def _held_encoder(self) -> nn.Module | None:
        """The encoder `config.encoder_config` describes (weights loaded with the head's), or None."""
        if self.config.encoder_config is None:
            return None
        return build_encoder(EncoderRecipe(**self.config.feature_recipe), self.config.encoder_config)

    def encode_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The held encoder's patch tokens `[batch, num_patches, vis_dim]` of prepared images."""
        if self.vision_model is None:
            raise ValueError(
                f"{type(self).__name__} holds no encoder (config.encoder_config is empty), so it takes patch tokens, "
                "not pixels: encode the images with the encoder config.feature_recipe names, or use the pipeline."
            )
        dtype = next(self.vision_model.parameters()).dtype
        return patch_tokens(EncoderRecipe(**self.config.feature_recipe), self.vision_model, pixel_values.to(dtype))

    def _features_or_pixels(
        self, features: torch.Tensor | None, pixels: torch.Tensor | None, names: str
    ) -> torch.Tensor | None:
        """One image's patch tokens, given (`features`) or from the held encoder (`pixels`); `names` names the pair."""
        if pixels is None:
            return features
        if features is not None:
            raise ValueError(f"Pass the image once: as {names}, not both.")
        return self.encode_pixels(pixels)


class LapvqaSingleImageDecoderModel(LapvqaPreTrainedModel, LapvqaCrossAttentionGenerationMixin, LapvqaHeldEncoderMixin):
    """The text decoder over one chest X-ray's frozen-encoder patch tokens, shared by the VQA head (prompts
    `question + [bos]`) and the report-generation head (prompts `[bos]`).

    The visual memory is `vis_proj(image_features)` (`[B, N, hidden]`, no frame embedding); the decoder attends
    to it at every layer, and `generate()` computes its cross-attention keys/values once per sequence. The config
    gives `vis_dim` and `encoder_name` beside the decoder's fields.
    """

    _tied_weights_keys = {"lm_head.weight": "decoder.embed_tokens.weight"}
    main_input_name = "input_ids"

    def __init__(self, config: LapvqaTextDecoderConfig):
        super().__init__(config)
        self.vision_model = self._held_encoder()
        self.visual_projection = LapvqaLinear(config.vis_dim, config.hidden_size)
        self.decoder = LapvqaTextDecoder(config)
        self.lm_head = LapvqaLinear(config.hidden_size, config.vocab_size, bias=False)
        self.loss_type = "ForCausalLM"  # transformers' causal-LM loss (`self.loss_function`), shifted labels
        self.post_init()

    def encode_visual(self, image_features: torch.Tensor | None) -> torch.Tensor:
        """Projects the image's patch tokens to the decoder width: `[B, N, hidden]`."""
        if image_features is None:
            raise ValueError(
                f"Missing image_features: the image's patch tokens `[batch, num_patches, {self.config.vis_dim}]` are "
                "required on the first step, before the cross-attention keys/values are cached."
            )
        if image_features.ndim != 3 or image_features.shape[-1] != self.config.vis_dim:
            raise ValueError(
                f"`image_features` must be patch tokens of shape [batch, num_patches, {self.config.vis_dim}] "
                f"(vis_dim of the {self.config.encoder_name or 'configured'} encoder), "
                f"got {list(image_features.shape)}."
            )
        return self.visual_projection(image_features.to(self.visual_projection.weight.dtype))

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        pixel_values: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithCrossAttentions:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `[batch, seq]`): the text, `question + [bos] (+ answer + [eos])`
                (VQA) or `[bos] (+ report + [eos])` (report generation); with a cache, only the tokens not yet seen.
            attention_mask (`torch.Tensor` of shape `[batch, past + seq]`, *optional*): 0 on (left) padding.
                Needed for padded batches, since pad, bos and eos share the id 50256.
            image_features (`torch.Tensor` of shape `[batch, N, vis_dim]`): the frozen encoder's patch tokens of
                the image. Ignored once cached.
            pixel_values (`torch.Tensor` of shape `[batch, channels, height, width]`, *optional*): the image as the
                encoder's processor prepares it, instead of `image_features`, where the model holds its encoder
                (`config.encoder_config`). Ignored once cached.
            cache (`Cache`, *optional*): the self- and cross-attention cache of earlier steps, as `generate()`
                passes it; `past_key_values` is its name before transformers 5.24 and is accepted too.
            labels (`torch.LongTensor` of shape `[batch, seq]`, *optional*): targets aligned with `input_ids`
                (shifted inside the loss); -100 is ignored (mask the question and the padding with it).
            logits_to_keep (`int` or `torch.Tensor`): compute logits for the last N positions only (0 = all).
        """
        cache = resolve_cache_argument(self, cache, past_key_values, kwargs)
        memory = None
        if not self._memory_is_cached(cache):
            image_features = self._features_or_pixels(image_features, pixel_values, "image_features or pixel_values")
            memory = self.encode_visual(image_features)
        return self._decode_with_memory(
            memory,
            "`image_features` holds",
            input_ids=input_ids,
            attention_mask=attention_mask,
            cache=cache,
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
            use_cache=use_cache,
            labels=labels,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )


__all__ = [
    "CACHE_OUTPUT_FIELD",
    "CARD_IMAGE_FEATURE_NAMES",
    "LapvqaAttention",
    "LapvqaCrossAttentionGenerationMixin",
    "LapvqaDecoderLayer",
    "LapvqaHeldEncoderMixin",
    "LapvqaLinear",
    "LapvqaMLP",
    "LapvqaPreNormEncoderMixin",
    "LapvqaPreTrainedModel",
    "LapvqaSingleImageDecoderModel",
    "LapvqaTextDecoder",
    "LapvqaTransformerEncoderLayer",
    "eager_attention_forward",
    "resolve_cache_argument",
    "take_card_image_features",
]
