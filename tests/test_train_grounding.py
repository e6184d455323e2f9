"""Fine-tuning the phrase-grounding heads: the MS-CXR loader and its synthetic release, mIoU / Acc@0.25 / Acc@0.5 /
pointing accuracy, and `task: grounding` in `lapvqa_hf.train` (training on stored features with phrase features
from a text tower, the saved model, `lapvqa evaluate`)."""

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_grounding import tiny_text_tower
from transformers import AutoModel, pipeline

from lapvqa_hf import LapvqaGroundingModel, LapvqaImageProcessor, LapvqaVisionConfig, LapvqaVisionModel
from lapvqa_hf.cli import main as lapvqa
from lapvqa_hf.data import DataError
from lapvqa_hf.features import (
    DETECTION_IMAGE_PREPARATION,
    FeatureError,
    FeatureStore,
    detection_image_processor,
    extract_features,
    images_of,
    recipe_for,
)
from lapvqa_hf.grounding_data import COLUMNS, TABLE, load_ms_cxr, write_synthetic_ms_cxr
from lapvqa_hf.metrics.grounding import grounding_scores, score_grounding
from lapvqa_hf.train import TrainConfig, config_problems, train
from lapvqa_hf.train.tasks import GroundingTask

pytestmark = pytest.mark.usefixtures("fresh_accelerator_state", "one_torch_thread")

# A grounding head small enough to train in seconds, without dropout.
TINY_HEAD = dict(d_model=64, encoder_layers=1, num_attention_heads=4, encoder_ffn_dim=64, dropout=0.0,
                 attention_dropout=0.0, activation_dropout=0.0)  # fmt: skip


