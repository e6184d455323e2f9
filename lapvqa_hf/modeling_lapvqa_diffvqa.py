"""LAPVQA differential-VQA head: a pre-norm transformer decoder over prior + current chest X-ray features."""

from collections.abc import Callable

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache, StaticCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions, CausalLMOutputWithCrossAttentions
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import logging
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_lapvqa_diffvqa import LapvqaDiffVQAConfig

logger = logging.get_logger(__name__)

REFERENCE_FRAME, CURRENT_FRAME = 0, 1


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
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class LapvqaAttention(nn.Module):
    """Multi-head attention with `torch.nn.MultiheadAttention`'s maths, split into q/k/v projections.

    Self-attention appends to the cache; cross-attention projects the visual memory once per sequence and
    reads it back from the cache on every later step.
    """

    def __init__(self, config: LapvqaDiffVQAConfig, layer_idx: int, is_cross_attention: bool):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.is_cross_attention = is_cross_attention
        self.is_causal = not is_cross_attention
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_value_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: EncoderDecoderCache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        query_states = self.q_proj(hidden_states).view(*input_shape, -1, self.head_dim).transpose(1, 2)

        cache = None
        cross_is_cached = False
        if past_key_values is not None:
            if self.is_cross_attention:
                cross_is_cached = bool(past_key_values.is_updated.get(self.layer_idx, False))
                cache = past_key_values.cross_attention_cache
            else:
                cache = past_key_values.self_attention_cache

        if cross_is_cached:
            key_states = cache.layers[self.layer_idx].keys
            value_states = cache.layers[self.layer_idx].values
        else:
            source = key_value_states if self.is_cross_attention else hidden_states
            kv_shape = (*source.shape[:-1], -1, self.head_dim)
            key_states = self.k_proj(source).view(kv_shape).transpose(1, 2)
            value_states = self.v_proj(source).view(kv_shape).transpose(1, 2)
            if cache is not None:
                key_states, value_states = cache.update(key_states, value_states, self.layer_idx)
                if self.is_cross_attention:
                    past_key_values.is_updated[self.layer_idx] = True

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
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


class LapvqaDecoderLayer(GradientCheckpointingLayer):
    """`torch.nn.TransformerDecoderLayer(norm_first=True)`: self-attention, cross-attention, feed-forward."""

    def __init__(self, config: LapvqaDiffVQAConfig, layer_idx: int):
        super().__init__()
        self.dropout = config.dropout
        self.activation_dropout = config.activation_dropout
        self.self_attn_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = LapvqaAttention(config, layer_idx, is_cross_attention=False)
        self.encoder_attn_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder_attn = LapvqaAttention(config, layer_idx, is_cross_attention=True)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.activation_fn = ACT2FN[config.hidden_act]

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        past_key_values: EncoderDecoderCache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            self.self_attn_layer_norm(hidden_states),
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            **kwargs,
        )
        hidden_states = residual + nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)

        residual = hidden_states
        hidden_states, _ = self.encoder_attn(
            self.encoder_attn_layer_norm(hidden_states),
            key_value_states=encoder_hidden_states,
            past_key_values=past_key_values,
            **kwargs,
        )
        hidden_states = residual + nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)

        residual = hidden_states
        hidden_states = self.activation_fn(self.fc1(self.final_layer_norm(hidden_states)))
        hidden_states = nn.functional.dropout(hidden_states, p=self.activation_dropout, training=self.training)
        hidden_states = self.fc2(hidden_states)
        hidden_states = residual + nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)
        return hidden_states


