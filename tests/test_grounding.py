"""The phrase-grounding head (`dmusingu/lapvqa-pg`): parity with the faithful original at every weight scale,
conversion and its refusals, remote code, the loss, the zero-shot-object-detection pipeline and `lapvqa answer`."""

import copy
import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    WEIGHT_SCALES,
    float32_bound,
    randomize_at_scale_,
    relative_error,
    run_without_lapvqa_hf,
    upstream_grounding_checkpoint,
)
from lapvqa_hf.convert import grounding
from lapvqa_hf.convert.original import VisualGroundingHead, randomize_
from lapvqa_hf.convert.verify import verify_conversion
from PIL import Image
from transformers import AutoConfig, AutoModel, CLIPConfig, CLIPModel, CLIPTokenizer, pipeline
from transformers.convert_slow_tokenizer import bytes_to_unicode

from lapvqa_hf import (
    LapvqaGroundingConfig,
    LapvqaGroundingModel,
    LapvqaImageProcessor,
    LapvqaVisionConfig,
    LapvqaVisionModel,
)
from lapvqa_hf.answer import answer_dataset
from lapvqa_hf.cli import main as lapvqa
from lapvqa_hf.collection import load_collection
from lapvqa_hf.model_card import usage_snippet
from lapvqa_hf.models.modeling_lapvqa_grounding import grounding_loss

TINY = dict(d_model=32, nhead=4, num_layers=3, dim_feedforward=48)


def make_head(vis_dim: int = 768, txt_dim: int = 768, seed: int = 0, scale: str | None = None, **overrides):
    head = VisualGroundingHead(vis_dim=vis_dim, txt_dim=txt_dim, **{**TINY, **overrides})
    if scale is None:
        return randomize_(head, seed=seed).eval()
    return randomize_at_scale_(head, scale, ("box_head.2.weight",), seed=seed)


def convert_in_memory(head: VisualGroundingHead, encoder: str = "coca", **options) -> LapvqaGroundingModel:
    state_dict = head.state_dict()
    text = grounding.text_record(encoder)
    config = grounding.infer_config(state_dict, encoder, text, num_attention_heads=4, **options)
    model = LapvqaGroundingModel(config)
    model.load_state_dict(grounding.convert_state_dict(state_dict, config), strict=True)
    return model.eval()


def inputs(batch: int, length: int, vis_dim: int = 768, txt_dim: int = 768, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    vis = torch.randn(batch, length, vis_dim, generator=generator, dtype=torch.float64)
    txt = torch.nn.functional.normalize(torch.randn(batch, txt_dim, generator=generator, dtype=torch.float64), dim=-1)
    return vis, txt


def tiny_text_tower(folder, projection_dim: int = 768, seed: int = 0):
    """A random CLIP (text side tiny, `projection_dim` wide) with a CLIP tokenizer of single bytes (no merges, 32
    tokens): a stand-in for CLIP ViT-L/14's text tower, in its own folder, as `AutoModel` / `AutoTokenizer` load it."""
    characters = list(bytes_to_unicode().values())
    vocab = {token: i for i, token in enumerate(characters + [c + "</w>" for c in characters])}
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=32)
    tiny = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), max_position_embeddings=32, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id, **tiny),
        vision_config=dict(image_size=32, patch_size=16, **tiny),
        projection_dim=projection_dim,
    )  # fmt: skip
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_image_encoder(folder):
    """A one-layer LapvqaVisionModel of the lapvqa-vit-l14 recipe's width and input size (1024, 224 px) in 56 px
    patches (16 tokens): the frozen encoder, in its own folder."""
    config = LapvqaVisionConfig(
        hidden_size=1024, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, image_size=224,
        patch_size=56,
    )  # fmt: skip
    torch.manual_seed(0)
    LapvqaVisionModel(config).save_pretrained(folder)
    return folder


def run_cli(*args) -> int:
    return lapvqa(["convert", "grounding", *map(str, args)])


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "coca.pt"
    head = make_head(max_len=60)
    torch.save(upstream_grounding_checkpoint(head, "coca"), path)
    return path, head


# --- parity with the faithful original ------------------------------------------------------------------------


def run_original(head: VisualGroundingHead, vis: torch.Tensor, txt: torch.Tensor):
    """The original's boxes and its box head's output before the sigmoid."""
    logits = []
    hook = head.box_head.register_forward_hook(lambda module, args, output: logits.append(output))
    with torch.no_grad():
        boxes = head(vis.to(head.reg_token.dtype), txt.to(head.reg_token.dtype))
    hook.remove()
    return boxes, logits[0]


