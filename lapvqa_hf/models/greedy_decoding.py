"""Greedy decoding of the LAPVQA text heads with the whole step on the device: the next token is chosen, finished
rows are padded and the stopping state is updated without a host synchronisation per token.

`generate()` runs a Python loop of logits processors and stopping criteria around every step and reads the
stopping state back to the host at each one: on a GPU, a step of these small decoders costs less than that. Here
the self-attention cache is static (fixed shapes), the cross-attention keys/values are computed once per sequence
(as `generate()` does), and the host looks at the stopping state only every `steps_per_check` tokens; the
sequences returned are `generate(do_sample=False, num_beams=1)`'s, token for token (finished rows padded, cut where
every row has finished). Everything else (sampling, beams, logits processors) stays with `generate()`.
"""

import torch
from transformers.cache_utils import StaticCache

from .modeling_lapvqa_common import CACHE_OUTPUT_FIELD

# What `fast_greedy_applies` accepts of generation arguments: plain greedy decoding and its length.
GREEDY_ARGUMENTS = {"max_new_tokens": None, "do_sample": False, "num_beams": 1, "use_cache": True}


def fast_greedy_applies(device: torch.device | str, generate_kwargs: dict) -> bool:
    """Whether the pipelines decode with `greedy_generate` (`decoding="auto"`): on a CUDA device, for plain greedy
    decoding (`generate_kwargs` holds nothing but `GREEDY_ARGUMENTS` at their greedy values)."""
    if torch.device(device).type != "cuda":
        return False
    return all(key in GREEDY_ARGUMENTS and (key == "max_new_tokens" or value == GREEDY_ARGUMENTS[key])
               for key, value in generate_kwargs.items())  # fmt: skip


def _token_ids(value: int | list[int] | None) -> list[int]:
    return [] if value is None else [value] if isinstance(value, int) else list(value)


@torch.no_grad()
def greedy_generate(
    model,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int | None = None,
    steps_per_check: int = 8,
    **visual_inputs: torch.Tensor,
) -> torch.LongTensor:
    """The greedy continuation of left-padded prompts (`input_ids` with their `attention_mask`) given the model's
    visual inputs (`image_features`, `prior_image_features` / `current_image_features` or `pixel_values`), as
    `model.generate(..., do_sample=False, num_beams=1)` returns it: prompts and new tokens, `[batch, length]`.

    `max_new_tokens` defaults to the model's generation config; prompt and answer must fit the learned positions
    (the last new token is never fed back). The host reads the stopping state every `steps_per_check` tokens.
    """
    generation = model.generation_config
    max_new_tokens = max_new_tokens if max_new_tokens is not None else generation.max_new_tokens
    eos = torch.tensor(_token_ids(generation.eos_token_id), device=input_ids.device)
    pad = generation.pad_token_id if generation.pad_token_id is not None else int(eos[0])
    batch_size, prompt_length = input_ids.shape
    limit = model.config.max_position_embeddings
    if max_new_tokens < 1 or prompt_length + max_new_tokens - 1 > limit:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} with a prompt of {prompt_length} tokens: it must be at least 1 and fit "
            f"the {limit} learned positions (at most {limit - prompt_length + 1} here)."
        )
    total = prompt_length + max_new_tokens
    sequences = torch.full((batch_size, total), pad, dtype=input_ids.dtype, device=input_ids.device)
    sequences[:, :prompt_length] = input_ids
    mask = torch.zeros((batch_size, total), dtype=attention_mask.dtype, device=attention_mask.device)
    mask[:, :prompt_length] = attention_mask
    self_attention = StaticCache(config=model.config, max_cache_len=total - 1)
    outputs = model(
        input_ids=input_ids, attention_mask=attention_mask, cache=self_attention, logits_to_keep=1, **visual_inputs
    )
    cache = outputs[CACHE_OUTPUT_FIELD]  # the static self-attention cache and the visual memory's keys/values
    finished = torch.zeros(batch_size, dtype=torch.bool, device=input_ids.device)
    length = torch.tensor(total, device=input_ids.device)  # where every row has finished, once they have
    for step in range(max_new_tokens):
        position = prompt_length + step
        token = torch.where(finished, pad, outputs.logits[:, -1].argmax(dim=-1))
        sequences[:, position] = token
        finished |= torch.isin(token, eos)
        length = torch.where(finished.all() & (length == total), position + 1, length)
        if step == max_new_tokens - 1 or ((step + 1) % steps_per_check == 0 and bool(finished.all())):
            break
        mask[:, position] = 1
        outputs = model(input_ids=token[:, None], attention_mask=mask[:, : position + 1], cache=cache, logits_to_keep=1)
    return sequences[:, : int(length)]


__all__ = ["GREEDY_ARGUMENTS", "fast_greedy_applies", "greedy_generate"]
