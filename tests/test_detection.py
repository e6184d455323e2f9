"""The abnormality-detection head (`dmusingu/lapvqa-ad`): parity, conversion, loading, training loss,
post-processing."""

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
from conftest import enable_activation_checkpointing, run_with_remote_code
from conftest import upstream_detection_checkpoint as upstream_checkpoint
from lapvqa_hf.convert import detection
from lapvqa_hf.convert.original import DetectionHead, randomize_
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForObjectDetection, DetrConfig
from transformers.loss.loss_utils import LOSS_MAPPING

from lapvqa_hf import LapvqaDetectionConfig, LapvqaDetectionModel, LapvqaImageProcessor
from lapvqa_hf.cli import main as lapvqa
from lapvqa_hf.models.configuration_lapvqa_detection import LOSS_WEIGHTS
from lapvqa_hf.models.modeling_lapvqa_detection import LapvqaDetectionOutput

TINY = dict(d_model=32, nhead=4, num_enc=2, num_dec=3, num_queries=5, dim_feedforward=48)
ENCODER_OF_WIDTH = {768: "coca", 1024: "clip-vit-l14", 1152: "siglip"}


def make_head(vis_dim: int = 768, seed: int = 0, **overrides) -> DetectionHead:
    return randomize_(DetectionHead(vis_dim=vis_dim, **{**TINY, **overrides}), seed=seed).eval()


def convert_in_memory(head: DetectionHead, encoder: str, attn_implementation: str = "eager", **options):
    state_dict = head.state_dict()
    config = detection.infer_config(
        state_dict, encoder, num_attention_heads=head.decoder.layers[0].self_attn.num_heads, **options
    )
    model = LapvqaDetectionModel(config)
    model.load_state_dict(detection.convert_state_dict(state_dict, config), strict=True)
    model.set_attn_implementation(attn_implementation)
    return model.eval()


def features(batch: int, length: int, vis_dim: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, length, vis_dim, generator=torch.Generator().manual_seed(seed))