@pytest.mark.parametrize("scale", WEIGHT_SCALES)
def test_converted_model_matches_the_original_at_every_weight_scale(scale):
    head = make_head(1024, seed=3, scale=scale, max_len=40)
    model = convert_in_memory(head, "clip-vit-l14")
    original64 = copy.deepcopy(head).double()
    for batch, length in ((1, 1), (3, 38)):
        vis, txt = inputs(batch, length, 1024)
        expected, expected_logits = run_original(original64, vis, txt)
        own, own_logits = run_original(head, vis, txt)
        with torch.no_grad():
            outputs = model(image_features=vis.float(), text_features=txt.float())
        assert outputs.pred_boxes.shape == (batch, 4) and outputs.pred_boxes.dtype == torch.float32
        assert relative_error(outputs.pred_boxes, expected) <= float32_bound(own, expected), scale
        assert relative_error(outputs.pred_box_logits, expected_logits) <= float32_bound(own_logits, expected_logits)
        assert torch.allclose(outputs.pred_boxes, outputs.pred_box_logits.sigmoid())


def test_conventions_the_weights_cannot_reveal_are_options_that_keep_parity():
    head = make_head(768, seed=5, activation="gelu", layer_norm_eps=1e-6, final_norm=False)  # and no positions
    model = convert_in_memory(head, "coca", activation_function="gelu", layer_norm_eps=1e-6)
    config = model.config
    assert (config.max_position_embeddings, config.encoder_final_layer_norm) == (None, False)
    assert model.position_embeddings is None and model.encoder.layer_norm is None
    vis, txt = inputs(2, 300, 768)  # no positions: any number of tokens
    with torch.no_grad():
        expected = head(vis.float(), txt.float())
        assert torch.allclose(model(image_features=vis, text_features=txt).pred_boxes, expected, atol=1e-6)


# --- the converter ---------------------------------------------------------------------------------------------


def test_converts_an_upstream_checkpoint_end_to_end(checkpoint, tmp_path, capsys):
    source, head = checkpoint
    out = tmp_path / "lapvqa-pg-coca"
    assert run_cli(source, "--output", out, "--num-heads", "4") == 0
    printed = capsys.readouterr().out
    assert (
        "coca.pt: encoder coca, vis_dim 768, txt_dim 768 (text tower clip-vit-l14), d_model 32, 3 layers, FFN 48, "
        "60 positions, final norm yes; epoch 21, val_miou 0.318, val_acc50 0.274"
    ) in printed
    assert "verify passed: float64 max |Δbox| = " in printed and "max |Δbox_logit|" in printed
    assert {"modeling_lapvqa_grounding.py", "pipeline_lapvqa_grounding.py", "text_towers.py", "model.safetensors",
            "preprocessor_config.json"} <= {p.name for p in out.iterdir()}  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "lapvqa_grounding" and config["encoder_name"] == "coca"
    assert config["training_results"] == {"epoch": 21, "val_miou": 0.318, "val_acc50": 0.274}
    assert (config["encoder_layers"], config["max_position_embeddings"], config["txt_dim"]) == (3, 60, 768)
    assert config["text_recipe"] == {
        "name": "clip-vit-l14", "checkpoint": "openai/clip-vit-large-patch14", "text_dim": 768, "revision": None,
    }  # fmt: skip
    assert config["text_normalize"] is True and config["feature_recipe"]["name"] == "coca"
    assert (config["bbox_loss_coefficient"], config["giou_loss_coefficient"]) == (5, 2)
    assert config["custom_pipelines"]["lapvqa-phrase-grounding"]["impl"] == (
        "pipeline_lapvqa_grounding.LapvqaGroundingPipeline"
    )
    info = config["conversion_info"]
    assert (info["assumed_num_attention_heads"], info["assumed_text_recipe"]) == (4, "clip-vit-l14")
    assert info["assumed_resize_mode"] == "stretch" and info["assumed_text_normalize"] is True
    processor = json.loads((out / "preprocessor_config.json").read_text())
    assert (processor["size"], processor["resize_mode"]) == ({"height": 224, "width": 224}, "stretch")

    assert type(AutoConfig.from_pretrained(out)) is LapvqaGroundingConfig
    model = AutoModel.from_pretrained(out).eval()
    assert type(model) is LapvqaGroundingModel
    vis, txt = inputs(2, 11)
    with torch.no_grad():
        assert torch.allclose(model(image_features=vis, text_features=txt).pred_boxes, head(vis.float(), txt.float()),
                              atol=1e-6)  # fmt: skip


