"""The demo Space (`spaces/lapvqa`) without a browser: its tabs follow the kind registry, each tab's run gives what
the model's pipeline and `lapvqa answer --save-maps` give, models load once, and every failure is one line."""

import re
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from lapvqa_hf.convert.original import DetectionHead, DiffVQAHead, ReportGenerationHead, VQAHead, randomize_
from PIL import Image
from test_image_processing import write_dicom
from test_pipelines import QUESTIONS, TINY_HEAD, convert, tiny_clip_folder
from transformers import pipeline

from lapvqa_hf.cli import main as lapvqa
from lapvqa_hf.collection import load_collection
from lapvqa_hf.kinds import KINDS

ROOT = Path(__file__).resolve().parents[1]
SPACE = ROOT / "spaces" / "lapvqa"
sys.path.insert(0, str(SPACE))

from lapvqa_space import NOTICE, Models, SpaceError, collection_models, registered_tasks, run  # noqa: E402

TASKS = {task.title: task for task in registered_tasks()}


@pytest.fixture(scope="module")
def xrays(tmp_path_factory) -> dict[str, str]:
    """What users upload: an 8-bit PNG, a 16-bit PNG, a DICOM, and a file that is no image."""
    folder = tmp_path_factory.mktemp("uploads")
    generator = np.random.default_rng(3)
    Image.fromarray(generator.integers(0, 255, (60, 50), dtype=np.uint8)).save(folder / "prior.png")
    Image.fromarray(generator.integers(200, 3000, (56, 64), dtype=np.uint16)).save(folder / "current16.png")
    write_dicom(folder / "current.dcm", generator.integers(0, 4096, (48, 40)), "MONOCHROME1", window=(2048, 4096))
    (folder / "broken.png").write_bytes(b"not a png at all")
    return {path.stem: str(path) for path in folder.iterdir()}


@pytest.fixture(scope="module")
def clip_encoder(tmp_path_factory):
    return tiny_clip_folder(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="module")
def diffvqa_folder(tmp_path_factory, clip_encoder) -> str:
    head = DiffVQAHead(vis_dim=1024, **TINY_HEAD)
    return convert("diffvqa", head, tmp_path_factory.mktemp("diffvqa"), clip_encoder, "--num-heads", "4")


@pytest.fixture(scope="module")
def vqa_folder(tmp_path_factory, clip_encoder) -> str:
    head = VQAHead(vis_dim=1024, **TINY_HEAD)
    return convert("vqa", head, tmp_path_factory.mktemp("vqa"), clip_encoder, "--num-heads", "4")


def heat(picture: Image.Image) -> int:
    """How far red rises above blue anywhere in a picture: a heat map over grey X-rays shows red to yellow."""
    pixels = np.asarray(picture.convert("RGB")).astype(int)
    return int((pixels[..., 0] - pixels[..., 2]).max())


def test_the_tabs_follow_the_kind_registry(monkeypatch):
    assert list(TASKS) == [
        "Differential VQA", "VQA", "Report generation", "Detection", "Zero-shot findings", "Phrase grounding"
    ]  # fmt: skip
    assert TASKS["Report generation"].kinds == ("report-generation", "captioning")
    assert TASKS["Differential VQA"].image_columns == ["prior_image", "current_image"]
    assert TASKS["Phrase grounding"].text_columns == ["phrase"] and TASKS["Phrase grounding"].picture == "boxes"
    monkeypatch.delitem(KINDS, "grounding")
    monkeypatch.delitem(KINDS, "report-generation")
    monkeypatch.setitem(KINDS, "new-kind", replace(KINDS["vqa"], name="new-kind"))
    tasks = {task.title: task for task in registered_tasks()}
    assert "Phrase grounding" not in tasks and tasks["Report generation"].kinds == ("captioning",)
    assert tasks["Report generation"].picture is None, "the captioning model draws no heat map"
    assert tasks["new-kind"].kinds == ("new-kind",) and tasks["new-kind"].text_columns == ["question"]


def test_each_tab_offers_the_collections_repos_of_its_kinds():
    models = load_collection().models
    differential = [m.repo_id for m in models if m.kind == "diffvqa" and not m.encoder_finetuned]
    assert (
        collection_models(TASKS["Differential VQA"]) == differential
        and "dmusingu/lapvqa-diffvqa-vit-l14" in differential
    )
    reports = collection_models(TASKS["Report generation"])
    assert "dmusingu/lapvqa-captioning" in reports and "dmusingu/lapvqa-rrg-clip-vit-l14" in reports
    assert not any("native" in repo for repo in reports), "heads that need their fine-tuned encoder are left out"


