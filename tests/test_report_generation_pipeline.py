"""Report generation from chest X-ray images: the pipeline (through the head's frozen encoder), `lapvqa answer` with
an `image` column and heat maps, remote code without the package, the "native" heads that need their fine-tuned
encoder named, and the collection's cards for both repos."""

import json

import numpy as np
import pytest
import torch
from conftest import run_without_lapvqa_hf, upstream_report_checkpoint
from lapvqa_hf.convert.original import ReportGenerationHead, randomize_
from PIL import Image
from test_pipelines import REMOTE_PIPELINE, manual_tokens, tiny_encoder_folder
from transformers import AutoModel, pipeline

from lapvqa_hf import LapvqaImageProcessor, LapvqaVisionModel
from lapvqa_hf.cli import main as lapvqa
from lapvqa_hf.collection import load_collection
from lapvqa_hf.model_card import render_model_card, usage_snippet
from lapvqa_hf.tokenization import build_gpt2_tokenizer

SPECIAL = 50256
TINY_HEAD = dict(d_model=32, nhead=4, num_layers=1, dim_feedforward=48, max_len=40)


@pytest.fixture(scope="module")
def encoder_folder(tmp_path_factory):
    """The frozen encoder: a tiny `LapvqaVisionModel` of the lapvqa-vit-l14 recipe's width (16 patch tokens)."""
    return tiny_encoder_folder("lapvqa-vit-l14", tmp_path_factory.mktemp("encoder"))


def convert(folder, encoder_folder, *options) -> str:
    """A random head's upstream checkpoint (lapvqa-vit-l14 features), converted into `folder / "rrg"` (without
    verify, which tests/test_report_generation.py tests)."""
    head = randomize_(ReportGenerationHead(1024, **TINY_HEAD), seed=3)
    torch.save(upstream_report_checkpoint(head, "lapvqa-vit-l14"), folder / "head.pt")
    encoder = ["--encoder-checkpoint", str(encoder_folder)] if encoder_folder is not None else []
    output = folder / "rrg"
    assert (
        lapvqa(
            [
                "convert",
                "report-generation",
                str(folder / "head.pt"),
                *encoder,
                *options,
                "--no-verify",
                "--output",
                str(output),
            ]
        )
        == 0
    )
    return str(output)


@pytest.fixture(scope="module")
def rrg_folder(tmp_path_factory, encoder_folder):
    return convert(tmp_path_factory.mktemp("rrg"), encoder_folder)


def reports_from_features(model, image_features: torch.Tensor, max_new_tokens: int = 6) -> list[str]:
    bos = torch.full((len(image_features), 1), SPECIAL)
    generated = model.generate(
        input_ids=bos, attention_mask=torch.ones_like(bos), image_features=image_features,
        max_new_tokens=max_new_tokens, do_sample=False,
    )  # fmt: skip
    return [text.strip() for text in build_gpt2_tokenizer().batch_decode(generated[:, 1:], skip_special_tokens=True)]


def test_the_pipeline_reports_as_the_manual_path_one_by_one_and_batched(rrg_folder, xrays):
    pipe = pipeline(model=rrg_folder, trust_remote_code=True)
    assert type(pipe).__name__ == "LapvqaReportGenerationPipeline"
    expected = [reports_from_features(pipe.model, manual_tokens(rrg_folder, [image]))[0] for image in xrays]
    assert pipe(xrays[0], max_new_tokens=6) == [{"generated_text": expected[0]}]
    assert pipe(xrays, max_new_tokens=6, batch_size=2) == [[{"generated_text": text}] for text in expected]
    beams = pipe(xrays[1], max_new_tokens=6, num_beams=3, num_return_sequences=2)
    assert len(beams) == 2 and all(set(beam) == {"generated_text"} for beam in beams)

    # The batch methods `lapvqa answer` calls: images encoded once, `[bos]` prompts.
    encoded = pipe.encode(torch.cat([pipe.prepare_image(image)[0] for image in xrays]))
    generated = pipe.generate_texts([pipe.prompt_ids()] * 3, {"image_features": encoded}, max_new_tokens=6)
    assert generated.texts == expected and generated.prompt_attention_mask.tolist() == [[1]] * 3


