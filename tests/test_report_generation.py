"""The report-generation head: parity with the upstream `ReportGenerationHead` at every weight scale, generation
from `[bos]` with the cache, and `lapvqa convert report-generation` (checkpoint dict checked, verify, remote code)."""

import json
import re

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
    upstream_report_checkpoint,
)
from lapvqa_hf.convert import report_generation
from lapvqa_hf.convert.original import DiffVQAHead, ReportGenerationHead, randomize_
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from lapvqa_hf import LapvqaReportGenerationConfig, LapvqaReportGenerationModel
from lapvqa_hf.cli import main as lapvqa

SPECIAL = 50256
ENCODERS = {768: "coca", 1024: "mae-vit-l16", 1152: "siglip"}


def make_pair(
    vis_dim: int = 1152,
    scale: str = "tiny",
    final_norm: bool = True,
    tie_weights: bool = False,
    attn_implementation: str = "eager",
    max_len: int = 40,
) -> tuple[ReportGenerationHead, LapvqaReportGenerationModel]:
    """An upstream `ReportGenerationHead` at one of `WEIGHT_SCALES` and the model converted from its state dict."""
    original = ReportGenerationHead(vis_dim, **SMALL, max_len=max_len, final_norm=final_norm, tie_weights=tie_weights)
    randomize_at_scale_(original, scale, ("lm_head.weight",))
    state_dict = original.state_dict()
    config = report_generation.infer_config(state_dict, ENCODERS[vis_dim], SMALL["nhead"])
    model = LapvqaReportGenerationModel(config)
    model.load_state_dict(report_generation.convert_state_dict(state_dict, config), strict=not tie_weights)
    model.tie_weights()
    model.set_attn_implementation(attn_implementation)
    return original, model.eval()


def features(batch: int, num_patches: int, vis_dim: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, num_patches, vis_dim, generator=torch.Generator().manual_seed(seed))


