"""The two-tower pretraining models (`lapvqa-pretrain-contrastive`, `-sigmoid`): parity with the pinned upstream
`ContrastiveModel` at every weight scale, conversion, the processor, and the zero-shot / embedding pipelines."""

import json

import numpy as np
import pytest
import torch
from conftest import WEIGHT_SCALES, float32_bound, randomize_at_scale_, relative_error, run_without_lapvqa_hf
from lapvqa_hf.convert import two_tower
from lapvqa_hf.convert.original import ContrastiveModel
from PIL import Image
from transformers import AutoModel, AutoProcessor, pipeline

from lapvqa_hf import LapvqaTwoTowerModel, LapvqaTwoTowerTextModel
from lapvqa_hf.cli import main as lapvqa
from lapvqa_hf.models.processing_lapvqa import LapvqaTwoTowerProcessor

TINY = dict(
    img_size=28,
    patch_size=14,
    vision_width=32,
    vision_depth=2,
    vision_heads=4,
    text_width=24,
    text_heads=4,
    text_depth=2,
    text_ffn=40,
    text_max_len=16,
    embed_dim=20,
)
HEADS = ["--num-heads", "4", "--text-num-heads", "4"]
# A trained model's embeddings are what its output layers make of the towers: the projections at std 1.
OUTPUT_LAYERS = ("image_proj.weight", "text_proj.weight")


def upstream_model(sigmoid: bool, scale: str = "tiny", seed: int = 0, **options) -> ContrastiveModel:
    original = ContrastiveModel(**{**TINY, **options}, sigmoid=sigmoid)
    randomize_at_scale_(original, scale, OUTPUT_LAYERS, seed=seed)
    with torch.no_grad():  # exp(logit_scale) of a trained model is tens (CLIP caps it at 100)
        original.logit_scale.fill_(3.0)
    return original


def converted(original: ContrastiveModel, **options) -> LapvqaTwoTowerModel:
    config = two_tower.infer_config(original.state_dict(), 4, 4, **options)
    model = LapvqaTwoTowerModel(config)
    model.load_state_dict(two_tower.convert_state_dict(original.state_dict(), config), strict=True)
    return model.eval()


