"""`accelerate launch -m lapvqa_hf.train`: a tiny head overfits the synthetic data on 2 CPU processes (gloo), and
a killed run resumes to exactly the result of an uninterrupted one."""

import json
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import (
    accelerate_launch,
    kill_after_the_first_checkpoint,
    prepare_training_release,
    training_config_values,
)
from safetensors.torch import load_file

from lapvqa_hf import LapvqaDiffVQAModel
from lapvqa_hf.data import load_mimic_diff_vqa
from lapvqa_hf.features import FeatureStore
from lapvqa_hf.tokenization import build_gpt2_tokenizer
from lapvqa_hf.train import DiffVQAExamples, TrainConfig, answer_split, train

pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_training_release(tmp_path_factory.mktemp("train"))


def write_config(base: Path, output: Path, **changes) -> Path:
    defaults = dict(warmup_steps=20, max_steps=250, checkpoint_every=250, eval_every=250, eval_max_new_tokens=32)
    values = training_config_values(base, output, **(defaults | changes))
    path = output.with_suffix(".json")
    path.write_text(json.dumps(values))
    return path


@pytest.mark.slow
def test_two_cpu_processes_overfit_the_synthetic_answers(prepared, tmp_path):
    config = write_config(prepared, tmp_path / "run")
    result = accelerate_launch("lapvqa_hf.train", ["--config", config], processes=2)  # DDP over gloo
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "result.json").read_text())
    assert summary["num_processes"] == 2 and summary["steps"] == 250
    assert summary["losses"][-1] < 0.5 < 10 < summary["losses"][0]
    model = LapvqaDiffVQAModel.from_pretrained(tmp_path / "run" / "best").eval()
    assert model.config.feature_recipe["vis_dim"] == 32
    train_set = DiffVQAExamples(
        load_mimic_diff_vqa(prepared / "mimic")["train"],
        FeatureStore(prepared / "features"),
        (prepared / "mimic").resolve(),
    )
    answers = answer_split(model, build_gpt2_tokenizer(), train_set, batch_size=6, max_new_tokens=32)
    reproduced = sum(a == row["answer"] for a, row in zip(answers, train_set.rows, strict=True))
    assert reproduced >= 16, f"only {reproduced}/18 training answers reproduced"
    assert (tmp_path / "run" / "best" / "tokenizer.json").is_file()


def test_a_killed_run_resumes_to_the_uninterrupted_result(prepared, tmp_path, monkeypatch):
    settings = dict(max_steps=12, gradient_accumulation_steps=2, batch_size=4, checkpoint_every=6, eval_every=1000)
    uninterrupted = train(TrainConfig.from_file(write_config(prepared, tmp_path / "a", **settings)))
    AcceleratorState._reset_state(True)
    config_b = TrainConfig.from_file(write_config(prepared, tmp_path / "b", **settings))
    kill_after_the_first_checkpoint(lambda: train(config_b), monkeypatch)
    resumed = train(config_b)

    assert resumed["losses"] == uninterrupted["losses"][6:]
    a = load_file(tmp_path / "a" / "checkpoints" / "step-12" / "model.safetensors")
    b = load_file(tmp_path / "b" / "checkpoints" / "step-12" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_config_file_with_overrides(prepared, tmp_path):
    path = write_config(prepared, tmp_path / "c")
    config = TrainConfig.from_file(path, ["max_steps=7", "mixed_precision=bf16", 'model={"hidden_size": 16}'])
    assert (config.max_steps, config.mixed_precision, config.model) == (7, "bf16", {"hidden_size": 16})
    with pytest.raises(ValueError, match="--set max_step: unknown field"):
        TrainConfig.from_file(path, ["max_step=7"])


def test_evaluate_cli_scores_a_split_per_question_type(prepared, tmp_path, capsys):
    from lapvqa_hf.cli import main as lapvqa

    train(
        TrainConfig.from_file(
            write_config(prepared, tmp_path / "run", max_steps=30, eval_every=30, checkpoint_every=30)
        )
    )
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
        "32",
        "--output",
        str(tmp_path / "scores.json"),
    ]
    assert lapvqa(args) == 0
    printed = capsys.readouterr().out
    assert "| question type | n | bleu1 | bleu2 | bleu3 | bleu4 | rouge1 | rougeL | cider |" in printed
    assert "| overall | 6 |" in printed and "| presence | 2 |" in printed
    saved = json.loads((tmp_path / "scores.json").read_text())
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    assert saved["scores"]["overall"]["bleu4"] == pytest.approx(best["scores"]["overall"]["bleu4"])
    assert lapvqa([*args[:-2], "--features", str(tmp_path)]) == 1
    assert "no features.json" in capsys.readouterr().err
    assert lapvqa([*args[:-4], "--max-new-tokens", "64"]) == 1  # 13-token prompts + 64 > 64 positions
    assert "Use max_new_tokens <= 52" in capsys.readouterr().err