def test_the_text_tower_follows_the_encoder_and_can_be_named(tmp_path, capsys):
    source = tmp_path / "siglip.pt"
    torch.save(upstream_grounding_checkpoint(make_head(1152, 1152), "siglip"), source)
    assert run_cli(source, "--output", tmp_path / "siglip", "--num-heads", "4", "--no-verify") == 0
    assert (
        AutoConfig.from_pretrained(tmp_path / "siglip").text_recipe["checkpoint"] == "google/siglip-so400m-patch14-384"
    )
    source = tmp_path / "mae.pt"
    torch.save(upstream_grounding_checkpoint(make_head(1024), "mae-vit-l16"), source)
    options = ["--num-heads", "4", "--no-verify", "--text-recipe", "owlv2", "--no-text-normalize"]
    assert run_cli(source, "--output", tmp_path / "mae", *options, "--text-checkpoint", tmp_path) == 0
    config = AutoConfig.from_pretrained(tmp_path / "mae")
    assert config.text_recipe == {"name": "owlv2", "checkpoint": str(tmp_path.resolve()), "text_dim": 768,
                                  "revision": None}  # fmt: skip
    assert config.text_normalize is False and config.encoder_name == "mae-vit-l16"


def _refused(tmp_path, capsys, source, *extra) -> str:
    out = tmp_path / "out"
    code = run_cli(source, "--output", out, "--num-heads", "4", *extra)
    err = capsys.readouterr().err.strip()
    assert code == 1 and not out.exists(), "a refused conversion must not write anything"
    error_lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and err.endswith(error_lines[0]), err
    return error_lines[0]


def _rewrite(path, change) -> None:
    content = torch.load(path, weights_only=True)
    change(content)
    torch.save(content, path)


@pytest.mark.parametrize(
    "change, extra, message",
    [
        (lambda c: c.update(vis_dim=1024), (), "vis_dim=1024, but the weights (vis_proj.weight) give 768."),
        (lambda c: c.update(txt_dim=1152), (), "txt_dim=1152, but the weights (txt_proj.weight) give 768."),
        (lambda c: c.update(num_layers=6), (), "num_layers=6, but the weights (encoder.layers.*) give 3."),
        (lambda c: c.update(d_model=256), (), "metadata says d_model=256, but the weights (vis_proj.weight) give 32."),
        (lambda c: c.pop("txt_dim"), (), "found unknown keys [] and missing keys ['txt_dim']"),
        (lambda c: c.update(val_miou=32.0), (), "val_miou must be a number in [0, 1], found 32.0"),
        (
            lambda c: c["state_dict"].update({"encoder.layers.0.extra": torch.ones(3), "cls.bias": torch.ones(2)}),
            (),
            "unknown keys in the checkpoint (not part of the expected layout): ['cls.bias', "
            "'encoder.layers.0.extra']",
        ),
        (
            lambda c: c["state_dict"].update({"pos_emb": torch.zeros(1, 2, 32)}),
            (),
            "pos_emb should be [1, L, 32] with L >= 3 ([REG], a visual token, the phrase), found [1, 2, 32].",
        ),
        (
            lambda c: None,
            ("--text-recipe", "siglip"),
            "the siglip text tower gives 1152-dim phrase features, but the checkpoint's txt_proj takes 768",
        ),
        (lambda c: None, ("--encoder", "owlv2"), "--encoder owlv2 contradicts the checkpoint's encoder 'coca'."),
    ],
    ids=["vis-dim", "txt-dim", "layers", "d-model", "missing-metadata", "miou-range", "unknown-keys", "short-positions",
         "text-tower-width", "encoder"],
)  # fmt: skip
def test_bad_checkpoints_are_refused_in_one_line(checkpoint, tmp_path, capsys, change, extra, message):
    source, _ = checkpoint
    _rewrite(source, change)
    assert message in _refused(tmp_path, capsys, source, *extra)


def test_a_mapping_bug_is_caught_by_verify(checkpoint, tmp_path, capsys, monkeypatch):
    source, _ = checkpoint
    real_convert = grounding.convert_state_dict

    def swapped(state_dict, config):  # two layers' feed-forward outputs exchanged: every shape still fits
        converted = real_convert(state_dict, config)
        first, second = "encoder.layers.0.mlp.fc2.weight", "encoder.layers.1.mlp.fc2.weight"
        converted[first], converted[second] = converted[second], converted[first]
        return converted

    monkeypatch.setattr(grounding, "convert_state_dict", swapped)
    err = _refused(tmp_path, capsys, source)
    assert "verify FAILED" in err and "max |Δbox_logit|" in err and "nothing was written" in err


