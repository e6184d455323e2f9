"""Training a report-generation head on stored features of a frozen encoder (`"task": "report-generation"`): its
validation scores improve, the best head reports from images through that encoder, and `lapvqa evaluate` gives the
validation scores of training, on 1 process and on 2."""

import dataclasses
import json

import pytest
import torch
from conftest import TINY_DECODER, accelerate_launch
from transformers import AutoModel, pipeline

from lapvqa_hf import LapvqaReportGenerationModel, LapvqaVisionConfig, LapvqaVisionModel
from lapvqa_hf.cli import main as lapvqa
from lapvqa_hf.data import load_mimic_cxr_reports, write_synthetic_mimic_diff_vqa
from lapvqa_hf.features import FeatureStore, extract_features, images_of, recipe_for
from lapvqa_hf.models.image_processing_lapvqa import LapvqaImageProcessor
from lapvqa_hf.train import ReportExamples, ReportGenerationTask, TrainConfig, report_split, train

TINY_ENCODER = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48, image_size=28)

pytestmark = pytest.mark.usefixtures("one_torch_thread", "fresh_accelerator_state")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A synthetic MIMIC-CXR release, a tiny encoder in its own folder and its features of every report's image."""
    base = tmp_path_factory.mktemp("report-generation")
    root = write_synthetic_mimic_diff_vqa(base / "mimic", num_subjects=10)
    rows = [row for split in load_mimic_cxr_reports(root).values() for row in split]
    torch.manual_seed(0)
    encoder = LapvqaVisionModel(LapvqaVisionConfig(**TINY_ENCODER)).eval()
    encoder.save_pretrained(base / "encoder")
    LapvqaImageProcessor(size={"height": 28, "width": 28}, resize_mode="stretch").save_pretrained(base / "encoder")
    recipe = dataclasses.replace(
        recipe_for("lapvqa-vit-l14"), image_size=28, vis_dim=32, checkpoint=str(base / "encoder")
    )
    extract_features(images_of(rows, root=root.resolve()), recipe, base / "features", encoder=encoder, progress=False)
    return base


def test_a_tiny_head_learns_the_reports_and_reports_from_images_through_its_encoder(prepared, tmp_path, monkeypatch):
    validated = []
    score = ReportGenerationTask.score

    def recorded(self, predictions, dataset):  # every validation's scores
        scores = score(self, predictions, dataset)
        validated.append(scores["overall"])
        return scores

    monkeypatch.setattr(ReportGenerationTask, "score", recorded)
    config = TrainConfig(
        data_root=str(prepared / "mimic"),
        features_dir=str(prepared / "features"),
        output_dir=str(tmp_path / "run"),
        task="report-generation",
        model=TINY_DECODER,
        learning_rate=0.02,
        warmup_steps=10,
        max_steps=60,
        batch_size=4,
        checkpoint_every=1000,
        eval_every=10,
        eval_max_new_tokens=48,
    )
    result = train(config)
    assert len(validated) == 6 and validated[0]["count"] == 4
    first, last = validated[0]["bleu4"], validated[-1]["bleu4"]
    assert last > first + 0.3 and last > 0.6, [round(v["bleu4"], 3) for v in validated]
    assert result["best"]["scores"]["overall"]["bleu4"] == pytest.approx(max(v["bleu4"] for v in validated))

    best = tmp_path / "run" / "best"
    model = AutoModel.from_pretrained(best).eval()
    assert type(model) is LapvqaReportGenerationModel and model.config.encoder_finetuned is False
    assert model.config.feature_recipe["checkpoint"] == str(prepared / "encoder") and model.config.vis_dim == 32
    rows = load_mimic_cxr_reports(prepared / "mimic")["validation"]
    examples = ReportExamples(rows, FeatureStore(prepared / "features"), (prepared / "mimic").resolve())
    tokenizer = ReportGenerationTask().tokenizer(model)
    from_features = report_split(model, tokenizer, examples, batch_size=4, max_new_tokens=48)
    pipe = pipeline(model=str(best), trust_remote_code=True)
    from_images = [report["generated_text"] for (report,) in pipe(list(rows["image"]), max_new_tokens=48)]
    assert from_images == from_features


def evaluate_arguments(prepared, run) -> list[str]:
    """Trains a head briefly into `run` (validated once, at its last step); `lapvqa evaluate` of its best model on
    the validation split."""
    values = dict(
        data_root=str(prepared / "mimic"),
        features_dir=str(prepared / "features"),
        output_dir=str(run),
        task="report-generation",
        model=TINY_DECODER,
        learning_rate=0.02,
        warmup_steps=5,
        max_steps=30,
        batch_size=4,
        checkpoint_every=1000,
        eval_every=30,
        eval_max_new_tokens=24,
    )
    train(TrainConfig(**values))
    arguments = ["evaluate", str(run / "best"), "--data-root", str(prepared / "mimic"), "--features"]
    return arguments + [
        str(prepared / "features"),
        "--split",
        "validation",
        "--max-new-tokens",
        "24",
        "--batch-size",
        "4",
    ]


def test_evaluate_gives_the_validation_scores_of_training(prepared, tmp_path, capsys):
    evaluate = evaluate_arguments(prepared, tmp_path / "run")
    assert lapvqa([*evaluate, "--output", str(tmp_path / "one.json")]) == 0
    assert "| reports | n | bleu1 | bleu2 | bleu3 | bleu4 | rouge1 | rougeL | cider |" in capsys.readouterr().out
    one = json.loads((tmp_path / "one.json").read_text())
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    assert one["scores"]["overall"] == pytest.approx(best["scores"]["overall"])
    assert len(one["answers"]) == len(one["references"]) == 4


@pytest.mark.slow  # accelerate launch of 2 processes: ~30 s on 2 shared cores
def test_evaluate_on_two_processes_equals_one_process(prepared, tmp_path):
    evaluate = evaluate_arguments(prepared, tmp_path / "run")
    assert lapvqa([*evaluate, "--output", str(tmp_path / "one.json")]) == 0
    result = accelerate_launch("lapvqa_hf.cli", [*evaluate, "--output", tmp_path / "two.json"], timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert two["answers"] == one["answers"] and two["references"] == one["references"]
    assert two["scores"]["overall"] == pytest.approx(one["scores"]["overall"])


def test_radgraph_f1_joins_the_scores_where_radgraph_is_installed(monkeypatch):
    import importlib.machinery
    import sys
    import types
    from types import SimpleNamespace

    dataset = SimpleNamespace(rows=[{"report": "No effusion."}, {"report": "Small left pleural effusion."}])
    predictions = ["No effusion.", "Left pleural effusion."]
    assert "radgraph_f1" not in ReportGenerationTask().score(predictions, dataset)["overall"], "not installed here"

    class F1RadGraph:  # radgraph's interface: F1RadGraph(reward_level)(hyps=, refs=) -> (score, ...)
        def __init__(self, reward_level: str):
            assert reward_level == "partial"

        def __call__(self, hyps, refs):
            assert (hyps, refs) == (predictions, [row["report"] for row in dataset.rows])
            return 0.25, None, None, None

    radgraph = types.ModuleType("radgraph")
    radgraph.F1RadGraph, radgraph.__spec__ = F1RadGraph, importlib.machinery.ModuleSpec("radgraph", None)
    monkeypatch.setitem(sys.modules, "radgraph", radgraph)
    scores = ReportGenerationTask().score(predictions, dataset)["overall"]
    assert scores["radgraph_f1"] == 0.25 and scores["count"] == 2 and "bleu4" in scores
