"""`lapvqa probe`: linear probes of frozen image embeddings on NIH ChestX-ray14 and CheXpert (synthetic releases in
their published layouts), for two-tower models, vision encoders and encoder recipes."""

import csv
import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from lapvqa_hf import (
    LapvqaImageProcessor,
    LapvqaTwoTowerConfig,
    LapvqaTwoTowerModel,
    LapvqaVisionConfig,
    LapvqaVisionModel,
)
from lapvqa_hf.cli import main as lapvqa
from lapvqa_hf.probe import load_embedder
from lapvqa_hf.probe_data import CHEXPERT_COMPETITION_LABELS, NIH_LABELS, load_chexpert, load_nih_cxr14

TINY_VISION = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, image_size=28,
                   patch_size=14)  # fmt: skip


@pytest.fixture(scope="module")
def releases(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("releases")
    assert lapvqa(["data", "synthesize", "--dataset", "nih-cxr14", "--output", str(base / "nih")]) == 0
    chexpert = base / "CheXpert-v1.0-small"
    assert lapvqa(["data", "synthesize", "--dataset", "chexpert", "--output", str(chexpert)]) == 0
    return {"nih-cxr14": base / "nih", "chexpert": chexpert}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """Tiny two-tower and vision-encoder folders, each with its image processor."""
    base = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    config = LapvqaTwoTowerConfig(
        vision_config=TINY_VISION,
        text_config=dict(hidden_size=16, num_attention_heads=2, intermediate_size=32, num_hidden_layers=1),
        projection_dim=8,
    )
    LapvqaTwoTowerModel(config).save_pretrained(base / "two-tower")
    LapvqaImageProcessor.for_encoder(config.vision_config).save_pretrained(base / "two-tower")
    vision = LapvqaVisionConfig(**TINY_VISION)
    LapvqaVisionModel(vision).save_pretrained(base / "vision")
    LapvqaImageProcessor.for_encoder(vision).save_pretrained(base / "vision")
    return {"two-tower": base / "two-tower", "vision": base / "vision"}


def probe(model, dataset: str, root, *options) -> int:
    return lapvqa(["probe", str(model), "--dataset", dataset, "--root", str(root), *map(str, options)])


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: "), err
    return err


def test_the_synthetic_releases_have_the_published_layouts(releases):
    nih = releases["nih-cxr14"]
    with open(nih / "Data_Entry_2017.csv", newline="") as file:
        header = next(csv.reader(file))
    assert header[:3] == ["Image Index", "Finding Labels", "Follow-up #"]
    assert sorted(path.parent.parent.name for path in nih.glob("images_*/images/*.png"))[::-1][0] == "images_002"
    first = (nih / "test_list.txt").read_text().split()[0]
    assert Image.open(next(nih.glob(f"images_*/images/{first}"))).mode == "L"
    chexpert = releases["chexpert"]
    with open(chexpert / "train.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert rows[0]["Path"].startswith("CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg")
    assert {row["Atelectasis"] for row in rows} <= {"1.0", "0.0", "-1.0", ""} and "-1.0" in {
        row[label] for row in rows for label in CHEXPERT_COMPETITION_LABELS
    }
    assert Image.open(chexpert.parent / rows[0]["Path"]).format == "JPEG"


def test_the_loaders_read_the_official_splits(releases):
    nih = releases["nih-cxr14"]
    splits = load_nih_cxr14(nih)
    names = {split: [path.split("/")[-1] for path in splits[split].images] for split in ("train", "test")}
    assert names["test"] == (nih / "test_list.txt").read_text().split()
    assert names["train"] == (nih / "train_val_list.txt").read_text().split()
    assert not set(names["train"]) & set(names["test"]), "an image of test_list.txt never lands in train"
    with open(nih / "Data_Entry_2017.csv", newline="") as file:
        findings = {row["Image Index"]: row["Finding Labels"].split("|") for row in csv.DictReader(file)}
    for name, labels in zip(names["test"], splits["test"].labels, strict=True):
        assert [label for label, value in zip(NIH_LABELS, labels, strict=True) if value] == [
            label for label in findings[name] if label != "No Finding"
        ]
    chexpert = releases["chexpert"]
    splits = load_chexpert(chexpert)
    for split, table in (("train", "train.csv"), ("test", "valid.csv")):
        with open(chexpert / table, newline="") as file:
            paths = [str(chexpert.parent / row["Path"]) for row in csv.DictReader(file)]
        assert splits[split].images == paths and splits[split].source == table


def test_chexpert_paths_are_found_from_the_roots_parent_the_root_or_a_renamed_root(releases, tmp_path):
    renamed = shutil.copytree(releases["chexpert"], tmp_path / "chexpert")  # Kaggle's copy: the folder renamed
    assert load_chexpert(renamed)["test"].images[0] == str(renamed / "valid/patient64541/study1/view1_frontal.jpg")
    beside = tmp_path / "tables"  # the tables in the root, the release folder inside it
    shutil.copytree(releases["chexpert"], beside / "CheXpert-v1.0-small")
    for table in ("train.csv", "valid.csv"):
        shutil.copy(releases["chexpert"] / table, beside / table)
    assert load_chexpert(beside)["train"].images[0].startswith(str(beside / "CheXpert-v1.0-small" / "train"))


def test_the_uncertain_policies_give_the_expected_labels(tmp_path):
    root = tmp_path / "CheXpert-v1.0-small"
    columns = ["Path", *CHEXPERT_COMPETITION_LABELS]
    values = [["1.0", "-1.0", "", "0.0", "-1.0"], ["-1.0", "0.0", "1.0", "", "1.0"], ["0.0", "", "-1.0", "1.0", "0.0"]]
    root.mkdir()
    for table, split in (("train.csv", "train"), ("valid.csv", "valid")):
        with open(root / table, "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(columns)
            for index, row in enumerate(values):
                path = f"{split}/patient{index}/study1/view1_frontal.jpg"
                (root / path).parent.mkdir(parents=True, exist_ok=True)
                Image.new("L", (8, 8)).save(root / path)
                writer.writerow([f"CheXpert-v1.0-small/{path}", *row])
    nan = float("nan")
    expected = {
        "ignore": [[1, nan, 0, 0, nan], [nan, 0, 1, 0, 1], [0, 0, nan, 1, 0]],
        "ones": [[1, 1, 0, 0, 1], [1, 0, 1, 0, 1], [0, 0, 1, 1, 0]],
        "zeros": [[1, 0, 0, 0, 0], [0, 0, 1, 0, 1], [0, 0, 0, 1, 0]],
    }
    for policy, labels in expected.items():
        np.testing.assert_array_equal(load_chexpert(root, uncertain=policy)["train"].labels, np.array(labels))


def test_a_two_tower_model_probes_nih_end_to_end(releases, models, tmp_path, capsys):
    assert probe(models["two-tower"], "nih-cxr14", releases["nih-cxr14"], "--output", tmp_path / "out") == 0
    out = capsys.readouterr().out
    assert "| label | train positives | test positives | AUC |" in out
    assert all(f"| {label} | " in out for label in NIH_LABELS)
    assert re.search(r"^mean AUC over 14 labels: [01]\.\d{3}$", out, re.MULTILINE), out
    result = json.loads((tmp_path / "out" / "probe.json").read_text())
    assert result["model"] == str(models["two-tower"]) and "get_image_features" in result["embedding"]
    assert result["dataset"] == "nih-cxr14" and result["uncertain_policy"] is None
    splits = load_nih_cxr14(releases["nih-cxr14"])
    assert result["splits"] == {
        "train": {"source": "train_val_list.txt", "images": len(splits["train"].images)},
        "test": {"source": "test_list.txt", "images": len(splits["test"].images)},
    }
    assert list(result["labels"]) == list(NIH_LABELS) == result["mean_over"] and result["mean_excludes"] == []
    aucs = [row["auc"] for row in result["labels"].values()]
    assert all(0 <= auc <= 1 for auc in aucs) and result["mean_auc"] == pytest.approx(np.mean(aucs))
    assert f"mean AUC over 14 labels: {result['mean_auc']:.3f}" in out
    assert {"torch", "transformers", "scikit-learn"} <= set(result["versions"])
    assert not list((tmp_path / "out").glob(".*")), "no temporary file is left"


def test_a_vision_encoder_probes_chexpert_under_each_uncertain_policy(releases, models, tmp_path, capsys):
    results = {}
    for policy in ("ignore", "ones", "zeros"):
        output = tmp_path / policy
        options = ["--output", output] + (["--uncertain", policy] if policy != "ignore" else [])
        assert probe(models["vision"], "chexpert", releases["chexpert"], *options) == 0
        results[policy] = json.loads((output / "probe.json").read_text())
        assert re.search(r"^mean AUC over 5 labels: [01]\.\d{3}$", capsys.readouterr().out, re.MULTILINE)
    for policy, result in results.items():
        assert result["uncertain_policy"] == policy and "blank labels" in result["blank_labels"]
        assert list(result["labels"]) == list(CHEXPERT_COMPETITION_LABELS)
        assert all(0 <= row["auc"] <= 1 for row in result["labels"].values())
        assert result["splits"]["test"]["source"] == "valid.csv" and "normed CLS" in result["embedding"]
    train = load_chexpert(releases["chexpert"])["train"]
    uncertain = np.isnan(train.labels).sum(axis=0)
    for column, label in enumerate(CHEXPERT_COMPETITION_LABELS):
        counts = {policy: result["labels"][label]["train"] for policy, result in results.items()}
        assert counts["ignore"]["examples"] == len(train.images) - uncertain[column]
        assert counts["ones"]["positives"] == counts["zeros"]["positives"] + uncertain[column]
        assert counts["ones"]["examples"] == counts["zeros"]["examples"] == len(train.images)


def test_a_label_with_one_class_is_skipped_named_and_left_out_of_the_mean(releases, models, tmp_path, capsys):
    root = shutil.copytree(releases["nih-cxr14"], tmp_path / "nih")
    test_images = set((root / "test_list.txt").read_text().split())
    with open(root / "Data_Entry_2017.csv", newline="") as file:
        reader = csv.DictReader(file)
        columns, rows = reader.fieldnames, list(reader)
    for row in rows:  # Hernia only in training images
        if row["Image Index"] in test_images:
            kept = [label for label in row["Finding Labels"].split("|") if label != "Hernia"]
            row["Finding Labels"] = "|".join(kept) or "No Finding"
    with open(root / "Data_Entry_2017.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    assert probe(models["vision"], "nih-cxr14", root, "--output", tmp_path / "out", "--batch-size", 5) == 0
    out = capsys.readouterr().out
    assert re.search(r"\| Hernia \| \d+/\d+ \| 0/\d+ \| skipped: only negatives in the test split \|", out), out
    assert re.search(r"^mean AUC over 13 labels: [01]\.\d{3} \(skipped, not in the mean: Hernia\)$", out, re.M)
    result = json.loads((tmp_path / "out" / "probe.json").read_text())
    hernia = result["labels"]["Hernia"]
    assert hernia["auc"] is None and hernia["skipped"] == "only negatives in the test split"
    assert result["mean_excludes"] == ["Hernia"] and result["mean_over"] == list(NIH_LABELS[:-1])
    assert result["mean_auc"] == pytest.approx(np.mean([result["labels"][label]["auc"] for label in NIH_LABELS[:-1]]))


def test_a_recipe_name_probes_its_mean_patch_token_from_a_local_encoder_checkpoint(releases, tmp_path, capsys):
    folder = tmp_path / "lapvqa-vit-l14"  # the recipe's width (1024), tiny otherwise
    config = LapvqaVisionConfig(**{**TINY_VISION, "hidden_size": 1024})
    LapvqaVisionModel(config).save_pretrained(folder)
    LapvqaImageProcessor.for_encoder(config).save_pretrained(folder)
    options = ["--encoder-checkpoint", folder, "--output", tmp_path / "out"]
    assert probe("lapvqa-vit-l14", "chexpert", releases["chexpert"], *options) == 0
    result = json.loads((tmp_path / "out" / "probe.json").read_text())
    assert result["model"] == f"lapvqa-vit-l14 ({folder})" and "mean of the lapvqa-vit-l14" in result["embedding"]
    assert all(0 <= row["auc"] <= 1 for row in result["labels"].values())
    image = load_chexpert(releases["chexpert"])["test"].images[0]
    encoder = LapvqaVisionModel.from_pretrained(folder).eval()
    with torch.no_grad():
        tokens = encoder(LapvqaImageProcessor.from_pretrained(folder)([image])["pixel_values"]).last_hidden_state
        embedding = load_embedder("lapvqa-vit-l14", str(folder), "cpu").embed([image])
    torch.testing.assert_close(embedding, tokens.mean(dim=1))


def test_problems_are_one_line_errors_naming_what_was_expected_and_found(releases, models, tmp_path, capsys):
    nih = shutil.copytree(releases["nih-cxr14"], tmp_path / "nih")
    (nih / "Data_Entry_2017.csv").unlink()
    assert probe(models["vision"], "nih-cxr14", nih) == 1
    error = one_line_error(capsys)
    assert "no Data_Entry_2017.csv; expected an NIH ChestX-ray14 release" in error and "found images_001/" in error
    nih = shutil.copytree(releases["nih-cxr14"], tmp_path / "nih2")
    gone = (nih / "test_list.txt").read_text().split()[:2]
    for name in gone:
        next(nih.glob(f"images_*/images/{name}")).unlink()
    assert probe(models["vision"], "nih-cxr14", nih) == 1
    error = one_line_error(capsys)
    assert f"2 of the {len((nih / 'test_list.txt').read_text().split())} images listed in" in error
    assert f"test_list.txt are missing (expected under {nih}/images*/): {gone[0]}, {gone[1]}." in error
    chexpert = shutil.copytree(releases["chexpert"], tmp_path / "CheXpert-v1.0-small")
    (chexpert / "valid.csv").unlink()
    assert probe(models["vision"], "chexpert", chexpert) == 1
    assert "no valid.csv; expected a CheXpert-v1.0-small release" in one_line_error(capsys)
    assert probe(models["vision"], "chexpert", chexpert.parent / "nowhere") == 1
    assert "found no such folder" in one_line_error(capsys)
    for arguments, expected in (
        (["sigclip", "--dataset", "chexpert"], "'sigclip' is no encoder recipe name"),
        ([models["vision"], "--dataset", "nih-cxr14", "--uncertain", "ones"], "--uncertain applies to CheXpert"),
        ([models["vision"], "--dataset", "nih-cxr14", "--encoder-checkpoint", "x"], "--encoder-checkpoint goes with"),
        ([models["vision"], "--dataset", "nih-cxr14", "--batch-size", "0"], "--batch-size must be a positive"),
    ):
        root = releases["chexpert" if "chexpert" in arguments else "nih-cxr14"]
        assert lapvqa(["probe", *map(str, arguments), "--root", str(root)]) == 1
        assert expected in one_line_error(capsys)