@pytest.mark.parametrize("scale", WEIGHT_SCALES)
def test_verify_passes_right_conversions_and_fails_mapping_bugs_at_every_weight_scale(scale):
    head = make_head(1024, seed=4, scale=scale, max_len=40)
    state_dict = head.state_dict()
    config = grounding.infer_config(state_dict, "clip-vit-l14", grounding.text_record("clip-vit-l14"), 4)
    probe = grounding.GroundingProbe(config)
    reports = []
    for swap in (False, True):
        converted = grounding.convert_state_dict(state_dict, config)
        if swap:  # two layers' feed-forward outputs exchanged
            first, second = "encoder.layers.0.mlp.fc2.weight", "encoder.layers.1.mlp.fc2.weight"
            converted[first], converted[second] = converted[second], converted[first]
        model = LapvqaGroundingModel(config).eval()
        model.load_state_dict(converted)
        reports.append(
            verify_conversion(head, lambda dtype, m=model: copy.deepcopy(m).to(dtype or torch.float32), probe)
        )
    right, wrong = reports
    assert right.passed and all(d.relative < 1e-13 for d in right.differences), str(right)
    assert not wrong.passed and wrong.differences[1].relative > 1e-2, str(wrong)


# --- the model's interface and loss ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "image_features, text_features, message",
    [
        (torch.zeros(2, 7, 1024), torch.zeros(2, 768), "non-empty patch tokens of shape [batch, num_patches, 768]"),
        (torch.zeros(2, 7, 768), torch.zeros(2, 1, 768), "one phrase embedding per image, [2, 768], got [2, 1, 768]"),
        (torch.zeros(2, 7, 768), None, "`image_features` (the coca encoder's patch tokens"),
        (torch.zeros(1, 59, 768), torch.zeros(1, 768), "59 visual tokens + [REG] + the phrase need 61 positions, "
                                                       "more than the 60 learned positions"),
    ],
    ids=["wrong-width", "text-rank", "missing", "too-many-tokens"],
)  # fmt: skip
def test_bad_inputs_name_what_was_expected(image_features, text_features, message):
    model = convert_in_memory(make_head(max_len=60))
    with pytest.raises(ValueError) as error:
        model(image_features=image_features, text_features=text_features)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_loss_is_transvgs_l1_plus_giou_with_the_configs_weights():
    # pair 1: (0.5, 0.5, 0.2, 0.2) in (0.5, 0.5, 0.4, 0.4): L1 0.2 + 0.2 = 0.4; IoU 0.04 / 0.16 = 0.25, enclosing box
    # = union: GIoU 0.25. pair 2: identical boxes: L1 0, GIoU 1. Batch means: L1 0.2, 1 - GIoU 0.375.
    pred = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.6, 0.2, 0.1]])
    target = torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.3, 0.6, 0.2, 0.1]])
    loss, parts = grounding_loss(pred, target, LapvqaGroundingConfig())
    assert parts["loss_bbox"].item() == pytest.approx(0.2) and parts["loss_giou"].item() == pytest.approx(0.375)
    assert loss.item() == pytest.approx(5 * 0.2 + 2 * 0.375)
    loss, _ = grounding_loss(pred, target, LapvqaGroundingConfig(bbox_loss_coefficient=1, giou_loss_coefficient=0))
    assert loss.item() == pytest.approx(0.2)

    config = LapvqaGroundingConfig(vis_dim=768, d_model=32, num_attention_heads=4, encoder_ffn_dim=48, dropout=0.0,
                                   attention_dropout=0.0, activation_dropout=0.0)  # fmt: skip
    torch.manual_seed(0)
    model = LapvqaGroundingModel(config).train()
    vis, txt = inputs(2, 5)
    outputs = model(image_features=vis.float(), text_features=txt.float(), labels=target)
    assert torch.equal(outputs.loss, grounding_loss(outputs.pred_boxes, target, config)[0])
    outputs.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    with pytest.raises(
        ValueError, match=r"`labels` must be a float tensor \[2, 4\] of target boxes .* got values from"
    ):
        model(image_features=vis.float(), text_features=txt.float(), labels=target * 300)
    with pytest.raises(Exception, match=r"loss weights must be finite and >= 0, got \{'giou_loss_coefficient': -1\}"):
        LapvqaGroundingConfig(giou_loss_coefficient=-1)
    with pytest.raises(Exception, match="the text tower 'siglip' gives 1152-dim phrase features, but txt_dim is 768"):
        LapvqaGroundingConfig(text_recipe={"name": "siglip", "checkpoint": "x", "text_dim": 1152})


