"""The layers every model shares live once (`modeling_lapvqa_common`); the one copy that must stay, the text
decoders' layer beside the detection head's (their published folders name the feed-forward differently), is held
to compute the same."""

import re
from pathlib import Path

import pytest
import torch

from lapvqa_hf import LapvqaDetectionConfig, LapvqaDiffVQAConfig
from lapvqa_hf.models.modeling_lapvqa_common import LapvqaDecoderLayer
from lapvqa_hf.models.modeling_lapvqa_detection import LapvqaDetectionDecoderLayer

PACKAGE = Path(__file__).resolve().parents[1] / "lapvqa_hf" / "models"


def _definitions(pattern: str) -> list[str]:
    """The model files (not the faithful upstream re-implementations) that define `pattern`, once per definition."""
    files = sorted(PACKAGE.glob("modeling_*.py"))
    return [path.name for path in files for _ in re.finditer(pattern, path.read_text(), re.M)]


def test_attention_and_the_feed_forward_are_written_once():
    assert _definitions(r"^def eager_attention_forward\(") == ["modeling_lapvqa_common.py"]
    assert _definitions(r"^class \w*Attention\(nn\.Module\)") == ["modeling_lapvqa_common.py"]
    assert _definitions(r"^class \w*MLP\(nn\.Module\)") == ["modeling_lapvqa_common.py"]
    assert _definitions(r"^class LapvqaTextDecoder\(") == ["modeling_lapvqa_common.py"]


@pytest.mark.parametrize("seed", [0, 1])
def test_the_text_decoder_layer_and_the_detection_decoder_layer_compute_the_same(seed):
    sizes = dict(num_attention_heads=4, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    text = LapvqaDiffVQAConfig(hidden_size=32, intermediate_size=48, hidden_act="relu", **sizes)
    detection = LapvqaDetectionConfig(d_model=32, decoder_ffn_dim=48, activation_function="relu",
                                      decoder_norm_first=True, **sizes)  # fmt: skip
    for config in (text, detection):
        config._attn_implementation = "eager"
    torch.manual_seed(seed)
    text_layer = LapvqaDecoderLayer(text, layer_idx=0).eval()
    detection_layer = LapvqaDetectionDecoderLayer(detection).eval()
    renamed = {key.replace("mlp.", ""): key for key in detection_layer.state_dict()}
    detection_layer.load_state_dict({renamed[key]: value for key, value in text_layer.state_dict().items()})
    queries, memory = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    with torch.no_grad():
        expected = text_layer(queries, None, memory)  # no mask: as the detection queries, all see all
        found = detection_layer(queries, memory)
    torch.testing.assert_close(found, expected, rtol=1e-6, atol=1e-6)
