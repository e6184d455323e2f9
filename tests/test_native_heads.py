"""Native heads that hold their fine-tuned encoder: a `*-native` file with the encoder's weights beside the head's
(`encoder.*`, in the layout of its recipe's model class) converts into one folder that `AutoModel` loads whole and
whose pipeline runs from images as it is; verify checks the encoder and the head together against the faithful
original; weights that do not fit the recipe's encoder are refused in one line."""

import json
import re

import pytest
import torch
from conftest import WEIGHT_SCALES, randomize_at_scale_, run_with_remote_code, upstream_report_checkpoint
from lapvqa_hf.convert import common as convert_common
from lapvqa_hf.convert.original import DiffVQAHead, ReportGenerationHead, VQAHead
from test_pipelines import tiny_encoder_folder
from transformers import AutoModel, pipeline

from lapvqa_hf.cli import main as lapvqa
from lapvqa_hf.collection import load_collection
from lapvqa_hf.model_card import render_model_card
from lapvqa_hf.models.encoders import RECIPES, EncoderRecipe, load_encoder, load_encoder_image_processor, patch_tokens
from lapvqa_hf.models.image_processing_lapvqa import LapvqaImageProcessor

TINY_HEAD = dict(d_model=32, nhead=4, num_layers=1, dim_feedforward=48)
HEADS = {"diffvqa": DiffVQAHead, "vqa": VQAHead, "report-generation": ReportGenerationHead}


def fine_tuned(encoder: torch.nn.Module, seed: int = 7) -> torch.nn.Module:
    """The off-the-shelf encoder after "training": every weight moved, so that only its own weights reproduce it."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in encoder.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return encoder.eval()


def native_file(kind: str, encoder_name: str, encoder: torch.nn.Module, path, scale: str = "tiny"):
    """An upstream head of `kind` on `encoder_name`'s features (weights at `scale`, see `randomize_at_scale_`),
    saved with `encoder`'s weights under `encoder.`."""
    head = HEADS[kind](RECIPES[encoder_name].vis_dim, max_len=40, **TINY_HEAD)
    randomize_at_scale_(head, scale, ("lm_head.weight",), seed=3)
    weights = {**head.state_dict(), **{f"encoder.{k}": v for k, v in encoder.state_dict().items()}}
    if kind == "report-generation":
        torch.save(upstream_report_checkpoint(head, encoder_name, state_dict=weights), path)
    else:
        torch.save(weights, path)
    return path


def convert(kind: str, encoder_name: str, source, encoder_folder, output, *options) -> int:
    encoder = [] if kind == "report-generation" else ["--encoder", encoder_name, "--num-heads", "4"]
    return lapvqa(
        ["convert", kind, str(source), *encoder, "--encoder-checkpoint", str(encoder_folder), "--native", *options,
         "--output", str(output)]
    )  # fmt: skip


def pipeline_inputs(kind: str, xrays: list[str]):
    if kind == "diffvqa":
        return {"prior_image": xrays[0], "current_image": xrays[1], "question": "what has changed?"}
    return {"image": xrays[1], "question": "is there an effusion?"} if kind == "vqa" else xrays[1]


