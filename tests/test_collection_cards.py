"""The collection manifest is complete and validated; every card renders, parses back and its snippet runs."""

import ast
import copy
import importlib
import json
from importlib import resources

import numpy as np
import pytest
import torch
import transformers
from conftest import upstream_detection_checkpoint
from huggingface_hub import ModelCard
from lapvqa_hf.convert.captioning import convert_captioning
from lapvqa_hf.convert.detection import convert_detection
from lapvqa_hf.convert.diffvqa import convert_diffvqa
from lapvqa_hf.convert.original import CaptioningModel, DetectionHead, DiffVQAHead, VQAHead, randomize_
from lapvqa_hf.convert.vision_encoder import convert_vision_encoder
from lapvqa_hf.convert.vqa import convert_vqa
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel
from transformers.pipelines import SUPPORTED_TASKS

from lapvqa_hf.collection import ManifestError, load_collection
from lapvqa_hf.compatibility import TRANSFORMERS_NEWEST_TESTED, TRANSFORMERS_OLDEST_TESTED, transformers_record
from lapvqa_hf.model_card import render_model_card, usage_snippet

MANIFEST = json.loads(resources.files("lapvqa_hf").joinpath("collection.json").read_text())


ENCODERS = ("clip-vit-l14", "coca", "florence2", "siglip", "owlv2")
NATIVE_ENCODERS = ("clip-vit-l14", "siglip", "florence2", "coca", "mae-vit-l16")
# Every file of the 13 readable upstream repos, as their cards list them (the rrg card is unreadable: the rrg-native
# layout is assumed; the sigmoid model's periodic checkpoints every 10 of its 50 epochs), and open_clip's CoCa.
UPSTREAM_FILES = {
    *(("dmusingu/lapvqa-diffvqa", f"{e}_best.pt") for e in ENCODERS),
    *(("dmusingu/lapvqa-vqa", f"{e}_best.pt") for e in ENCODERS),
    *(("dmusingu/lapvqa-ad", f"{e}.pt") for e in (*ENCODERS, "mae-vit-l16")),
    ("dmusingu/lapvqa-pretrain-captioning", "model_best.pt"),
    ("dmusingu/lapvqa-pretrain-captioning", "encoder_final.pt"),
    ("laion/mscoco_finetuned_CoCa-ViT-L-14-laion2B-s13B-b90k", "open_clip_pytorch_model.bin"),
    ("dmusingu/lapvqa-pretrain-contrastive", "model_best.pt"),
    ("dmusingu/lapvqa-pretrain-contrastive", "encoder_final.pt"),
    ("dmusingu/lapvqa-pretrain-sigmoid", "model_best.pt"),
    ("dmusingu/lapvqa-pretrain-sigmoid", "encoder_final.pt"),
    *(("dmusingu/lapvqa-pretrain-sigmoid", f"model_epoch{epoch:03d}.pt") for epoch in (10, 20, 30, 40, 50)),
    *(("dmusingu/lapvqa-vqa-native", f"{e}_best.pt") for e in NATIVE_ENCODERS),
    *(("dmusingu/lapvqa-diffvqa-native", f"{e}_best.pt") for e in NATIVE_ENCODERS),
    ("dmusingu/lapvqa-vqa-pretrain-captioning", "pretrain-captioning_best.pt"),
    ("dmusingu/lapvqa-diffvqa-pretrain-captioning", "pretrain-captioning_best.pt"),
    *(("dmusingu/lapvqa-rrg", f"{e}.pt") for e in NATIVE_ENCODERS),
    *(("dmusingu/lapvqa-rrg-native", f"{e}.pt") for e in NATIVE_ENCODERS),
    *(("dmusingu/lapvqa-pg", f"{e}.pt") for e in (*NATIVE_ENCODERS, "owlv2")),
}


