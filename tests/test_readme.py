"""The README's and docs' commands and code are true: their snippets run on converted random-weight checkpoints
(Hub ids replaced by local folders converted the same way)."""

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import upstream_detection_checkpoint
from lapvqa_hf.convert.captioning import convert_captioning
from lapvqa_hf.convert.detection import convert_detection
from lapvqa_hf.convert.diffvqa import convert_diffvqa
from lapvqa_hf.convert.original import (
    CaptioningModel,
    DetectionHead,
    DiffVQAHead,
    VisionTransformer,
    VQAHead,
    randomize_,
)
from lapvqa_hf.convert.vision_encoder import convert_vision_encoder
from lapvqa_hf.convert.vqa import convert_vqa
from PIL import Image
from test_image_processing import write_dicom

from lapvqa_hf.models.configuration_lapvqa_detection import VINDR_CXR_CLASSES

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = {path.name: path.read_text() for path in sorted((ROOT / "docs").glob("*.md"))}
CI_RUN = (ROOT / ".ci" / "run").read_text()
QUIET = dict(log=lambda _: None)


def snippet(heading: str) -> tuple[str, str]:
    """The first Python block under `## heading`, in the README or a docs page, and where it was found."""
    for name, text in {"README.md": README, **{f"docs/{n}": t for n, t in DOCS.items()}}.items():
        found = re.search(rf"## {re.escape(heading)}\n.*?```python\n(.*?)```", text, re.S)
        if found:
            return found.group(1), name
    raise AssertionError(f"no section {heading!r} with a Python block")


def run_snippet(heading: str, folder: Path, monkeypatch, hub_ids: dict[str, Path] | None = None) -> dict:
    """Runs a snippet in `folder`, with each Hub id of `hub_ids` replaced by its local folder."""
    monkeypatch.chdir(folder)
    code, source = snippet(heading)
    for repo_id, local in (hub_ids or {}).items():
        assert repo_id in code, f"{source} ({heading}) no longer uses {repo_id}"
        code = code.replace(repo_id, str(local))
    namespace: dict = {}
    exec(compile(code, f"{source} ({heading})", "exec"), namespace)
    return namespace