def run_cli(*args) -> int:
    return lapvqa(["convert", "detection", *map(str, args)])


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "coca.pt"
    head = make_head(768)
    torch.save(upstream_checkpoint(head, "coca"), path)
    return path, head


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A converted tiny CoCa head, its original, and the folder."""
    folder = tmp_path_factory.mktemp("converted")
    head = make_head(768, seed=1)
    torch.save(upstream_checkpoint(head, "coca"), folder / "coca.pt")
    out = detection.convert_detection(folder / "coca.pt", folder / "out", num_attention_heads=4, log=lambda _: None)
    return head, out


# --- parity with the faithful original ------------------------------------------------------------------------


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("vis_dim", [768, 1024, 1152])
def test_converted_model_matches_the_original_for_every_encoder_width(vis_dim, attn_implementation):
    head = make_head(vis_dim, seed=vis_dim)
    model = convert_in_memory(head, ENCODER_OF_WIDTH[vis_dim], attn_implementation)
    for batch, length in ((1, 1), (2, 7), (3, 50)):
        image_features = features(batch, length, vis_dim, seed=length)
        with torch.no_grad():
            expected_logits, expected_boxes = head(image_features)
            outputs = model(image_features=image_features)
        assert outputs.logits.shape == (batch, 5, 15) and outputs.pred_boxes.shape == (batch, 5, 4)
        assert (outputs.logits - expected_logits).abs().max() < 1e-5
        assert (outputs.pred_boxes - expected_boxes).abs().max() < 1e-5


@pytest.mark.parametrize(
    "options, head_overrides",
    [
        (dict(decoder_norm_first=False), dict(decoder_norm_first=False)),
        (dict(activation_function="gelu"), dict(activation="gelu")),
        (dict(layer_norm_eps=1e-6), dict(layer_norm_eps=1e-6)),
        ({}, dict(encoder_final_norm=False, decoder_final_norm=False, decoder_dim_feedforward=40)),
    ],
    ids=["decoder-post-norm", "gelu", "eps-1e-6", "no-final-norms-and-own-decoder-ffn"],
)
def test_conventions_the_weights_cannot_reveal_are_options_that_keep_parity(options, head_overrides):
    head = make_head(1024, seed=5, **head_overrides)
    model = convert_in_memory(head, "owlv2", **options)
    config = model.config
    assert config.encoder_final_layer_norm == head_overrides.get("encoder_final_norm", True)
    assert config.decoder_ffn_dim == head_overrides.get("decoder_dim_feedforward", 48)
    image_features = features(2, 9, 1024)
    with torch.no_grad():
        expected_logits, expected_boxes = head(image_features)
        outputs = model(image_features=image_features)
    assert (outputs.logits - expected_logits).abs().max() < 1e-5
    assert (outputs.pred_boxes - expected_boxes).abs().max() < 1e-5


def test_real_size_siglip_head_matches_the_original():
    head = randomize_(DetectionHead(vis_dim=1152), seed=3, std=0.02).eval()  # d_model 256, 20 queries
    model = convert_in_memory(head, "siglip", attn_implementation="sdpa")
    image_features = features(1, 729, 1152)  # SigLIP-384: a 27 x 27 grid
    with torch.no_grad():
        expected_logits, expected_boxes = head(image_features)
        outputs = model(image_features=image_features)
    assert outputs.logits.shape == (1, 20, 15)
    assert (outputs.logits - expected_logits).abs().max() < 1e-5
    assert (outputs.pred_boxes - expected_boxes).abs().max() < 1e-5
    assert torch.equal(outputs.logits.argmax(-1), expected_logits.argmax(-1))


# --- the converter ---------------------------------------------------------------------------------------------


def test_converts_an_upstream_checkpoint_end_to_end(checkpoint, tmp_path, capsys):
    source, head = checkpoint
    out = tmp_path / "lapvqa-ad-coca"
    assert run_cli(source, "--output", out, "--num-heads", "4") == 0
    printed = capsys.readouterr().out
    assert (
        "coca.pt: encoder coca, vis_dim 768, d_model 32, 5 queries, 2 encoder + 3 decoder layers, FFN 48/48, "
        "final norms yes/yes; epoch 37, val_map40 0.048, val_map50 0.031"
    ) in printed
    assert "verify passed: float64 max |Δlogit| = " in printed and "argmax class identical for 30/30 queries" in printed
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "configuration_lapvqa_coca.py",
        "configuration_lapvqa_common.py",
        "configuration_lapvqa_detection.py",
        "configuration_lapvqa_vision.py",
        "encoders.py",
        "greedy_decoding.py",
        "image_processing_lapvqa.py",
        "model.safetensors",
        "modeling_lapvqa_coca.py",
        "modeling_lapvqa_common.py",
        "modeling_lapvqa_detection.py",
        "modeling_lapvqa_vision.py",
        "pipeline_lapvqa.py",
        "preprocessor_config.json",
        "processing_lapvqa.py",
        "xray_reading.py",
    ]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "lapvqa_detection" and config["encoder_name"] == "coca"
    assert config["training_results"] == {"epoch": 37, "val_map40": 0.048, "val_map50": 0.031}
    assert (config["num_queries"], config["encoder_layers"], config["decoder_layers"]) == (5, 2, 3)
    assert config["id2label"]["0"] == "Aortic enlargement" and config["id2label"]["13"] == "Pulmonary fibrosis"
    assert config["position_embedding_type"] == "none" and config["decoder_norm_first"] is True
    info = config["conversion_info"]
    assert info["source_file"] == "coca.pt" and len(info["source_sha256"]) == 64
    assert info["assumed_num_attention_heads"] == 4 and info["assumed_resize_mode"] == "stretch"
    processor = json.loads((out / "preprocessor_config.json").read_text())
    assert (processor["size"], processor["resize_mode"]) == (
        {"height": 224, "width": 224},
        "stretch",
    )  # CoCa's feature recipe
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"

    model = AutoModelForObjectDetection.from_pretrained(out).eval()
    image_features = features(2, 11, 768)
    with torch.no_grad():
        expected_logits, expected_boxes = head(image_features)
        outputs = model(image_features=image_features)
    assert (outputs.logits - expected_logits).abs().max() < 1e-5
    assert (outputs.pred_boxes - expected_boxes).abs().max() < 1e-5


def test_the_mae_vit_l16_head_converts(tmp_path):
    source = tmp_path / "mae-vit-l16.pt"
    torch.save(upstream_checkpoint(make_head(1024), "mae-vit-l16"), source)
    out = detection.convert_detection(source, tmp_path / "out", num_attention_heads=4, log=lambda _: None)
    config = AutoConfig.from_pretrained(out)
    assert (config.encoder_name, config.vis_dim) == ("mae-vit-l16", 1024)
    assert AutoImageProcessor.from_pretrained(out).size == {"height": 224, "width": 224}


def test_a_plain_state_dict_converts_with_encoder(tmp_path, capsys):
    source = tmp_path / "siglip.pt"
    torch.save(make_head(1152).state_dict(), source)
    assert run_cli(source, "--output", tmp_path / "out", "--num-heads", "4") == 1
    assert "a plain state dict carries no encoder name; pass --encoder." in capsys.readouterr().err
    assert run_cli(source, "--encoder", "siglip", "--output", tmp_path / "out", "--num-heads", "4") == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["encoder_name"] == "siglip" and config["training_results"] is None


def test_module_entry_point(checkpoint, tmp_path):
    source, _ = checkpoint
    command = [sys.executable, "-m", "lapvqa_hf.convert.detection", str(source), "--output", str(tmp_path / "out")]
    result = subprocess.run(
        [*command, "--num-heads", "4", "--no-verify"], capture_output=True, text=True, env=os.environ
    )
    assert result.returncode == 0, result.stderr
    assert "verify" not in result.stdout and (tmp_path / "out" / "model.safetensors").is_file()


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo should-never-run",))


def _refused(tmp_path, capsys, source, *extra) -> str:
    out = tmp_path / "out"
    code = run_cli(source, "--output", out, "--num-heads", "4", *extra)
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert not out.exists(), "a refused conversion must not write anything"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    error_lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and err.endswith(error_lines[0]), err
    return error_lines[0]


def _rewrite(path, change) -> None:
    content = torch.load(path, weights_only=True)
    change(content)
    torch.save(content, path)


def test_a_pickle_that_runs_code_is_refused(tmp_path, capsys):
    source = tmp_path / "evil.pt"
    with open(source, "wb") as file:
        pickle.dump({"state_dict": {"vis_proj.weight": RunsCode()}, "encoder": "coca"}, file, protocol=2)
    err = _refused(tmp_path, capsys, source)
    assert "refused to load a pickle that could run code (it imports posix.system)" in err
    assert "weights_only=False" not in err


def test_a_corrupt_file_is_refused(checkpoint, tmp_path, capsys):
    source, _ = checkpoint
    source.write_bytes(source.read_bytes()[:2000])
    assert "not a readable PyTorch checkpoint" in _refused(tmp_path, capsys, source)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda c: c.update(vis_dim=1024),
            "checkpoint metadata says vis_dim=1024, but the weights (vis_proj.weight) give 768.",
        ),
        (
            lambda c: c.update(num_queries=20),
            "checkpoint metadata says num_queries=20, but the weights (object_queries) give 5.",
        ),
        (
            lambda c: c.update(num_dec=6),
            "checkpoint metadata says num_dec=6, but the weights (decoder.layers.*) give 3.",
        ),
        (
            lambda c: c.update(encoder="siglip"),
            "encoder siglip gives 1152-dim features, but the checkpoint's vis_proj takes 768",
        ),
        (lambda c: c.update(encoder="resnet50"), "unknown encoder 'resnet50'; expected one of ['clip-vit-l14', "),
        (lambda c: c.update(optimizer="adamw"), "found unknown keys ['optimizer'] and missing keys []"),
        (lambda c: c.pop("num_enc"), "found unknown keys [] and missing keys ['num_enc']"),
        (
            lambda c: c.update(epoch=[1, 2]),
            "checkpoint metadata must be numbers or strings, found other values under ['epoch']",
        ),
        (
            lambda c: c["state_dict"].update({"decoder.layers.0.extra.weight": torch.ones(3)}),
            "unknown keys in the checkpoint (not part of the expected layout): ['decoder.layers.0.extra.weight']",
        ),
        (
            lambda c: c["state_dict"].pop("decoder.layers.1.multihead_attn.in_proj_bias"),
            "missing source tensor 'decoder.layers.1.multihead_attn.in_proj_bias'",
        ),
        (
            lambda c: c["state_dict"].update({"box_head.2.weight": torch.zeros(4, 33)}),
            "shape mismatch: bbox_predictor.layers.1.weight: expected [4, 32], found [4, 33]",
        ),
        (
            lambda c: c["state_dict"].update({"class_head.weight": torch.zeros(11, 32)}),
            "class_head.weight should be [15, 32] (14 VinDr-CXR classes + no-object), found [11, 32].",
        ),
    ],
    ids=[
        "vis-dim",
        "queries",
        "decoder-layers",
        "encoder-width",
        "unknown-encoder",
        "unknown-metadata",
        "missing-metadata",
        "metadata-not-plain",
        "unknown-key",
        "missing-key",
        "wrong-shape",
        "class-count",
    ],
)
def test_bad_checkpoints_are_refused_with_expected_and_found(checkpoint, tmp_path, capsys, change, message):
    source, _ = checkpoint
    _rewrite(source, change)
    assert message in _refused(tmp_path, capsys, source)


def test_an_encoder_option_that_contradicts_the_checkpoint_is_refused(checkpoint, tmp_path, capsys):
    source, _ = checkpoint
    err = _refused(tmp_path, capsys, source, "--encoder", "owlv2")
    assert "--encoder owlv2 contradicts the checkpoint's encoder 'coca'." in err


def test_a_failed_verification_writes_nothing(checkpoint, tmp_path, capsys, monkeypatch):
    source, _ = checkpoint
    real_convert = detection.convert_state_dict

    def corrupted(state_dict, config):
        converted = real_convert(state_dict, config)
        converted["bbox_predictor.layers.1.bias"] = converted["bbox_predictor.layers.1.bias"] + 0.5
        return converted

    monkeypatch.setattr(detection, "convert_state_dict", corrupted)
    err = _refused(tmp_path, capsys, source)
    assert "verify FAILED" in err and "max |Δbox|" in err and "nothing was written" in err


# --- loading ---------------------------------------------------------------------------------------------------


def test_auto_classes_load_the_package_classes(converted):
    _, out = converted
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_lapvqa_detection.LapvqaDetectionConfig",
        "AutoModel": "modeling_lapvqa_detection.LapvqaDetectionModel",
        "AutoModelForObjectDetection": "modeling_lapvqa_detection.LapvqaDetectionModel",
    }
    assert type(AutoConfig.from_pretrained(out)) is LapvqaDetectionConfig
    assert type(AutoModel.from_pretrained(out)) is LapvqaDetectionModel
    assert type(AutoModelForObjectDetection.from_pretrained(out)) is LapvqaDetectionModel
    assert type(AutoImageProcessor.from_pretrained(out)) is LapvqaImageProcessor
    for implementation in ("eager", "sdpa"):
        model = AutoModel.from_pretrained(out, attn_implementation=implementation)
        assert model.config._attn_implementation == implementation


def test_loading_in_bfloat16_with_a_device_map(converted):
    _, out = converted
    model = AutoModelForObjectDetection.from_pretrained(out, dtype=torch.bfloat16, device_map="cpu")
    with torch.no_grad():
        outputs = model(image_features=features(1, 4, 768))  # fp32 features are cast to the model's dtype
    assert model.dtype == torch.bfloat16 and outputs.pred_boxes.dtype == torch.bfloat16


def test_remote_code_loads_without_the_package(converted, tmp_path):
    head, out = converted
    image_features = features(1, 6, 768)
    post_process = dict(threshold=0.0, target_sizes=[(300, 200)])
    remote = run_with_remote_code(out, {"image_features": image_features}, tmp_path, post_process=post_process)
    assert remote["class"] == "LapvqaDetectionModel"
    model = LapvqaDetectionModel.from_pretrained(out, attn_implementation="eager").eval()
    with torch.no_grad():
        outputs = model(image_features=image_features)
        expected_logits, _ = head(image_features)
    assert torch.equal(remote["outputs"]["logits"], outputs.logits)
    assert (remote["outputs"]["logits"] - expected_logits).abs().max() < 1e-5
    local = LapvqaImageProcessor.from_pretrained(out).post_process_object_detection(outputs, **post_process)[0]
    assert torch.equal(remote["detections"][0]["boxes"], local["boxes"])
    assert torch.equal(remote["detections"][0]["labels"], local["labels"])


# --- the model's interface -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.zeros(2, 768), "got [2, 768]"),
        (torch.zeros(2, 7, 1024), "got [2, 7, 1024]"),
        (
            torch.zeros(2, 0, 768),
            "non-empty patch tokens of shape [batch, num_patches, 768] (vis_dim of the coca encoder), got [2, 0, 768].",
        ),
        (None, "`image_features` are required"),
    ],
    ids=["rank-2", "wrong-width", "no-tokens", "missing"],
)
def test_bad_image_features_name_the_expected_shape(bad, message):
    model = convert_in_memory(make_head(768), "coca")
    with pytest.raises(ValueError) as error:
        model(image_features=bad)
    assert message in str(error.value)
    assert "[batch, num_patches, 768]" in str(error.value) and "coca" in str(error.value)


# --- training: transformers' DETR loss ------------------------------------------------------------------------


def trainable_model(**overrides) -> LapvqaDetectionModel:
    config = LapvqaDetectionConfig(
        vis_dim=768, d_model=32, num_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, num_queries=5,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, **overrides,
    )  # fmt: skip
    torch.manual_seed(0)
    return LapvqaDetectionModel(config).train()


def detr_labels() -> list[dict]:
    """Three images: two findings, none ("No finding"), one."""
    return [
        {"class_labels": torch.tensor([3, 10]), "boxes": torch.tensor([[0.5, 0.6, 0.5, 0.3], [0.25, 0.85, 0.3, 0.2]])},
        {"class_labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)},
        {"class_labels": torch.tensor([8]), "boxes": torch.tensor([[0.3, 0.3, 0.1, 0.1]])},
    ]


def detr_config(**overrides) -> DetrConfig:
    """transformers' own DETR config, with its own matching costs and loss weights."""
    return DetrConfig(use_timm_backbone=False, backbone_config=None, num_labels=14, decoder_layers=3, **overrides)


