"""Fine-tuning the captioning decoder on stored encoder features: `image_features` is the pixel path without the
encoder, a tiny decoder learns the synthetic reports, and the saved model reports from pixels too.

The training loop is the one `test_train.py` runs for DiffVQA (2 processes, kill and resume); here it runs with the
captioning task, whose model state (the decoder, without the frozen encoder) is resumed exactly as well.
"""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import TINY_DECODER, kill_after_the_first_checkpoint
from safetensors.torch import load_file
from transformers import AutoModel, AutoProcessor

from lapvqa_hf import LapvqaCaptioningConfig, LapvqaCaptioningModel, LapvqaVisionConfig, LapvqaVisionModel
from lapvqa_hf.data import load_mimic_cxr_reports, write_synthetic_mimic_diff_vqa
from lapvqa_hf.features import FeatureError, FeatureStore, extract_features, images_of, recipe_for
from lapvqa_hf.models.image_processing_lapvqa import LapvqaImageProcessor
from lapvqa_hf.train import ReportExamples, TrainConfig, report_collate, report_split, train

TINY_ENCODER = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48, image_size=28)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A synthetic release, a tiny encoder saved as a folder, and its features of every report's frontal image."""
    base = tmp_path_factory.mktemp("captioning")
    root = write_synthetic_mimic_diff_vqa(base / "mimic", num_subjects=10)
    rows = [row for split in load_mimic_cxr_reports(root).values() for row in split]
    torch.manual_seed(0)
    encoder = LapvqaVisionModel(LapvqaVisionConfig(**TINY_ENCODER)).eval()
    encoder.save_pretrained(base / "encoder")
    LapvqaImageProcessor(size={"height": 28, "width": 28}, resize_mode="stretch").save_pretrained(
        base / "encoder"
    )  # its own processor
    # What `lapvqa extract-features --encoder lapvqa-vit-l14 --checkpoint <folder>` records.
    recipe = dataclasses.replace(
        recipe_for("lapvqa-vit-l14"), image_size=28, vis_dim=32, checkpoint=str(base / "encoder")
    )
    extract_features(images_of(rows, root=root.resolve()), recipe, base / "features", encoder=encoder, progress=False)
    return base


pytestmark = pytest.mark.usefixtures("one_torch_thread", "fresh_accelerator_state")


def config_for(base: Path, output: Path, **changes) -> TrainConfig:
    values = dict(
        data_root=str(base / "mimic"),
        features_dir=str(base / "features"),
        output_dir=str(output),
        task="captioning",
        model=TINY_DECODER,
        learning_rate=0.02,
        warmup_steps=10,
        max_steps=120,
        batch_size=4,
        checkpoint_every=1000,
        eval_every=1000,
        eval_max_new_tokens=48,
    )
    return TrainConfig(**(values | changes))


def tiny_captioning_model(seed: int = 0) -> LapvqaCaptioningModel:
    torch.manual_seed(seed)
    config = LapvqaCaptioningConfig(vision_config=TINY_ENCODER, **TINY_DECODER)
    return LapvqaCaptioningModel(config).eval()


def test_image_features_give_the_pixel_paths_logits_and_reports():
    model = tiny_captioning_model()
    pixels = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        patch_tokens = model.vision_model(pixels).last_hidden_state
        text = torch.randint(0, 50256, (3, 9))
        assert torch.equal(
            model(input_ids=text, pixel_values=pixels).logits, model(input_ids=text, image_features=patch_tokens).logits
        )
    bos = torch.full((3, 1), 50256)
    common = dict(input_ids=bos, attention_mask=torch.ones_like(bos), max_new_tokens=8, min_new_tokens=8)
    from_pixels = model.generate(pixel_values=pixels, do_sample=False, **common)
    for extra in ({}, {"cache_implementation": "static"}, {"num_beams": 2}):
        expected = from_pixels if not extra else model.generate(pixel_values=pixels, **extra, **common)
        assert torch.equal(model.generate(image_features=patch_tokens, **extra, **common), expected), extra
    with pytest.raises(ValueError, match="Got both pixel_values and image_features: pass exactly one"):
        model(input_ids=bos, pixel_values=pixels, image_features=patch_tokens)
    with pytest.raises(ValueError, match="Missing pixel_values or image_features"):
        model(input_ids=bos)
    with pytest.raises(ValueError, match=r"shape \[batch, num_patches, 32\].*got \[3, 4, 16\]"):
        model(input_ids=bos, image_features=patch_tokens[..., :16])


