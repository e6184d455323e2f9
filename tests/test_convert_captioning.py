"""`lapvqa convert captioning` and `lapvqa convert vision-encoder`: strict, safe, verified, atomic."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from lapvqa_hf.convert import captioning
from lapvqa_hf.convert.original import CaptioningModel, randomize_
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, AutoProcessor

from lapvqa_hf import LapvqaCaptioningModel, LapvqaImageProcessor, LapvqaProcessor, LapvqaVisionModel
from lapvqa_hf.cli import main as lapvqa

TINY = dict(
    img_size=56,
    patch_size=14,
    vision_width=64,
    vision_depth=2,
    vision_heads=4,
    d_model=32,
    nhead=4,
    num_layers=2,
    dim_feedforward=48,
    max_len=40,
)
HEADS = ["--num-heads", "4", "--vision-num-heads", "4"]


@pytest.fixture
def upstream(tmp_path):
    model = randomize_(CaptioningModel(**TINY), seed=2)
    torch.save(model.state_dict(), tmp_path / "model_best.pt")
    torch.save(model.vision_encoder.state_dict(), tmp_path / "encoder_final.pt")
    return tmp_path


def test_captioning_converts_to_a_folder_with_model_tokenizer_and_processor(upstream, capsys):
    out = upstream / "lapvqa-pretrain-captioning"
    assert lapvqa(["convert", "captioning", str(upstream / "model_best.pt"), "--output", str(out), *HEADS]) == 0
    printed = capsys.readouterr().out
    assert "encoder width 64, 2 layers, 56 px (16 patches); decoder 2 layers, 40 positions" in printed
    assert "verify passed" in printed and "greedy reports identical for 2/2 images" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "lapvqa_captioning" and config["vision_config"]["image_size"] == 56
    assert config["conversion_info"]["assumed_vision_num_attention_heads"] == 4
    processor = AutoProcessor.from_pretrained(out)
    assert type(processor) is LapvqaProcessor and processor.image_processor.size == {"height": 56, "width": 56}
    model = AutoModel.from_pretrained(out)
    assert type(model) is LapvqaCaptioningModel
    Image.fromarray((np.random.default_rng(0).random((70, 64)) * 255).astype(np.uint8)).save(upstream / "cxr.png")
    inputs = processor(images=upstream / "cxr.png")
    report = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert report.shape == (1, 6)


def test_vision_encoder_converts_with_its_image_processor(upstream, capsys):
    out = upstream / "encoder"
    assert (
        lapvqa(
            ["convert", "vision-encoder", str(upstream / "encoder_final.pt"), "--output", str(out), "--num-heads", "4"]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "width 64, 2 layers, MLP 256, patch 14, 56 px (16 patches)" in printed
    assert "verify passed: float64 max |Δfeature|" in printed
    assert type(AutoModel.from_pretrained(out)) is LapvqaVisionModel
    image_processor = AutoImageProcessor.from_pretrained(out)
    assert type(image_processor) is LapvqaImageProcessor and image_processor.size == {"height": 56, "width": 56}


def test_module_entry_points(upstream):
    for module, source in (("captioning", "model_best.pt"), ("vision_encoder", "encoder_final.pt")):
        heads = HEADS if module == "captioning" else ["--num-heads", "4"]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                f"lapvqa_hf.convert.{module}",
                str(upstream / source),
                "--output",
                str(upstream / module),
                "--no-verify",
                *heads,
            ],
            capture_output=True,
            text=True,
            env=os.environ,
        )
        assert result.returncode == 0, result.stderr
        assert (upstream / module / "model.safetensors").is_file()


def _refused(upstream, capsys, *args):
    out = upstream / "out"
    assert lapvqa(["convert", *map(str, args), "--output", str(out)]) == 1
    assert not out.exists()
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1
    return errors[0]


def test_non_square_position_grid_is_refused(upstream, capsys):
    state = torch.load(upstream / "encoder_final.pt", weights_only=True)
    state["pos_embed"] = torch.zeros(1, 1 + 15, 64)
    torch.save(state, upstream / "encoder_final.pt")
    err = _refused(upstream, capsys, "vision-encoder", upstream / "encoder_final.pt", "--num-heads", "4")
    assert "pos_embed has 16 rows: expected 1 (CLS) + a square grid of patches, found 15 patch positions" in err


def test_captioning_checkpoint_without_encoder_is_refused(upstream, capsys):
    state = torch.load(upstream / "model_best.pt", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("vision_encoder.")}
    torch.save(state, upstream / "model_best.pt")
    err = _refused(upstream, capsys, "captioning", upstream / "model_best.pt", *HEADS)
    assert "not a ViT encoder state dict: missing 'vision_encoder.pos_embed'" in err


def test_extra_encoder_keys_are_named(upstream, capsys):
    state = torch.load(upstream / "model_best.pt", weights_only=True)
    state["vision_encoder.head.weight"] = torch.zeros(14, 64)
    torch.save(state, upstream / "model_best.pt")
    err = _refused(upstream, capsys, "captioning", upstream / "model_best.pt", *HEADS)
    assert "unknown keys in the checkpoint (not part of the expected layout): ['vision_encoder.head.weight']" in err


def test_malicious_encoder_file_is_refused(upstream, capsys):
    class RunsCode:
        def __reduce__(self):
            return (os.system, ("echo never",))

    torch.save({"pos_embed": RunsCode()}, upstream / "encoder_final.pt")
    err = _refused(upstream, capsys, "vision-encoder", upstream / "encoder_final.pt")
    assert "refused to load a pickle that could run code (it imports posix.system)" in err


def test_failed_captioning_verification_writes_nothing(upstream, capsys, monkeypatch):
    real = captioning.convert_state_dict

    def corrupted(state_dict, config):
        converted = real(state_dict, config)
        bias = converted["vision_model.layers.1.mlp.fc2.bias"]
        # Not a constant shift: the final LayerNorm would cancel that.
        converted["vision_model.layers.1.mlp.fc2.bias"] = bias + torch.linspace(0, 1, bias.numel())
        return converted

    monkeypatch.setattr(captioning, "convert_state_dict", corrupted)
    err = _refused(upstream, capsys, "captioning", upstream / "model_best.pt", *HEADS)
    assert "verify FAILED" in err and "nothing was written" in err
