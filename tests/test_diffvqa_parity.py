"""LapvqaDiffVQAModel reproduces the upstream DiffVQAHead: logits, greedy answers, batching."""

import pytest
import torch
from conftest import (
    FLOAT32_RELATIVE,
    WEIGHT_SCALES,
    answers_of,
    float32_bound,
    make_pair,
    relative_error,
    visual_features,
)


@pytest.mark.parametrize(
    ("vis_dim", "num_curr", "num_ref", "final_norm", "tied"),
    [
        (768, 1, 1, True, False),
        (1024, 49, 37, False, True),
        (1152, 257, 256, True, True),
        (768, 49, 49, False, False),
    ],
)
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_logits_match_original(vis_dim, num_curr, num_ref, final_norm, tied, attn_implementation):
    original, model = make_pair(vis_dim, final_norm, tied, attn_implementation=attn_implementation)
    curr_vis, ref_vis = visual_features(3, num_curr, num_ref, vis_dim)
    input_ids = torch.randint(0, 50256, (3, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = original(curr_vis, ref_vis, input_ids)
        found = model(input_ids=input_ids, current_image_features=curr_vis, prior_image_features=ref_vis).logits
    assert found.shape == expected.shape == (3, 21, 50257)
    assert relative_error(found, expected) < FLOAT32_RELATIVE


@pytest.mark.parametrize("scale", WEIGHT_SCALES)
def test_logits_match_original_at_real_size(scale):
    original, model = make_pair(
        768, final_norm=True, tie_weights=False, scale=scale, d_model=512, nhead=8, num_layers=6, dim_feedforward=2048
    )
    curr_vis, ref_vis = visual_features(2, 256, 256, 768)
    input_ids = torch.randint(0, 50256, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = original(curr_vis, ref_vis, input_ids)
        found = model(input_ids=input_ids, current_image_features=curr_vis, prior_image_features=ref_vis).logits
        exact = original.double()(curr_vis.double(), ref_vis.double(), input_ids)
    assert relative_error(found, exact) < float32_bound(expected, exact)


@pytest.mark.parametrize("scale", WEIGHT_SCALES)
def test_cached_step_by_step_logits_equal_full_forward(scale):
    _, model = make_pair(1024, scale=scale)
    curr_vis, ref_vis = visual_features(2, 9, 5, 1024)
    input_ids = torch.randint(0, 50256, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(input_ids=input_ids, current_image_features=curr_vis, prior_image_features=ref_vis).logits
        out = model(
            input_ids=input_ids[:, :7], current_image_features=curr_vis, prior_image_features=ref_vis, use_cache=True
        )
        steps = [out.logits]
        for t in range(7, 12):
            # The visual features are not needed once their keys/values are cached.
            out = model(input_ids=input_ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    assert relative_error(torch.cat(steps, dim=1), full) < FLOAT32_RELATIVE


def _pair_with_varied_endings(attn_implementation="eager"):
    """A tiny-vocabulary head (eos = 7) where, on these inputs, some greedy answers stop early and some do not."""
    for seed in range(50):
        original, model = make_pair(
            64, vocab_size=8, max_len=40, seed=seed, std=0.5, attn_implementation=attn_implementation
        )
        curr_vis, ref_vis = visual_features(6, 4, 3, 64, seed=seed)
        prompt = torch.randint(0, 7, (6, 5), generator=torch.Generator().manual_seed(seed))
        answers = original.generate(curr_vis, ref_vis, prompt, 7, 7, max_new_tokens=12)
        lengths = {len(a) for a in answers}
        if min(lengths) < 12 and max(lengths) == 12 and len(lengths) >= 3:
            return original, model, curr_vis, ref_vis, prompt, answers
    raise AssertionError("no seed gave a mix of early-EOS and full-length answers")


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_greedy_answers_identical_including_early_eos(attn_implementation):
    original, model, curr_vis, ref_vis, prompt, expected = _pair_with_varied_endings(attn_implementation)
    input_ids = torch.cat([prompt, torch.full((6, 1), 7)], dim=1)
    generated = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        current_image_features=curr_vis,
        prior_image_features=ref_vis,
        max_new_tokens=12,
        do_sample=False,
    )
    assert answers_of(generated, 6, eos_token_id=7) == expected
    # Finished rows are padded with eos (= pad), as GenerationMixin does.
    for row, answer in zip(generated[:, 6:].tolist(), expected, strict=True):
        assert all(token == 7 for token in row[len(answer) :])


@pytest.mark.parametrize("scale", WEIGHT_SCALES)
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_left_padded_batch_equals_one_by_one(attn_implementation, scale, gpt2_tokenizer):
    from lapvqa_hf.tokenization import encode_questions

    original, model = make_pair(768, attn_implementation=attn_implementation, scale=scale)
    questions = [
        "what has changed compared to the previous image?",
        "is the pleural effusion bigger?",
        "any new finding?",
    ]
    curr_vis, ref_vis = visual_features(3, 16, 12, 768)
    batch = encode_questions(gpt2_tokenizer, questions)
    assert (batch.attention_mask == 0).any(), "the batch must actually be padded"
    generated = model.generate(
        **batch, current_image_features=curr_vis, prior_image_features=ref_vis, max_new_tokens=10, do_sample=False
    )
    batched = answers_of(generated, batch.input_ids.shape[1], 50256)
    for i, question in enumerate(questions):
        single = encode_questions(gpt2_tokenizer, question)
        alone = model.generate(
            **single,
            current_image_features=curr_vis[i : i + 1],
            prior_image_features=ref_vis[i : i + 1],
            max_new_tokens=10,
            do_sample=False,
        )
        assert answers_of(alone, single.input_ids.shape[1], 50256) == [batched[i]]
        question_ids = single.input_ids[:, :-1]
        assert original.generate(curr_vis[i : i + 1], ref_vis[i : i + 1], question_ids, 50256, 50256, 10) == [
            batched[i]
        ]


def test_padded_rows_produce_no_nan_logits():
    _, model = make_pair(768, attn_implementation="sdpa")
    curr_vis, ref_vis = visual_features(2, 4, 4, 768)
    input_ids = torch.randint(0, 50256, (2, 6), generator=torch.Generator().manual_seed(4))
    attention_mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        logits = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            current_image_features=curr_vis,
            prior_image_features=ref_vis,
        ).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("scale", WEIGHT_SCALES)
def test_sdpa_equals_eager(scale):
    _, eager = make_pair(1152, attn_implementation="eager", scale=scale)
    _, sdpa = make_pair(1152, attn_implementation="sdpa", scale=scale)
    curr_vis, ref_vis = visual_features(2, 30, 20, 1152)
    input_ids = torch.randint(0, 50256, (2, 15), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(input_ids)
    mask[0, :4] = 0
    with torch.no_grad():
        a = eager(
            input_ids=input_ids, attention_mask=mask, current_image_features=curr_vis, prior_image_features=ref_vis
        ).logits
        b = sdpa(
            input_ids=input_ids, attention_mask=mask, current_image_features=curr_vis, prior_image_features=ref_vis
        ).logits
    assert relative_error(a[1], b[1]) < FLOAT32_RELATIVE
    assert relative_error(a[0, 4:], b[0, 4:]) < FLOAT32_RELATIVE