def test_report_batches_score_the_report_and_its_eos(gpt2_tokenizer):
    collate = report_collate(gpt2_tokenizer, max_positions=6)
    batch = collate(
        [
            {"image_features": torch.zeros(4, 32), "report": "No effusion."},
            {"image_features": torch.ones(4, 32), "report": "A large right pleural effusion is seen."},
        ]
    )
    short = gpt2_tokenizer("No effusion.", add_special_tokens=False)["input_ids"]
    assert batch["input_ids"][0].tolist() == [50256, *short, 50256] + [50256] * (6 - len(short) - 2)
    assert batch["labels"][0].tolist() == [50256, *short, 50256] + [-100] * (6 - len(short) - 2)
    assert batch["attention_mask"].tolist()[1] == [1] * 6, "a long report is cut to the model's positions"
    assert batch["image_features"].shape == (2, 4, 32)


def test_a_tiny_decoder_learns_the_synthetic_reports_and_the_saved_model_reports_from_pixels(prepared, tmp_path):
    result = train(config_for(prepared, tmp_path / "run"))  # 120 steps, validated and saved at the last
    losses = result["losses"]
    assert losses[0] > 10 and losses[-1] < 0.1, (losses[0], losses[-1])
    assert result["best"]["scores"]["overall"]["bleu4"] > 0.8

    best = tmp_path / "run" / "best"
    model = AutoModel.from_pretrained(best).eval()
    processor = AutoProcessor.from_pretrained(best)
    assert type(model) is LapvqaCaptioningModel and model.config.feature_recipe["vis_dim"] == 32
    assert model.config.report_sections == ["findings", "impression"]
    encoder = LapvqaVisionModel.from_pretrained(prepared / "encoder")
    saved_encoder = model.vision_model.state_dict()
    assert all(torch.equal(saved_encoder[k], v) for k, v in encoder.state_dict().items()), "the features' encoder"
    assert (processor.image_processor.size, processor.image_processor.resize_mode) == (
        {"height": 28, "width": 28},
        "stretch",
    )

    rows = load_mimic_cxr_reports(prepared / "mimic")["train"]
    examples = ReportExamples(rows, FeatureStore(prepared / "features"), (prepared / "mimic").resolve())
    from_features = report_split(model, processor.tokenizer, examples, batch_size=6, max_new_tokens=48)
    reproduced = sum(r == row["report"] for r, row in zip(from_features, rows, strict=True))
    assert reproduced >= 10, f"only {reproduced}/{len(rows)} training reports reproduced"
    inputs = processor(images=list(rows["image"]))
    generated = model.generate(**inputs, max_new_tokens=48, do_sample=False)
    from_pixels = [r.strip() for r in processor.batch_decode(generated[:, 1:], skip_special_tokens=True)]
    assert from_pixels == from_features


