"""`generate()` on every LAPVQA text model, the cases transformers' `GenerationTesterMixin` covers (its sdist does not
ship tests/generation/): greedy, sampling and beam search with dict outputs and the cache, continuing from a
returned cache, assisted decoding, the static cache and left padding. These hold on every supported transformers
release: the cache travels as `cache` from 5.24 on and as `past_key_values` before.
"""

import contextlib
import warnings

import pytest
import torch
import transformers
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache

from lapvqa_hf import (
    LapvqaCaptioningConfig,
    LapvqaCaptioningModel,
    LapvqaDiffVQAConfig,
    LapvqaDiffVQAModel,
    LapvqaVQAConfig,
    LapvqaVQAModel,
)
from lapvqa_hf.models.modeling_lapvqa_common import CACHE_OUTPUT_FIELD

VOCAB, SPECIAL = 99, 98  # bos = eos = pad, as GPT-2's <|endoftext|> in the real models
DECODER = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=48,
    vocab_size=VOCAB,
    max_position_embeddings=48,
    initializer_range=0.2,  # decisive logits, so that greedy answers never hinge on a rounding difference
    bos_token_id=SPECIAL,
    eos_token_id=SPECIAL,
    pad_token_id=SPECIAL,
)
PROMPT_LENGTHS = (5, 2, 4)  # a left-padded batch
MEMORY_LENGTH = {"diffvqa": 5 + 3, "vqa": 6, "captioning": 4 * 4}  # visual tokens the decoder attends to


def _visual_inputs(kind: str, batch: int, generator: torch.Generator) -> dict:
    if kind == "diffvqa":
        return {
            "current_image_features": torch.randn(batch, 5, 24, generator=generator),
            "prior_image_features": torch.randn(batch, 3, 24, generator=generator),
        }
    if kind == "vqa":
        return {"image_features": torch.randn(batch, 6, 24, generator=generator)}
    return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=generator)}


def tiny_model(kind: str, attn_implementation: str = "eager") -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "diffvqa":
        model = LapvqaDiffVQAModel(LapvqaDiffVQAConfig(vis_dim=24, **DECODER))
    elif kind == "vqa":
        model = LapvqaVQAModel(LapvqaVQAConfig(vis_dim=24, **DECODER))
    else:
        vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48)
        model = LapvqaCaptioningModel(
            LapvqaCaptioningConfig(vision_config=dict(image_size=16, patch_size=4, **vision), **DECODER)
        )
    model.set_attn_implementation(attn_implementation)
    return model.eval()


def batch_inputs(kind: str, prompt_lengths=PROMPT_LENGTHS) -> dict:
    """Left-padded prompts ending in bos (`question + [bos]`, or a report prefix after `[bos]` for captioning)."""
    generator = torch.Generator().manual_seed(1)
    width = max(prompt_lengths)
    input_ids = torch.full((len(prompt_lengths), width), SPECIAL)
    attention_mask = torch.zeros_like(input_ids)
    for row, length in enumerate(prompt_lengths):
        input_ids[row, width - length : -1] = torch.randint(0, SPECIAL, (length - 1,), generator=generator)
        attention_mask[row, width - length :] = 1
    if kind == "captioning":  # a report starts with bos, then the prefix
        input_ids = input_ids.roll(1, dims=1)
        input_ids[:, 0] = SPECIAL
        attention_mask = attention_mask.roll(1, dims=1)
        attention_mask[:, 0] = 0
        for row, length in enumerate(prompt_lengths):
            input_ids[row, width - length] = SPECIAL
            attention_mask[row, width - length :] = 1
    visual = _visual_inputs(kind, len(prompt_lengths), generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, **visual}


def cache_argument(cache: Cache) -> dict:
    """The cache as `generate()` takes it on the installed transformers (`cache`, or `past_key_values` < 5.24)."""
    return {CACHE_OUTPUT_FIELD: cache}


KINDS = ("diffvqa", "vqa", "captioning")
GREEDY = dict(max_new_tokens=8, do_sample=False)