def texts(batch: int = 3, length: int = 9, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded `ids + [eot]` of different lengths."""
    ids = torch.randint(0, 50256, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    for row in range(batch):
        used = length - 2 * row
        ids[row, used - 1], ids[row, used:], mask[row, used:] = 50256, 50256, 0
    return ids, mask


def images(batch: int = 3, seed: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 28, 28, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("scale", WEIGHT_SCALES)
@pytest.mark.parametrize("sigmoid", [False, True], ids=["contrastive", "sigmoid"])
@pytest.mark.parametrize(("image_pooling", "text_pooling"), [("cls", "eot"), ("mean", "mean")])
def test_embeddings_logits_and_loss_match_the_original(scale, sigmoid, image_pooling, text_pooling):
    original = upstream_model(sigmoid, scale, image_pooling=image_pooling, text_pooling=text_pooling)
    model = converted(original, image_pooling=image_pooling, text_pooling=text_pooling)
    ids, mask = texts()
    pixels = images()
    with torch.no_grad():
        expected = original(pixels, ids, mask)
        exact = ContrastiveModel.double(original)(pixels.double(), ids, mask)
        found = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, return_loss=True)
    found = (found.image_embeds, found.text_embeds, found.logits_per_image, found.loss)
    for what, f, e, x in zip(("image", "text", "logits", "loss"), found, expected, exact, strict=True):
        assert relative_error(f, x) < float32_bound(e, x), what


def test_the_loss_is_the_one_the_weights_select():
    contrastive, sigmoid = converted(upstream_model(False)), converted(upstream_model(True))
    assert contrastive.logit_bias is None and not contrastive.config.use_logit_bias
    assert sigmoid.config.use_logit_bias and sigmoid.logit_bias is not None
    ids, mask = texts()
    with torch.no_grad():
        out = sigmoid(input_ids=ids, attention_mask=mask, pixel_values=images(), return_loss=True)
    logits = out.logits_per_text
    by_hand = (
        -sum(
            torch.nn.functional.logsigmoid(logits[i, j] if i == j else -logits[i, j])
            for i in range(3)
            for j in range(3)
        )
        / 3
    )
    assert torch.allclose(out.loss, by_hand, rtol=1e-5)
    assert torch.equal(out.logits_per_image, logits.T)


def test_features_are_projected_and_unnormalised_as_clip_gives_them():
    model = converted(upstream_model(False, "trained-like"))
    ids, mask = texts()
    with torch.no_grad():
        text = model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
        image = model.get_image_features(pixel_values=images()).pooler_output
        out = model(input_ids=ids, attention_mask=mask, pixel_values=images())
    assert text.shape == image.shape == (3, 20)
    assert not torch.allclose(text.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(torch.nn.functional.normalize(text, dim=-1), out.text_embeds)
    torch.testing.assert_close(torch.nn.functional.normalize(image, dim=-1), out.image_embeds)


def test_padding_does_not_change_a_text_embedding():
    model = converted(upstream_model(False, "large"))
    ids, mask = texts(1, 6)
    padded = torch.cat([ids, torch.full((1, 5), 50256)], dim=1)
    with torch.no_grad():
        alone = model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
        with_padding = model.get_text_features(
            input_ids=padded, attention_mask=torch.cat([mask, torch.zeros(1, 5, dtype=torch.long)], dim=1)
        ).pooler_output
    assert relative_error(with_padding, alone) < 1e-5


def test_a_text_beyond_the_learned_positions_is_refused_in_one_line():
    model = converted(upstream_model(False))
    with pytest.raises(ValueError, match="more than the 16 learned positions"):
        model.get_text_features(input_ids=torch.zeros(1, 17, dtype=torch.long))


@pytest.fixture
def upstream_files(tmp_path):
    contrastive = upstream_model(False, "trained-like", seed=3)
    sigmoid = upstream_model(True, "trained-like", seed=4)
    torch.save(contrastive.state_dict(), tmp_path / "model_best.pt")
    torch.save(contrastive.vision_encoder.state_dict(), tmp_path / "encoder_final.pt")
    optimizer = torch.optim.AdamW(sigmoid.parameters())
    torch.save(
        {"epoch": 10, "model": sigmoid.state_dict(), "optimizer": optimizer.state_dict()},
        tmp_path / "model_epoch010.pt",
    )
    Image.fromarray((np.random.default_rng(0).random((70, 64)) * 65535).astype(np.uint16)).save(tmp_path / "cxr.png")
    return tmp_path


def test_two_tower_converts_verified_at_trained_like_scale_with_its_processor(upstream_files, capsys):
    out = upstream_files / "lapvqa-pretrain-contrastive"
    assert lapvqa(["convert", "two-tower", str(upstream_files / "model_best.pt"), "--output", str(out), *HEADS]) == 0
    printed = capsys.readouterr().out
    assert "text encoder width 24, 2 layers, 16 positions; shared width 20; contrastive (softmax) model" in printed
    assert "verify passed" in printed
    for what in ("image embedding", "text embedding", "logit", "loss"):
        assert f"max |Δ{what}|" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "lapvqa_two_tower" and config["use_logit_bias"] is False
    info = config["conversion_info"]
    assert (info["assumed_image_pooling"], info["assumed_text_pooling"], info["assumed_text_activation"]) == (
        "cls",
        "eot",
        "gelu",
    )
    assert set(config["custom_pipelines"]) == {"lapvqa-zero-shot-findings", "lapvqa-image-embedding"}
    model = AutoModel.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    assert type(model) is LapvqaTwoTowerModel and type(processor) is LapvqaTwoTowerProcessor
    inputs = processor(images=[upstream_files / "cxr.png"] * 2, text=["no acute findings", "small left effusion"])
    assert inputs["input_ids"][0, 3].item() == 50256 and inputs["attention_mask"][0].tolist() == [1] * 4 + [0]
    assert inputs["input_ids"][1, -1].item() == 50256 and inputs["pixel_values"].shape == (2, 3, 28, 28)
    with torch.no_grad():
        assert model(**inputs, return_loss=True).loss.isfinite()
    tower = AutoModel.from_config(model.config.text_config)  # the report encoder is its own AutoModel too
    assert type(tower) is LapvqaTwoTowerTextModel


def test_a_training_checkpoint_converts_its_model_weights_and_names_what_it_leaves_out(upstream_files, capsys):
    out = upstream_files / "sigmoid"
    source = upstream_files / "model_epoch010.pt"
    assert lapvqa(["convert", "two-tower", str(source), "--output", str(out), *HEADS]) == 0
    printed = capsys.readouterr().out
    assert "converting ['model']; left out: epoch, optimizer" in printed and "sigmoid (logit_bias) model" in printed
    assert json.loads((out / "config.json").read_text())["use_logit_bias"] is True


def test_keys_no_pin_explains_are_refused_in_one_line_that_lists_them(upstream_files, capsys):
    state_dict = torch.load(upstream_files / "model_best.pt", weights_only=True)
    state_dict["text_encoder.cls_token"] = torch.zeros(1, 1, 24)
    state_dict["temperature"] = torch.tensor(1.0)
    torch.save(state_dict, upstream_files / "odd.pt")
    out = upstream_files / "odd"
    assert lapvqa(["convert", "two-tower", str(upstream_files / "odd.pt"), "--output", str(out), *HEADS]) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "['temperature', 'text_encoder.cls_token']" in error and not out.exists()


def test_pins_the_weights_cannot_show_are_options_verified_on_both_sides_and_recorded(upstream_files, capsys):
    out = upstream_files / "mean"
    source = str(upstream_files / "model_best.pt")
    assert lapvqa(["convert", "two-tower", source, "--output", str(out), *HEADS, "--text-pooling", "mean"]) == 0
    printed = capsys.readouterr().out
    assert "assumed on both sides, not checkable from the weights" in printed and "text_pooling=mean" in printed
    assert json.loads((out / "config.json").read_text())["text_config"]["text_pooling"] == "mean"


def test_a_mapping_bug_fails_verify(upstream_files, monkeypatch, capsys):
    real = two_tower.convert_state_dict

    def swapped_projections(state_dict, config):
        mapped = real(state_dict, config)
        mapped["text_model.layers.0.self_attn.q_proj.weight"], mapped["text_model.layers.0.self_attn.k_proj.weight"] = (
            mapped["text_model.layers.0.self_attn.k_proj.weight"],
            mapped["text_model.layers.0.self_attn.q_proj.weight"],
        )
        return mapped

    monkeypatch.setattr(two_tower, "convert_state_dict", swapped_projections)
    out = upstream_files / "wrong"
    assert lapvqa(["convert", "two-tower", str(upstream_files / "model_best.pt"), "--output", str(out), *HEADS]) == 1
    assert "verify FAILED" in capsys.readouterr().err and not out.exists()


@pytest.fixture
def two_tower_folders(upstream_files):
    folders = {}
    for name, source in (("contrastive", "model_best.pt"), ("sigmoid", "model_epoch010.pt")):
        folders[name] = two_tower.convert_two_tower(
            upstream_files / source, upstream_files / name, 4, 4, log=lambda _: None
        )
    return folders


def test_zero_shot_scores_are_a_softmax_for_the_contrastive_model_and_sigmoids_for_the_sigmoid_model(
    two_tower_folders, upstream_files
):
    findings = ["pleural effusion", "cardiomegaly", "no acute cardiopulmonary process"]
    image = upstream_files / "cxr.png"
    for name, folder in two_tower_folders.items():
        pipe = pipeline("lapvqa-zero-shot-findings", model=str(folder), trust_remote_code=True)
        scores = pipe(image, candidate_labels=findings)
        assert sorted(s["label"] for s in scores) == sorted(findings)
        assert [s["score"] for s in scores] == sorted((s["score"] for s in scores), reverse=True)
        model, processor = pipe.model, AutoProcessor.from_pretrained(folder)
        with torch.no_grad():
            logits = model(**processor(images=[image], text=findings)).logits_per_image[0]
        expected = logits.sigmoid() if name == "sigmoid" else logits.softmax(-1)
        by_label = {s["label"]: s["score"] for s in scores}
        assert [by_label[f] for f in findings] == pytest.approx(expected.tolist(), rel=1e-5)
        if name == "contrastive":
            assert sum(by_label.values()) == pytest.approx(1.0)


def test_the_embedding_pipeline_gives_the_normalised_image_embedding(two_tower_folders, upstream_files):
    folder = two_tower_folders["contrastive"]
    embed = pipeline("lapvqa-image-embedding", model=str(folder), trust_remote_code=True)
    embedding = embed(str(upstream_files / "cxr.png"))
    assert len(embedding) == 20 and sum(v * v for v in embedding) == pytest.approx(1.0)
    raw = embed(str(upstream_files / "cxr.png"), normalize=False, return_tensors=True)
    torch.testing.assert_close(torch.nn.functional.normalize(raw, dim=-1), torch.tensor(embedding))


REMOTE_ZERO_SHOT = """
from transformers import pipeline
pipe = pipeline(model=sys.argv[1], task="lapvqa-zero-shot-findings", trust_remote_code=True)
assert "lapvqa_hf" not in sys.modules
print(json.dumps(pipe(sys.argv[2], candidate_labels=["effusion", "no finding"])))
"""


def test_the_zero_shot_pipeline_runs_without_the_package(two_tower_folders, upstream_files, tmp_path):
    folder = two_tower_folders["sigmoid"]
    result = run_without_lapvqa_hf("import json\n" + REMOTE_ZERO_SHOT, [folder, upstream_files / "cxr.png"], tmp_path)
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    local = pipeline("lapvqa-zero-shot-findings", model=str(folder), trust_remote_code=True)(
        upstream_files / "cxr.png", candidate_labels=["effusion", "no finding"]
    )
    assert [r["label"] for r in remote] == [r["label"] for r in local]
    assert [r["score"] for r in remote] == pytest.approx([r["score"] for r in local], rel=1e-5)


def test_the_image_encoder_alone_converts_with_vision_encoder(upstream_files, capsys):
    out = upstream_files / "encoder"
    args = ["convert", "vision-encoder", str(upstream_files / "encoder_final.pt"), "--output", str(out)]
    assert lapvqa([*args, "--num-heads", "4"]) == 0
    assert "verify passed" in capsys.readouterr().out
    assert type(AutoModel.from_pretrained(out)).__name__ == "LapvqaVisionModel"


def test_lapvqa_answer_ranks_each_rows_findings_and_gives_bad_rows_their_own_error(two_tower_folders, upstream_files):
    (upstream_files / "broken.png").write_bytes(b"not a png")
    rows = [
        {"image": "cxr.png", "labels": "pleural effusion; cardiomegaly; no finding"},
        {"image": "broken.png", "labels": "effusion"},
        {"image": "cxr.png", "labels": " ; "},
        {"image": "cxr.png", "labels": "pneumothorax;effusion"},
    ]
    (upstream_files / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    output = upstream_files / "scores.jsonl"
    folder = two_tower_folders["contrastive"]
    arguments = ["answer", str(folder), "--input", str(upstream_files / "rows.jsonl"), "--output", str(output)]
    assert lapvqa([*arguments, "--batch-size", "3"]) == 0
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [line["row"] for line in lines] == [0, 1, 2, 3]
    expected = pipeline("lapvqa-zero-shot-findings", model=str(folder), trust_remote_code=True)(
        upstream_files / "cxr.png", candidate_labels=["pleural effusion", "cardiomegaly", "no finding"]
    )
    assert lines[0]["scores"] == [{"label": s["label"], "score": round(s["score"], 4)} for s in expected]
    assert lines[1]["error"].startswith("image: ") and "broken.png" in lines[1]["error"]
    assert "candidate_labels must be a non-empty list" in lines[2]["error"]
    assert sorted(s["label"] for s in lines[3]["scores"]) == ["effusion", "pneumothorax"]


def test_lapvqa_answer_runs_the_folders_own_code_with_trust_remote_code(two_tower_folders, upstream_files):
    """A folder with two pipelines (zero-shot findings, image embedding): `lapvqa answer` names the one it runs."""
    (upstream_files / "rows.csv").write_text("image,labels\ncxr.png,effusion;no finding\n")
    output = upstream_files / "remote.jsonl"
    folder = two_tower_folders["sigmoid"]
    arguments = ["answer", str(folder), "--input", str(upstream_files / "rows.csv"), "--output", str(output)]
    assert lapvqa([*arguments, "--trust-remote-code"]) == 0
    (line,) = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(s["label"] for s in line["scores"]) == ["effusion", "no finding"]