def test_differential_vqa_answers_as_the_pipeline_with_heat_maps_over_both_images(diffvqa_folder, xrays):
    # The random head never ends an answer: it fills every position left, and its heat map still fits them.
    pipe, models = pipeline(model=diffvqa_folder, trust_remote_code=True), Models()
    for current in ("current16", "current"):  # a 16-bit PNG and a DICOM, read from their files
        values = {"prior_image": xrays["prior"], "current_image": xrays[current], "question": QUESTIONS[0]}
        result = run(TASKS["Differential VQA"], diffvqa_folder, values, models=models)
        assert result.text == pipe(values)["answer"] and result.status.startswith("Done in")
        assert result.picture.size[0] == 640, "prior and current side by side, as lapvqa answer --save-maps draws"
        assert heat(result.picture) > 50 and result.scores == []


def test_models_load_once_and_the_least_recently_used_goes_first(diffvqa_folder, vqa_folder, xrays):
    models, calls = Models(capacity=1), []
    differential = {"prior_image": xrays["prior"], "current_image": xrays["current16"], "question": QUESTIONS[1]}
    progress = lambda fraction, desc=None: calls.append(desc)  # noqa: E731
    run(TASKS["Differential VQA"], diffvqa_folder, differential, progress=progress, models=models)
    (answerer,) = models.entries.values()
    run(TASKS["Differential VQA"], diffvqa_folder, {**differential, "question": QUESTIONS[2]}, progress=progress,
        models=models)  # fmt: skip
    assert models.entries[("diffvqa", diffvqa_folder)] is answerer, "loaded once"
    assert calls == [
        f"Loading {diffvqa_folder}",
        "Reading the images and answering",
        "Reading the images and answering",
    ]
    maps = answerer.maps
    assert maps.is_dir() and not list(maps.iterdir()), "each picture is read into memory, its file removed"
    result = run(TASKS["VQA"], vqa_folder, {"image": xrays["current"], "question": QUESTIONS[1]}, models=models)
    assert list(models.entries) == [("vqa", vqa_folder)] and not maps.exists(), "evicted, its folder removed"
    assert result.picture.size[0] == 320 and heat(result.picture) > 50
    expected = pipeline(model=vqa_folder, trust_remote_code=True)({"image": xrays["current"], "question": QUESTIONS[1]})
    assert result.text == expected["answer"]


def test_report_generation_writes_the_report_with_its_heat_map(clip_encoder, xrays, tmp_path):
    from conftest import upstream_report_checkpoint

    head = randomize_(ReportGenerationHead(1024, **TINY_HEAD), seed=3)
    torch.save(upstream_report_checkpoint(head, "clip-vit-l14"), tmp_path / "head.pt")
    folder = str(tmp_path / "rrg")
    arguments = ["--encoder-checkpoint", str(clip_encoder), "--output", folder]
    assert lapvqa(["convert", "report-generation", str(tmp_path / "head.pt"), *arguments]) == 0
    result = run(TASKS["Report generation"], folder, {"image": xrays["current"]}, models=Models())
    assert result.text == pipeline(model=folder, trust_remote_code=True)(xrays["current"])[0]["generated_text"]
    assert result.picture.size[0] == 320 and heat(result.picture) > 50


def test_detection_draws_the_boxes_with_labels_and_scores_above_the_threshold(clip_encoder, xrays, tmp_path):
    folder = convert("detection", DetectionHead(vis_dim=1024, d_model=32, dim_feedforward=48), tmp_path, clip_encoder)
    models, values = Models(), {"image": xrays["current16"]}
    result = run(TASKS["Detection"], folder, values, threshold=0.0, models=models)
    expected = pipeline(model=folder, trust_remote_code=True)(xrays["current16"], threshold=0.0)
    lines = result.text.splitlines()
    assert len(lines) == len(expected) > 0
    assert all(re.fullmatch(r".+: \d\.\d\d at \(\d+, \d+\) to \(\d+, \d+\) px", line) for line in lines), lines
    assert [line.split(":")[0] for line in lines] == [found["label"] for found in expected]
    assert max(result.picture.size) == 640 and result.picture.size[0] > result.picture.size[1], "64 x 56, scaled"
    none = run(TASKS["Detection"], folder, values, threshold=1.0, models=models)
    assert none.text == "No finding scored 1.00 or more."


def test_zero_shot_findings_are_scored_for_the_bar_plot(tmp_path, xrays):
    from lapvqa_hf.convert.two_tower import convert_two_tower
    from test_two_tower import upstream_model

    torch.save(upstream_model(False, "trained-like", seed=3).state_dict(), tmp_path / "model_best.pt")
    folder = str(convert_two_tower(tmp_path / "model_best.pt", tmp_path / "contrastive", 4, 4, log=lambda _: None))
    findings = ["pleural effusion", "cardiomegaly", "no acute cardiopulmonary process"]
    entered = "pleural effusion\n cardiomegaly \n\nno acute cardiopulmonary process"  # as typed, one per line
    result = run(TASKS["Zero-shot findings"], folder, {"image": xrays["prior"], "labels": entered}, models=Models())
    expected = pipeline("lapvqa-zero-shot-findings", model=folder, trust_remote_code=True)(
        xrays["prior"], candidate_labels=findings
    )
    assert result.scores == [(found["label"], pytest.approx(found["score"], abs=1e-4)) for found in expected]
    assert sum(score for _, score in result.scores) == pytest.approx(1.0, abs=1e-3) and result.picture is None
    assert result.text.splitlines()[0] == f"{expected[0]['label']}: {expected[0]['score']:.3f}"


