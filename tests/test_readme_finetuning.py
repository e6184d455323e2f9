"""The fine-tuning guide's section (docs/fine-tuning.md), run as written on the synthetic release: data, features, `accelerate launch`
training of a DiffVQA head and of the captioning decoder (from features, and from images with its encoder),
the native recipe (a DiffVQA head fine-tuned with its encoder from images), evaluation, and a saved folder ready to
publish.

Only the scale is shrunk (fewer subjects, a few steps, a tiny DiffVQA decoder, tiny converted models standing in
for `lapvqa-pretrain-captioning[-encoder]`, a tiny MAE standing in for `facebook/vit-mae-large`); every command line
of the guide runs unchanged otherwise."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_with_remote_code
from lapvqa_hf.convert.captioning import convert_captioning
from lapvqa_hf.convert.original import CaptioningModel, randomize_
from lapvqa_hf.convert.vision_encoder import convert_vision_encoder
from test_pipelines import tiny_encoder_folder

GUIDE = (Path(__file__).resolve().parents[1] / "docs" / "fine-tuning.md").read_text()
SECTION = re.search(r"## Fine-tuning a DiffVQA head or the captioning decoder\n(.*?)(\n## |\Z)", GUIDE, re.S).group(1)
TINY_DIFFVQA = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
SMALL_RUN = [
    "max_steps=4",
    "warmup_steps=1",
    "batch_size=4",
    "checkpoint_every=2",
    "eval_every=4",
    "eval_max_new_tokens=8",
]


def shrunk_script() -> str:
    script = "\n".join(re.findall(r"```bash\n(.*?)```", SECTION, re.S))
    assert script.count("accelerate launch -m lapvqa_hf.train") == 4 and "lapvqa evaluate" in script
    script = script.replace("--subjects 40", "--subjects 8")

    def shrink(match: re.Match) -> str:
        overrides = list(SMALL_RUN)
        if "captioning" not in match.group(0):  # the DiffVQA runs: a tiny decoder
            overrides.append(f"model={json.dumps(TINY_DIFFVQA, separators=(',', ':'))}")
        if "native" in match.group(0):  # its encoder's starting weights: the tiny MAE (the guide's come from the Hub)
            overrides.append("encoder_checkpoint=mae-stand-in")
        return match.group(0) + "".join(f" --set '{o}'" for o in overrides)

    return re.sub(r"^accelerate launch -m lapvqa_hf\.train .*$", shrink, script, flags=re.M)


def write_pretrained_stand_ins(folder: Path) -> None:
    """Tiny converted `lapvqa-pretrain-captioning` and its encoder (the same weights), 1024-wide like ViT-L/14."""
    captioning = randomize_(
        CaptioningModel(
            img_size=224,
            vision_width=1024,
            vision_depth=1,
            vision_heads=4,
            d_model=32,
            nhead=4,
            num_layers=1,
            dim_feedforward=48,
            max_len=96,
        )
    )
    torch.save(captioning.state_dict(), folder / "model_best.pt")
    torch.save(captioning.vision_encoder.state_dict(), folder / "encoder_final.pt")
    quiet = dict(log=lambda _: None)
    convert_captioning(
        folder / "model_best.pt",
        folder / "lapvqa-pretrain-captioning",
        num_attention_heads=4,
        vision_num_attention_heads=4,
        **quiet,
    )
    convert_vision_encoder(
        folder / "encoder_final.pt", folder / "lapvqa-pretrain-captioning-encoder", num_attention_heads=4, **quiet
    )
    tiny_encoder_folder("mae-vit-l16", folder / "mae-stand-in")


@pytest.mark.slow
def test_the_fine_tuning_section_runs_end_to_end(tmp_path):
    write_pretrained_stand_ins(tmp_path)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", shrunk_script()], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("| overall |") >= 1 and "| reports |" in result.stdout, result.stdout[-2000:]

    for task, inputs in (
        (
            "diffvqa",
            {"current_image_features": torch.randn(1, 16, 1024), "prior_image_features": torch.randn(1, 16, 1024)},
        ),
        ("captioning", {"image_features": torch.randn(1, 16, 1024)}),
    ):
        best = tmp_path / "runs" / task / "best"
        config = json.loads((best / "config.json").read_text())
        assert config["feature_recipe"]["name"] == "lapvqa-vit-l14", "the features' recipe travels with the model"
        assert {"model.safetensors", "tokenizer.json"} <= {p.name for p in best.iterdir()}
        # Ready to publish (`hf upload`): the folder loads as remote code where lapvqa-hf is not installed.
        (tmp_path / task).mkdir()
        remote = run_with_remote_code(best, {"input_ids": torch.tensor([[50256]]), **inputs}, tmp_path / task)
        assert remote["outputs"]["logits"].shape == (1, 1, 50257)

    # The native recipe: the head holds its fine-tuned encoder and runs from images as it is.
    best = tmp_path / "runs" / "diffvqa-native" / "best"
    config = json.loads((best / "config.json").read_text())
    assert config["encoder_finetuned"] is True and config["encoder_config"]["model_type"] == "vit_mae"
    assert "preprocessor_config.json" in {p.name for p in best.iterdir()}
    (tmp_path / "native").mkdir()
    remote = run_with_remote_code(
        best, {"input_ids": torch.tensor([[50256]]), "prior_pixel_values": torch.randn(1, 3, 224, 224),
               "current_pixel_values": torch.randn(1, 3, 224, 224)}, tmp_path / "native",
    )  # fmt: skip
    assert remote["outputs"]["logits"].shape == (1, 1, 50257)

    # From images, the encoder trained too: the saved model holds it, with the processor that prepared the images.
    best = tmp_path / "runs" / "captioning-pixels" / "best"
    assert json.loads((best / "config.json").read_text())["feature_recipe"] is None
    assert {"model.safetensors", "processor_config.json", "tokenizer.json"} <= {p.name for p in best.iterdir()}