def test_the_matching_costs_and_loss_weights_default_to_transformers_detr():
    ours, detr = LapvqaDetectionConfig(), detr_config()
    for name in LOSS_WEIGHTS + ("auxiliary_loss",):
        assert getattr(ours, name) == getattr(detr, name), name
    assert (ours.class_cost, ours.bbox_cost, ours.giou_cost) == (1, 5, 2)
    assert (ours.bbox_loss_coefficient, ours.giou_loss_coefficient, ours.eos_coefficient) == (5, 2, 0.1)


@pytest.mark.parametrize("auxiliary_loss", [False, True], ids=["last-layer", "auxiliary-loss"])
def test_the_loss_is_transformers_detr_loss(auxiliary_loss):
    costs = dict(class_cost=2, bbox_cost=3, giou_cost=1, bbox_loss_coefficient=4, eos_coefficient=0.2)
    model = trainable_model(auxiliary_loss=auxiliary_loss, **costs)
    labels = detr_labels()
    outputs = model(image_features=features(3, 7, 768), labels=labels, output_hidden_states=True)
    outputs_class = outputs_coord = None
    if auxiliary_loss:  # DETR's intermediate outputs: every decoder layer through the final decoder norm and heads
        layers = [model.decoder.layer_norm(state) for state in outputs.decoder_hidden_states[1:-1]]
        intermediate = torch.stack([*layers, outputs.last_hidden_state])
        outputs_class = model.class_labels_classifier(intermediate)
        outputs_coord = model.bbox_predictor(intermediate).sigmoid()
    detr_loss = LOSS_MAPPING["ForObjectDetection"]  # what DetrForObjectDetection.loss_function is
    loss, loss_dict, auxiliary_outputs = detr_loss(
        outputs.logits, labels, "cpu", outputs.pred_boxes, detr_config(auxiliary_loss=auxiliary_loss, **costs),
        outputs_class, outputs_coord,
    )  # fmt: skip
    assert torch.equal(outputs.loss, loss) and outputs.loss_dict.keys() == loss_dict.keys()
    assert all(torch.equal(outputs.loss_dict[key], loss_dict[key]) for key in loss_dict)
    if auxiliary_loss:  # the same parts again for each decoder layer but the last
        assert "loss_giou_1" in loss_dict and len(outputs.auxiliary_outputs) == 2
        assert torch.equal(outputs.auxiliary_outputs[0]["logits"], auxiliary_outputs[0]["logits"])
    else:  # class cross-entropy + 4 x L1 + 2 x GIoU (giou_loss_coefficient's default)
        assert outputs.auxiliary_outputs is None
        weighted = loss_dict["loss_ce"] + 4 * loss_dict["loss_bbox"] + 2 * loss_dict["loss_giou"]
        assert torch.allclose(outputs.loss, weighted)