def test_a_killed_captioning_run_resumes_to_the_uninterrupted_result(prepared, tmp_path, monkeypatch):
    settings = dict(max_steps=8, gradient_accumulation_steps=2, batch_size=3, checkpoint_every=4)
    uninterrupted = train(config_for(prepared, tmp_path / "a", **settings))
    AcceleratorState._reset_state(True)
    kill_after_the_first_checkpoint(lambda: train(config_for(prepared, tmp_path / "b", **settings)), monkeypatch)
    resumed = train(config_for(prepared, tmp_path / "b", **settings))

    assert resumed["losses"] == uninterrupted["losses"][4:]
    a = load_file(tmp_path / "a" / "checkpoints" / "step-8" / "model.safetensors")
    b = load_file(tmp_path / "b" / "checkpoints" / "step-8" / "model.safetensors")
    assert not any(k.startswith("vision_model.") for k in a), "the frozen encoder stays out of the checkpoints"
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_evaluate_cli_scores_a_captioning_model(prepared, tmp_path, capsys):
    from lapvqa_hf.cli import main as lapvqa

    train(config_for(prepared, tmp_path / "run", max_steps=10, eval_every=10))
    args = [
        "evaluate",
        str(tmp_path / "run" / "best"),
        "--data-root",
        str(prepared / "mimic"),
        "--features",
        str(prepared / "features"),
        "--split",
        "validation",
        "--max-new-tokens",
        "48",
        "--output",
        str(tmp_path / "scores.json"),
    ]
    assert lapvqa(args) == 0
    printed = capsys.readouterr().out
    assert "| reports | n | bleu1 | bleu2 | bleu3 | bleu4 | rouge1 | rougeL | cider |" in printed
    assert "| overall | 4 |" in printed
    saved = json.loads((tmp_path / "scores.json").read_text())
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    assert saved["scores"]["overall"]["cider"] == pytest.approx(best["scores"]["overall"]["cider"])
    assert len(saved["answers"]) == len(saved["references"]) == 4


def test_captioning_needs_features_of_its_own_encoder(prepared, tmp_path):
    siglip = {"recipe": dataclasses.asdict(dataclasses.replace(recipe_for("siglip"), vis_dim=32)), "shards": []}
    (tmp_path / "features.json").write_text(json.dumps(siglip))
    with pytest.raises(FeatureError, match="extract features with `lapvqa extract-features --encoder lapvqa-vit-l14`"):
        train(config_for(prepared, tmp_path / "x", features_dir=str(tmp_path)))
    other = LapvqaVisionModel(LapvqaVisionConfig(**(TINY_ENCODER | {"hidden_size": 64})))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(FeatureError, match="gives 64-dim tokens of 28 px images, but the features .* are 32-dim"):
        train(config_for(prepared, tmp_path / "y", vision_encoder=str(tmp_path / "other")))
    with pytest.raises(OSError, match="Set `vision_encoder` to that LapvqaVisionModel's folder"):
        train(config_for(prepared, tmp_path / "z", vision_encoder=str(tmp_path / "absent")))
    with pytest.raises(ValueError, match="eval_max_new_tokens=100 exceeds the model's 64 learned positions"):
        train(config_for(prepared, tmp_path / "w", eval_max_new_tokens=100))
    with pytest.raises(ValueError, match="task='segmentation': expected one of"):
        train(config_for(prepared, tmp_path / "v", task="segmentation"))


# --- from pixels: the encoder in the loop -----------------------------------------------------------------------


def pixel_config(base: Path, output: Path, **changes) -> TrainConfig:
    values = dict(inputs="pixels", features_dir=None, vision_encoder=str(base / "encoder"), max_steps=6, batch_size=3)
    return config_for(base, output, **(values | changes))


def saved_weights(folder: Path, prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(folder / "model.safetensors").items() if k.startswith(prefix)}