@pytest.fixture
def xray_files(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("cxr.png", "prior.png"):
        Image.fromarray((rng.random((70, 60)) * 65535).astype(np.uint16)).save(tmp_path / name)
    for name in ("cxr.dcm", "current.dcm"):
        write_dicom(tmp_path / name, rng.integers(0, 4096, (64, 64)), "MONOCHROME1", window=(2048, 4096))
    return tmp_path


def test_diffvqa_usage_snippet(tmp_path, monkeypatch):
    head = DiffVQAHead(vis_dim=768, d_model=64, nhead=4, num_layers=2, dim_feedforward=96)
    torch.save(randomize_(head).state_dict(), tmp_path / "coca_best.pt")
    convert_diffvqa(tmp_path / "coca_best.pt", "coca", tmp_path / "lapvqa-diffvqa-coca", num_attention_heads=4, **QUIET)
    answers = run_snippet("Load and generate (DiffVQA)", tmp_path, monkeypatch)["answers"]
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_vqa_usage_snippet(tmp_path, monkeypatch):
    head = VQAHead(vis_dim=1152, d_model=64, nhead=4, num_layers=2, dim_feedforward=96)
    torch.save(randomize_(head).state_dict(), tmp_path / "siglip_best.pt")
    assert "lapvqa convert vqa siglip_best.pt --encoder siglip --output lapvqa-vqa-siglip" in DOCS["models.md"]
    convert_vqa(tmp_path / "siglip_best.pt", "siglip", tmp_path / "lapvqa-vqa-siglip", num_attention_heads=4, **QUIET)
    answers = run_snippet("Single-image VQA", tmp_path, monkeypatch)["answers"]
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_detection_usage_snippet(tmp_path, monkeypatch, capsys):
    head = DetectionHead(vis_dim=1024, d_model=32, dim_feedforward=48)
    torch.save(upstream_detection_checkpoint(randomize_(head), "owlv2"), tmp_path / "owlv2.pt")
    assert "lapvqa convert detection owlv2.pt --output lapvqa-ad-owlv2" in DOCS["models.md"]
    convert_detection(tmp_path / "owlv2.pt", tmp_path / "lapvqa-ad-owlv2", **QUIET)
    detections = run_snippet("Abnormality detection", tmp_path, monkeypatch)["detections"]
    assert len(detections["boxes"]) == 20, "threshold 0.0 keeps every query"
    assert (detections["boxes"][:, 2] <= 2500).all() and (detections["boxes"][:, 3] <= 2048).all()
    assert set(detections["label_names"]) <= set(VINDR_CXR_CLASSES)


def test_captioning_and_two_image_snippets(xray_files, monkeypatch, capsys):
    tmp_path = xray_files
    captioning = CaptioningModel(
        img_size=56,
        vision_width=64,
        vision_depth=2,
        vision_heads=4,
        d_model=32,
        nhead=4,
        num_layers=2,
        dim_feedforward=48,
        max_len=80,
    )
    torch.save(randomize_(captioning).state_dict(), tmp_path / "model_best.pt")
    convert_captioning(
        tmp_path / "model_best.pt",
        tmp_path / "lapvqa-pretrain-captioning",
        num_attention_heads=4,
        vision_num_attention_heads=4,
        **QUIET,
    )
    run_snippet("Caption a chest X-ray", tmp_path, monkeypatch)
    assert capsys.readouterr().out.startswith("[")

    encoder = VisionTransformer(img_size=56, patch_size=14, embed_dim=1024, depth=1, num_heads=4)
    torch.save(randomize_(encoder).state_dict(), tmp_path / "encoder_final.pt")
    convert_vision_encoder(
        tmp_path / "encoder_final.pt", tmp_path / "lapvqa-pretrain-captioning-encoder", num_attention_heads=4, **QUIET
    )
    head = DiffVQAHead(vis_dim=1024, d_model=64, nhead=4, num_layers=2, dim_feedforward=96)
    torch.save(randomize_(head).state_dict(), tmp_path / "head.pt")
    convert_diffvqa(
        tmp_path / "head.pt",
        "lapvqa-vit-l14",
        tmp_path / "lapvqa-diffvqa-lapvqa-vit-l14",
        num_attention_heads=4,
        **QUIET,
    )
    run_snippet("DiffVQA from two images", tmp_path, monkeypatch)
    assert capsys.readouterr().out.startswith("[")


def test_ci_runs_the_readme_test_command():
    commands = re.findall(
        r"Tests \(what `.ci/run` runs; about \d+ minutes on an idle 2-core machine\):\n\n```bash\n(.*?)\n```",
        README,
        re.S,
    )
    assert len(commands) == 1
    steps = [shlex.split(step) for step in commands[0].split(" && ")]
    assert steps[-1] == [".venv/bin/python", "-m", "pytest", "-n", "2", "-q"]
    readme_torch = next(word for step in steps for word in step if word.startswith("torch=="))
    assert f"TORCH_FLOOR={readme_torch.removeprefix('torch==')}" in CI_RUN, "README's torch is CI's first environment's"
    assert 'install .venv "torch==$TORCH_FLOOR" dev,space\n' in CI_RUN, "with the Space's browser tests"
    assert [".venv/bin/pip", "install", "-e", ".[dev,space]"] in steps, "README installs what CI's .venv has"
    assert ".venv/bin/python -m pytest -n 2 -q" in CI_RUN
    assert ".venv-floor/bin/python -m pytest -n 2 -q" in CI_RUN, "and again on the declared transformers floor"
    assert ".venv-torch-newest/bin/python -m pytest -n 2 -q" in CI_RUN, "and on the newest torch"


def test_the_first_screen_pipelines_run_from_images(xray_files, tmp_path, monkeypatch, capsys):
    """The README's first examples: two X-rays and a question to an answer, one X-ray to a report and to boxes."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, Owlv2VisionConfig, Owlv2VisionModel

    clip = CLIPVisionConfig(hidden_size=1024, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                            image_size=224, patch_size=56)  # fmt: skip
    CLIPVisionModel(clip).save_pretrained(tmp_path / "clip")
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size=224).save_pretrained(tmp_path / "clip")
    owl = Owlv2VisionConfig(hidden_size=1024, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                            image_size=960, patch_size=240)  # fmt: skip
    Owlv2VisionModel(owl).save_pretrained(tmp_path / "owlv2")
    head = DiffVQAHead(vis_dim=1024, d_model=64, nhead=4, num_layers=2, dim_feedforward=96)
    torch.save(randomize_(head).state_dict(), tmp_path / "clip-vit-l14_best.pt")
    convert_diffvqa(tmp_path / "clip-vit-l14_best.pt", "clip-vit-l14", tmp_path / "diffvqa", num_attention_heads=4,
                    encoder_checkpoint=str(tmp_path / "clip"), **QUIET)  # fmt: skip
    run_snippet(  # the prior is a 16-bit PNG, the current a MONOCHROME1 DICOM
        "Two X-rays and a question: what changed?",
        xray_files,
        monkeypatch,
        {"dmusingu/lapvqa-diffvqa-clip-vit-l14": tmp_path / "diffvqa"},
    )
    assert capsys.readouterr().out.startswith("{'answer': ")

    captioning = CaptioningModel(img_size=56, vision_width=64, vision_depth=1, vision_heads=4, d_model=32, nhead=4,
                                 num_layers=1, dim_feedforward=48, max_len=80)  # fmt: skip
    torch.save(randomize_(captioning).state_dict(), tmp_path / "model_best.pt")
    convert_captioning(tmp_path / "model_best.pt", tmp_path / "captioning", num_attention_heads=4,
                       vision_num_attention_heads=4, **QUIET)  # fmt: skip
    detection = randomize_(DetectionHead(vis_dim=1024, d_model=32, dim_feedforward=48), std=0.2)  # confident
    torch.save(upstream_detection_checkpoint(detection, "owlv2"), tmp_path / "owlv2.pt")
    convert_detection(tmp_path / "owlv2.pt", tmp_path / "detection", encoder_checkpoint=str(tmp_path / "owlv2"),
                      **QUIET)  # fmt: skip
    run_snippet(
        "One X-ray: a report, or boxes",
        xray_files,
        monkeypatch,
        {"dmusingu/lapvqa-captioning": tmp_path / "captioning", "dmusingu/lapvqa-ad-owlv2": tmp_path / "detection"},
    )
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("[{'generated_text': ")
    assert len(printed) > 1 and all(line.endswith("}") for line in printed[1:]), "one line per finding"