def test_manifest_lists_every_upstream_file_once():
    collection = load_collection()
    names = {m.name for m in collection.models}
    for encoder in ("clip-vit-l14", "coca", "florence2", "siglip", "owlv2"):
        assert f"lapvqa-diffvqa-{encoder}" in names and f"lapvqa-vqa-{encoder}" in names
        assert f"lapvqa-ad-{encoder}" in names
    assert {"lapvqa-captioning", "lapvqa-vit-l14", "lapvqa-coca-vit-l14", "lapvqa-ad-mae-vit-l16"} <= names
    assert {"lapvqa-contrastive", "lapvqa-sigmoid"} <= names
    assert {f"lapvqa-pg-{e}" for e in ("clip-vit-l14", "siglip", "florence2", "coca", "owlv2", "mae-vit-l16")} <= names
    for encoder in ("clip-vit-l14", "siglip", "florence2", "coca", "mae-vit-l16"):
        assert f"lapvqa-rrg-{encoder}" in names and f"lapvqa-rrg-native-{encoder}" in names
    assert {(m.source.repo_id, m.source.filename) for m in collection.models} == UPSTREAM_FILES
    assert collection.select(convertible_only=True) == list(collection.models), "every upstream file converts"
    native = {m.name for m in collection.models if m.encoder_finetuned}
    assert native == {m.name for m in collection.models if m.source.repo_id.endswith("-native")}
    for name in ("lapvqa-vqa-vit-l14", "lapvqa-diffvqa-vit-l14"):  # heads on the captioning-pretrained encoder
        assert next(m for m in collection.models if m.name == name).encoder == "lapvqa-vit-l14"