def bos(batch: int) -> dict[str, torch.Tensor]:
    ids = torch.full((batch, 1), SPECIAL)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("scale", WEIGHT_SCALES)
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_logits_match_the_original(scale, attn_implementation):
    original, model = make_pair(1152, scale, attn_implementation=attn_implementation)
    image_features = features(2, 17, 1152)
    report = torch.randint(0, SPECIAL, (2, 11), generator=torch.Generator().manual_seed(1))
    ids = torch.cat([torch.full((2, 1), SPECIAL), report], dim=1)  # [bos] + report
    labels = ids.clone()
    with torch.no_grad():
        expected = original(image_features, ids)
        outputs = model(input_ids=ids, image_features=image_features, labels=labels)
        exact = original.double()(image_features.double(), ids)
    assert relative_error(outputs.logits, exact) < float32_bound(expected, exact)
    shifted = torch.nn.functional.cross_entropy(exact[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    assert outputs.loss.item() == pytest.approx(shifted.item(), rel=1e-4), "the shifted LM loss"


@pytest.mark.parametrize("scale", WEIGHT_SCALES)
def test_greedy_reports_match_the_original_loop(scale):
    original, model = make_pair(768, scale, final_norm=scale != "large", tie_weights=scale == "trained-like")
    image_features = features(3, 20, 768)
    generated = model.generate(**bos(3), image_features=image_features, max_new_tokens=16, do_sample=False)
    assert answers_of(generated, 1, SPECIAL) == original.generate(image_features, SPECIAL, SPECIAL, 16)


def test_left_padded_batched_generation_equals_one_by_one():
    _, model = make_pair(1024, "trained-like")
    image_features = features(3, 9, 1024)
    generator = torch.Generator().manual_seed(2)
    prompts = [[SPECIAL] + torch.randint(0, SPECIAL, (n,), generator=generator).tolist() for n in (0, 4, 2)]
    width = max(map(len, prompts))
    input_ids = torch.tensor([[SPECIAL] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    options = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False)
    batched = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, image_features=image_features, **options
    )
    for i, prompt in enumerate(prompts):
        alone = model.generate(input_ids=torch.tensor([prompt]), image_features=image_features[i : i + 1], **options)
        assert batched[i, width:].tolist() == alone[0, len(prompt) :].tolist()


def test_image_keys_values_are_computed_once_per_sequence():
    _, model = make_pair(768)
    calls = []
    modules = [model.visual_projection, *(layer.encoder_attn.k_proj for layer in model.decoder.layers)]
    handles = [m.register_forward_hook(lambda *_: calls.append(1)) for m in modules]
    model.generate(**bos(2), image_features=features(2, 9, 768), max_new_tokens=6, min_new_tokens=6)
    for handle in handles:
        handle.remove()
    assert len(calls) == len(modules)


def test_config_defaults_and_bad_inputs():
    config = LapvqaReportGenerationConfig()
    assert (config.encoder_finetuned, config.tie_word_embeddings, config.max_position_embeddings) == (False, False, 256)
    _, model = make_pair(768, max_len=8)
    with pytest.raises(ValueError, match=r"Missing image_features: .*\[batch, num_patches, 768\]"):
        model(**bos(1))
    with pytest.raises(ValueError, match=r"\(vis_dim of the coca encoder\), got \[1, 9, 1024\]"):
        model(**bos(1), image_features=features(1, 9, 1024))
    with pytest.raises(ValueError, match="Use max_new_tokens <= 8 for this prompt"):
        model.generate(**bos(1), image_features=features(1, 9, 768), max_new_tokens=9)


# --- conversion -------------------------------------------------------------------------------------------------


def converted_with_verify(tmp_path, scale: str, tie_weights: bool) -> tuple[str, list[float]]:
    """Converts a head at `scale`; returns verify's report and its relative errors (float64, then float32)."""
    head = randomize_at_scale_(
        ReportGenerationHead(1152, **SMALL, max_len=40, tie_weights=tie_weights), scale, ("lm_head.weight",)
    )
    torch.save(upstream_report_checkpoint(head, "siglip"), tmp_path / "siglip.pt")
    lines = []
    report_generation.convert_report_generation(tmp_path / "siglip.pt", tmp_path / "out", log=lines.append)
    (verify,) = [line for line in lines if line.startswith("verify ")]
    return verify, [float(value) for value in re.findall(r"relative ([0-9.e+-]+)", verify)]


@pytest.mark.parametrize("scale", WEIGHT_SCALES)
def test_verify_judges_relative_to_scale_at_every_weight_scale(tmp_path, scale):
    verify, (float64, float32) = converted_with_verify(tmp_path, scale, tie_weights=scale == "trained-like")
    print(f"{scale}: {verify}")
    assert verify.startswith("verify passed") and "greedy reports identical for 3/3 samples" in verify
    assert float64 < 1e-12 and float32 < 1e-4


def test_converter_writes_a_verified_folder_that_loads_with_auto_classes(tmp_path, capsys):
    head = randomize_(ReportGenerationHead(1024, **SMALL, max_len=40, final_norm=False), seed=1).eval()
    torch.save(upstream_report_checkpoint(head, "mae-vit-l16"), tmp_path / "mae-vit-l16.pt")
    out = tmp_path / "lapvqa-rrg-mae-vit-l16"
    assert lapvqa(["convert", "report-generation", str(tmp_path / "mae-vit-l16.pt"), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (
        "encoder mae-vit-l16, vis_dim 1024, d_model 64, 2 layers, 4 heads, FFN 96, 40 positions, final norm no, "
        "lm_head untied; epoch 14, val_bleu4 0.031" in printed
    )
    assert "verify passed" in printed and "greedy reports identical for 3/3 samples" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "lapvqa_report_generation" and config["encoder_name"] == "mae-vit-l16"
    assert config["feature_recipe"]["checkpoint"] == "facebook/vit-mae-large" and config["encoder_finetuned"] is False
    assert config["training_results"] == {"epoch": 14, "val_bleu4": 0.031}
    assert config["num_attention_heads"] == 4 and "assumed_num_attention_heads" not in config["conversion_info"]
    assert config["custom_pipelines"]["lapvqa-rrg"]["impl"] == "pipeline_lapvqa.LapvqaReportGenerationPipeline"
    assert {"modeling_lapvqa_report_generation.py", "modeling_lapvqa_common.py", "tokenizer.json"} <= {
        p.name for p in out.iterdir()
    }

    assert type(AutoConfig.from_pretrained(out)) is LapvqaReportGenerationConfig
    assert type(AutoModelForCausalLM.from_pretrained(out)) is LapvqaReportGenerationModel
    model = AutoModel.from_pretrained(out).eval()
    image_features, ids = features(1, 7, 1024), torch.tensor([[SPECIAL, 17, 4000, 99]])
    with torch.no_grad():
        local_logits = model(input_ids=ids, image_features=image_features).logits
        assert relative_error(local_logits, head(image_features, ids)) < 1e-5

    inputs = {**bos(1), "image_features": image_features}
    remote = run_with_remote_code(out, inputs, tmp_path, generate={"max_new_tokens": 5, "do_sample": False})
    assert remote["class"] == "LapvqaReportGenerationModel"
    with torch.no_grad():
        assert relative_error(remote["outputs"]["logits"], model(**inputs).logits) < 1e-6
    assert torch.equal(remote["generated"], model.generate(**inputs, max_new_tokens=5, do_sample=False))


def test_a_mapping_bug_is_caught_by_verify(tmp_path, monkeypatch, capsys):
    head = randomize_(ReportGenerationHead(768, **SMALL, max_len=40), seed=2)
    torch.save(upstream_report_checkpoint(head, "coca"), tmp_path / "coca.pt")
    convert_state_dict = report_generation.convert_state_dict

    def swapped_cross_attention(state_dict, config):  # query and key of the first layer's cross-attention swapped
        mapped = convert_state_dict(state_dict, config)
        prefix = "decoder.layers.0.encoder_attn."
        mapped[prefix + "q_proj.weight"], mapped[prefix + "k_proj.weight"] = (
            mapped[prefix + "k_proj.weight"],
            mapped[prefix + "q_proj.weight"],
        )
        return mapped

    monkeypatch.setattr(report_generation, "convert_state_dict", swapped_cross_attention)
    out = tmp_path / "out"
    assert lapvqa(["convert", "report-generation", str(tmp_path / "coca.pt"), "--output", str(out)]) == 1
    assert "verify FAILED" in capsys.readouterr().err and not out.exists()


def edited(checkpoint: dict, **changes) -> dict:
    return {**checkpoint, **changes}


def with_extra_keys(checkpoint: dict) -> dict:
    # Not under `encoder.` (where a native file holds its fine-tuned encoder: tests/test_native_heads.py)
    extra = {"vision_encoder.blocks.0.norm1.weight": torch.ones(4), "vision_encoder.cls_token": torch.zeros(1, 1, 4)}
    return {**checkpoint, "state_dict": {**checkpoint["state_dict"], **extra}}


@pytest.mark.parametrize(
    ("change", "options", "message"),
    [
        (lambda c: edited(c, num_layers=3), [], "checkpoint metadata says num_layers=3, but the weights"),
        (lambda c: edited(c, vis_dim=1024), [], "checkpoint metadata says vis_dim=1024, but the weights"),
        (lambda c: edited(c, nhead=3), [], "checkpoint metadata: nhead 3 does not divide d_model 64."),
        (lambda c: edited(c, lr=1e-4), [], r"found unknown keys \['lr'\] and missing keys \[\]"),
        (lambda c: edited(c, encoder="resnet"), [], "the checkpoint names an unknown encoder 'resnet'"),
        (lambda c: c, ["--encoder", "coca"], "--encoder coca contradicts the checkpoint's encoder 'siglip'."),
        (lambda c: c, ["--num-heads", "8"], "--num-heads 8 contradicts the checkpoint's nhead 4."),
        (
            with_extra_keys,
            [],
            r"unknown keys in the checkpoint \(not part of the expected layout\): "
            r"\['vision_encoder.blocks.0.norm1.weight', 'vision_encoder.cls_token'\]",
        ),
        (lambda c: c["state_dict"], [], "a plain state dict carries no encoder name; pass --encoder."),
        (
            lambda c: randomize_(DiffVQAHead(vis_dim=1152, **SMALL)).state_dict(),
            ["--encoder", "siglip", "--num-heads", "4"],
            "frame_emb.weight, so it is a two-image DiffVQAHead",
        ),
    ],
    ids=[
        "layers",
        "vis-dim",
        "heads",
        "metadata",
        "encoder",
        "contradicting-encoder",
        "contradicting-heads",
        "encoder-weights",
        "plain-without-encoder",
        "diffvqa",
    ],
)
def test_checkpoints_that_disagree_are_refused_in_one_line(tmp_path, capsys, change, options, message):
    head = randomize_(ReportGenerationHead(1152, **SMALL, max_len=16))
    torch.save(change(upstream_report_checkpoint(head, "siglip")), tmp_path / "siglip.pt")
    out = tmp_path / "out"
    assert lapvqa(["convert", "report-generation", str(tmp_path / "siglip.pt"), *options, "--output", str(out)]) == 1
    (error,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert re.search(message, error), error
    assert not out.exists()


def test_a_plain_state_dict_converts_with_the_encoder_named(tmp_path, capsys):
    head = randomize_(ReportGenerationHead(768, **SMALL, max_len=16, tie_weights=True))
    torch.save(head.state_dict(), tmp_path / "coca.pt")
    arguments = ["--encoder", "coca", "--num-heads", "4", "--native", "--no-verify", "--output", str(tmp_path / "out")]
    assert lapvqa(["convert", "report-generation", str(tmp_path / "coca.pt"), *arguments]) == 0
    printed = capsys.readouterr().out
    assert "lm_head tied; no training record" in printed
    assert "the fine-tuned coca encoder is not in this file" in printed
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["encoder_finetuned"] is True and config["training_results"] is None
    assert config["conversion_info"]["assumed_num_attention_heads"] == 4
