"""LapvqaVisionModel and LapvqaCaptioningModel reproduce the upstream ViT-L/14 and CaptioningModel."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import answers_of, enable_activation_checkpointing
from lapvqa_hf.convert.captioning import convert_state_dict as convert_captioning_state_dict
from lapvqa_hf.convert.captioning import infer_config as infer_captioning_config
from lapvqa_hf.convert.checkpoint import StateDictMapper
from lapvqa_hf.convert.common import expected_shapes
from lapvqa_hf.convert.original import CaptioningModel, VisionTransformer, randomize_
from lapvqa_hf.convert.vision_encoder import infer_vision_config, map_vision_encoder
from transformers import AutoModel, AutoModelForImageTextToText

from lapvqa_hf import LapvqaCaptioningModel, LapvqaVisionConfig, LapvqaVisionModel

TINY_VIT = dict(img_size=56, patch_size=14, embed_dim=64, depth=2, num_heads=4)


def vision_pair(attn_implementation="eager", seed=0, **sizes):
    sizes = {**TINY_VIT, **sizes}
    original = randomize_(VisionTransformer(**sizes), seed=seed).eval()
    config = infer_vision_config(original.state_dict(), num_attention_heads=sizes["num_heads"])
    model = LapvqaVisionModel(config)
    mapper = StateDictMapper(original.state_dict())
    map_vision_encoder(mapper, config, source="", target="")
    model.load_state_dict(mapper.finish(expected_shapes(model)), strict=True)
    model.set_attn_implementation(attn_implementation)
    return original, model.eval()


def captioning_pair(vocab_size=50257, max_len=30, seed=0, std=0.05, attn_implementation="eager"):
    original = CaptioningModel(
        img_size=56,
        patch_size=14,
        vision_width=64,
        vision_depth=2,
        vision_heads=4,
        d_model=32,
        nhead=4,
        num_layers=2,
        dim_feedforward=48,
        vocab_size=vocab_size,
        max_len=max_len,
    )
    randomize_(original, seed=seed, std=std).eval()
    config = infer_captioning_config(original.state_dict(), num_attention_heads=4, vision_num_attention_heads=4)
    special = vocab_size - 1
    config.bos_token_id = config.eos_token_id = config.pad_token_id = special
    model = LapvqaCaptioningModel(config)
    model.load_state_dict(convert_captioning_state_dict(original.state_dict(), config))
    model.set_attn_implementation(attn_implementation)
    return original, model.eval()


def images(batch=2, size=56, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_encoder_patch_tokens_match_original(attn_implementation):
    original, model = vision_pair(attn_implementation)
    pixels = images(3)
    with torch.no_grad():
        expected = original(pixels)
        found = model(pixels).last_hidden_state
    assert found.shape == (3, 16, 64)
    assert (found - expected).abs().max() < 1e-5


@pytest.mark.slow
def test_encoder_matches_original_at_vit_l14_size():
    original, model = vision_pair("sdpa", img_size=224, patch_size=14, embed_dim=1024, depth=24, num_heads=16)
    assert (model.config.image_size, model.config.num_patches, model.config.intermediate_size) == (224, 256, 4096)
    pixels = images(1, 224)
    with torch.no_grad():
        assert (model(pixels).last_hidden_state - original(pixels)).abs().max() < 1e-4


def test_sdpa_equals_eager_for_the_encoder():
    _, eager = vision_pair("eager")
    _, sdpa = vision_pair("sdpa")
    pixels = images(2)
    with torch.no_grad():
        assert (eager(pixels).last_hidden_state - sdpa(pixels).last_hidden_state).abs().max() < 1e-5


def test_encoder_hidden_states_attentions_and_pooler():
    _, model = vision_pair()
    out = model(images(2), output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == 3 and out.hidden_states[0].shape == (2, 17, 64)  # CLS kept inside
    assert len(out.attentions) == 2 and out.attentions[0].shape == (2, 4, 17, 17)
    assert out.pooler_output.shape == (2, 64)


def test_other_image_sizes_are_refused_or_interpolated():
    _, model = vision_pair()
    with pytest.raises(ValueError, match="trained on 56x56 images, got 70x70.*interpolate_pos_encoding=True"):
        model(images(1, 70))
    out = model(images(1, 70), interpolate_pos_encoding=True)
    assert out.last_hidden_state.shape == (1, 25, 64)
    # The native size is untouched by interpolation.
    pixels = images(1)
    assert torch.equal(model(pixels, interpolate_pos_encoding=True).last_hidden_state, model(pixels).last_hidden_state)
    with pytest.raises(ValueError, match="multiples of the patch size 14, got 60x60"):
        model(images(1, 60), interpolate_pos_encoding=True)


def test_wrong_channel_count_is_refused():
    _, model = vision_pair()
    with pytest.raises(ValueError, match=r"\[batch, 3, height, width\], got \[2, 1, 56, 56\]"):
        model(torch.randn(2, 1, 56, 56))


def test_encoder_gradient_checkpointing():
    _, model = vision_pair()
    model.train()
    enable_activation_checkpointing(model)
    model(images(2)).last_hidden_state.sum().backward()
    assert model.embeddings.patch_embedding.weight.grad is not None


def test_vision_config_refuses_sizes_that_are_not_patch_multiples():
    from huggingface_hub.errors import StrictDataclassClassValidationError

    with pytest.raises(
        StrictDataclassClassValidationError, match="multiple of patch_size \\(14\\); the nearest are 378 and 392"
    ):
        LapvqaVisionConfig(image_size=384)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_captioning_logits_match_original(attn_implementation):
    original, model = captioning_pair(attn_implementation=attn_implementation)
    pixels = images(2)
    text = torch.randint(0, 50256, (2, 14))
    with torch.no_grad():
        assert (model(input_ids=text, pixel_values=pixels).logits - original(pixels, text)).abs().max() < 1e-5


def test_greedy_reports_identical_including_early_eos():
    for seed in range(40):
        original, model = captioning_pair(vocab_size=8, seed=seed, std=0.5)
        pixels = images(5, seed=seed)
        expected = original.generate(pixels, 7, 7, max_new_tokens=10)
        lengths = {len(r) for r in expected}
        if min(lengths) < 10 and max(lengths) == 10:
            break
    else:
        raise AssertionError("no seed gave a mix of early-EOS and full-length reports")
    generated = model.generate(
        pixel_values=pixels,
        input_ids=torch.full((5, 1), 7),
        attention_mask=torch.ones(5, 1, dtype=torch.long),
        max_new_tokens=10,
        do_sample=False,
    )
    assert answers_of(generated, 1, 7) == expected


def test_image_is_encoded_once_per_generation():
    _, model = captioning_pair()
    calls = []
    handle = model.vision_model.register_forward_hook(lambda *_: calls.append(1))
    bos = torch.full((2, 1), 50256)
    model.generate(
        pixel_values=images(2),
        input_ids=bos,
        attention_mask=torch.ones_like(bos),
        max_new_tokens=6,
        min_new_tokens=6,
        num_beams=2,
    )
    handle.remove()
    assert len(calls) == 1


def test_static_cache_matches_dynamic_for_captioning():
    _, model = captioning_pair(attn_implementation="sdpa")
    bos = torch.full((2, 1), 50256)
    kwargs = dict(
        pixel_values=images(2),
        input_ids=bos,
        attention_mask=torch.ones_like(bos),
        max_new_tokens=6,
        min_new_tokens=6,
        do_sample=False,
    )
    assert torch.equal(model.generate(**kwargs), model.generate(**kwargs, cache_implementation="static"))


def test_reports_longer_than_the_positions_are_refused():
    _, model = captioning_pair(max_len=30)
    bos = torch.full((1, 1), 50256)
    with pytest.raises(
        ValueError, match="plus 40 new tokens needs 40 positions, 10 more than the 30 learned positions"
    ):
        model.generate(pixel_values=images(1), input_ids=bos, attention_mask=torch.ones_like(bos), max_new_tokens=40)
    with pytest.raises(ValueError, match="needs 31 positions"):
        model(input_ids=torch.randint(0, 50256, (1, 31)), pixel_values=images(1))


def test_missing_image_is_refused():
    _, model = captioning_pair()
    with pytest.raises(ValueError, match="Missing pixel_values"):
        model(input_ids=torch.full((1, 1), 50256))


def test_captioning_loss_and_auto_classes(tmp_path):
    _, model = captioning_pair()
    text = torch.randint(0, 50256, (2, 9))
    out = model(input_ids=text, pixel_values=images(2), labels=text)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    model.save_pretrained(tmp_path)
    assert type(AutoModel.from_pretrained(tmp_path)) is LapvqaCaptioningModel
    assert type(AutoModelForImageTextToText.from_pretrained(tmp_path)) is LapvqaCaptioningModel


REMOTE = textwrap.dedent(
    """
    import sys, importlib.abc
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "lapvqa_hf":
                raise ImportError("blocked")
    sys.meta_path.insert(0, Block())
    import torch
    from transformers import AutoModel
    for folder in sys.argv[1:3]:
        model = AutoModel.from_pretrained(folder, trust_remote_code=True, attn_implementation="eager")
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    pixels = torch.load(sys.argv[3], weights_only=True)
    encoder = AutoModel.from_pretrained(sys.argv[2], trust_remote_code=True, attn_implementation="eager")
    torch.save(encoder(pixels).last_hidden_state, sys.argv[4])
    """
)


def test_remote_code_loads_both_without_the_package(tmp_path):
    _, captioning = captioning_pair()
    _, encoder = vision_pair()
    captioning.save_pretrained(tmp_path / "captioning")
    encoder.save_pretrained(tmp_path / "encoder")
    pixels = images(1)
    torch.save(pixels, tmp_path / "pixels.pt")
    (tmp_path / "remote.py").write_text(REMOTE)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "remote.py", "captioning", "encoder", "pixels.pt", "out.pt"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "out.pt", weights_only=True), encoder(pixels).last_hidden_state)


def test_embedding_accessors_and_vocabulary_resizing():
    from conftest import make_pair

    for model in (make_pair(768)[1], captioning_pair()[1]):
        assert model.get_input_embeddings() is model.decoder.embed_tokens
        assert model.get_output_embeddings() is model.lm_head
        assert model.get_decoder() is model.decoder
        model.resize_token_embeddings(50300, mean_resizing=False)
        assert model.lm_head.weight.shape == (50300, model.config.hidden_size)
        assert model.config.vocab_size == 50300
