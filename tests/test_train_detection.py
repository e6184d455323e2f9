"""Fine-tuning the detection heads: the VinDr-CXR loader and its synthetic release, mAP at IoU 0.4 / 0.5, and
`task: detection` in `lapvqa_hf.train` (training, resuming, the saved model, `lapvqa evaluate` on 1 and 2 processes)."""

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import accelerate_launch, kill_after_the_first_checkpoint
from PIL import Image
from safetensors.torch import load_file
from test_image_processing import write_dicom
from transformers import AutoImageProcessor, AutoModelForObjectDetection

import lapvqa_hf.train as training
from lapvqa_hf import LapvqaDetectionModel, LapvqaImageProcessor, LapvqaVisionConfig, LapvqaVisionModel
from lapvqa_hf.cli import main as lapvqa
from lapvqa_hf.data import DataError
from lapvqa_hf.detection_data import fuse_radiologists, load_vindr_cxr, write_synthetic_vindr_cxr
from lapvqa_hf.features import (
    DETECTION_IMAGE_PREPARATION,
    FeatureError,
    FeatureStore,
    detection_image_processor,
    extract_features,
    image_id,
    images_of,
    recipe_for,
)
from lapvqa_hf.metrics.detection import score_detections
from lapvqa_hf.train import DetectionTask, TrainConfig, config_problems, train

pytestmark = pytest.mark.usefixtures("fresh_accelerator_state", "one_torch_thread")

# A detection head small enough to train in a second, without dropout.
TINY_HEAD = dict(
    d_model=32, encoder_layers=1, decoder_layers=2, num_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
    num_queries=6, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
)  # fmt: skip


def tiny_encoder_and_recipe():
    """A 32-wide encoder of 48 px images in 8 px patches (36 tokens), standing in for a real one."""
    torch.manual_seed(0)
    config = LapvqaVisionConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48, image_size=48, patch_size=8
    )
    return LapvqaVisionModel(config), dataclasses.replace(recipe_for("lapvqa-vit-l14"), image_size=48, vis_dim=32)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A synthetic VinDr-CXR release (`vindr`) and the tiny encoder's features of its images (`features`)."""
    base = tmp_path_factory.mktemp("detection")
    root = write_synthetic_vindr_cxr(base / "vindr", num_images=32)
    rows = [row for split in load_vindr_cxr(root).values() for row in split]
    encoder, recipe = tiny_encoder_and_recipe()
    extract_features(
        images_of(rows, root=root.resolve()), recipe, base / "features", encoder, detection_image_processor(recipe),
        progress=False, image_preparation=DETECTION_IMAGE_PREPARATION,
    )  # fmt: skip
    return base


def config_values(base: Path, output: Path, **changes) -> dict:
    values = dict(
        task="detection", data_root=str(base / "vindr"), features_dir=str(base / "features"), output_dir=str(output),
        model=TINY_HEAD, learning_rate=3e-3, warmup_steps=5, max_steps=8, batch_size=8, checkpoint_every=4,
        eval_every=1000, best_metric="map50",
    )  # fmt: skip
    return values | changes


def split_examples(base: Path, split: str) -> training.DetectionExamples:
    task = DetectionTask()
    return task.examples(task.load_splits(base / "vindr")[split], FeatureStore(base / "features"), base / "vindr")


# --- the VinDr-CXR loader ---------------------------------------------------------------------------------------


def write_table(path: Path, rows: list[tuple]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["image_id", "class_name", "x_min", "y_min", "x_max", "y_max", "rad_id"])
        writer.writerows(rows)


def hand_made_release(root: Path) -> Path:
    """Three training images by three radiologists, as VinDr-CXR's tables hold them:
    - `a` (DICOM, 200 rows x 100 columns): R1 and R2 draw one Cardiomegaly 2 px apart, R3 sees nothing;
      R1 also draws a Nodule/Mass and an Edema (a VinDr local label outside the 14 classes);
    - `b` (PNG, 50 x 80): R1 draws two Pleural effusions, left and right; R2 draws only the left one;
    - `c` (PNG, 40 x 40): No finding by all three."""
    (root / "train").mkdir(parents=True)
    write_dicom(root / "train" / "a.dicom", np.zeros((200, 100)), "MONOCHROME2")
    Image.new("L", (80, 50)).save(root / "train" / "b.png")
    Image.new("L", (40, 40)).save(root / "train" / "c.png")
    write_table(
        root / "annotations" / "annotations_train.csv",
        [
            ("a", "Cardiomegaly", 20, 100, 80, 160, "R1"),
            ("a", "Cardiomegaly", 22, 102, 82, 162, "R2"),
            ("a", "No finding", "", "", "", "", "R3"),
            ("a", "Nodule/Mass", 10, 10, 30, 30, "R1"),
            ("a", "Edema", 10, 10, 90, 190, "R1"),
            ("b", "Pleural effusion", 0, 30, 20, 50, "R1"),
            ("b", "Pleural effusion", 60, 30, 80, 50, "R1"),
            ("b", "Pleural effusion", 1, 29, 21, 49, "R2"),
            *[("c", "No finding", "", "", "", "", reader) for reader in ("R1", "R2", "R3")],
        ],
    )
    return root