@pytest.mark.parametrize("cache_implementation", [None, "static"])
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", KINDS)
def test_cached_greedy_equals_uncached_greedy_on_a_left_padded_batch(kind, attn_implementation, cache_implementation):
    model, inputs = tiny_model(kind, attn_implementation), batch_inputs(kind)
    uncached = model.generate(**inputs, **GREEDY, use_cache=False)
    cached = model.generate(**inputs, **GREEDY, cache_implementation=cache_implementation)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("kind", KINDS)
def test_each_row_of_a_padded_batch_answers_as_it_does_alone(kind):
    model, inputs = tiny_model(kind), batch_inputs(kind)
    together = model.generate(**inputs, **GREEDY)
    width = inputs["input_ids"].shape[1]
    for row, length in enumerate(PROMPT_LENGTHS):
        alone = {name: value[row : row + 1] for name, value in inputs.items()}
        alone["input_ids"] = alone["input_ids"][:, width - length :]
        alone["attention_mask"] = alone["attention_mask"][:, width - length :]
        answer = model.generate(**alone, **GREEDY)[0, length:]
        assert torch.equal(together[row, width : width + len(answer)], answer)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_dict_outputs_carry_scores_attentions_and_the_cache(kind):
    model, inputs = tiny_model(kind), batch_inputs(kind)
    out = model.generate(
        **inputs,
        **GREEDY,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
        output_attentions=True,
        output_hidden_states=True,
    )
    new_tokens = out.sequences.shape[1] - inputs["input_ids"].shape[1]
    assert len(out.scores) == len(out.logits) == new_tokens
    assert out.scores[0].shape == (len(PROMPT_LENGTHS), VOCAB)
    assert torch.equal(out.sequences[:, -new_tokens:], torch.stack([s.argmax(-1) for s in out.scores], dim=1))
    assert len(out.attentions) == new_tokens and len(out.attentions[0]) == DECODER["num_hidden_layers"]
    assert len(out.hidden_states[0]) == DECODER["num_hidden_layers"] + 1
    cache = getattr(out, CACHE_OUTPUT_FIELD)
    assert isinstance(cache, EncoderDecoderCache)
    # every token but the last generated one went through the decoder; the cross part holds the visual memory
    assert cache.get_seq_length() == out.sequences.shape[1] - 1
    assert cache.cross_attention_cache.get_seq_length() == MEMORY_LENGTH[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_generation_continues_from_a_returned_cache(kind):
    model, inputs = tiny_model(kind), batch_inputs(kind)
    in_one_go = model.generate(**inputs, max_new_tokens=7, do_sample=False)
    first = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    sequences = first.sequences
    mask = torch.cat([inputs["attention_mask"], torch.ones(len(sequences), 3, dtype=torch.long)], dim=1)
    continued = model.generate(
        **{**inputs, "input_ids": sequences, "attention_mask": mask},
        **cache_argument(getattr(first, CACHE_OUTPUT_FIELD)),
        max_new_tokens=4,
        do_sample=False,
    )
    assert torch.equal(continued, in_one_go)


@pytest.mark.parametrize("kind", KINDS)
def test_a_user_supplied_cache_gives_the_same_answers(kind):
    model, inputs = tiny_model(kind), batch_inputs(kind)
    expected = model.generate(**inputs, **GREEDY)
    assert torch.equal(model.generate(**inputs, **GREEDY, **cache_argument(DynamicCache())), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_sampling_is_reproducible_and_top_k_1_is_greedy(kind):
    model, inputs = tiny_model(kind), batch_inputs(kind)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(model.generate(**inputs, max_new_tokens=8, do_sample=True, temperature=1.5))
    assert torch.equal(runs[0], runs[1])
    top_1 = model.generate(**inputs, max_new_tokens=8, do_sample=True, top_k=1)
    assert torch.equal(top_1, model.generate(**inputs, **GREEDY))


@pytest.mark.parametrize("kind", KINDS)
def test_beam_search_with_dict_outputs_and_cache_equals_without_cache(kind):
    model, inputs = tiny_model(kind), batch_inputs(kind)
    beams = dict(max_new_tokens=6, num_beams=3, num_return_sequences=2, do_sample=False)
    out = model.generate(**inputs, **beams, return_dict_in_generate=True, output_scores=True)
    assert out.sequences.shape[0] == 2 * len(PROMPT_LENGTHS)
    assert out.sequences_scores.shape == (2 * len(PROMPT_LENGTHS),)
    assert out.beam_indices.shape[0] == 2 * len(PROMPT_LENGTHS)
    assert torch.equal(out.sequences, model.generate(**inputs, **beams, use_cache=False))


@pytest.mark.parametrize("kind", KINDS)
def test_beam_search_with_one_beam_is_greedy(kind):
    model, inputs = tiny_model(kind), batch_inputs(kind)
    assert torch.equal(model.generate(**inputs, **GREEDY, num_beams=1), model.generate(**inputs, **GREEDY))


@pytest.mark.parametrize("kind", KINDS)
def test_assisted_decoding_gives_the_greedy_answers(kind):
    model, inputs = tiny_model(kind), batch_inputs(kind, prompt_lengths=(4,))  # transformers assists batch 1 only
    expected = model.generate(**inputs, **GREEDY)
    assistant = tiny_model(kind)
    with torch.no_grad():  # a worse assistant: its drafts are sometimes rejected, which rolls the cache back
        for parameter in assistant.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    assisted = model.generate(**inputs, **GREEDY, assistant_model=assistant)
    assert torch.equal(assisted, expected)
    assert torch.equal(model.generate(**inputs, **GREEDY, prompt_lookup_num_tokens=2), expected)


def test_an_assistant_captioning_model_drafts_from_the_image_too():
    """transformers gives `pixel_values` to the main model's first step only, and none to an assistant's: the
    captioning model takes the image on every step until its keys/values are cached, so both see it."""
    model, inputs = tiny_model("captioning"), batch_inputs("captioning", prompt_lengths=(4,))
    assistant = tiny_model("captioning")
    images_seen = []
    assistant.vision_model.register_forward_hook(lambda module, args, output: images_seen.append(args[0].shape))
    assisted = model.generate(**inputs, **GREEDY, assistant_model=assistant)
    assert torch.equal(assisted, model.generate(**inputs, **GREEDY))
    assert images_seen == [inputs["pixel_values"].shape], "the assistant encodes the image once"


def test_the_validate_generated_length_hook_is_still_called(monkeypatch):
    """`_validate_generated_length` is a private `GenerationMixin` hook: it turns "too long for 48 learned
    positions" into an error before any step runs. If transformers stops calling it, this fails."""
    model, inputs = tiny_model("vqa"), batch_inputs("vqa")
    calls = []
    original = type(model)._validate_generated_length
    monkeypatch.setattr(
        type(model), "_validate_generated_length", lambda self, *a, **k: calls.append(a) or original(self, *a, **k)
    )
    model.generate(**inputs, max_new_tokens=2)
    assert calls
    with pytest.raises(ValueError, match="Use max_new_tokens <= 44 for this prompt"):
        model.generate(**inputs, max_new_tokens=60)


@pytest.mark.parametrize("kind", KINDS)
def test_a_cache_under_an_unknown_name_fails_loudly(kind):
    model, inputs = tiny_model(kind), batch_inputs(kind)
    with pytest.raises(TypeError, match=rf"a Cache as \['kv_cache'\] from transformers {transformers.__version__}"):
        model(**inputs, kv_cache=DynamicCache())
    with pytest.raises(TypeError, match=r"unknown argument\(s\) \['frobnicate'\]"):
        model(**inputs, frobnicate=True)


@pytest.mark.parametrize("kind", KINDS)
def test_both_cache_names_work_and_passing_both_is_refused(kind):
    model, inputs = tiny_model(kind), batch_inputs(kind)
    by_new_name = model(**inputs, cache=DynamicCache()).logits
    with pytest.warns(FutureWarning) if CACHE_OUTPUT_FIELD == "cache" else _no_future_warning():
        by_old_name = model(**inputs, past_key_values=DynamicCache()).logits
    assert torch.equal(by_new_name, by_old_name)
    with pytest.raises(ValueError, match="not as both"):
        model(**inputs, cache=DynamicCache(), past_key_values=DynamicCache())


@contextlib.contextmanager
def _no_future_warning():
    """Before 5.24 `past_key_values` is transformers' own name for the cache, so using it warns of nothing."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        yield
