"""Bad input gets a ValueError that names what was expected and what was found."""

import pytest
import torch
from conftest import make_pair, visual_features
from huggingface_hub.errors import StrictDataclassClassValidationError

from lapvqa_hf import LapvqaDiffVQAConfig


@pytest.fixture(scope="module")
def model():
    return make_pair(768)[1]


def _prompt(length):
    ids = torch.randint(0, 50256, (1, length))
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids))


def test_feature_width_must_be_vis_dim(model):
    curr_vis, ref_vis = visual_features(1, 4, 4, 1024)
    with pytest.raises(ValueError, match=r"\[batch, num_patches, 768\].*got \[1, 4, 1024\]"):
        model(**_prompt(3), current_image_features=curr_vis, prior_image_features=ref_vis)


def test_features_must_be_three_dimensional(model):
    curr_vis, ref_vis = visual_features(1, 4, 4, 768)
    with pytest.raises(ValueError, match=r"`prior_image_features` must be patch tokens.*got \[4, 768\]"):
        model(**_prompt(3), current_image_features=curr_vis, prior_image_features=ref_vis[0])


def test_prior_and_current_batches_must_match(model):
    curr_vis, _ = visual_features(2, 4, 4, 768)
    _, ref_vis = visual_features(3, 4, 4, 768)
    with pytest.raises(ValueError, match="same number of samples, got 3 and 2"):
        model.generate(**_prompt(3), current_image_features=curr_vis, prior_image_features=ref_vis, max_new_tokens=2)


def test_visual_batch_must_match_text_batch(model):
    curr_vis, ref_vis = visual_features(2, 4, 4, 768)
    with pytest.raises(ValueError, match="visual features hold 2 samples but the text holds 1"):
        model(**_prompt(3), current_image_features=curr_vis, prior_image_features=ref_vis)


def test_the_upstream_cards_names_ref_vis_and_curr_vis_are_accepted(model):
    curr_vis, ref_vis = visual_features(1, 4, 5, 768)
    prompt = _prompt(3)
    with torch.no_grad():
        named = model(**prompt, prior_image_features=ref_vis, current_image_features=curr_vis).logits
        card_named = model(**prompt, ref_vis=ref_vis, curr_vis=curr_vis).logits
        swapped = model(**prompt, prior_image_features=curr_vis, current_image_features=ref_vis).logits
    torch.testing.assert_close(card_named, named, rtol=0, atol=0)
    assert not torch.allclose(swapped, named)  # the two images are told apart: ref_vis is the prior
    generated = model.generate(**prompt, ref_vis=ref_vis, curr_vis=curr_vis, max_new_tokens=3, do_sample=False)
    expected = model.generate(
        **prompt, prior_image_features=ref_vis, current_image_features=curr_vis, max_new_tokens=3, do_sample=False
    )
    assert generated.tolist() == expected.tolist()


def test_one_image_under_both_names_is_refused(model):
    curr_vis, ref_vis = visual_features(1, 4, 4, 768)
    with pytest.raises(ValueError, match=r"once, as `prior_image_features` \(or the card's `ref_vis`\)"):
        model(**_prompt(3), prior_image_features=ref_vis, ref_vis=ref_vis, current_image_features=curr_vis)


@pytest.mark.parametrize("missing", ["current_image_features", "prior_image_features"])
def test_visual_features_are_required_on_the_first_step(model, missing):
    curr_vis, ref_vis = visual_features(1, 4, 4, 768)
    features = {"current_image_features": curr_vis, "prior_image_features": ref_vis}
    del features[missing]
    with pytest.raises(ValueError, match=f"Missing {missing}.*first step"):
        model.generate(**_prompt(3), **features, max_new_tokens=2)


def test_prompt_longer_than_the_learned_positions(model):
    curr_vis, ref_vis = visual_features(1, 4, 4, 768)
    with pytest.raises(ValueError, match="prompt has 205 tokens, 5 more than the 200 learned positions"):
        model.generate(**_prompt(205), current_image_features=curr_vis, prior_image_features=ref_vis, max_new_tokens=2)


def test_prompt_plus_new_tokens_longer_than_the_learned_positions(model):
    curr_vis, ref_vis = visual_features(1, 4, 4, 768)
    with pytest.raises(
        ValueError,
        match=r"prompt \(150 tokens\) plus 60 new tokens needs 209 positions, 9 more .* max_new_tokens <= 51",
    ):
        model.generate(**_prompt(150), current_image_features=curr_vis, prior_image_features=ref_vis, max_new_tokens=60)


def test_exactly_filling_the_positions_is_allowed(model):
    curr_vis, ref_vis = visual_features(1, 4, 4, 768)
    out = model.generate(
        **_prompt(150),
        current_image_features=curr_vis,
        prior_image_features=ref_vis,
        max_new_tokens=51,
        min_new_tokens=51,
        do_sample=False,
    )
    assert out.shape[1] == 201


def test_forward_refuses_too_many_positions(model):
    curr_vis, ref_vis = visual_features(1, 4, 4, 768)
    with pytest.raises(ValueError, match="needs 201 positions .* 1 more than the 200 learned positions"):
        model(**_prompt(201), current_image_features=curr_vis, prior_image_features=ref_vis)


# Config validation goes through huggingface_hub's strict dataclasses, which wrap the ValueError.
def test_config_refuses_an_encoder_with_another_width():
    with pytest.raises(
        StrictDataclassClassValidationError, match="encoder_name='siglip' gives 1152-dim features, but vis_dim is 768"
    ):
        LapvqaDiffVQAConfig(encoder_name="siglip", vis_dim=768)


def test_config_refuses_heads_that_do_not_divide_the_width():
    with pytest.raises(
        StrictDataclassClassValidationError, match=r"hidden_size \(512\) must be divisible by num_attention_heads \(7\)"
    ):
        LapvqaDiffVQAConfig(num_attention_heads=7)