def test_the_loader_normalises_each_image_by_its_size_and_fuses_the_radiologists(tmp_path):
    root = hand_made_release(tmp_path / "vindr")
    fused = load_vindr_cxr(root, validation_fraction=0)
    assert list(fused) == ["train", "validation"] and len(fused["validation"]) == 0  # no test table: no test split
    a, b, c = fused["train"]
    assert (a["image_id"], a["height"], a["width"], a["image"]) == ("a", 200, 100, str(root / "train" / "a.dicom"))
    # Cardiomegaly (class 3): R1 and R2 overlap (IoU 0.88), one finding, their mean box 21..81 x 101..161 px.
    assert a["class_labels"] == [3, 8]
    assert np.allclose(a["boxes"], [[0.51, 0.655, 0.6, 0.3], [0.2, 0.1, 0.2, 0.1]])
    assert (b["height"], b["width"], b["class_labels"]) == (50, 80, [10, 10])  # the right effusion: R1's alone
    assert np.allclose(b["boxes"], [[0.13125, 0.79, 0.25, 0.4], [0.875, 0.8, 0.25, 0.4]])
    assert (c["class_labels"], c["boxes"]) == ([], [])
    every = load_vindr_cxr(root, radiologists="all", validation_fraction=0)["train"]
    assert [len(row["boxes"]) for row in every] == [3, 3, 0]
    assert every[0]["boxes"][1] == pytest.approx([0.52, 0.66, 0.6, 0.3])  # R2's Cardiomegaly, unchanged