def test_a_native_head_runs_from_images_only_with_its_fine_tuned_encoder(tmp_path, rrg_folder, encoder_folder, xrays):
    native = convert(tmp_path, None, "--native")  # the same head, its fine-tuned encoder not named
    config = json.loads(open(f"{native}/config.json").read())
    assert config["encoder_finetuned"] is True and config["feature_recipe"]["checkpoint"] == "dmusingu/lapvqa-vit-l14"
    with pytest.raises(ValueError, match="trained with its lapvqa-vit-l14 encoder fine-tuned") as refused:
        pipeline(model=native, trust_remote_code=True)
    assert "\n" not in str(refused.value) and "--encoder-checkpoint" in str(refused.value)
    assert "`encoder=`" in str(refused.value)

    (tmp_path / "rows.csv").write_text(f"image\n{xrays[0]}\n")
    arguments = ["--input", str(tmp_path / "rows.csv"), "--output", str(tmp_path / "out.jsonl"), "--device", "cpu"]
    assert lapvqa(["answer", native, *arguments]) == 1 and not (tmp_path / "out.jsonl").exists()

    # From the fine-tuned encoder's features the model runs as it is.
    frozen = pipeline(model=rrg_folder, trust_remote_code=True)
    tokens = manual_tokens(rrg_folder, [xrays[2]])
    assert reports_from_features(AutoModel.from_pretrained(native), tokens) == reports_from_features(
        frozen.model, tokens
    )
    # Named at run time (a loaded encoder) or at conversion (`--encoder-checkpoint`), it runs from images.
    named = pipeline(
        model=native, trust_remote_code=True, encoder=LapvqaVisionModel.from_pretrained(encoder_folder),
        encoder_image_processor=LapvqaImageProcessor.from_pretrained(encoder_folder),
    )  # fmt: skip
    assert named(xrays[2], max_new_tokens=6) == frozen(xrays[2], max_new_tokens=6)
    (tmp_path / "named").mkdir()
    converted = convert(tmp_path / "named", encoder_folder, "--native")
    assert json.loads(open(f"{converted}/config.json").read())["encoder_finetuned"] is True
    assert pipeline(model=converted, trust_remote_code=True)(xrays[2], max_new_tokens=6) == frozen(
        xrays[2], max_new_tokens=6
    )


def test_lapvqa_answer_writes_each_images_report_and_its_heat_map(rrg_folder, xrays, tmp_path):
    names = [image.rsplit("/", 1)[1] for image in xrays]
    (tmp_path / "rows.csv").write_text("image\n" + "\n".join([*names, "missing.png"]) + "\n")
    root = xrays[0].rsplit("/", 1)[0]
    arguments = ["--input", str(tmp_path / "rows.csv"), "--output", str(tmp_path / "out.jsonl"), "--image-root", root]
    arguments += ["--save-maps", str(tmp_path / "maps"), "--max-new-tokens", "6", "--device", "cpu"]
    assert lapvqa(["answer", rrg_folder, *arguments]) == 0
    found = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    pipe = pipeline(model=rrg_folder, trust_remote_code=True)
    for line, image in zip(found, xrays, strict=False):
        assert line["report"] == pipe(image, max_new_tokens=6)[0]["generated_text"]
        width, height = Image.open(line["map"]).size
        assert width == 320 and height > 340, "the image with its heat map, the report below"
    assert found[3]["error"].endswith("missing.png: no such image file.")


def test_the_remote_code_pipeline_reports_without_the_package(rrg_folder, xrays, tmp_path):
    expected = pipeline(model=rrg_folder, trust_remote_code=True)(xrays[1], max_new_tokens=6)
    result = run_without_lapvqa_hf(REMOTE_PIPELINE, [rrg_folder, json.dumps(xrays[1])], tmp_path)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == expected


def test_the_cards_say_what_a_native_folder_needs_and_their_snippet_runs(rrg_folder, tmp_path, monkeypatch):
    collection = load_collection()
    native, frozen = collection.select(["lapvqa-rrg-native-mae-vit-l16", "lapvqa-rrg-clip-vit-l14"])
    assert (native.encoder_finetuned, frozen.encoder_finetuned) == (True, False)
    assert (native.source.filename, native.source.filename_assumed, frozen.source.filename_assumed) == (
        "mae-vit-l16.pt",
        False,
        True,
    )
    card = render_model_card(native, collection, {"assumptions": ["report layout"]}).text
    assert "## The fine-tuned encoder" in card and "the pipeline refuses to run from images" in card
    assert "--native --encoder-checkpoint FINE_TUNED_ENCODER" in card and "(a `ViTMAEModel`)" in card
    assert "| BLEU-4 | 0.032 |" in card and "| ROUGE-L | 0.164 |" in card and "| RadGraph-s | 0.195 |" in card
    assert "which this repo does not hold" in usage_snippet(native)
    assert "The fine-tuned encoder" not in render_model_card(frozen, collection, {"assumptions": []}).text

    Image.fromarray((np.random.default_rng(1).random((60, 50)) * 255).astype(np.uint8)).save(
        tmp_path / "chest_xray.png"
    )
    monkeypatch.chdir(tmp_path)
    code = usage_snippet(frozen).replace(f'"{frozen.repo_id}"', f'"{rrg_folder}"')
    exec(compile(code, "card snippet (lapvqa-rrg-clip-vit-l14)", "exec"), {})