@pytest.mark.parametrize(
    "kind, encoder_name",
    [("diffvqa", "mae-vit-l16"), ("vqa", "siglip"), ("report-generation", "lapvqa-vit-l14"), ("diffvqa", "coca")],
)
def test_a_native_file_with_its_encoder_converts_into_a_folder_that_runs_from_images(
    kind, encoder_name, tmp_path, xrays, capsys
):
    off_the_shelf = tiny_encoder_folder(encoder_name, tmp_path / "off-the-shelf")
    recipe = EncoderRecipe(**{**RECIPES[encoder_name].__dict__, "checkpoint": str(off_the_shelf)})
    encoder = fine_tuned(load_encoder(recipe))
    source = native_file(kind, encoder_name, encoder, tmp_path / "native.pt")
    assert convert(kind, encoder_name, source, off_the_shelf, tmp_path / "out") == 0
    printed = capsys.readouterr().out
    assert f"the file holds the fine-tuned {encoder_name} encoder too" in printed and "verify passed" in printed

    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["encoder_finetuned"] is True and config["encoder_config"]["model_type"] == encoder.config.model_type
    assert (tmp_path / "out" / "preprocessor_config.json").is_file()  # the encoder's own image processor

    # AutoModel loads head and encoder; the encoder is the file's, not the off-the-shelf one.
    model = AutoModel.from_pretrained(tmp_path / "out", trust_remote_code=True)
    held = model.vision_model.state_dict()
    assert all(torch.equal(held[key], value) for key, value in encoder.state_dict().items())

    # The pipeline needs nothing but the folder, and equals the head fed the fine-tuned encoder's tokens by hand.
    pipe = pipeline(model=str(tmp_path / "out"), trust_remote_code=True)
    assert pipe.encoder is pipe.model.vision_model
    processor = load_encoder_image_processor(recipe)
    pixels = LapvqaImageProcessor().encoder_pixel_values(xrays, processor)
    with torch.no_grad():
        by_hand = patch_tokens(recipe, encoder, pixels)
        assert torch.allclose(pipe.encode(pixels), by_hand, atol=1e-6)
        assert not torch.allclose(patch_tokens(recipe, load_encoder(recipe), pixels), by_hand, atol=1e-3)
    answer = pipe(pipeline_inputs(kind, xrays), max_new_tokens=5)
    named = pipeline(model=str(tmp_path / "out"), trust_remote_code=True, encoder=encoder,
                     encoder_image_processor=processor)  # fmt: skip
    assert answer == named(pipeline_inputs(kind, xrays), max_new_tokens=5)

    # `lapvqa answer` over a file of rows, through the same pipeline.
    row = pipeline_inputs(kind, xrays)
    row = row if isinstance(row, dict) else {"image": row}
    (tmp_path / "rows.jsonl").write_text(json.dumps(row) + "\n")
    arguments = ["--input", tmp_path / "rows.jsonl", "--output", tmp_path / "out.jsonl", "--max-new-tokens", "5"]
    assert lapvqa(["answer", str(tmp_path / "out"), *map(str, arguments), "--device", "cpu"]) == 0
    (written,) = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    expected = answer["answer"] if isinstance(answer, dict) else answer[0]["generated_text"]
    assert written.get("answer", written.get("report")) == expected


@pytest.mark.parametrize("scale", WEIGHT_SCALES)
def test_verify_passes_at_every_weight_scale_judged_relative_to_the_outputs(scale, tmp_path, capsys):
    """Tiny, trained-like (logits of tens) and large (std 3) heads over the fine-tuned encoder: float64 agrees to
    rounding, relative to the logits' scale, and every greedy answer is identical."""
    off_the_shelf = tiny_encoder_folder("lapvqa-vit-l14", tmp_path / "off-the-shelf")
    encoder = fine_tuned(load_encoder(EncoderRecipe(**{**RECIPES["lapvqa-vit-l14"].__dict__,
                                                       "checkpoint": str(off_the_shelf)})))  # fmt: skip
    source = native_file("diffvqa", "lapvqa-vit-l14", encoder, tmp_path / "native.pt", scale=scale)
    assert convert("diffvqa", "lapvqa-vit-l14", source, off_the_shelf, tmp_path / "out") == 0
    (report,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("verify ")]
    assert report.startswith("verify passed") and "greedy answers identical for 3/3 samples" in report
    relative = float(re.search(r"Δlogit\| = \S+, relative (\S+)", report).group(1))
    print(f"{scale}: {report}")  # the closing numbers, with -s
    assert relative < 1e-12


