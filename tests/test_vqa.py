"""The single-image VQA head: parity with the upstream `VQAHead`, generation, conversion, loading."""

import json
import pickle

import pytest
import torch
from conftest import (
    SMALL,
    WEIGHT_SCALES,
    answers_of,
    float32_bound,
    randomize_at_scale_,
    relative_error,
    run_with_remote_code,
)
from lapvqa_hf.convert import vqa
from lapvqa_hf.convert.original import DiffVQAHead, VQAHead, randomize_
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from lapvqa_hf import LapvqaVQAConfig, LapvqaVQAModel
from lapvqa_hf.cli import main as lapvqa

SPECIAL = 50256


def make_vqa_pair(
    vis_dim: int = 1152,
    final_norm: bool = True,
    attn_implementation: str = "eager",
    seed: int = 0,
    scale: str | None = None,
    **sizes,
) -> tuple[VQAHead, LapvqaVQAModel]:
    """An upstream `VQAHead` (tied, 150 positions) with random weights (or at one of `WEIGHT_SCALES`) and the model
    converted from it."""
    sizes = {**SMALL, **sizes}
    original = VQAHead(vis_dim=vis_dim, final_norm=final_norm, **sizes)
    if scale is None:
        randomize_(original, seed=seed).eval()
    else:
        randomize_at_scale_(original, scale, ("lm_head.weight",), seed=seed)
    encoder = {768: "coca", 1024: "clip-vit-l14", 1152: "siglip"}[vis_dim]
    config = vqa.infer_config(original.state_dict(), encoder, sizes["nhead"])
    model = LapvqaVQAModel(config)
    model.load_state_dict(vqa.convert_state_dict(original.state_dict(), config), strict=False)
    model.tie_weights()
    model.set_attn_implementation(attn_implementation)
    return original, model.eval()


def features(batch: int, num_patches: int, vis_dim: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, num_patches, vis_dim, generator=torch.Generator().manual_seed(seed))


def test_the_upstream_defaults_are_the_config_defaults():
    config = LapvqaVQAConfig()
    assert (config.max_position_embeddings, config.tie_word_embeddings, config.hidden_size) == (150, True, 512)
    original = VQAHead(vis_dim=1152)
    assert original.pos_emb.num_embeddings == 150
    assert original.lm_head.weight is original.tok_emb.weight
    assert "frame_emb.weight" not in original.state_dict()


@pytest.mark.parametrize("scale", WEIGHT_SCALES)
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize(("vis_dim", "num_patches"), [(768, 1), (1024, 49), (1152, 257)])
def test_logits_match_the_original(vis_dim, num_patches, attn_implementation, scale):
    original, model = make_vqa_pair(vis_dim, attn_implementation=attn_implementation, scale=scale)
    image_features = features(2, num_patches, vis_dim)
    ids = torch.randint(0, SPECIAL, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = original(image_features, ids)
        found = model(input_ids=ids, image_features=image_features).logits
        exact = original.double()(image_features.double(), ids)
    assert relative_error(found, exact) < float32_bound(expected, exact)


def test_lm_head_is_tied_to_the_token_embeddings():
    _, model = make_vqa_pair()
    assert model.lm_head.weight.data_ptr() == model.decoder.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("scale", WEIGHT_SCALES)
def test_greedy_answers_match_the_original_loop_on_a_left_padded_batch(scale):
    original, model = make_vqa_pair(768, final_norm=False, scale=scale)
    image_features = features(3, 20, 768)
    generator = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, SPECIAL, (n,), generator=generator).tolist() for n in (3, 7, 5)]
    width = max(len(p) for p in prompts) + 1
    input_ids = torch.tensor([[SPECIAL] * (width - len(p) - 1) + p + [SPECIAL] for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p) - 1) + [1] * (len(p) + 1) for p in prompts])
    generated = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, image_features=image_features, max_new_tokens=12
    )
    found = answers_of(generated, width, SPECIAL)
    expected = [
        original.generate(image_features[i : i + 1], torch.tensor([p]), SPECIAL, SPECIAL, 12)[0]
        for i, p in enumerate(prompts)
    ]
    assert found == expected


def test_image_keys_values_are_computed_once_per_sequence():
    _, model = make_vqa_pair(768)
    calls = []
    modules = [model.visual_projection, *(layer.encoder_attn.k_proj for layer in model.decoder.layers)]
    handles = [m.register_forward_hook(lambda *_: calls.append(1)) for m in modules]
    ids = torch.randint(0, SPECIAL, (2, 5))
    model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        image_features=features(2, 9, 768),
        max_new_tokens=6,
        min_new_tokens=6,
    )
    for handle in handles:
        handle.remove()
    assert len(calls) == len(modules)


def test_static_cache_matches_dynamic():
    _, model = make_vqa_pair(768, attn_implementation="sdpa")
    ids = torch.randint(0, SPECIAL, (2, 5))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    inputs = dict(input_ids=ids, attention_mask=mask, image_features=features(2, 9, 768))
    dynamic = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6)
    static = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, cache_implementation="static")
    assert torch.equal(dynamic, static)


