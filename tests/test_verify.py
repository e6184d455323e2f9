"""Every converter's verify step tells a right conversion from a wrong one, at every weight scale.

Each converter runs through the `lapvqa convert` command on an upstream-layout checkpoint at three scales (tiny:
every weight std 0.02; trained-like: the output layer std 1, so outputs of tens; large: every weight std 3). The
right conversion is accepted at each; a conversion with a mapping bug injected (q/k projections swapped, the two
frame embeddings swapped, a square weight transposed, a bias dropped) is refused at each, with nothing written.
"""

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import WEIGHT_SCALES, randomize_at_scale_, upstream_detection_checkpoint
from lapvqa_hf.convert.checkpoint import StateDictMapper
from lapvqa_hf.convert.original import CaptioningModel, CocaVisionTower, DetectionHead, DiffVQAHead, VQAHead
from lapvqa_hf.convert.verify import Agreement, Difference, VerifyReport
from torch import nn

from lapvqa_hf.cli import main as lapvqa
from lapvqa_hf.models.modeling_lapvqa_common import LapvqaLinear

DECODER = dict(d_model=32, nhead=4, num_layers=2, dim_feedforward=48, max_len=40)


@dataclass
class ConverterCase:
    """One converter: how to build its upstream module, which parameters are its output layer, how the upstream
    file holds it, and the `lapvqa convert` arguments for it."""

    command: str
    build: Callable[[], nn.Module]
    output_layers: tuple[str, ...]
    options: tuple[str, ...]
    file_contents: Callable[[nn.Module], dict] = lambda module: module.state_dict()


CASES = {
    "diffvqa": ConverterCase(
        "diffvqa",
        lambda: DiffVQAHead(vis_dim=768, **DECODER),
        ("lm_head.weight",),
        ("--encoder", "coca", "--num-heads", "4"),
    ),
    "vqa": ConverterCase(
        "vqa", lambda: VQAHead(vis_dim=768, **DECODER), ("lm_head.weight",), ("--encoder", "coca", "--num-heads", "4")
    ),
    "captioning": ConverterCase(
        "captioning",
        lambda: CaptioningModel(img_size=56, patch_size=14, vision_width=64, vision_depth=2, vision_heads=4, **DECODER),
        ("lm_head.weight",),
        ("--num-heads", "4", "--vision-num-heads", "4"),
    ),
    "vision-encoder": ConverterCase(
        "vision-encoder",
        lambda: (
            CaptioningModel(img_size=56, patch_size=14, vision_width=64, vision_depth=2, vision_heads=4).vision_encoder
        ),
        ("norm.weight", "norm.bias"),
        ("--num-heads", "4"),
    ),
    "coca-encoder": ConverterCase(
        "coca-encoder",
        lambda: CocaVisionTower(
            image_size=56,
            patch_size=14,
            width=64,
            layers=2,
            heads=4,
            output_dim=48,
            attn_pooler_queries=5,
            attn_pooler_heads=4,
        ),  # fmt: skip
        ("proj",),
        ("--num-heads", "4", "--pooler-num-heads", "4"),
    ),
    "detection": ConverterCase(
        "detection",
        lambda: DetectionHead(vis_dim=768, d_model=32, nhead=4, num_queries=5, dim_feedforward=48),
        ("class_head.weight", "box_head.2.weight"),
        ("--num-heads", "4"),
        lambda head: upstream_detection_checkpoint(head, "coca"),
    ),
}


def _swap_query_and_key_projections(state_dict: dict[str, torch.Tensor]) -> None:
    """The fused in_proj split in the wrong order: q and k exchanged in every attention."""
    for key in [k for k in state_dict if ".q_proj." in k]:
        other = key.replace(".q_proj.", ".k_proj.")
        if state_dict[key].shape == state_dict[other].shape:
            state_dict[key], state_dict[other] = state_dict[other], state_dict[key]


def _swap_frame_embeddings(state_dict: dict[str, torch.Tensor]) -> None:
    """Prior and current frame embeddings exchanged."""
    state_dict["frame_embeddings.weight"] = state_dict["frame_embeddings.weight"].flip(0).contiguous()