def tiny_encoder_and_recipe():
    """A 32-wide encoder of 48 px images in 8 px patches (36 tokens), standing in for a real one."""
    torch.manual_seed(0)
    config = LapvqaVisionConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48, image_size=48, patch_size=8
    )
    return LapvqaVisionModel(config), dataclasses.replace(recipe_for("lapvqa-vit-l14"), image_size=48, vis_dim=32)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A synthetic MS-CXR release (`ms-cxr`), the tiny encoder's features of its images (`features`) and a tiny
    text tower (`text`, 16-dim phrase features)."""
    base = tmp_path_factory.mktemp("grounding")
    root = write_synthetic_ms_cxr(base / "ms-cxr", num_images=40)
    rows = [row for split in load_ms_cxr(root).values() for row in split]
    encoder, recipe = tiny_encoder_and_recipe()
    extract_features(
        images_of(rows, root=root.resolve()), recipe, base / "features", encoder, detection_image_processor(recipe),
        progress=False, image_preparation=DETECTION_IMAGE_PREPARATION,
    )  # fmt: skip
    tiny_text_tower(base / "text", projection_dim=16)
    return base


def config_values(base: Path, output: Path, **changes) -> dict:
    values = dict(
        task="grounding", data_root=str(base / "ms-cxr"), features_dir=str(base / "features"), output_dir=str(output),
        text_checkpoint=str(base / "text"), model=TINY_HEAD, learning_rate=3e-3, warmup_steps=5, max_steps=8,
        batch_size=8, checkpoint_every=1000, eval_every=1000, best_metric="miou",
    )  # fmt: skip
    return values | changes


# --- the MS-CXR loader ------------------------------------------------------------------------------------------


def write_table(root: Path, rows: list[dict]) -> None:
    with open(root / TABLE, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def row(dicom_id: str, phrase: str, box: tuple, size: tuple, split: str = "train", category: str = "Pleural Effusion"):
    x, y, w, h = box
    width, height = size
    return dict(dicom_id=dicom_id, category_name=category, label_text=phrase, path=f"files/p10/{dicom_id}.jpg", x=x,
                y=y, w=w, h=h, image_width=width, image_height=height, split=split)  # fmt: skip


def hand_made_release(root: Path) -> Path:
    """Two images, as MS-CXR's table holds them:
    - `a` (100 x 200, train): a left effusion, and a bilateral one marked by two boxes (one past the left edge);
    - `b` (validation): 80 x 50 in the table, the file a half-size copy (boxes are normalised by the table's size)."""
    (root / "files" / "p10").mkdir(parents=True)
    Image.new("L", (100, 200)).save(root / "files" / "p10" / "a.jpg")
    Image.new("L", (40, 25)).save(root / "files" / "p10" / "b.jpg")
    write_table(root, [
        row("a", "left pleural effusion", (50, 150, 40, 30), (100, 200)),
        row("a", "bilateral effusions", (-5, 150, 45, 30), (100, 200)),
        row("b", "enlarged heart", (20, 20, 40, 20), (80, 50), "val", "Cardiomegaly"),
        row("a", "bilateral effusions", (55, 150, 40, 30), (100, 200)),
    ])  # fmt: skip
    return root


def test_the_loader_normalises_boxes_by_the_tables_size_and_joins_a_phrases_boxes(tmp_path):
    root = hand_made_release(tmp_path / "ms-cxr")
    splits = load_ms_cxr(root)
    assert list(splits) == ["train", "validation"]
    left, bilateral = splits["train"]
    assert (left["phrase"], left["category"]) == ("left pleural effusion", "Pleural Effusion")
    assert (left["height"], left["width"]) == (200, 100)
    assert left["image"] == str(root / "files" / "p10" / "a.jpg")
    assert np.allclose(left["boxes"], [[0.7, 0.825, 0.4, 0.15]]) and np.allclose(left["box"], [0.7, 0.825, 0.4, 0.15])
    # x -5..40 is clipped to 0..40; the enclosing box runs from 0 to 95.
    assert np.allclose(bilateral["boxes"], [[0.2, 0.825, 0.4, 0.15], [0.75, 0.825, 0.4, 0.15]])
    assert np.allclose(bilateral["box"], [0.475, 0.825, 0.95, 0.15])
    (heart,) = splits["validation"]
    assert heart["category"] == "Cardiomegaly" and np.allclose(heart["box"], [0.5, 0.6, 0.5, 0.4])


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(x="left"), "line 2: x must be a number, got 'left'."),
        (dict(w=0), "line 2: the box (x 50.0, y 150.0, w 0.0, h 30.0) must have w, h > 0 and overlap the 100 x 200"),
        (dict(x=120), "must have w, h > 0 and overlap the 100 x 200 image."),
        (dict(split="dev"), "line 2: unknown split 'dev'; expected train, val or test."),
        (dict(label_text=" "), "line 2: label_text is empty."),
        (dict(path="files/p10/z.jpg"), "line 2: no image "),
        (dict(image_width=0), "image_width and image_height must be whole pixels >= 1, got 0.0 x 200.0."),
    ],
    ids=["not-a-number", "empty-box", "outside", "split", "no-phrase", "missing-image", "no-size"],
)
def test_bad_rows_are_one_line_errors_naming_the_line(tmp_path, change, message):
    (tmp_path / "files" / "p10").mkdir(parents=True)
    Image.new("L", (100, 200)).save(tmp_path / "files" / "p10" / "a.jpg")
    write_table(tmp_path, [row("a", "left pleural effusion", (50, 150, 40, 30), (100, 200)) | change])
    with pytest.raises(DataError) as error:
        load_ms_cxr(tmp_path)
    assert message in str(error.value) and "\n" not in str(error.value)
    (tmp_path / TABLE).write_text("dicom_id,label_text\na,effusion\n")
    with pytest.raises(DataError, match=r"missing columns \['category_name', 'path', 'x', "):
        load_ms_cxr(tmp_path)
    with pytest.raises(DataError, match=f"no {TABLE}; expected an MS-CXR release's folder"):
        load_ms_cxr(tmp_path / "files")


def test_the_synthetic_release_has_the_layout(tmp_path, capsys):
    assert lapvqa(["data", "synthesize", "--dataset", "ms-cxr", "--output", str(tmp_path / "ms"), "--subjects",
                   "20"]) == 0  # fmt: skip
    assert "phrases {'train': " in capsys.readouterr().out
    with open(tmp_path / "ms" / TABLE, newline="") as file:
        rows = list(csv.DictReader(file))
    assert tuple(rows[0]) == COLUMNS and {r["split"] for r in rows} == {"train", "val", "test"}
    assert all(Path(tmp_path / "ms" / r["path"]).is_file() and r["path"].endswith(".jpg") for r in rows)
    splits = load_ms_cxr(tmp_path / "ms")
    assert len({r["dicom_id"] for r in rows}) == 20 and sum(len(s) for s in splits.values()) < len(rows)
    assert any(len(example["boxes"]) == 2 for split in splits.values() for example in split)  # bilateral
    with pytest.raises(DataError, match="exists and is not empty"):
        write_synthetic_ms_cxr(tmp_path / "ms")