def test_bad_inputs_are_refused_with_the_expected_shape():
    _, model = make_vqa_pair(768)
    ids = torch.randint(0, SPECIAL, (2, 5))
    with pytest.raises(ValueError, match=r"Missing image_features: .*\[batch, num_patches, 768\]"):
        model(input_ids=ids)
    with pytest.raises(
        ValueError, match=r"\[batch, num_patches, 768\] \(vis_dim of the coca encoder\), got \[2, 9, 1024\]"
    ):
        model(input_ids=ids, image_features=features(2, 9, 1024))
    with pytest.raises(ValueError, match="`image_features` holds 3 samples but the text holds 2"):
        model(input_ids=ids, image_features=features(3, 9, 768))
    with pytest.raises(ValueError, match="The prompt has 151 tokens, 1 more than the 150 learned positions"):
        long = torch.randint(0, SPECIAL, (1, 151))
        model.generate(input_ids=long, attention_mask=torch.ones_like(long), image_features=features(1, 9, 768))


def write_vqa_checkpoint(path, vis_dim=768, **sizes):
    head = randomize_(VQAHead(vis_dim=vis_dim, **{**SMALL, **sizes}), seed=1).eval()
    torch.save(head.state_dict(), path)
    return head


def test_converter_writes_a_verified_folder_that_loads_with_auto_classes(tmp_path, capsys):
    checkpoint = tmp_path / "coca_best.pt"
    head = write_vqa_checkpoint(checkpoint)
    out = tmp_path / "lapvqa-vqa-coca"
    assert (
        lapvqa(["convert", "vqa", str(checkpoint), "--encoder", "coca", "--output", str(out), "--num-heads", "4"]) == 0
    )
    printed = capsys.readouterr().out
    assert "vis_dim 768, 2 layers, FFN 96, 150 positions, final norm yes, lm_head tied" in printed
    assert "verify passed" in printed and "identical for 3/3 samples" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "lapvqa_vqa" and config["encoder_name"] == "coca"
    assert config["auto_map"]["AutoModel"] == "modeling_lapvqa_vqa.LapvqaVQAModel"
    assert "memory = vis_proj(image patch tokens), no frame embedding" in config["conversion_info"]["assumptions"]
    assert {"modeling_lapvqa_vqa.py", "configuration_lapvqa_vqa.py", "tokenizer.json"} <= {
        p.name for p in out.iterdir()
    }

    assert type(AutoConfig.from_pretrained(out)) is LapvqaVQAConfig
    assert type(AutoModelForCausalLM.from_pretrained(out)) is LapvqaVQAModel
    model = AutoModel.from_pretrained(out)
    assert type(model) is LapvqaVQAModel
    image_features, ids = features(1, 7, 768), torch.randint(0, SPECIAL, (1, 6))
    with torch.no_grad():
        assert (
            model(input_ids=ids, image_features=image_features).logits - head(image_features, ids)
        ).abs().max() < 1e-5

    remote = run_with_remote_code(
        out,
        {"input_ids": ids, "attention_mask": torch.ones_like(ids), "image_features": image_features},
        tmp_path,
        generate={"max_new_tokens": 4, "do_sample": False},
    )
    assert remote["class"] == "LapvqaVQAModel"
    with torch.no_grad():
        local_logits = model(input_ids=ids, image_features=image_features).logits
    assert (remote["outputs"]["logits"] - local_logits).abs().max() < 1e-5
    local = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), image_features=image_features, max_new_tokens=4
    )
    assert torch.equal(remote["generated"], local)


def test_converter_refuses_diffvqa_checkpoints_and_wrong_encoders(tmp_path, capsys):
    diffvqa_checkpoint = tmp_path / "coca_best.pt"
    torch.save(randomize_(DiffVQAHead(vis_dim=768, **SMALL)).state_dict(), diffvqa_checkpoint)
    out = tmp_path / "out"
    assert lapvqa(["convert", "vqa", str(diffvqa_checkpoint), "--encoder", "coca", "--output", str(out)]) == 1
    assert "frame_emb.weight, so it is a two-image DiffVQAHead: use `lapvqa convert diffvqa`" in capsys.readouterr().err

    vqa_checkpoint = tmp_path / "siglip_best.pt"
    write_vqa_checkpoint(vqa_checkpoint, vis_dim=768)
    assert lapvqa(["convert", "vqa", str(vqa_checkpoint), "--encoder", "siglip", "--output", str(out)]) == 1
    assert "encoder siglip gives 1152-dim features, but the checkpoint's vis_proj takes 768" in capsys.readouterr().err

    state = torch.load(vqa_checkpoint, weights_only=True)
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, vqa_checkpoint)
    assert (
        lapvqa(["convert", "vqa", str(vqa_checkpoint), "--encoder", "coca", "--output", str(out), "--num-heads", "4"])
        == 1
    )
    assert "extra.weight" in capsys.readouterr().err

    class Exploit:
        def __reduce__(self):
            return (print, ("owned",))

    malicious = tmp_path / "malicious.pt"
    malicious.write_bytes(pickle.dumps(Exploit()))
    assert lapvqa(["convert", "vqa", str(malicious), "--encoder", "coca", "--output", str(out)]) == 1
    assert not out.exists()
