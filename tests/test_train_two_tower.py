"""Pretraining the two-tower model from images: both losses over the global batch (negatives gathered across
processes with gradients), validation by Recall@K, the best model saved as a folder the zero-shot pipeline runs,
exact resume, and 2 processes equal to 1."""

import json

import pytest
import torch
from conftest import accelerate_launch, kill_after_the_first_checkpoint
from transformers import pipeline

from lapvqa_hf.data import write_synthetic_mimic_diff_vqa
from lapvqa_hf.metrics.retrieval import match_ranks, recall_at_k, score_retrieval
from lapvqa_hf.train import TrainConfig, TrainConfigError, train

TINY_TWO_TOWER = dict(
    vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48, image_size=28),
    text_config=dict(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=48,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
    ),
    projection_dim=8,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread", "fresh_accelerator_state")


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    # 12 subjects: 16 training pairs, whole batches of 4 and 8
    return write_synthetic_mimic_diff_vqa(tmp_path_factory.mktemp("two-tower") / "mimic", num_subjects=12)


def values_for(release, output, **changes) -> dict:
    return (
        dict(
            data_root=str(release),
            output_dir=str(output),
            task="two-tower",
            inputs="pixels",
            train_encoder=True,
            model=TINY_TWO_TOWER,
            learning_rate=0.005,
            warmup_steps=1,
            max_steps=4,
            batch_size=4,
            checkpoint_every=2,
            eval_every=2,
            best_metric="mean_recall",
        )
        | changes
    )


def test_pretraining_from_images_saves_a_best_model_the_zero_shot_pipeline_runs(release, tmp_path):
    result = train(TrainConfig(**values_for(release, tmp_path / "run")))
    assert result["steps"] == 4 and all(torch.isfinite(torch.tensor(result["losses"])))
    best = result["best"]
    assert best["metric"] == "mean_recall" and set(best["scores"]["overall"]) >= {"i2r_recall1", "r2i_recall10"}
    pipe = pipeline("lapvqa-zero-shot-findings", model=str(tmp_path / "run" / "best"), trust_remote_code=True)
    image = next(release.rglob("*.jpg"))
    scores = pipe(str(image), candidate_labels=["pleural effusion", "no acute cardiopulmonary process"])
    assert sum(s["score"] for s in scores) == pytest.approx(1.0)


def test_the_sigmoid_model_trains_with_its_own_loss_in_bf16(release, tmp_path):
    model = TINY_TWO_TOWER | {"use_logit_bias": True}
    values = values_for(release, tmp_path / "run", model=model, mixed_precision="bf16", max_steps=2, eval_every=100)
    result = train(TrainConfig(**values))
    assert len(result["losses"]) == 2 and all(torch.isfinite(torch.tensor(result["losses"])))
    saved = json.loads((tmp_path / "run" / "checkpoints" / "step-2" / "train_config.json").read_text())
    assert saved["model"]["use_logit_bias"] is True


def test_a_killed_run_resumes_to_the_losses_of_an_uninterrupted_one(release, tmp_path, monkeypatch):
    values = values_for(release, tmp_path / "straight", eval_every=100)
    straight = train(TrainConfig(**values))["losses"]
    resumed_values = values | {"output_dir": str(tmp_path / "resumed")}
    kill_after_the_first_checkpoint(lambda: train(TrainConfig(**resumed_values)), monkeypatch)
    resumed = train(TrainConfig(**resumed_values))["losses"]
    assert resumed == pytest.approx(straight[2:], rel=1e-5)


def test_stored_features_are_refused_with_what_to_set(release, tmp_path):
    values = values_for(release, tmp_path / "run") | {"inputs": "features"}
    with pytest.raises(TrainConfigError, match="inputs=features: task two-tower trains from images only"):
        TrainConfig(**values)


def test_recall_at_k_counts_ties_against_the_match():
    perfect = torch.eye(4)
    assert [recall_at_k(perfect, k) for k in (1, 2)] == [1.0, 1.0]
    reversed_ = torch.eye(4).flip(0)  # each query's match scores lowest but one... or lowest
    assert recall_at_k(reversed_, 1) == 0.0
    assert match_ranks(torch.zeros(3, 3)).tolist() == [2, 2, 2]  # a constant model retrieves nothing at K=1
    assert recall_at_k(torch.zeros(3, 3), 3) == 1.0
    scores = score_retrieval(torch.eye(3), torch.eye(3))["overall"]
    assert scores["count"] == 3 and scores["i2r_recall1"] == scores["r2i_recall1"] == scores["mean_recall"] == 1.0
    with pytest.raises(ValueError, match="square"):
        recall_at_k(torch.zeros(2, 3), 1)


@pytest.mark.slow
def test_two_processes_see_the_global_batch_and_give_the_losses_of_one_process(release, tmp_path):
    """Batch 4 on each of 2 processes is batch 8 on one: the same pairs meet as negatives, the same loss, and (the
    gradients through the gathered embeddings being right) the same loss again after the first update."""
    common = dict(max_steps=3, eval_every=100, checkpoint_every=100)
    one = train(TrainConfig(**values_for(release, tmp_path / "one", batch_size=8, **common)))["losses"]
    (tmp_path / "two.json").write_text(json.dumps(values_for(release, tmp_path / "two", batch_size=4, **common)))
    result = accelerate_launch("lapvqa_hf.train", ["--config", tmp_path / "two.json"], processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    assert two["num_processes"] == 2
    assert two["losses"] == pytest.approx(one, rel=1e-4)