def test_manifest_carries_the_reported_results():
    collection = {m.name: m for m in load_collection().models}
    coca = {r.name: r.value for r in collection["lapvqa-diffvqa-coca"].results}
    assert coca == {"BLEU-1": 0.196, "BLEU-4": 0.138, "ROUGE-1": 0.320, "RadGraph-s": 0.317}
    assert collection["lapvqa-diffvqa-owlv2"].results == ()
    assert [r.value for r in collection["lapvqa-vit-l14"].results] == [0.686, 0.808]
    assert {r.name: r.value for r in collection["lapvqa-vqa-siglip"].results}["BLEU-4"] == 0.253
    siglip_ad = collection["lapvqa-ad-siglip"].results[0]
    assert (siglip_ad.value, siglip_ad.approximate) == (0.045, True)
    assert collection["lapvqa-ad-mae-vit-l16"].vis_dim == 1024
    mae_rrg = collection["lapvqa-rrg-native-mae-vit-l16"]  # MIMIC-CXR test, encoder fine-tuned with the head
    assert {r.type: r.value for r in mae_rrg.results} == {"bleu4": 0.032, "rougeL": 0.164, "radgraph_s": 0.195}
    assert collection["lapvqa-rrg-native-siglip"].vis_dim == 1152 and collection["lapvqa-rrg-siglip"].results == ()
    for name, values in (
        ("lapvqa-diffvqa-native-mae-vit-l16", {"bleu4": 0.472, "rouge2": 0.573, "radgraph_s": 0.288}),
        ("lapvqa-diffvqa-vit-l14", {"bleu4": 0.468, "rouge2": 0.562, "radgraph_s": 0.303}),
    ):
        assert {r.type: r.value for r in collection[name].results} == values | {"bertscore_f1": 0.938}
    mae_pg = collection["lapvqa-pg-mae-vit-l16"]  # MIMIC-CXR test, fine-tuned
    assert {r.type: r.value for r in mae_pg.results} == {"miou": 0.320, "acc25": 0.569, "pointing": 0.593}
    assert collection["lapvqa-pg-siglip"].vis_dim == 1152 and collection["lapvqa-pg-coca"].results == ()
    for name, aucs in (("lapvqa-contrastive", [0.653, 0.759]), ("lapvqa-sigmoid", [0.650, 0.785])):
        assert [r.value for r in collection[name].results] == aucs  # linear-probe mean AUC: NIH CXR-14, CheXpert-5
        assert [r.value for r in collection[f"{name}-vit-l14"].results] == aucs


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["models"].append(copy.deepcopy(m["models"][0])), "repo ids listed twice"),
        (lambda m: m["models"][0].update(kind="segmentation"), "kind must be one of"),
        (lambda m: m["models"][12].update(encoder="resnet"), "unknown encoder 'resnet'; expected one of"),
        (lambda m: m["models"][0]["results"][0].update(value=18.4), "value 18.4 outside"),
        (lambda m: m["models"][0].pop("source"), "missing field 'source'"),
        (lambda m: m["models"][0].update(repo_id="lapvqa-diffvqa"), "repo_id must be 'owner/name'"),
        (lambda m: m["models"][0].update(repo_id="dmusingu/lapvqa-diffvqa"), "converted repo ids that are upstream"),
    ],
)
def test_manifest_validation(tmp_path, edit, message):
    manifest = copy.deepcopy(MANIFEST)
    edit(manifest)
    (tmp_path / "collection.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match=message):
        load_collection(tmp_path / "collection.json")


def test_selecting_unknown_names_is_refused():
    with pytest.raises(ManifestError, match=r"not in the collection manifest: \['lapvqa-diffvqa-resnet'\]"):
        load_collection().select(["lapvqa-diffvqa-resnet"])


@pytest.mark.parametrize("entry", load_collection().select(convertible_only=True), ids=lambda e: e.name)
def test_every_card_renders_and_its_metadata_parses_back(entry):
    collection = load_collection()
    info = {"assumptions": ["assumption one", "assumption two"], "source_sha256": "ab" * 32}
    card = ModelCard(
        str(
            render_model_card(
                entry,
                collection,
                info,
                "verify passed: float64 max |Δlogit| = 2.8e-13, relative 2.5e-15 (tolerance 1e-09)",
            )
        )
    )
    data = card.data.to_dict()
    coca_tower = entry.kind == "coca-vision-encoder"  # open_clip's weights, not trained on chest X-rays
    assert data["license"] == ("mit" if coca_tower else "apache-2.0") and data["library_name"] == "transformers"
    assert data["pipeline_tag"] == entry.pipeline_tag and data["base_model"] == entry.source.repo_id
    assert entry.pipeline_tag in SUPPORTED_TASKS, "a task the installed transformers has"
    assert "chest-xray" in data["tags"] and data["datasets"]
    if entry.results:
        (result,) = data["model-index"][0]["results"]
        assert result["dataset"]["name"] == entry.dataset.name
        assert [(m["name"], m["value"]) for m in result["metrics"]] == [(r.name, r.value) for r in entry.results]
        for metric in entry.results:
            assert f"| {metric.name} | {'~' if metric.approximate else ''}{metric.value:.3f} |" in card.text
    else:
        assert "model-index" not in data
    assert "assumption one" in card.text and "Research only" in card.text
    assert ("johnson2019mimic" in card.text) != coca_tower and ("yu2022coca" in card.text) == coca_tower
    assert ("hu2023expert" in card.text) == (entry.kind == "diffvqa")
    assert f'"{entry.repo_id}"' in card.text


def test_cards_state_the_transformers_releases_the_code_was_tested_with():
    collection = load_collection()
    (entry,) = collection.select(["lapvqa-diffvqa-coca"])
    card = render_model_card(entry, collection, {"assumptions": [], **transformers_record()}).text
    tested = f">={TRANSFORMERS_OLDEST_TESTED},<={TRANSFORMERS_NEWEST_TESTED}"
    assert f"tested with transformers `{tested}`" in card
    assert f"written with transformers {transformers.__version__}" in card


def test_detection_cards_show_the_training_record_and_the_assumed_options():
    collection = load_collection()
    (entry,) = collection.select(["lapvqa-ad-owlv2"])
    info = {
        "assumptions": ["no positional encoding"],
        "assumed_num_attention_heads": 8,
        "assumed_resize_mode": "stretch",
    }
    training = {"epoch": 37, "val_map40": 0.052, "val_map50": 0.031}
    card = render_model_card(entry, collection, info, "verify passed", training).text
    assert "| val_map40 | 0.052 |" in card and "| epoch | 37 |" in card
    assert "- option `num_attention_heads` = `8` (not in the weights; a converter option)" in card
    assert "- option `resize_mode` = `stretch`" in card
    assert "post_process_object_detection" in card and "fine-tunes the head with DETR's set loss" in card
    assert "| mAP@0.4 | 0.048 |" in card, "the upstream card's test result beside the checkpoint's validation record"
    diffvqa_card = render_model_card(collection.select(["lapvqa-diffvqa-coca"])[0], collection, info).text
    assert "Training record" not in diffvqa_card and "Detection outputs" not in diffvqa_card


@pytest.mark.parametrize("entry", load_collection().select(convertible_only=True), ids=lambda e: e.name)
def test_usage_snippets_only_name_what_exists(entry):
    tree = ast.parse(usage_snippet(entry))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{node.module}.{alias.name}"


def test_usage_snippets_run_on_converted_folders(tmp_path, monkeypatch):
    """Each kind's card snippet, run on a folder converted like the collection's entry (the CLIP ViT-L/14 heads),
    with the encoder a tiny random CLIP vision tower of the same width in a local folder."""
    names = ["lapvqa-diffvqa-clip-vit-l14", "lapvqa-vqa-clip-vit-l14", "lapvqa-ad-clip-vit-l14", "lapvqa-captioning",
             "lapvqa-vit-l14"]  # fmt: skip
    collection = {m.kind: m for m in load_collection().select(names)}
    quiet = dict(log=lambda _: None)
    clip = CLIPVisionConfig(hidden_size=1024, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                            image_size=224, patch_size=56)  # fmt: skip
    CLIPVisionModel(clip).save_pretrained(tmp_path / "clip")
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size=224).save_pretrained(tmp_path / "clip")
    encoder = dict(encoder_checkpoint=str(tmp_path / "clip"))
    head = randomize_(DiffVQAHead(vis_dim=1024, d_model=64, num_layers=2, dim_feedforward=96))
    torch.save(head.state_dict(), tmp_path / "clip-vit-l14_best.pt")
    convert_diffvqa(tmp_path / "clip-vit-l14_best.pt", "clip-vit-l14", tmp_path / "diffvqa", **encoder, **quiet)
    vqa_head = randomize_(VQAHead(vis_dim=1024, d_model=64, num_layers=2, dim_feedforward=96))
    torch.save(vqa_head.state_dict(), tmp_path / "clip_vqa.pt")
    convert_vqa(tmp_path / "clip_vqa.pt", "clip-vit-l14", tmp_path / "vqa", **encoder, **quiet)
    detection_head = randomize_(DetectionHead(vis_dim=1024, d_model=32, dim_feedforward=48))
    torch.save(upstream_detection_checkpoint(detection_head, "clip-vit-l14"), tmp_path / "clip-vit-l14.pt")
    convert_detection(tmp_path / "clip-vit-l14.pt", tmp_path / "detection", **encoder, **quiet)
    captioning = randomize_(
        CaptioningModel(img_size=56, vision_width=64, vision_depth=2, d_model=32, num_layers=2, dim_feedforward=48)
    )
    torch.save(captioning.state_dict(), tmp_path / "model_best.pt")
    torch.save(captioning.vision_encoder.state_dict(), tmp_path / "encoder_final.pt")
    convert_captioning(tmp_path / "model_best.pt", tmp_path / "captioning", **quiet)
    convert_vision_encoder(tmp_path / "encoder_final.pt", tmp_path / "vision-encoder", **quiet)
    for name in ("chest_xray.png", "prior.png", "current.png"):
        pixels = (np.random.default_rng(len(name)).random((80, 70)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(tmp_path / name)
    monkeypatch.chdir(tmp_path)
    for kind, entry in collection.items():
        code = usage_snippet(entry).replace(f'"{entry.repo_id}"', f'"{tmp_path / kind}"')
        exec(compile(code, f"card snippet ({entry.name})", "exec"), {})