class LapvqaPreTrainedModel(PreTrainedModel):
    config: LapvqaDiffVQAConfig
    base_model_prefix = "decoder"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LapvqaDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
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

    def __init__(self, config: LapvqaDiffVQAConfig):
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
        past_key_values: EncoderDecoderCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPastAndCrossAttentions:
        """Decodes text conditioned on `encoder_hidden_states` (the projected visual memory, `[B, M, hidden]`).

        `encoder_hidden_states` may be omitted once `past_key_values` holds the cross-attention keys/values.
        Positions are learned and absolute: left padding is handled by counting them from `attention_mask`.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = EncoderDecoderCache(DynamicCache(config=self.config), DynamicCache(config=self.config))
        if not use_cache:
            past_key_values = None

        seq_length = inputs_embeds.shape[1]
        past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
        if not torch.compiler.is_compiling():
            self._check_positions(past_seen, seq_length)
        if position_ids is None:
            if attention_mask is not None and attention_mask.ndim == 2:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq_length:]
            else:
                position_ids = torch.arange(seq_length, device=inputs_embeds.device).unsqueeze(0) + past_seen

        hidden_states = inputs_embeds + self.embed_positions(position_ids)
        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values.self_attention_cache if past_key_values is not None else None,
            position_ids=position_ids,
        )
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                causal_mask,
                encoder_hidden_states,
                past_key_values=past_key_values,
                **kwargs,
            )
        if self.norm is not None:
            hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPastAndCrossAttentions(
            last_hidden_state=hidden_states, past_key_values=past_key_values
        )

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

    Models define `_visual_memory_length(model_kwargs)`: the number of visual tokens the decoder attends to.
    """

    def _visual_memory_length(self, model_kwargs: dict) -> int | None:
        raise NotImplementedError

    @staticmethod
    def _with_cross_attention_cache(
        past_key_values: Cache | None, config, use_cache: bool
    ) -> tuple[EncoderDecoderCache | None, bool]:
        """Pairs a plain self-attention cache with a cross-attention one; says whether the memory is cached."""
        if not use_cache:
            return None, False
        if past_key_values is not None and not isinstance(past_key_values, EncoderDecoderCache):
            past_key_values = EncoderDecoderCache(past_key_values, DynamicCache(config=config))
        memory_is_cached = past_key_values is not None and bool(past_key_values.is_updated.get(0, False))
        return past_key_values, memory_is_cached

    def _decode_with_memory(
        self,
        encoder_hidden_states: torch.Tensor | None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **decoder_inputs,
    ) -> CausalLMOutputWithCrossAttentions:
        """Runs `self.decoder` over the visual memory, then `self.lm_head` (and the shifted LM loss on `labels`)."""
        num_items_in_batch = decoder_inputs.pop("num_items_in_batch", None)  # gradient accumulation (Trainer)
        outputs: BaseModelOutputWithPastAndCrossAttentions = self.decoder(
            encoder_hidden_states=encoder_hidden_states, **decoder_inputs
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
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            cross_attentions=outputs.cross_attentions,
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

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs) -> None:
        """Pairs the self-attention cache `generate()` builds with a cross-attention cache for the visual memory.

        A static self-attention cache gets a static cross-attention cache sized to the memory (so compiled
        decoding sees fixed shapes); otherwise the cross part is dynamic.
        """
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get("past_key_values")
        if cache is None or isinstance(cache, EncoderDecoderCache):
            return
        memory_length = self._visual_memory_length(model_kwargs)
        if isinstance(cache, StaticCache) and memory_length is not None:
            cross_cache = StaticCache(config=self.config, max_cache_len=memory_length)
        else:
            cross_cache = DynamicCache(config=self.config)
        model_kwargs["past_key_values"] = EncoderDecoderCache(cache, cross_cache)