# --- mIoU, Acc@0.25, Acc@0.5, pointing accuracy ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "predicted, truths, expected",
    [
        ([0, 0, 10, 10], [[0, 0, 10, 10]], dict(miou=1.0, acc25=1.0, acc50=1.0, pointing=1.0)),
        # IoU 0.45: a hit at 0.25, a miss at 0.5; the centre (5, 5) lies below the box
        ([0, 0, 10, 10], [[0, 0, 10, 4.5]], dict(miou=0.45, acc25=1.0, acc50=0.0, pointing=0.0)),
        ([0, 0, 10, 10], [[0, 0, 10, 2]], dict(miou=0.2, acc25=0.0, acc50=0.0, pointing=0.0)),
        ([20, 20, 30, 30], [[0, 0, 10, 10]], dict(miou=0.0, acc25=0.0, acc50=0.0, pointing=0.0)),
        # a small box pointing at the middle of a large one: IoU 0.04
        ([4, 4, 6, 6], [[0, 0, 10, 10]], dict(miou=0.04, acc25=0.0, acc50=0.0, pointing=1.0)),
        # both lungs: the IoU with their enclosing box, pointing inside either
        ([0, 0, 10, 10], [[0, 0, 4, 10], [6, 0, 10, 10]], dict(miou=1.0, acc25=1.0, acc50=1.0, pointing=0.0)),
        ([1, 1, 3, 9], [[0, 0, 4, 10], [6, 0, 10, 10]], dict(miou=0.16, acc25=0.0, acc50=0.0, pointing=1.0)),
        # the centre on the edge counts
        ([5, 0, 15, 10], [[0, 0, 10, 10]], dict(miou=50 / 150, acc25=1.0, acc50=0.0, pointing=1.0)),
    ],
    ids=["perfect", "iou-0.45", "iou-0.2", "disjoint", "pointing-only", "bilateral", "one-lung", "edge"],
)
def test_grounding_metrics_against_hand_computed_cases(predicted, truths, expected):
    assert grounding_scores([predicted], [truths]) == pytest.approx(expected | {"count": 1})


def test_grounding_metrics_average_over_examples_and_groups():
    predictions = [[0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]]
    references = [[[0, 0, 10, 10]], [[0, 0, 10, 4.5]], [[0, 0, 10, 10]]]
    scores = score_grounding(predictions, references, ["Cardiomegaly", "Edema", "Cardiomegaly"])
    assert scores["overall"] == pytest.approx(dict(miou=1.45 / 3, acc25=2 / 3, acc50=1 / 3, pointing=1 / 3, count=3))
    assert scores["Cardiomegaly"] == pytest.approx(dict(miou=0.5, acc25=0.5, acc50=0.5, pointing=0.5, count=2))
    assert scores["Edema"]["count"] == 1 and list(scores) == ["overall", "Cardiomegaly", "Edema"]
    assert grounding_scores([], []) == dict(miou=0.0, acc25=0.0, acc50=0.0, pointing=0.0, count=0)
    with pytest.raises(ValueError, match="2 predicted boxes but 1 references; expected one each."):
        grounding_scores(predictions[:2], references[:1])
    with pytest.raises(ValueError, match=r"references\[0\] must be a non-empty list of \(x0, y0, x1, y1\) boxes"):
        grounding_scores(predictions[:1], [[]])


# --- training ---------------------------------------------------------------------------------------------------