def _transpose_a_weight(state_dict: dict[str, torch.Tensor]) -> None:
    """A square weight copied without the transpose its layout needs (the first attention output projection)."""
    key = sorted(k for k in state_dict if k.endswith("out_proj.weight"))[0]
    state_dict[key] = state_dict[key].t().contiguous()


def _drop_a_bias(state_dict: dict[str, torch.Tensor]) -> None:
    """A bias the mapping forgot, left at its initial zeros (the first feed-forward layer's)."""
    key = sorted(k for k in state_dict if k.endswith("fc1.bias"))[0]
    state_dict[key] = torch.zeros_like(state_dict[key])


BUGS = {
    "q-k-swapped": _swap_query_and_key_projections,
    "frame-embeddings-swapped": _swap_frame_embeddings,
    "weight-transposed": _transpose_a_weight,
    "bias-dropped": _drop_a_bias,
}
BUGGY_CONVERSIONS = [
    (converter, bug)
    for converter in CASES
    for bug in BUGS
    if bug != "frame-embeddings-swapped" or converter == "diffvqa"  # only DiffVQA has two frames
]


def write_upstream_file(case: ConverterCase, scale: str, folder: Path) -> Path:
    module = randomize_at_scale_(case.build(), scale, case.output_layers)
    path = folder / f"{case.command}-{scale}.pt"
    torch.save(case.file_contents(module), path)
    return path


def convert(case: ConverterCase, checkpoint: Path, output: Path, capsys, *extra: str) -> tuple[int, str]:
    code = lapvqa(["convert", case.command, str(checkpoint), "--output", str(output), *case.options, *extra])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _verdict(printed: str) -> str:
    return next(line for line in printed.splitlines() if "verify " in line)


def _relative_errors(text: str) -> list[float]:
    return [float(part.split()[0].rstrip(",")) for part in text.split("relative ")[1:]]


def _float64_and_float32_errors(verdict: str) -> tuple[list[float], list[float]]:
    """The relative errors of the float64 comparison and of the shipped float32 model, read from the verdict."""
    float64, _, float32 = verdict.partition(" as shipped:")
    return _relative_errors(float64.split("(tolerance")[0]), _relative_errors(float32.split("(budget")[0])


@pytest.mark.parametrize("scale", WEIGHT_SCALES)
@pytest.mark.parametrize("converter", CASES)
def test_the_right_conversion_is_accepted_at_every_scale(converter, scale, tmp_path, capsys):
    case = CASES[converter]
    code, printed = convert(case, write_upstream_file(case, scale, tmp_path), tmp_path / "out", capsys)
    assert code == 0, printed
    verdict = _verdict(printed)
    assert verdict.startswith("verify passed: float64 max |Δ")
    float64_errors, float32_errors = _float64_and_float32_errors(verdict)
    assert float64_errors and max(float64_errors) < 1e-12, "float64 rounding only"
    assert float32_errors
    if scale != "large":  # large weights saturate attention: the original itself loses more in float32 there
        assert max(float32_errors) < 1e-5, "float32 rounding only"
    assert "assumed on both sides, not checkable from the weights: num_attention_heads=4" in verdict
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize("scale", WEIGHT_SCALES)
@pytest.mark.parametrize(("converter", "bug"), BUGGY_CONVERSIONS)
def test_a_mapping_bug_is_refused_at_every_scale_and_nothing_is_written(
    converter, bug, scale, tmp_path, capsys, monkeypatch
):
    case = CASES[converter]
    checkpoint = write_upstream_file(case, scale, tmp_path)
    finish = StateDictMapper.finish

    def finish_with_the_bug(mapper, expected):
        mapped = dict(finish(mapper, expected))
        before = {key: tensor.clone() for key, tensor in mapped.items()}
        BUGS[bug](mapped)
        assert any(not torch.equal(before[key], mapped[key]) for key in mapped), "the bug must change a weight"
        return mapped

    monkeypatch.setattr(StateDictMapper, "finish", finish_with_the_bug)
    code, printed = convert(case, checkpoint, tmp_path / "out", capsys)
    assert code == 1
    assert "verify FAILED: float64 max |Δ" in printed and "nothing was written" in printed
    float64_errors, _ = _float64_and_float32_errors(_verdict(printed))
    assert max(float64_errors) > 1e-6, "far beyond float64 rounding"
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint.name], "no output, no staging folder"