def test_the_loss_trains_every_parameter_and_images_without_boxes_only_the_no_object_class():
    model = trainable_model()
    outputs = model(image_features=features(3, 7, 768), labels=detr_labels())
    outputs.loss.backward()
    gradients = {name: p.grad for name, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in gradients.values())
    for name in ("object_queries", "visual_projection.weight", "class_labels_classifier.weight"):
        assert gradients[name].abs().sum() > 0, name
    assert gradients["bbox_predictor.layers.1.weight"].abs().sum() > 0

    nothing = [{"class_labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}] * 2
    outputs = model(image_features=features(2, 7, 768), labels=nothing)
    assert outputs.loss_dict["loss_bbox"] == outputs.loss_dict["loss_giou"] == 0
    assert torch.equal(outputs.loss, outputs.loss_dict["loss_ce"]) and torch.isfinite(outputs.loss)


def test_the_loss_is_float32_for_a_bfloat16_model():
    model = trainable_model().to(torch.bfloat16)
    outputs = model(image_features=features(3, 7, 768), labels=detr_labels())
    assert outputs.loss.dtype == torch.float32 and torch.isfinite(outputs.loss)
    assert outputs.logits.dtype == torch.bfloat16


def boxes_of(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)


@pytest.mark.parametrize(
    "labels, message",
    [
        ({"class_labels": torch.tensor([1])}, "`labels` must be a list of 2 dicts (one per image) of `class_labels`"),
        ([{"class_labels": torch.tensor([1]), "boxes": boxes_of([0.5] * 4)}], "a list of 2 dicts (one per image)"),
        ([{"boxes": boxes_of()}] * 2, "labels[0] must be a dict of `class_labels` and `boxes`, got ['boxes']."),
        (
            [{"class_labels": torch.tensor([1.0]), "boxes": boxes_of([0.5] * 4)}] * 2,
            "labels[0]['class_labels'] must be a 1-D integer tensor of class ids, got [1].",
        ),
        (
            [{"class_labels": torch.tensor([14]), "boxes": boxes_of([0.5] * 4)}] * 2,
            "labels[0]['class_labels'] must be class ids in [0, 14) (the no-object class 14 is no target), got [14].",
        ),
        (
            [{"class_labels": torch.tensor([1, 2]), "boxes": boxes_of([0.5] * 4)}] * 2,
            "labels[0]['boxes'] must be a float tensor [2, 4] (one (cx, cy, w, h) box per class label), got "
            "torch.float32 [1, 4].",
        ),
        (
            [{"class_labels": torch.tensor([1]), "boxes": torch.tensor([[200, 100, 50, 40]])}] * 2,
            "labels[0]['boxes'] must be a float tensor [1, 4]",
        ),
        (
            [{"class_labels": torch.tensor([1]), "boxes": boxes_of([0.5, 0.5, 0.2, 0.2])}]
            + [{"class_labels": torch.tensor([1]), "boxes": boxes_of([200.0, 100.0, 50.0, 40.0])}],
            "labels[1]['boxes'] must be (cx, cy, w, h) normalised to [0, 1] by the image size, got values from 40.0 to "
            "200.0.",
        ),
        (
            [{"class_labels": torch.tensor([1]), "boxes": boxes_of([0.5, float("nan"), 0.2, 0.2])}] * 2,
            "labels[0]['boxes'] must be (cx, cy, w, h) normalised to [0, 1]",
        ),
    ],
    ids=["not-a-list", "one-per-image", "no-boxes-key", "float-classes", "no-object-class", "one-box-short",
         "integer-boxes", "pixel-boxes", "nan-box"],
)  # fmt: skip
def test_bad_labels_name_what_was_expected(labels, message):
    model = trainable_model()
    with pytest.raises(ValueError) as error:
        model(image_features=features(2, 3, 768), labels=labels)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_loss_settings_are_saved_and_checked(tmp_path):
    config = LapvqaDetectionConfig(bbox_cost=3.5, eos_coefficient=0.05, auxiliary_loss=True)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["bbox_cost"], saved["eos_coefficient"], saved["auxiliary_loss"]) == (3.5, 0.05, True)
    assert (saved["giou_cost"], saved["bbox_loss_coefficient"]) == (2, 5)
    with pytest.raises(Exception, match=r"must be finite and >= 0, got \{'giou_loss_coefficient': -1\}"):
        LapvqaDetectionConfig(giou_loss_coefficient=-1)
    with pytest.raises(Exception, match="At least one matching cost .* must be > 0, got all 0"):
        LapvqaDetectionConfig(class_cost=0, bbox_cost=0, giou_cost=0)


def test_attentions_and_hidden_states_are_returned_on_request():
    model = convert_in_memory(make_head(768), "coca", attn_implementation="eager")
    with torch.no_grad():
        outputs = model(image_features=features(2, 7, 768), output_attentions=True, output_hidden_states=True)
        as_tuple = model(image_features=features(2, 7, 768), return_dict=False)
    assert [a.shape for a in outputs.encoder_attentions] == [(2, 4, 7, 7)] * 2
    assert [a.shape for a in outputs.decoder_attentions] == [(2, 4, 5, 5)] * 3
    assert [a.shape for a in outputs.cross_attentions] == [(2, 4, 5, 7)] * 3
    assert len(outputs.encoder_hidden_states) == 3 and len(outputs.decoder_hidden_states) == 4
    assert torch.equal(outputs.decoder_hidden_states[-1], outputs.last_hidden_state)
    assert outputs.encoder_last_hidden_state.shape == (2, 7, 32) and outputs.loss is None
    assert torch.equal(as_tuple[0], outputs.logits) and torch.equal(as_tuple[1], outputs.pred_boxes)


def test_gradient_checkpointing_gives_the_same_gradients():
    config = LapvqaDetectionConfig(
        vis_dim=768, d_model=32, num_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, num_queries=5,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LapvqaDetectionModel(config).train()
    image_features = features(2, 6, 768)
    gradients = []
    for checkpointing in (False, True):
        if checkpointing:
            enable_activation_checkpointing(model)
        model.zero_grad()
        outputs = model(image_features=image_features)
        (outputs.logits.sum() + outputs.pred_boxes.sum()).backward()
        gradients.append({name: p.grad.clone() for name, p in model.named_parameters()})
    assert model.encoder.layers[0].gradient_checkpointing
    assert all(torch.allclose(gradients[0][name], gradients[1][name], atol=1e-6) for name in gradients[0])


def test_fresh_models_are_initialised_like_transformers_models():
    model = LapvqaDetectionModel(LapvqaDetectionConfig(encoder_name="siglip", initializer_range=0.02))
    assert abs(model.object_queries.std().item() - 0.02) < 2e-3
    assert abs(model.decoder.layers[0].mlp.fc1.weight.std().item() - 0.02) < 2e-3
    assert torch.all(model.encoder.layers[1].self_attn.q_proj.bias == 0)
    assert torch.all(model.decoder.layer_norm.weight == 1) and torch.all(model.encoder.layer_norm.bias == 0)
    assert model.class_labels_classifier.out_features == 15 and model.config.id2label[8] == "Nodule/Mass"


def test_config_refuses_what_is_not_implemented_or_does_not_fit():
    with pytest.raises(Exception, match="position_embedding_type='sine' is not implemented"):
        LapvqaDetectionConfig(position_embedding_type="sine")
    with pytest.raises(Exception, match="encoder_name='coca' gives 768-dim features, but vis_dim is 1152"):
        LapvqaDetectionConfig(encoder_name="coca", vis_dim=1152)


# --- post-processing -------------------------------------------------------------------------------------------
# Four queries over 14 classes + no-object (all other logits 0, so softmax probabilities are easy to write down):
#   query 0: class 3 (Cardiomegaly) logit ln 36      -> 36 / (36 + 14) = 0.72
#   query 1: all logits 0                            -> 1 / 15 for every class
#   query 2: class 10 (Pleural effusion) logit ln 86 -> 86 / (86 + 14) = 0.86
#   query 3: no-object ln 100, class 0 ln 50         -> class 0 scores 50 / (50 + 100 + 13); no-object never wins
# Boxes (cx, cy, w, h) normalised to the encoder's 100 x 100 input:
#   query 0: (0.5, 0.5, 0.2, 0.4)  -> x 0.4..0.6, y 0.3..0.7 -> 40..60, 30..70 input pixels
#   query 2: (0.25, 0.5, 0.1, 0.2) -> x 0.2..0.3, y 0.4..0.6 -> 20..30, 40..60 input pixels


def hand_made_outputs(box_2=(0.25, 0.5, 0.1, 0.2)) -> LapvqaDetectionOutput:
    logits = torch.zeros(1, 4, 15)
    logits[0, 0, 3] = torch.tensor(36.0).log()
    logits[0, 2, 10] = torch.tensor(86.0).log()
    logits[0, 3, 14], logits[0, 3, 0] = torch.tensor(100.0).log(), torch.tensor(50.0).log()
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.5, 0.5, 0.1, 0.1], list(box_2), [0.5, 0.5, 0.3, 0.3]]])
    return LapvqaDetectionOutput(logits=logits, pred_boxes=boxes)