def test_a_short_run_improves_the_validation_miou(prepared, tmp_path, capsys):
    values = config_values(prepared, tmp_path / "run", max_steps=200, eval_every=100, checkpoint_every=200)
    result = train(TrainConfig(**values))
    losses = result["losses"]
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])

    task = GroundingTask.from_config(TrainConfig(**values))
    torch.manual_seed(0)
    untrained = task.build_model(TrainConfig(**values), FeatureStore(prepared / "features")).eval()  # as it started
    validation = task.examples(task.load_splits(prepared / "ms-cxr")["validation"], FeatureStore(prepared / "features"),
                               prepared / "ms-cxr")  # fmt: skip
    before = task.score(task.predict(untrained, None, validation, 8, 0), validation)["overall"]
    best = result["best"]["scores"]["overall"]
    assert result["best"]["metric"] == "miou" and best["count"] == len(validation) > 5
    assert best["miou"] > before["miou"] + 0.25 and best["miou"] > 0.4, (before, best)
    assert set(best) == {"miou", "acc25", "acc50", "pointing", "count"}

    # The saved model: its text tower and image processor recorded; `lapvqa evaluate` gives the validation scores.
    saved = tmp_path / "run" / "best"
    model = AutoModel.from_pretrained(saved)
    assert isinstance(model, LapvqaGroundingModel) and (model.config.vis_dim, model.config.txt_dim) == (32, 16)
    assert model.config.text_recipe == {"name": "clip-vit-l14", "checkpoint": str((prepared / "text").resolve()),
                                        "text_dim": 16, "revision": None}  # fmt: skip
    processor = LapvqaImageProcessor.from_pretrained(saved)
    assert (processor.resize_mode, dict(processor.size)) == ("stretch", {"height": 48, "width": 48})
    evaluate = [
        "evaluate",
        str(saved),
        "--data-root",
        str(prepared / "ms-cxr"),
        "--features",
        str(prepared / "features"),
    ]
    assert lapvqa([*evaluate, "--split", "validation", "--output", str(tmp_path / "validation.json")]) == 0
    assert "| category | n | miou | acc25 | acc50 | pointing |" in capsys.readouterr().out
    scores = json.loads((tmp_path / "validation.json").read_text())["scores"]
    assert scores["overall"] == pytest.approx(best, abs=1e-6)

    # ... and grounds from pixels with the encoder its features came from.
    encoder, _ = tiny_encoder_and_recipe()
    pipe = pipeline(model=str(saved), trust_remote_code=True, encoder=encoder)
    example = validation.rows[0]
    (found,) = pipe(example["image"], candidate_labels=[example["phrase"]])
    assert 0 <= found["box"]["xmin"] < found["box"]["xmax"] <= example["width"]


def test_features_for_grounding_are_extracted_as_the_heads_image_processor_prepares_them(tmp_path):
    assert lapvqa(["data", "synthesize", "--dataset", "ms-cxr", "--output", str(tmp_path / "ms"), "--subjects",
                   "3"]) == 0  # fmt: skip
    encoder = LapvqaVisionModel(LapvqaVisionConfig(hidden_size=1024, num_hidden_layers=1, num_attention_heads=4,
                                                   intermediate_size=64, patch_size=56))  # fmt: skip
    encoder.save_pretrained(tmp_path / "encoder")
    extract = ["extract-features", "--encoder", "lapvqa-vit-l14", "--checkpoint", str(tmp_path / "encoder")]
    assert lapvqa([*extract, "--data-root", str(tmp_path / "ms"), "--task", "grounding", "--output",
                   str(tmp_path / "f")]) == 0  # fmt: skip
    store = FeatureStore(tmp_path / "f")
    assert len(store) == 3 and store.image_preparation == DETECTION_IMAGE_PREPARATION
    # Features prepared for the text tasks (the encoder's own processor) are refused, naming the fix.
    rows = load_ms_cxr(tmp_path / "ms")["train"]
    own = LapvqaImageProcessor.for_encoder(encoder.config)
    extract_features(images_of(rows, root=tmp_path / "ms"), store.recipe, tmp_path / "g", encoder, own, progress=False)
    with pytest.raises(
        FeatureError, match="a grounding head needs .*extract with `lapvqa extract-features --task grounding`"
    ):
        GroundingTask().examples(rows, FeatureStore(tmp_path / "g"), tmp_path / "ms")


def test_grounding_config_problems_are_one_line_each(prepared, tmp_path):
    values = config_values(prepared, tmp_path / "run")
    assert config_problems(values) == []
    assert config_problems(values | {"best_metric": "map50"}) == [
        "best_metric='map50': task grounding is scored by miou, acc25, acc50, pointing; set best_metric to one of them."
    ]
    assert config_problems(values | {"text_recipe": "bert"}) == [
        "text_recipe='bert': expected null or one of clip-vit-l14, siglip, owlv2."
    ]
    assert config_problems({"task": "diffvqa", "text_checkpoint": "clip"}) == [
        "text_checkpoint: only used with task grounding; remove it."
    ]
    assert config_problems(values | {"model": {"txt_dim": 32}}) == [
        "model.txt_dim: set by training from the features (or vision_encoder); remove it."
    ]
