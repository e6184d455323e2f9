"""Saving, loading, Auto classes and remote code."""

import json

import pytest
import torch
from conftest import make_pair, run_with_remote_code, visual_features
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from lapvqa_hf import LapvqaDiffVQAConfig, LapvqaDiffVQAModel


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def saved(request, tmp_path_factory):
    _, model = make_pair(1024, tie_weights=request.param, final_norm=not request.param)
    path = tmp_path_factory.mktemp("saved")
    model.save_pretrained(path)
    return model, path


def test_round_trip_is_bit_exact(saved):
    model, path = saved
    reloaded = LapvqaDiffVQAModel.from_pretrained(path, attn_implementation=model.config._attn_implementation)
    original_state, reloaded_state = model.state_dict(), reloaded.state_dict()
    assert original_state.keys() == reloaded_state.keys()
    assert all(torch.equal(original_state[k], reloaded_state[k]) for k in original_state)
    curr_vis, ref_vis = visual_features(2, 5, 6, 1024)
    ids = torch.randint(0, 50256, (2, 7))
    with torch.no_grad():
        assert torch.equal(
            model(input_ids=ids, current_image_features=curr_vis, prior_image_features=ref_vis).logits,
            reloaded.eval()(input_ids=ids, current_image_features=curr_vis, prior_image_features=ref_vis).logits,
        )


def test_tied_checkpoints_store_the_embedding_once(saved):
    model, path = saved
    stored = load_file(path / "model.safetensors")
    assert ("lm_head.weight" in stored) != model.config.tie_word_embeddings
    reloaded = LapvqaDiffVQAModel.from_pretrained(path)
    tied = reloaded.lm_head.weight.data_ptr() == reloaded.decoder.embed_tokens.weight.data_ptr()
    assert tied == model.config.tie_word_embeddings


def test_saved_folder_carries_auto_map_and_model_files(saved):
    _, path = saved
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "lapvqa_diffvqa"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_lapvqa_diffvqa.LapvqaDiffVQAConfig",
        "AutoModel": "modeling_lapvqa_diffvqa.LapvqaDiffVQAModel",
        "AutoModelForCausalLM": "modeling_lapvqa_diffvqa.LapvqaDiffVQAModel",
    }
    assert (path / "configuration_lapvqa_diffvqa.py").is_file()
    assert (path / "modeling_lapvqa_diffvqa.py").is_file()


def test_auto_classes_resolve_to_the_package_classes(saved):
    _, path = saved
    assert type(AutoConfig.from_pretrained(path)) is LapvqaDiffVQAConfig
    assert type(AutoModel.from_pretrained(path)) is LapvqaDiffVQAModel
    assert type(AutoModelForCausalLM.from_pretrained(path)) is LapvqaDiffVQAModel
    assert type(AutoModel.from_config(LapvqaDiffVQAConfig())) is LapvqaDiffVQAModel


def test_loading_in_bfloat16_with_a_device_map(saved):
    _, path = saved
    model = AutoModel.from_pretrained(path, dtype=torch.bfloat16, device_map="cpu")
    assert model.dtype == torch.bfloat16
    curr_vis, ref_vis = visual_features(1, 5, 6, 1024)  # fp32 features are cast to the model's dtype
    ids = torch.randint(0, 50256, (1, 4))
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        current_image_features=curr_vis,
        prior_image_features=ref_vis,
        max_new_tokens=3,
    )
    assert out.shape[0] == 1


def test_attn_implementation_is_chosen_at_load_time(saved):
    _, path = saved
    for implementation in ("eager", "sdpa"):
        model = AutoModel.from_pretrained(path, attn_implementation=implementation)
        assert model.config._attn_implementation == implementation


def test_remote_code_loads_without_the_package(saved, tmp_path):
    model, path = saved
    curr_vis, ref_vis = visual_features(1, 5, 6, 1024)
    ids = torch.randint(0, 50256, (1, 4))
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "current_image_features": curr_vis,
        "prior_image_features": ref_vis,
    }
    generate = {"max_new_tokens": 4, "do_sample": False}
    remote = run_with_remote_code(path, inputs, tmp_path, generate=generate, auto_class="AutoModelForCausalLM")
    assert remote["class"] == "LapvqaDiffVQAModel"
    with torch.no_grad():
        assert torch.equal(remote["outputs"]["logits"], model(**inputs).logits)
    assert torch.equal(remote["generated"], model.generate(**inputs, **generate))


def test_fresh_models_are_initialised_like_transformers_models():
    model = LapvqaDiffVQAModel(LapvqaDiffVQAConfig(num_hidden_layers=2, initializer_range=0.02))
    assert abs(model.decoder.layers[0].fc1.weight.std().item() - 0.02) < 2e-3
    assert abs(model.decoder.embed_tokens.weight.std().item() - 0.02) < 2e-3
    assert torch.all(model.decoder.layers[1].encoder_attn.q_proj.bias == 0)
    assert torch.all(model.decoder.norm.weight == 1) and torch.all(model.decoder.norm.bias == 0)