@pytest.mark.parametrize(
    "resize_mode, height, width, expected_boxes",
    [
        # 400 x 200 portrait, padded: resized to 100 x 50 at left = 25, top = 0; 4 original pixels per input pixel.
        # query 2's x0 = (20 - 25) * 4 = -20 is clipped to the image.
        ("pad", 400, 200, [[0, 160, 20, 240], [60, 120, 140, 280]]),
        # 300 x 600 landscape, padded: resized to 50 x 100 at top = 25, left = 0; 6 original pixels per input pixel.
        ("pad", 300, 600, [[120, 90, 180, 210], [240, 30, 360, 270]]),
        # 300 x 200 portrait, padded: width 200 / 3 = 66.7 rounds to 67 at left = (100 - 67) // 2 = 16, so
        # x = (input x - 16) * 200 / 67 and y = input y * 3.
        ("pad", 300, 200, [[800 / 67, 120, 2800 / 67, 180], [4800 / 67, 90, 8800 / 67, 210]]),
        # Stretched: a plain scale by (200, 400).
        ("stretch", 400, 200, [[40, 160, 60, 240], [80, 120, 120, 280]]),
    ],
    ids=["pad-portrait", "pad-landscape", "pad-rounded", "stretch"],
)
def test_boxes_are_mapped_back_to_the_original_image(resize_mode, height, width, expected_boxes):
    processor = LapvqaImageProcessor(size={"height": 100, "width": 100}, resize_mode=resize_mode)
    (result,) = processor.post_process_object_detection(hand_made_outputs(), target_sizes=[(height, width)])
    assert result["labels"].tolist() == [10, 3]  # best first
    assert torch.allclose(result["scores"], torch.tensor([0.86, 0.72]))
    assert torch.allclose(result["boxes"], torch.tensor(expected_boxes, dtype=torch.float32), atol=1e-4)