@pytest.mark.parametrize("train_encoder", [False, True], ids=["encoder frozen", "encoder trained"])
def test_captioning_trains_from_pixels_with_its_encoder_in_the_loop(prepared, tmp_path, train_encoder):
    result = train(pixel_config(prepared, tmp_path / "run", train_encoder=train_encoder, eval_every=6))
    assert result["steps"] == 6 and all(torch.isfinite(torch.tensor(result["losses"])))
    assert result["losses"][-1] < result["losses"][0]
    best = tmp_path / "run" / "best"
    encoder = {
        f"vision_model.{k}": v for k, v in LapvqaVisionModel.from_pretrained(prepared / "encoder").state_dict().items()
    }
    saved = saved_weights(best, "vision_model.")
    unchanged = [k for k, v in encoder.items() if torch.equal(saved[k], v)]
    if train_encoder:
        assert len(unchanged) < len(encoder) / 2, "the encoder learned"
    else:
        assert len(unchanged) == len(encoder), "the frozen encoder is saved as it was"
    model, processor = AutoModel.from_pretrained(best).eval(), AutoProcessor.from_pretrained(best)
    assert model.config.feature_recipe is None and model.config.report_sections == ["findings", "impression"]
    rows = load_mimic_cxr_reports(prepared / "mimic")["validation"]
    generated = model.generate(**processor(images=list(rows["image"])), max_new_tokens=4, do_sample=False)
    assert generated.shape[0] == len(rows)


def test_gradient_checkpointing_trains_to_the_same_losses(prepared, tmp_path):
    plain = train(pixel_config(prepared, tmp_path / "a", train_encoder=True, max_steps=3))
    AcceleratorState._reset_state(True)
    checkpointed = train(
        pixel_config(prepared, tmp_path / "b", train_encoder=True, max_steps=3, gradient_checkpointing=True)
    )
    torch.testing.assert_close(torch.tensor(checkpointed["losses"]), torch.tensor(plain["losses"]), rtol=1e-5, atol=0)


def test_a_killed_pixel_run_resumes_to_the_uninterrupted_result(prepared, tmp_path, monkeypatch):
    settings = dict(train_encoder=True, max_steps=4, checkpoint_every=2)
    uninterrupted = train(pixel_config(prepared, tmp_path / "a", **settings))
    AcceleratorState._reset_state(True)
    kill_after_the_first_checkpoint(lambda: train(pixel_config(prepared, tmp_path / "b", **settings)), monkeypatch)
    resumed = train(pixel_config(prepared, tmp_path / "b", **settings))
    assert resumed["losses"] == uninterrupted["losses"][2:]
    a = load_file(tmp_path / "a" / "checkpoints" / "step-4" / "model.safetensors")
    b = load_file(tmp_path / "b" / "checkpoints" / "step-4" / "model.safetensors")
    assert any(k.startswith("vision_model.") for k in a), "the trained encoder is part of the checkpoints"
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pixel_inputs_are_refused_where_they_cannot_work(prepared, tmp_path):
    from lapvqa_hf.train import TrainConfigError, config_problems

    with pytest.raises(TrainConfigError) as raised:
        pixel_config(prepared, tmp_path / "run", vision_encoder=None)
    assert raised.value.problems == [
        "inputs=pixels: name the encoder to train from: vision_encoder (a LapvqaVisionModel) or init_from."
    ]
    assert config_problems({"task": "detection", "inputs": "pixels", "best_metric": "map50"}) == [
        "inputs=pixels: task detection trains on stored features only (its frozen encoder is not part of its model); "
        "set inputs to features."
    ]
    assert config_problems({"task": "captioning", "train_encoder": True}) == [
        "train_encoder: only used with inputs pixels (stored features have no encoder to train)."
    ]
    with pytest.raises(TrainConfigError) as raised:
        config_for(prepared, tmp_path / "run", features_dir=None)
    assert raised.value.problems == [
        "features_dir: required with inputs features; run `lapvqa extract-features` and name its folder."
    ]


def test_an_unreadable_training_image_stops_training_naming_it(prepared, tmp_path):
    import shutil

    from lapvqa_hf.data import DataError

    release = tmp_path / "mimic"
    shutil.copytree(prepared / "mimic", release)
    image = load_mimic_cxr_reports(release)["train"][0]["image"]
    Path(image).write_bytes(b"not an image")
    with pytest.raises(DataError, match=f"{image}: cannot be read"):
        train(pixel_config(prepared, tmp_path / "run", data_root=str(release)))