# --- the pipeline and `lapvqa answer` ----------------------------------------------------------------------------

PHRASES = ["small left pleural effusion", "enlarged cardiac silhouette"]


@pytest.fixture(scope="module")
def grounding_folder(tmp_path_factory) -> str:
    """A converted head on the lapvqa-vit-l14 recipe, its encoder and text tower tiny local folders."""
    base = tmp_path_factory.mktemp("grounding")
    torch.save(upstream_grounding_checkpoint(make_head(1024, seed=2), "lapvqa-vit-l14"), base / "vit.pt")
    arguments = ["--encoder-checkpoint", tiny_image_encoder(base / "encoder"), "--text-checkpoint",
                 tiny_text_tower(base / "text"), "--num-heads", "4"]  # fmt: skip
    assert run_cli(base / "vit.pt", "--output", base / "lapvqa-pg", *arguments) == 0
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (90, 70), dtype=np.uint8)).save(base / "a.png")
    Image.fromarray(rng.integers(0, 65535, (60, 84), dtype=np.uint16)).save(base / "b.png")
    return str(base / "lapvqa-pg")


def expected_boxes(folder: str, image, phrases: list[str]) -> list[list[float]]:
    """The boxes computed step by step: the folder's processor, the encoder, the text tower, the head, the boxes."""
    model = LapvqaGroundingModel.from_pretrained(folder).eval()
    processor = LapvqaImageProcessor.from_pretrained(folder)
    encoder = LapvqaVisionModel.from_pretrained(model.config.feature_recipe["checkpoint"]).eval()
    text_tower = CLIPModel.from_pretrained(model.config.text_recipe["checkpoint"]).eval()
    tokenizer = CLIPTokenizer.from_pretrained(model.config.text_recipe["checkpoint"])
    loaded = processor.load_image(image)
    with torch.no_grad():
        tokens = encoder(processor(loaded)["pixel_values"]).last_hidden_state.expand(len(phrases), -1, -1)
        texts = tokenizer(phrases, padding="max_length", truncation=True, return_tensors="pt")
        text = torch.nn.functional.normalize(text_tower.get_text_features(**texts).pooler_output, dim=-1)
        boxes = model(image_features=tokens, text_features=text).pred_boxes
    cx, cy, w, h = boxes.unbind(-1)
    corners = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
    height, width = loaded.shape[:2]
    return processor.boxes_to_original(corners, height, width).tolist()


def test_the_pipeline_gives_one_box_per_phrase_in_the_original_pixels(grounding_folder, monkeypatch):
    folder = grounding_folder.rsplit("/", 1)[0]
    pipe = pipeline(model=grounding_folder, trust_remote_code=True)
    found = pipe(f"{folder}/a.png", candidate_labels=PHRASES)
    assert [f["label"] for f in found] == PHRASES and all(f["score"] == 1.0 for f in found)
    expected = expected_boxes(grounding_folder, f"{folder}/a.png", PHRASES)
    for result, box in zip(found, expected, strict=True):
        assert list(result["box"]) == ["xmin", "ymin", "xmax", "ymax"]
        assert np.allclose(list(result["box"].values()), box, atol=0.01)
        assert 0 <= result["box"]["xmin"] <= result["box"]["xmax"] <= 70
        assert 0 <= result["box"]["ymin"] <= result["box"]["ymax"] <= 90
    # transformers' zero-shot-object-detection inputs: a dict, a list of them, labels as one comma-separated string
    assert pipe({"image": f"{folder}/a.png", "candidate_labels": PHRASES}) == found
    both = pipe([{"image": f"{folder}/a.png", "candidate_labels": PHRASES[:1]},
                 {"image": f"{folder}/b.png", "candidate_labels": ", ".join(PHRASES)}])  # fmt: skip
    assert both[0] == found[:1] and [f["label"] for f in both[1]] == PHRASES
    with pytest.raises(ValueError, match="candidate_labels must be a non-empty list of findings"):
        pipe(f"{folder}/a.png", candidate_labels=[])

    # Loaded towers are reused; the card's snippet runs on the folder.
    reused = pipeline(model=grounding_folder, trust_remote_code=True, text_encoder=pipe.text_encoder,
                      text_tokenizer=pipe.text_tokenizer, encoder=pipe.encoder)  # fmt: skip
    assert reused.text_encoder is pipe.text_encoder and reused(f"{folder}/a.png", candidate_labels=PHRASES) == found
    (entry,) = [m for m in load_collection().models if m.kind == "grounding" and m.encoder == "clip-vit-l14"]
    Image.open(f"{folder}/a.png").save(f"{folder}/chest_xray.png")
    monkeypatch.chdir(folder)
    exec(compile(usage_snippet(entry).replace(f'"{entry.repo_id}"', f'"{grounding_folder}"'), "snippet", "exec"), {})
    # ... and so does docs/models.md's.
    docs = (Path(__file__).resolve().parents[1] / "docs" / "models.md").read_text()
    code = re.search(r"## Phrase grounding\n.*?```python\n(.*?)```", docs, re.S).group(1)
    assert "dmusingu/lapvqa-pg-clip-vit-l14" in code
    Image.open(f"{folder}/a.png").save(f"{folder}/cxr.png")
    namespace = {}
    exec(
        compile(code.replace("dmusingu/lapvqa-pg-clip-vit-l14", grounding_folder), "docs/models.md", "exec"), namespace
    )
    assert torch.allclose(namespace["outputs"].pred_boxes, namespace["outputs"].pred_box_logits.sigmoid())