def test_stretched_boxes_are_clipped_to_the_image():
    processor = LapvqaImageProcessor(size={"height": 100, "width": 100}, resize_mode="stretch")
    # (0.95, 0.05, 0.2, 0.2): x 0.85..1.05, y -0.05..0.15 -> x 170..210, y -20..60 on a 400 x 200 image
    outputs = hand_made_outputs(box_2=(0.95, 0.05, 0.2, 0.2))
    (result,) = processor.post_process_object_detection(outputs, target_sizes=torch.tensor([[400, 200]]))
    assert torch.allclose(result["boxes"][0], torch.tensor([170.0, 0.0, 200.0, 60.0]), atol=1e-4)


def test_threshold_top_k_label_names_and_normalised_boxes():
    processor = LapvqaImageProcessor(size={"height": 100, "width": 100})
    names = dict(enumerate(LapvqaDetectionConfig().id2label.values()))
    (low,) = processor.post_process_object_detection(hand_made_outputs(), threshold=0.05, id2label=names)
    assert torch.allclose(low["scores"], torch.tensor([0.86, 0.72, 50 / 163, 1 / 15]))
    assert low["labels"].tolist()[:3] == [10, 3, 0] and 14 not in low["labels"].tolist()
    assert low["label_names"][:3] == ["Pleural effusion", "Cardiomegaly", "Aortic enlargement"]
    # Without target sizes the boxes stay (x0, y0, x1, y1) normalised to the encoder's input.
    assert torch.allclose(low["boxes"][1], torch.tensor([0.4, 0.3, 0.6, 0.7]))
    (best,) = processor.post_process_object_detection(hand_made_outputs(), threshold=0.05, top_k=1)
    assert best["labels"].tolist() == [10] and best["boxes"].shape == (1, 4)
    (none,) = processor.post_process_object_detection(hand_made_outputs(), threshold=0.9)
    assert none["boxes"].shape == (0, 4) and none["scores"].shape == (0,)


def test_target_sizes_must_match_the_batch():
    processor = LapvqaImageProcessor(size={"height": 100, "width": 100})
    with pytest.raises(ValueError, match="target_sizes holds 2 sizes but the outputs hold 1 images"):
        processor.post_process_object_detection(hand_made_outputs(), target_sizes=[(10, 10), (20, 20)])
