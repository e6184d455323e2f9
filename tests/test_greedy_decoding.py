"""The device-side greedy decoder (`greedy_generate`) gives `generate()`'s greedy sequences token for token, for every
text kind, batched and left-padded, whenever rows stop; the pipelines choose it on a GPU for plain greedy decoding.
"""

import pytest
import torch
from test_generation_common import KINDS, SPECIAL, batch_inputs, tiny_model

from lapvqa_hf.models.greedy_decoding import fast_greedy_applies, greedy_generate


def common_tokens(sequences: torch.Tensor, prompt_width: int) -> list[int]:
    """Generated tokens seen in every row, most frequent first: eos ids that stop rows at different steps."""
    rows = [set(row) for row in sequences[:, prompt_width:].tolist()]
    counts = torch.bincount(sequences[:, prompt_width:].flatten())
    return sorted(set.union(*rows) - {SPECIAL}, key=lambda token: -int(counts[token]))


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", KINDS)
def test_greedy_sequences_equal_generate_on_a_left_padded_batch(kind, attn_implementation):
    model = tiny_model(kind, attn_implementation)
    inputs = batch_inputs(kind)
    expected = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert torch.equal(greedy_generate(model, **inputs, max_new_tokens=12), expected)


@pytest.mark.parametrize("steps_per_check", [1, 8])
@pytest.mark.parametrize("kind", KINDS)
def test_rows_that_stop_at_different_steps_are_padded_and_cut_as_generate_does(kind, steps_per_check):
    model = tiny_model(kind)
    inputs = batch_inputs(kind)
    width = inputs["input_ids"].shape[1]
    never = model.generate(**inputs, max_new_tokens=16, do_sample=False, eos_token_id=SPECIAL + 1000)
    for eos in common_tokens(never, width)[:3]:  # eos ids that end rows early, at different steps
        model.generation_config.eos_token_id = [SPECIAL, eos]
        expected = model.generate(**inputs, max_new_tokens=16, do_sample=False)
        found = greedy_generate(model, **inputs, max_new_tokens=16, steps_per_check=steps_per_check)
        assert torch.equal(found, expected), eos
        assert expected.shape[1] < width + 16 or eos not in expected[:, width:].tolist()


def test_a_length_beyond_the_learned_positions_is_refused_in_one_line():
    model = tiny_model("vqa")
    inputs = batch_inputs("vqa")
    with pytest.raises(ValueError, match="fit the 48 learned positions") as error:
        greedy_generate(model, **inputs, max_new_tokens=45)
    assert "\n" not in str(error.value)


def test_the_pipelines_choose_it_on_a_gpu_for_plain_greedy_decoding_only():
    assert fast_greedy_applies("cuda:0", {"max_new_tokens": 32})
    assert fast_greedy_applies("cuda", {"do_sample": False, "num_beams": 1})
    assert not fast_greedy_applies("cpu", {"max_new_tokens": 32})
    assert not fast_greedy_applies("cuda", {"num_beams": 4})
    assert not fast_greedy_applies("cuda", {"do_sample": True})
    assert not fast_greedy_applies("cuda", {"repetition_penalty": 1.2})