def test_answer_grounds_each_rows_phrase_as_the_pipeline_does(grounding_folder, tmp_path):
    folder = grounding_folder.rsplit("/", 1)[0]
    rows = [("a.png", PHRASES[0]), ("b.png", PHRASES[1]), ("missing.png", PHRASES[0]), ("a.png", ""),
            ("a.png", PHRASES[1])]  # fmt: skip
    with open(tmp_path / "rows.csv", "w", newline="") as file:
        csv.writer(file).writerows([("image", "phrase"), *rows])
    output = answer_dataset(grounding_folder, tmp_path / "rows.csv", tmp_path / "out.jsonl", image_root=folder,
                            batch_size=2, save_maps=tmp_path / "maps", progress=False)  # fmt: skip
    lines = [json.loads(line) for line in open(output)]
    assert [line["row"] for line in lines] == [0, 1, 2, 3, 4]
    assert "missing.png" in lines[2]["error"] and "phrase" in lines[3]["error"]
    for index in (0, 1, 4):
        image, phrase = rows[index]
        (box,) = expected_boxes(grounding_folder, f"{folder}/{image}", [phrase])
        assert np.allclose(list(lines[index]["box"].values()), box, atol=0.01)
        assert lines[index]["input"] == {"image": image, "phrase": phrase}
        assert max(Image.open(lines[index]["map"]).size) == 640


_REMOTE_GROUNDING = """
import torch
import transformers

request = torch.load(sys.argv[2], weights_only=True)
model = transformers.AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
with torch.no_grad():
    boxes = model(**request["inputs"]).pred_boxes
pipe = transformers.pipeline(model=sys.argv[1], trust_remote_code=True)
classes = [type(model).__module__, type(pipe).__module__]
assert all(name.startswith("transformers_modules") for name in classes) and "lapvqa_hf" not in sys.modules, classes
torch.save({"boxes": boxes, "found": pipe(request["image"], candidate_labels=request["phrases"])}, sys.argv[3])
"""


def test_the_model_and_its_pipeline_run_as_remote_code_without_the_package(grounding_folder, tmp_path):
    image = f"{grounding_folder.rsplit('/', 1)[0]}/b.png"
    vis, txt = inputs(2, 9, 1024)
    request = {"inputs": {"image_features": vis.float(), "text_features": txt.float()}, "image": image,
               "phrases": PHRASES}  # fmt: skip
    torch.save(request, tmp_path / "request.pt")
    run_without_lapvqa_hf(_REMOTE_GROUNDING, [grounding_folder, tmp_path / "request.pt", tmp_path / "out.pt"], tmp_path)
    remote = torch.load(tmp_path / "out.pt", weights_only=True)
    with torch.no_grad():
        local = LapvqaGroundingModel.from_pretrained(grounding_folder).eval()(**request["inputs"]).pred_boxes
    assert torch.equal(remote["boxes"], local)
    assert remote["found"] == pipeline(model=grounding_folder, trust_remote_code=True)(image, candidate_labels=PHRASES)