def test_phrase_grounding_draws_the_phrases_box(tmp_path, xrays):
    from conftest import upstream_grounding_checkpoint
    from test_grounding import make_head, run_cli, tiny_image_encoder, tiny_text_tower

    torch.save(upstream_grounding_checkpoint(make_head(1024, seed=2), "lapvqa-vit-l14"), tmp_path / "vit.pt")
    arguments = ["--encoder-checkpoint", tiny_image_encoder(tmp_path / "encoder"), "--text-checkpoint",
                 tiny_text_tower(tmp_path / "text"), "--num-heads", "4"]  # fmt: skip
    assert run_cli(tmp_path / "vit.pt", "--output", tmp_path / "pg", *arguments) == 0
    phrase = "small left pleural effusion"
    result = run(TASKS["Phrase grounding"], str(tmp_path / "pg"), {"image": xrays["prior"], "phrase": phrase},
                 models=Models())  # fmt: skip
    (found,) = pipeline(model=str(tmp_path / "pg"), trust_remote_code=True)(xrays["prior"], candidate_labels=[phrase])
    box = found["box"]
    assert (
        result.text == f"{phrase}: ({box['xmin']:.0f}, {box['ymin']:.0f}) to ({box['xmax']:.0f}, {box['ymax']:.0f}) px"
    )
    assert max(result.picture.size) == 640


def test_every_failure_is_one_line_for_the_page(diffvqa_folder, vqa_folder, xrays, tmp_path):
    task, models = TASKS["Differential VQA"], Models()
    good = {"prior_image": xrays["prior"], "current_image": xrays["current16"], "question": QUESTIONS[1]}
    cases = [
        (diffvqa_folder, {**good, "current_image": xrays["broken"]}, "current_image: broken.png: cannot read it as an image"),
        (diffvqa_folder, {**good, "current_image": None}, "Current X-ray: upload a PNG, JPEG or DICOM file."),
        (diffvqa_folder, {**good, "question": "  "}, "question: missing or empty"),
        ("  ", good, "Choose a model of the collection, or type a model folder."),
        (str(tmp_path / "nothing-here"), good, f"{tmp_path / 'nothing-here'}: no such model folder."),
        (str(tmp_path), good, f"{tmp_path}: not a model folder (no config.json)."),
        (vqa_folder, good, f"{vqa_folder} is a vqa model; the Differential VQA tab runs diffvqa models."),
        ("dmusingu/lapvqa-diffvqa-clip-vit-l14", good, "the Hub cannot be reached (HF_HUB_OFFLINE is set)"),
        ("someone/no-such-model", good, "someone/no-such-model is no local folder and not in the Hugging Face cache"),
    ]  # fmt: skip
    for model, values, expected in cases:
        with pytest.raises(SpaceError) as raised:
            run(task, model, values, models=models)
        message = str(raised.value)
        assert expected in message and "\n" not in message, message
    assert str(Path(xrays["broken"]).parent) not in message, "an upload is named by its file name alone"
    assert list(models.entries) == [("diffvqa", diffvqa_folder)], "only the model that loaded is kept"


def test_the_page_shows_the_readmes_research_use_notice():
    for readme in (ROOT / "README.md", SPACE / "README.md"):  # the notice is a quoted block in both
        assert NOTICE in " ".join(re.sub(r"^> ?", "", readme.read_text(), flags=re.M).split()), readme


def test_the_space_card_and_requirements_are_what_a_space_builds_from():
    from huggingface_hub import SpaceCard

    card = SpaceCard.load(SPACE / "README.md").data
    assert (card.sdk, card.app_file, card.license) == ("gradio", "app.py", "apache-2.0")
    assert {"title", "emoji", "colorFrom", "colorTo", "pinned", "short_description"} <= set(card.to_dict())
    assert len(card.short_description) <= 60, "the Hub's limit"
    (extra,) = re.findall(r"^space = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), re.M)
    assert f'"gradio=={card.sdk_version}"' in extra, "the tests run the gradio release the Space declares"
    requirements = [line.split("#")[0].strip() for line in (SPACE / "requirements.txt").read_text().splitlines()]
    names = [re.split(r"[\[<>=@ ]", line)[0] for line in requirements if line and not line.startswith("-")]
    assert "lapvqa-hf" in names and "gradio" not in names, "the Space installs gradio itself (sdk_version)"


def test_the_package_never_imports_gradio():
    sources = [*ROOT.joinpath("lapvqa_hf").rglob("*.py"), SPACE / "lapvqa_space.py"]
    assert not [path for path in sources if re.search(r"^\s*(import|from)\s+gradio\b", path.read_text(), re.M)]