def test_a_wrong_head_count_is_what_verify_cannot_see_and_the_verdict_says_so(tmp_path, capsys):
    """A head trained with 4 heads, converted with the default 8: both sides assume 8, so verify passes."""
    case = CASES["diffvqa"]
    checkpoint = write_upstream_file(case, "trained-like", tmp_path)
    code = lapvqa(["convert", "diffvqa", str(checkpoint), "--encoder", "coca", "--output", str(tmp_path / "out")])
    verdict = _verdict(capsys.readouterr().out)
    assert code == 0
    assert verdict.endswith(
        "assumed on both sides, not checkable from the weights: num_attention_heads=8, hidden_act=relu"
    )
    assert (
        json.loads((tmp_path / "out" / "config.json").read_text())["conversion_info"]["assumed_num_attention_heads"]
        == 8
    )


def test_the_tolerance_is_relative_to_the_outputs_scale(tmp_path, capsys):
    case = CASES["diffvqa"]
    checkpoint = write_upstream_file(case, "large", tmp_path)
    code, printed = convert(case, checkpoint, tmp_path / "out", capsys, "--tolerance", "1e-30")
    assert code == 1 and "(tolerance 1e-30)" in printed, "float64 rounding exceeds an impossible tolerance"


def test_a_shipped_float32_path_that_loses_precision_is_refused(tmp_path, capsys, monkeypatch):
    """The conversion is right (float64 agrees), but the float32 model rounds its linears to bfloat16."""
    case = CASES["diffvqa"]
    checkpoint = write_upstream_file(case, "trained-like", tmp_path)
    linear_forward = LapvqaLinear.forward

    def rounded_in_float32(module, input):
        output = linear_forward(module, input)
        return output.bfloat16().float() if output.dtype == torch.float32 else output

    monkeypatch.setattr(LapvqaLinear, "forward", rounded_in_float32)
    code, printed = convert(case, checkpoint, tmp_path / "out", capsys)
    verdict = _verdict(printed)
    assert code == 1 and verdict.startswith("verify FAILED") and not (tmp_path / "out").exists()
    float64_errors, float32_errors = _float64_and_float32_errors(verdict)
    assert max(float64_errors) < 1e-12 and max(float32_errors) > 1e-3
    code, printed = convert(case, checkpoint, tmp_path / "out", capsys, "--float32-budget", "0.1")
    assert code == 0 and "(budget 1e-01)" in printed, "a budget the user widened"


def test_the_help_says_the_tolerance_is_relative(capsys):
    with pytest.raises(SystemExit):
        lapvqa(["convert", "diffvqa", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "relative tolerance of verify: max |Δ| / max |original output|, both models in float64" in text
    assert "relative precision budget of the shipped float32 model against the float64 original" in text


# --- the report itself -------------------------------------------------------------------------------------------


def test_differences_are_relative_to_the_reference_scale():
    reference = torch.tensor([100.0, -50.0], dtype=torch.float64)
    difference = Difference.between("logit", reference, reference + torch.tensor([0.0, 1e-3], dtype=torch.float64))
    assert difference.max_abs_diff == pytest.approx(1e-3) and difference.relative == pytest.approx(1e-5)
    assert Difference.between("logit", torch.zeros(3), torch.zeros(3)).relative == 0.0
    assert Difference.between("logit", torch.zeros(3), torch.full((3,), 1e-30)).relative == math.inf


@pytest.mark.parametrize(
    "found", [torch.tensor([1.0, float("nan")]), torch.tensor([1.0, float("inf")]), torch.ones(3)], ids=str
)
def test_non_finite_or_misshapen_outputs_never_pass(found):
    difference = Difference.between("logit", torch.ones(2), found)
    assert not difference.within(1e30)
    report = VerifyReport([difference], tolerance=1e30)
    assert not report.passed and str(report).startswith("verify FAILED")


def test_one_differing_answer_fails_the_verdict():
    close = Difference.between("logit", torch.ones(2), torch.ones(2))
    assert VerifyReport([close], 1e-9, Agreement("greedy answers", 3, 3, "samples")).passed
    report = VerifyReport([close], 1e-9, Agreement("greedy answers", 2, 3, "samples"))
    assert not report.passed and "greedy answers identical for 2/3 samples" in str(report)