def test_the_synthetic_release_has_the_layout_and_a_validation_split_of_a_tenth(tmp_path):
    root = write_synthetic_vindr_cxr(tmp_path / "vindr", num_images=40, seed=3)
    with open(root / "annotations" / "annotations_train.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0]) == ["image_id", "class_name", "x_min", "y_min", "x_max", "y_max", "rad_id"]
    readers = {}
    for row in rows:
        readers.setdefault(row["image_id"], set()).add(row["rad_id"])
    assert len(readers) == 40 and {len(r) for r in readers.values()} == {3}
    assert any(row["class_name"] == "No finding" and row["x_min"] == "" for row in rows)
    splits = load_vindr_cxr(root)
    assert {name: len(split) for name, split in splits.items()} == {"train": 36, "validation": 4, "test": 10}
    assert splits["validation"]["image_id"] == load_vindr_cxr(root)["validation"]["image_id"]  # by id, not chance
    boxes = [box for split in splits.values() for row in split for box in row["boxes"]]
    assert boxes and all(0 <= value <= 1 for box in boxes for value in box)
    with pytest.raises(DataError, match="exists and is not empty"):
        write_synthetic_vindr_cxr(root)


@pytest.mark.parametrize(
    "row, message",
    [
        (("a", "Cardiomegaly", "", "", "", "", "R1"), "line 2: a Cardiomegaly box needs numeric x_min, y_min, x_max"),
        (("a", "Cardiomegaly", 50, 10, 20, 30, "R1"), "line 2: expected x_min < x_max and y_min < y_max, got [50.0,"),
        (("z", "No finding", "", "", "", "", "R1"), "no image of image_id 'z' (looked for .dicom, .dcm, .png"),
    ],
    ids=["no-coordinates", "inverted-box", "missing-image"],
)
def test_bad_annotation_rows_are_one_line_errors_naming_the_line(tmp_path, row, message):
    (tmp_path / "train").mkdir()
    write_dicom(tmp_path / "train" / "a.dicom", np.zeros((20, 10)), "MONOCHROME2")
    write_table(tmp_path / "annotations" / "annotations_train.csv", [row])
    with pytest.raises(DataError) as error:
        load_vindr_cxr(tmp_path)
    assert message in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(DataError, match="no annotations/annotations_train.csv"):
        load_vindr_cxr(tmp_path / "train")
    with pytest.raises(ValueError, match="radiologists must be one of"):
        load_vindr_cxr(tmp_path, radiologists="majority")


def test_fusion_merges_only_boxes_of_one_class_by_different_radiologists():
    boxes = [
        ("R1", 0, (0, 0, 10, 10)),
        ("R1", 0, (1, 1, 11, 11)),  # R1's second box: a finding of its own, however close
        ("R2", 0, (0, 0, 10, 8)),  # IoU 0.8 with R1's first, 0.54 with its second: joins the first
        ("R2", 1, (0, 0, 10, 10)),  # another class
        ("R3", 0, (30, 30, 40, 40)),  # no overlap
    ]
    assert fuse_radiologists(boxes) == [
        (0, (0.0, 0.0, 10.0, 9.0)),
        (0, (1.0, 1.0, 11.0, 11.0)),
        (1, (0.0, 0.0, 10.0, 10.0)),
        (0, (30.0, 30.0, 40.0, 40.0)),
    ]


# --- mAP at IoU 0.4 and 0.5 ---------------------------------------------------------------------------------------

TRUTH = [{"boxes": [[0, 0, 10, 10]], "labels": [3]}]


def found(*detections) -> list[dict]:
    """One image's detections: (box, score, label)."""
    return [{key: [d[i] for d in detections] for i, key in enumerate(("boxes", "scores", "labels"))}]


@pytest.mark.parametrize(
    "predictions, references, map40, map50",
    [
        (found(([0, 0, 10, 10], 0.9, 3)), TRUTH, 1.0, 1.0),  # perfect
        (found(([0, 0, 10, 4.5], 0.9, 3)), TRUTH, 1.0, 0.0),  # IoU 0.45: a hit at 0.4, a miss at 0.5
        (found(([0, 0, 10, 10], 0.9, 5)), TRUTH, 0.0, 0.0),  # the right box, the wrong class
        (found(), TRUTH, 0.0, 0.0),  # nothing found
        # A false positive ranked above the hit: precision 1/2 at every recall (101-point interpolation).
        (found(([50, 50, 60, 60], 0.9, 3), ([0, 0, 10, 10], 0.8, 3)), TRUTH, 0.5, 0.5),
        # Half the boxes found: precision 1 up to recall 0.5, i.e. at 51 of COCO's 101 recall points.
        (found(([0, 0, 10, 10], 0.9, 3)), [{"boxes": [[0, 0, 10, 10], [20, 20, 30, 30]], "labels": [3, 3]}],
         51 / 101, 51 / 101),
        # Two classes with boxes, one found: their mean; a class without boxes (1) does not count.
        (found(([0, 0, 10, 10], 0.9, 3), ([5, 5, 9, 9], 0.9, 1)),
         [{"boxes": [[0, 0, 10, 10], [20, 20, 30, 30]], "labels": [3, 0]}], 0.5, 0.5),
    ],
    ids=["perfect", "iou-0.45", "wrong-class", "nothing", "false-positive-first", "half-found", "two-classes"],
)  # fmt: skip
def test_map_at_iou_40_and_50_against_hand_computed_cases(predictions, references, map40, map50):
    scores = score_detections(predictions, references)
    assert scores["overall"] == {"map40": pytest.approx(map40), "map50": pytest.approx(map50), "count": 1}


def test_map_is_reported_per_class_and_over_several_images():
    references = [TRUTH[0], {"boxes": [], "labels": []}, {"boxes": [[0, 0, 4, 4], [5, 5, 9, 9]], "labels": [3, 10]}]
    predictions = [
        *found(([0, 0, 10, 10], 0.9, 3)),
        *found(([1, 1, 2, 2], 0.95, 3)),  # a false positive on an image without findings, ranked first
        *found(([0, 0, 4, 4], 0.5, 3), ([5, 5, 9, 9], 0.7, 10)),
    ]
    scores = score_detections(predictions, references, {3: "Cardiomegaly", 10: "Pleural effusion"})
    # Cardiomegaly: FP (0.95), TP (0.9), TP (0.5): precision 2/3 at recall 1, interpolated everywhere.
    assert scores["Cardiomegaly"] == {"map40": pytest.approx(2 / 3), "map50": pytest.approx(2 / 3), "count": 2}
    assert scores["Pleural effusion"] == {"map40": pytest.approx(1.0), "map50": pytest.approx(1.0), "count": 1}
    assert scores["overall"] == {"map40": pytest.approx(5 / 6), "map50": pytest.approx(5 / 6), "count": 3}
    with pytest.raises(ValueError, match="2 images of predictions but 3 of references"):
        score_detections(predictions[:2], references)
    with pytest.raises(ValueError, match=r"predictions\[0\] must have \['boxes', 'scores', 'labels'\]"):
        score_detections([{"boxes": []}], TRUTH)


# --- training -----------------------------------------------------------------------------------------------------


def test_a_tiny_head_learns_the_synthetic_boxes(prepared, tmp_path):
    values = config_values(prepared, tmp_path / "run", max_steps=150, eval_every=150, checkpoint_every=150)
    result = train(TrainConfig(**values))
    losses = result["losses"]
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    assert result["best"]["metric"] == "map50" and result["best"]["step"] == 150

    train_set = split_examples(prepared, "train")
    task = DetectionTask()
    trained = LapvqaDetectionModel.from_pretrained(tmp_path / "run" / "best").eval()
    torch.manual_seed(0)
    untrained = LapvqaDetectionModel(trained.config).eval()  # as the run started (`seed` 0)
    before = task.score(task.predict(untrained, None, train_set, 8, 0), train_set)["overall"]
    after = task.score(task.predict(trained, None, train_set, 8, 0), train_set)["overall"]
    assert before["map50"] < 0.05 and after["map50"] > 0.2 and after["map40"] >= after["map50"]


def test_the_saved_model_detects_with_its_image_processor_and_records_its_training(prepared, tmp_path):
    train(TrainConfig(**config_values(prepared, tmp_path / "run", max_steps=4, eval_every=4)))
    best = tmp_path / "run" / "best"
    model = AutoModelForObjectDetection.from_pretrained(best)
    assert isinstance(model, LapvqaDetectionModel) and model.config.vis_dim == 32
    assert (model.config.radiologists, model.config.bbox_cost, model.config.eos_coefficient) == ("fused", 5, 0.1)
    assert model.config.feature_recipe["image_size"] == 48
    processor = AutoImageProcessor.from_pretrained(best)
    assert (processor.resize_mode, dict(processor.size)) == ("stretch", {"height": 48, "width": 48})
    assert json.loads((tmp_path / "run" / "best.json").read_text())["scores"]["overall"].keys() == {
        "map40",
        "map50",
        "count",
    }
    recorded = json.loads((tmp_path / "run" / "checkpoints" / "step-4" / "train_config.json").read_text())
    assert (recorded["task"], recorded["radiologists"]) == ("detection", "fused")


def test_a_killed_run_resumes_to_the_uninterrupted_result(prepared, tmp_path, monkeypatch):
    uninterrupted = train(TrainConfig(**config_values(prepared, tmp_path / "a")))
    AcceleratorState._reset_state(True)
    kill_after_the_first_checkpoint(lambda: train(TrainConfig(**config_values(prepared, tmp_path / "b"))), monkeypatch)
    resumed = train(TrainConfig(**config_values(prepared, tmp_path / "b")))
    assert resumed["losses"] == uninterrupted["losses"][4:]
    a = load_file(tmp_path / "a" / "checkpoints" / "step-8" / "model.safetensors")
    b = load_file(tmp_path / "b" / "checkpoints" / "step-8" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def assert_same_scores(found: dict, expected: dict) -> None:
    assert found.keys() == expected.keys()
    assert all(found[group] == pytest.approx(expected[group], abs=1e-9) for group in expected)


def test_evaluate_on_two_processes_equals_one_process(prepared, tmp_path, capsys):
    train(TrainConfig(**config_values(prepared, tmp_path / "run", max_steps=60, eval_every=60, checkpoint_every=60)))
    evaluate = ["evaluate", str(tmp_path / "run" / "best"), "--data-root", str(prepared / "vindr")]
    evaluate += ["--features", str(prepared / "features"), "--batch-size", "4"]
    # The validation scores of training are those `lapvqa evaluate` gives the best model.
    assert lapvqa([*evaluate, "--split", "validation", "--output", str(tmp_path / "validation.json")]) == 0
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    assert_same_scores(json.loads((tmp_path / "validation.json").read_text())["scores"], best["scores"])

    assert lapvqa([*evaluate, "--split", "test", "--output", str(tmp_path / "one.json")]) == 0
    printed = capsys.readouterr().out
    assert "| class | n | map40 | map50 |" in printed and "| overall | 8 |" in printed
    result = accelerate_launch("lapvqa_hf.cli", [*evaluate, "--split", "test", "--output", tmp_path / "two.json"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("| overall | 8 |") == 1
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert two["references"] == one["references"] and len(two["detections"]) == 8
    assert_same_scores(two["scores"], one["scores"])
    assert one["scores"]["overall"]["map50"] > 0
    for mine, theirs in zip(one["detections"], two["detections"], strict=True):
        assert mine["labels"] == theirs["labels"]
        assert np.allclose(mine["boxes"], theirs["boxes"], atol=1e-6)
        assert np.allclose(mine["scores"], theirs["scores"], atol=1e-6)


# --- features and config ------------------------------------------------------------------------------------------


def test_extract_features_for_detection_prepares_images_as_the_heads_image_processor(tmp_path, capsys):
    assert lapvqa(["data", "synthesize", "--dataset", "vindr-cxr", "--output", str(tmp_path / "vindr"), "--subjects",
                   "4"]) == 0  # fmt: skip
    assert "images {'train': 4, 'validation': 0, 'test': 1}" in capsys.readouterr().out
    # A stand-in for the real checkpoint: the lapvqa-vit-l14 recipe's width and input size, one layer.
    encoder = LapvqaVisionModel(
        LapvqaVisionConfig(hidden_size=1024, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    )
    encoder.save_pretrained(tmp_path / "encoder")
    extract = ["extract-features", "--encoder", "lapvqa-vit-l14", "--checkpoint", str(tmp_path / "encoder")]
    extract += ["--data-root", str(tmp_path / "vindr"), "--task", "detection", "--output", str(tmp_path / "f")]
    assert lapvqa(extract) == 0
    store = FeatureStore(tmp_path / "f")
    assert len(store) == 5 and store.image_preparation == DETECTION_IMAGE_PREPARATION

    task, root = DetectionTask(), (tmp_path / "vindr").resolve()
    rows = task.load_splits(root)["train"]
    processor = detection_image_processor(store.recipe)  # stretched to the recipe's 224 px
    with torch.no_grad():
        pixels = processor(processor.load_rgb(rows[0]["image"]))["pixel_values"]
        expected = encoder(pixel_values=pixels).last_hidden_state[0]
    assert torch.allclose(store[image_id(rows[0]["image"], root)].float(), expected, atol=1e-2)

    # Features prepared for the other tasks (by the encoder's own processor) are refused, naming the fix.
    own = LapvqaImageProcessor.for_encoder(encoder.config)
    extract_features(images_of(rows, root=root), store.recipe, tmp_path / "g", encoder, own, progress=False)
    with pytest.raises(FeatureError, match="extract with `lapvqa extract-features --task detection`"):
        task.examples(rows, FeatureStore(tmp_path / "g"), root)
    # ... and the stretched detection features are refused by the text tasks.
    with pytest.raises(FeatureError, match=r"a text head needs .*extract with `lapvqa extract-features` into"):
        training.CaptioningTask().examples([], store, root)
    with pytest.raises(FeatureError, match=r"a text head needs .*extract with `lapvqa extract-features` into"):
        training.DiffVQATask().examples([], store, root)


def test_detection_config_problems_are_one_line_each(prepared, tmp_path):
    values = config_values(prepared, tmp_path / "run")
    assert config_problems(values) == []
    assert config_problems(values | {"best_metric": "bleu4"}) == [
        "best_metric='bleu4': task detection is scored by map40, map50; set best_metric to one of them."
    ]
    assert config_problems(values | {"radiologists": "majority"}) == [
        "radiologists='majority': expected one of fused, all."
    ]
    assert config_problems({"task": "diffvqa", "radiologists": "all"}) == [
        "radiologists: only used with task detection; remove it."
    ]
    assert config_problems({"task": "diffvqa", "best_metric": "map50"}) == [
        "best_metric='map50': task diffvqa is scored by bleu1, bleu2, bleu3, bleu4, rouge1, rougeL, cider; set "
        "best_metric to one of them."
    ]
    assert config_problems(values | {"model": {"bbox_cost": -1}}) == [
        "model: Class validation error for validator 'validate_architecture': ValueError: The matching costs and "
        "loss weights must be finite and >= 0, got {'bbox_cost': -1}."
    ]