def test_the_folder_runs_from_pixels_as_remote_code_without_the_package(tmp_path):
    """`AutoModel(trust_remote_code=True)` where lapvqa_hf is not installed: the head and its encoder from the folder's
    own files, `pixel_values` in, the same logits and greedy answers as in this process."""
    off_the_shelf = tiny_encoder_folder("lapvqa-vit-l14", tmp_path / "off-the-shelf")
    encoder = fine_tuned(load_encoder(EncoderRecipe(**{**RECIPES["lapvqa-vit-l14"].__dict__,
                                                       "checkpoint": str(off_the_shelf)})))  # fmt: skip
    source = native_file("vqa", "lapvqa-vit-l14", encoder, tmp_path / "native.pt")
    assert convert("vqa", "lapvqa-vit-l14", source, off_the_shelf, tmp_path / "out") == 0
    inputs = {"input_ids": torch.tensor([[11, 12, 13, 50256]] * 2), "pixel_values": torch.randn(2, 3, 224, 224)}
    remote = run_with_remote_code(
        tmp_path / "out", inputs, tmp_path, generate={"max_new_tokens": 4, "do_sample": False}
    )
    local = AutoModel.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    with torch.no_grad():
        assert torch.allclose(remote["outputs"]["logits"], local(**inputs).logits, atol=1e-5)
    assert torch.equal(remote["generated"], local.generate(**inputs, max_new_tokens=4, do_sample=False))


def test_verify_checks_the_encoder_too(tmp_path, monkeypatch, capsys):
    """Were the file's encoder weights left unloaded (the off-the-shelf architecture, random weights), verify fails
    and nothing is written."""
    off_the_shelf = tiny_encoder_folder("mae-vit-l16", tmp_path / "off-the-shelf")
    encoder = fine_tuned(load_encoder(EncoderRecipe(**{**RECIPES["mae-vit-l16"].__dict__,
                                                       "checkpoint": str(off_the_shelf)})))  # fmt: skip
    source = native_file("diffvqa", "mae-vit-l16", encoder, tmp_path / "native.pt")
    monkeypatch.setattr(convert_common, "load_held_encoder", lambda model, state: None)
    assert convert("diffvqa", "mae-vit-l16", source, off_the_shelf, tmp_path / "out") == 1
    captured = capsys.readouterr()
    assert "verify FAILED" in captured.out + captured.err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "change, expected",
    [
        ("extra", "1 unexpected tensor (e.g. encoder.surprise.weight)"),
        ("missing", "1 missing tensor (e.g. encoder.layernorm.weight)"),
        ("misshapen", "1 misshapen tensor (e.g. encoder.layernorm.weight)"),
    ],
)
def test_encoder_weights_that_do_not_fit_the_recipe_are_refused_in_one_line(change, expected, tmp_path, capsys):
    off_the_shelf = tiny_encoder_folder("mae-vit-l16", tmp_path / "off-the-shelf")
    encoder = load_encoder(EncoderRecipe(**{**RECIPES["mae-vit-l16"].__dict__, "checkpoint": str(off_the_shelf)}))
    source = native_file("vqa", "mae-vit-l16", encoder, tmp_path / "native.pt")
    weights = torch.load(source, weights_only=True)
    if change == "extra":
        weights["encoder.surprise.weight"] = torch.zeros(2)
    elif change == "missing":
        weights.pop("encoder.layernorm.weight")
    else:
        weights["encoder.layernorm.weight"] = torch.zeros(3)
    torch.save(weights, source)
    capsys.readouterr()
    assert convert("vqa", "mae-vit-l16", source, off_the_shelf, tmp_path / "out") == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: the file's encoder.* weights do not fit a ViTMAEModel")
    assert expected in error and "\n" not in error and "--encoder-checkpoint" in error
    assert not (tmp_path / "out").exists()


def test_the_card_of_a_folder_that_holds_its_encoder_says_it_needs_nothing_else():
    collection = load_collection()
    (entry,) = collection.select(["lapvqa-diffvqa-native-mae-vit-l16"])
    holding = render_model_card(entry, collection, {"assumptions": []}, holds_encoder=True).text
    assert "and the upstream file holds both: so does" in holding and "(a `ViTMAEModel`" not in holding
    assert "refuses to run from images" not in holding and "the pipeline needs nothing else" in holding
    head_alone = render_model_card(entry, collection, {"assumptions": []}).text
    assert "the pipeline refuses to run from images" in head_alone
    assert "lapvqa convert diffvqa FILE --native --encoder-checkpoint FINE_TUNED_ENCODER" in head_alone
