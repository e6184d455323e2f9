"""`lapvqa retrieve`: a tiny converted two-tower model ranks reports for X-rays and X-rays for reports, the rankings
agree with `model.similarity`, Recall@K on paired data, and one-line refusals."""

import csv
import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize_at_scale_
from lapvqa_hf.convert.original import ContrastiveModel
from lapvqa_hf.convert.two_tower import convert_two_tower
from PIL import Image
from transformers import AutoModel, AutoProcessor

from lapvqa_hf import LapvqaVisionConfig
from lapvqa_hf.cli import main as lapvqa
from lapvqa_hf.data import write_synthetic_mimic_diff_vqa
from lapvqa_hf.metrics.retrieval import recall_at_k

TINY = dict(
    img_size=28,
    patch_size=14,
    vision_width=32,
    vision_depth=1,
    vision_heads=4,
    text_width=24,
    text_heads=4,
    text_depth=1,
    text_ffn=40,
    text_max_len=16,
    embed_dim=20,
)
DOCS = Path(__file__).resolve().parents[1] / "docs" / "models.md"
REPORTS = {
    "s1": "Small left pleural effusion.",
    "s2": "No acute cardiopulmonary process.",
    "s3": "Large right pleural effusion. No pneumothorax.",
    "s4": "The lungs are clear.",
    "s5": "Moderate cardiomegaly.",
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A converted contrastive two-tower model with random trained-like weights."""
    base = tmp_path_factory.mktemp("two-tower")
    original = ContrastiveModel(**TINY)
    randomize_at_scale_(original, "trained-like", ("image_proj.weight", "text_proj.weight"), seed=5)
    with torch.no_grad():
        original.logit_scale.fill_(3.0)
    torch.save(original.state_dict(), base / "model_best.pt")
    return convert_two_tower(base / "model_best.pt", base / "model", 4, 4, log=lambda _: None)


@pytest.fixture
def data(tmp_path):
    """X-rays s1..s5 (s5 is no image file) under `xrays/`, and the files of the two layouts naming them."""
    (tmp_path / "xrays").mkdir()
    rng = np.random.default_rng(0)
    for name in list(REPORTS)[:4]:
        pixels = (rng.random((36, 30)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(tmp_path / "xrays" / f"{name}.png")
    (tmp_path / "xrays" / "s5.png").write_bytes(b"not a png")
    write_csv(tmp_path / "images.csv", ["id", "image"], [[name, f"xrays/{name}.png"] for name in REPORTS])
    write_csv(tmp_path / "reports.csv", ["id", "report"], [[name, text] for name, text in REPORTS.items()])
    pairs = [{"image": f"{name}.png", "report": text} for name, text in REPORTS.items()]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in pairs))
    return tmp_path


def write_csv(path, header: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def expected_logits(folder, data) -> torch.Tensor:
    """`model.similarity` of the readable X-rays s1..s4 against every report, `[4, 5]`, as a user computes it."""
    model, processor = AutoModel.from_pretrained(folder), AutoProcessor.from_pretrained(folder)
    inputs = processor(images=[data / "xrays" / f"s{i}.png" for i in range(1, 5)], text=list(REPORTS.values()))
    with torch.no_grad():
        images = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        texts = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        return model.similarity(images, texts.pooler_output)


def check_ranking(results: list[dict], ids: list, logits: torch.Tensor, top_k: int) -> None:
    """The listed ids are the `top_k` best by `logits` (one query's row over `ids`), with their scores, best first."""
    scores = [result["score"] for result in results]
    assert len(results) == top_k and scores == sorted(scores, reverse=True)
    best = logits.argsort(descending=True)[:top_k].tolist()
    assert [result["id"] for result in results] == [ids[j] for j in best]
    assert scores == pytest.approx(logits[best].tolist(), abs=2e-4)


def test_recall_at_k_on_hand_made_matrices():
    perfect = torch.eye(4) + 0.1
    reversed_ = -torch.eye(4)  # every match scores below every other item
    assert [recall_at_k(perfect, k) for k in (1, 2, 4)] == [1.0, 1.0, 1.0]
    assert [recall_at_k(reversed_, k) for k in (1, 3, 4)] == [0.0, 0.0, 1.0]
    ties = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 0.5], [0.3, 0.3, 0.3]])
    # query 0 ties its match with one item, query 1 wins, query 2 ties with all: a tie counts against the match
    assert [recall_at_k(ties, k) for k in (1, 2, 3)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert recall_at_k(torch.zeros(5, 5), 4) == 0.0  # a model that scores everything alike retrieves nothing
    assert recall_at_k(torch.tensor([[0.2, 0.9], [0.1, 0.8]]), 1) == 0.5


def test_image_to_report_ranks_every_report_for_each_xray_and_scores_the_pairs(folder, data, capsys):
    output = data / "out" / "ranked.jsonl"
    arguments = ["--images", str(data / "images.csv"), "--reports", str(data / "reports.csv")]
    assert (
        lapvqa(["retrieve", str(folder), *arguments, "--output", str(output), "--top-k", "3", "--batch-size", "3"]) == 0
    )
    lines = read_jsonl(output)
    assert [line["id"] for line in lines] == list(REPORTS)
    logits = expected_logits(folder, data)
    for line, row in zip(lines[:4], logits, strict=True):
        check_ranking(line["reports"], list(REPORTS), row, 3)
    assert (
        set(lines[4]) == {"id", "error"} and lines[4]["error"].startswith("image: ") and "s5.png" in lines[4]["error"]
    )
    printed = capsys.readouterr().out
    assert "5 image queries, top 3 each; 1 image could not be read" in printed
    assert "| Recall@K (4 pairs) | R@1 | R@5 | R@10 |" in printed
    metrics = json.loads((data / "out" / "ranked.jsonl.metrics.json").read_text())
    paired = logits[:, :4]  # the readable pairs: s1..s4 against their own reports
    assert metrics["recall"] == {
        "image-to-report": {f"R@{k}": recall_at_k(paired, k) for k in (1, 5, 10)},
        "report-to-image": {f"R@{k}": recall_at_k(paired.T, k) for k in (1, 5, 10)},
    }
    assert {key: metrics[key] for key in ("direction", "images", "reports", "pairs", "unreadable_images", "k")} == {
        "direction": "image-to-report",
        "images": 5,
        "reports": 5,
        "pairs": 4,
        "unreadable_images": 1,
        "k": [1, 5, 10],
    }
    assert metrics["model"] == str(folder)


def test_report_to_image_from_a_pairs_file_leaves_unreadable_images_out_of_the_corpus(folder, data):
    output = data / "ranked.jsonl"
    arguments = ["--pairs", str(data / "pairs.jsonl"), "--image-root", str(data / "xrays"), "--direction"]
    assert (
        lapvqa(["retrieve", str(folder), *arguments, "report-to-image", "--output", str(output), "--top-k", "9"]) == 0
    )
    lines = read_jsonl(output)
    assert [line["id"] for line in lines] == [0, 1, 2, 3, 4]  # no id column: row numbers
    logits = expected_logits(folder, data)
    for line, column in zip(lines, logits.T, strict=True):
        check_ranking(line["images"], [0, 1, 2, 3], column, 4)  # the top 9 of the 4 readable images
    metrics = json.loads((data / "ranked.jsonl.metrics.json").read_text())
    assert metrics["direction"] == "report-to-image" and metrics["pairs"] == 4
    assert metrics["recall"]["report-to-image"]["R@1"] == recall_at_k(logits[:, :4].T, 1)


def test_unpaired_corpora_are_ranked_without_recall(folder, data, capsys):
    write_csv(data / "other.csv", ["id", "report"], [["r1", "Small effusion."], ["r2", "Clear lungs."]])
    output = data / "ranked.jsonl"
    (data / "ranked.jsonl.metrics.json").write_text("{}")  # a stale file of an earlier paired run
    arguments = ["--images", str(data / "images.csv"), "--reports", str(data / "other.csv"), "--output", str(output)]
    assert lapvqa(["retrieve", str(folder), *arguments, "--direction", "report-to-image"]) == 0
    assert [len(line["images"]) for line in read_jsonl(output)] == [4, 4]
    assert "Recall" not in capsys.readouterr().out and not (data / "ranked.jsonl.metrics.json").exists()


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("not-two-tower", "is a lapvqa_vision model; `lapvqa retrieve` takes a two-tower model (lapvqa_two_tower"),
        ("missing-column", "needs the columns ['report']; the header has ['id', 'text'] (['report'] missing)"),
        ("duplicate-id", "id 's1' is on lines 2 and 3; ids must be unique"),
        ("empty-corpus", "reports.csv: no rows"),
        ("no-id", "reports.jsonl line 1: id: missing or empty"),
        ("no-reports", "pass --images and --reports"),
    ],
)
def test_problems_are_one_line_errors_and_nothing_is_written(folder, data, capsys, case, message):
    model, reports = str(folder), data / "reports.csv"
    if case == "not-two-tower":
        model = str(data / "vision")
        LapvqaVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4).save_pretrained(model)
    elif case == "missing-column":
        write_csv(reports, ["id", "text"], [["s1", "Clear."]])
    elif case == "duplicate-id":
        write_csv(reports, ["id", "report"], [["s1", "Clear."], ["s1", "Effusion."]])
    elif case == "empty-corpus":
        write_csv(reports, ["id", "report"], [])
    elif case == "no-id":
        reports = data / "reports.jsonl"
        reports.write_text(json.dumps({"report": "Clear."}) + "\n")
    output = data / "ranked.jsonl"
    arguments = ["--images", str(data / "images.csv")] + (["--reports", str(reports)] if case != "no-reports" else [])
    assert lapvqa(["retrieve", model, *arguments, "--output", str(output)]) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and error.startswith("error: ") and message in error
    assert not output.exists() and not list(data.glob(".ranked.jsonl*"))


def test_the_docs_pairs_file_of_a_mimic_release_and_command_run(folder, tmp_path, monkeypatch, capsys):
    section = DOCS.read_text().split("## Retrieval\n", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    commands = [shlex.split(line) for line in re.search(r"```bash\n(.*?)```", section, re.S).group(1).splitlines()]
    command = next(command for command in commands if "--pairs" in command)
    monkeypatch.chdir(tmp_path)
    write_synthetic_mimic_diff_vqa(tmp_path / "mimic-cxr-jpg", num_subjects=10)
    exec(compile(code, "docs/models.md (Retrieval)", "exec"), {})
    assert command[:3] == ["lapvqa", "retrieve", "lapvqa-pretrain-contrastive"]
    assert lapvqa([command[1], str(folder), *command[3:]]) == 0
    lines = read_jsonl(tmp_path / "test_ranked.jsonl")
    assert len(lines) == 4 and all(len(line["reports"]) == 4 for line in lines)  # 2 test subjects, 2 studies each
    metrics = json.loads((tmp_path / "test_ranked.jsonl.metrics.json").read_text())
    assert (metrics["pairs"], metrics["unreadable_images"]) == (
        4,
        0,
    ) and "| image-to-report |" in capsys.readouterr().out
