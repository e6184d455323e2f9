"""The "native" recipe: a DiffVQA or report-generation head trained from images with its encoder in the loop
(inputs "pixels"), fine-tuned with `train_encoder` or frozen; the saved folder holds that encoder and its image
processor and runs from images through its pipeline as it is."""

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_DECODER
from safetensors.torch import load_file
from test_pipelines import tiny_encoder_folder
from transformers import pipeline

from lapvqa_hf import LapvqaDiffVQAConfig, LapvqaDiffVQAModel
from lapvqa_hf.cli import main as lapvqa
from lapvqa_hf.data import load_mimic_cxr_reports, load_mimic_diff_vqa, write_synthetic_mimic_diff_vqa
from lapvqa_hf.models.encoders import RECIPES, EncoderRecipe, load_encoder, patch_tokens
from lapvqa_hf.models.image_processing_lapvqa import LapvqaImageProcessor
from lapvqa_hf.train import TrainConfig, TrainConfigError, config_problems, train

pytestmark = pytest.mark.usefixtures("fresh_accelerator_state", "one_torch_thread")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A synthetic MIMIC-Diff-VQA release (with its MIMIC-CXR reports) and a tiny off-the-shelf encoder folder of the
    lapvqa-vit-l14 recipe (1024 wide, 16 patch tokens)."""
    base = tmp_path_factory.mktemp("native")
    write_synthetic_mimic_diff_vqa(base / "mimic", num_subjects=6)
    tiny_encoder_folder("lapvqa-vit-l14", base / "encoder")
    return base


def native_config(base: Path, output: Path, **changes) -> TrainConfig:
    values = dict(
        task="diffvqa", data_root=str(base / "mimic"), output_dir=str(output), inputs="pixels", features_dir=None,
        encoder="lapvqa-vit-l14", encoder_checkpoint=str(base / "encoder"), model=TINY_DECODER, learning_rate=0.01,
        warmup_steps=1, max_steps=4, batch_size=3, checkpoint_every=4, eval_every=4, eval_max_new_tokens=4,
    )  # fmt: skip
    return TrainConfig(**(values | changes))


def off_the_shelf(base: Path) -> torch.nn.Module:
    return load_encoder(EncoderRecipe(**{**RECIPES["lapvqa-vit-l14"].__dict__, "checkpoint": str(base / "encoder")}))


@pytest.mark.parametrize("train_encoder", [True, False], ids=["encoder fine-tuned", "encoder frozen"])
def test_a_diffvqa_head_trained_from_images_runs_from_images_through_its_pipeline(prepared, tmp_path, train_encoder):
    result = train(native_config(prepared, tmp_path / "run", train_encoder=train_encoder))
    assert result["steps"] == 4 and all(torch.isfinite(torch.tensor(result["losses"])))
    assert result["losses"][-1] < result["losses"][0]
    best = tmp_path / "run" / "best"
    config = json.loads((best / "config.json").read_text())
    assert config["encoder_finetuned"] is train_encoder and config["encoder_config"]["hidden_size"] == 1024
    assert config["feature_recipe"]["checkpoint"] == str(prepared / "encoder")
    assert (best / "preprocessor_config.json").is_file()

    start = {f"vision_model.{k}": v for k, v in off_the_shelf(prepared).state_dict().items()}
    saved = {k: v for k, v in load_file(best / "model.safetensors").items() if k.startswith("vision_model.")}
    unchanged = [k for k, v in start.items() if torch.equal(saved[k], v)]
    if train_encoder:
        assert len(unchanged) < len(start) / 2, "the encoder learned with the head"
    else:
        assert len(unchanged) == len(start), "the frozen encoder is saved as it was"

    # The folder runs from images as it is: the pipeline uses the encoder it holds, as a user would by hand.
    row = load_mimic_diff_vqa(prepared / "mimic")["validation"][0]
    pipe = pipeline(model=str(best), trust_remote_code=True)
    assert pipe.encoder is pipe.model.vision_model
    answer = pipe({"prior_image": row["prior_image"], "current_image": row["current_image"],
                   "question": row["question"]}, max_new_tokens=4)  # fmt: skip
    pixels = LapvqaImageProcessor().encoder_pixel_values([row["prior_image"], row["current_image"]],
                                                       LapvqaImageProcessor.from_pretrained(best))  # fmt: skip
    prompt = pipe.prompt_ids(row["question"])
    with torch.no_grad():
        generated = pipe.model.generate(
            input_ids=torch.tensor([prompt]), prior_pixel_values=pixels[:1], current_pixel_values=pixels[1:],
            max_new_tokens=4, do_sample=False,
        )  # fmt: skip
        tokens = patch_tokens(pipe.recipe, pipe.model.vision_model, pixels)
        assert torch.equal(tokens, pipe.encode(pixels))
        if train_encoder:  # the fine-tuned encoder, not the off-the-shelf one, feeds the head
            assert not torch.allclose(tokens, patch_tokens(pipe.recipe, off_the_shelf(prepared), pixels), atol=1e-3)
    assert answer == {"answer": pipe.tokenizer.decode(generated[0, len(prompt) :], skip_special_tokens=True).strip()}

    if train_encoder:  # `lapvqa evaluate` without features scores from the images, as training validated
        evaluate = ["evaluate", str(best), "--data-root", str(prepared / "mimic"), "--split", "validation"]
        options = ["--max-new-tokens", "4", "--batch-size", "3", "--output", str(tmp_path / "scores.json")]
        assert lapvqa([*evaluate, *options]) == 0
        scores = json.loads((tmp_path / "scores.json").read_text())["scores"]["overall"]
        assert scores == pytest.approx(json.loads((tmp_path / "run" / "best.json").read_text())["scores"]["overall"])


def test_evaluate_without_features_needs_a_model_that_holds_its_encoder(prepared, tmp_path, capsys):
    LapvqaDiffVQAModel(LapvqaDiffVQAConfig(vis_dim=1024, **TINY_DECODER)).save_pretrained(tmp_path / "head")
    assert lapvqa(["evaluate", str(tmp_path / "head"), "--data-root", str(prepared / "mimic")]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.endswith("holds no encoder to read the images with; name the features of its encoder "
                          "(`lapvqa extract-features`).")  # fmt: skip


def test_a_report_head_fine_tuned_with_its_encoder_reports_from_images(prepared, tmp_path):
    model = dict(TINY_DECODER, max_position_embeddings=40)
    result = train(native_config(prepared, tmp_path / "run", task="report-generation", train_encoder=True, model=model))
    assert result["losses"][-1] < result["losses"][0]
    best = tmp_path / "run" / "best"
    assert json.loads((best / "config.json").read_text())["encoder_finetuned"] is True
    image = load_mimic_cxr_reports(prepared / "mimic")["validation"][0]["image"]
    reports = pipeline(model=str(best), trust_remote_code=True)(image, max_new_tokens=4)
    assert len(reports) == 1 and set(reports[0]) == {"generated_text"}


def test_a_native_run_starts_from_a_head_folder_and_keeps_its_encoder(prepared, tmp_path):
    """`init_from` a folder that holds its encoder: training goes on with that encoder (no `encoder` needed)."""
    first = train(native_config(prepared, tmp_path / "first", train_encoder=True, max_steps=2, checkpoint_every=2))
    assert first["steps"] == 2
    values = dict(init_from=str(tmp_path / "first" / "best"), encoder=None, encoder_checkpoint=None, model={})
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    second = train(native_config(prepared, tmp_path / "second", train_encoder=True, max_steps=2, **values))
    assert second["steps"] == 2
    first_weights = load_file(tmp_path / "first" / "best" / "model.safetensors")
    second_weights = load_file(tmp_path / "second" / "best" / "model.safetensors")
    assert first_weights.keys() == second_weights.keys()
    with pytest.raises(ValueError, match="remove encoder"):
        AcceleratorState._reset_state(True)
        train(native_config(prepared, tmp_path / "third", max_steps=2, **(values | {"encoder": "siglip"})))


def test_the_native_options_are_refused_where_they_cannot_work(prepared, tmp_path):
    with pytest.raises(TrainConfigError) as raised:
        native_config(prepared, tmp_path / "run", encoder=None)
    assert raised.value.problems == [
        "inputs=pixels: name the encoder the head learns with (encoder, one of "
        f"{', '.join(RECIPES)}) or a head to start from (init_from)."
    ]
    assert config_problems({"task": "diffvqa", "encoder": "siglip"}) == [
        "encoder: only used with inputs pixels (the stored features name their encoder); remove it."
    ]
    assert config_problems({"task": "detection", "encoder": "siglip", "best_metric": "map50"}) == [
        "encoder: only used with task diffvqa or report-generation; remove it."
    ]