class LapvqaDiffVQAModel(LapvqaPreTrainedModel, LapvqaCrossAttentionGenerationMixin):
    """The upstream `DiffVQAHead`: answers a question about the change between a prior and a current X-ray.

    The visual memory is `[vis_proj(ref_vis) + frame_emb(0) ; vis_proj(curr_vis) + frame_emb(1)]`
    (`[B, N_ref + N_curr, hidden]`); the decoder attends to it at every layer. Inputs follow the upstream
    layout `question_ids + [bos] + answer_ids + [eos]`, and `generate()` continues `question_ids + [bos]`.
    """

    _tied_weights_keys = {"lm_head.weight": "decoder.embed_tokens.weight"}
    main_input_name = "input_ids"

    def __init__(self, config: LapvqaDiffVQAConfig):
        super().__init__(config)
        self.visual_projection = nn.Linear(config.vis_dim, config.hidden_size)
        self.frame_embeddings = nn.Embedding(2, config.hidden_size)
        self.decoder = LapvqaTextDecoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _visual_memory_length(self, model_kwargs: dict) -> int | None:
        curr_vis, ref_vis = model_kwargs.get("curr_vis"), model_kwargs.get("ref_vis")
        return None if curr_vis is None or ref_vis is None else curr_vis.shape[1] + ref_vis.shape[1]

    def encode_visual(self, curr_vis: torch.Tensor, ref_vis: torch.Tensor) -> torch.Tensor:
        """Projects both images' patch tokens and tags them with their frame: `[B, N_ref + N_curr, hidden]`."""
        self._check_visual_features(curr_vis, ref_vis)
        dtype = self.visual_projection.weight.dtype
        reference = self.visual_projection(ref_vis.to(dtype)) + self.frame_embeddings.weight[REFERENCE_FRAME]
        current = self.visual_projection(curr_vis.to(dtype)) + self.frame_embeddings.weight[CURRENT_FRAME]
        return torch.cat([reference, current], dim=1)

    def _check_visual_features(self, curr_vis: torch.Tensor | None, ref_vis: torch.Tensor | None) -> None:
        if curr_vis is None or ref_vis is None:
            missing = " and ".join(name for name, t in (("curr_vis", curr_vis), ("ref_vis", ref_vis)) if t is None)
            raise ValueError(
                f"Missing {missing}: both images' patch tokens `[batch, num_patches, {self.config.vis_dim}]` are "
                "required on the first step, before the cross-attention keys/values are cached."
            )
        for name, features in (("curr_vis", curr_vis), ("ref_vis", ref_vis)):
            if features.ndim != 3 or features.shape[-1] != self.config.vis_dim:
                raise ValueError(
                    f"`{name}` must be patch tokens of shape [batch, num_patches, {self.config.vis_dim}] "
                    f"(vis_dim of the {self.config.encoder_name or 'configured'} encoder), got {list(features.shape)}."
                )
        if curr_vis.shape[0] != ref_vis.shape[0]:
            raise ValueError(
                f"`curr_vis` and `ref_vis` must hold the same number of samples, got {curr_vis.shape[0]} and "
                f"{ref_vis.shape[0]}."
            )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        curr_vis: torch.Tensor | None = None,
        ref_vis: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithCrossAttentions:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `[batch, seq]`): `question + [bos] (+ answer + [eos])`;
                with a cache, only the tokens not yet seen.
            attention_mask (`torch.Tensor` of shape `[batch, past + seq]`, *optional*): 0 on (left) padding.
                Needed for padded batches, since pad, bos and eos share the id 50256.
            curr_vis / ref_vis (`torch.Tensor` of shape `[batch, N, vis_dim]`): the frozen encoder's patch
                tokens of the current and the prior image (N may differ). Ignored once cached.
            labels (`torch.LongTensor` of shape `[batch, seq]`, *optional*): targets aligned with `input_ids`
                (shifted inside the loss); -100 is ignored (mask the question with it).
            logits_to_keep (`int` or `torch.Tensor`): compute logits for the last N positions only (0 = all).
        """
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        past_key_values, memory_is_cached = self._with_cross_attention_cache(past_key_values, self.config, use_cache)
        encoder_hidden_states = None if memory_is_cached else self.encode_visual(curr_vis, ref_vis)
        batch_size = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        if encoder_hidden_states is not None and encoder_hidden_states.shape[0] != batch_size:
            raise ValueError(
                f"The visual features hold {encoder_hidden_states.shape[0]} samples but the text holds {batch_size}."
            )

        return self._decode_with_memory(
            encoder_hidden_states,
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
            use_cache=use_cache,
            labels=labels,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )


__all__ = [
    "LapvqaCrossAttentionGenerationMixin",
    "LapvqaDecoderLayer",
    "LapvqaDiffVQAModel",
    "LapvqaPreTrainedModel",
    "LapvqaTextDecoder",
]
