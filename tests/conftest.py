"""Shared fixtures: offline Hub, the GPT-2 vocabulary from ../shared, and upstream-layout heads with random weights."""

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
_TIKTOKEN_CACHE = Path(__file__).resolve().parents[1].parent / "shared" / "tiktoken-cache"
if _TIKTOKEN_CACHE.is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(_TIKTOKEN_CACHE))

import pytest  # noqa: E402
import torch  # noqa: E402
from lapvqa_hf.convert.diffvqa import convert_state_dict  # noqa: E402

from lapvqa_hf import LapvqaDiffVQAConfig, LapvqaDiffVQAModel  # noqa: E402
from lapvqa_hf.original import DiffVQAHead, randomize_  # noqa: E402

# A small decoder with the real vocabulary; real-size cases say so explicitly.
SMALL = dict(d_model=64, nhead=4, num_layers=2, dim_feedforward=96)


def make_pair(
    vis_dim: int = 768,
    final_norm: bool = True,
    tie_weights: bool = False,
    vocab_size: int = 50257,
    max_len: int = 200,
    seed: int = 0,
    attn_implementation: str = "eager",
    std: float = 0.05,
    **sizes,
) -> tuple[DiffVQAHead, LapvqaDiffVQAModel]:
    """An upstream `DiffVQAHead` with random weights and the `LapvqaDiffVQAModel` converted from its state dict."""
    sizes = {**SMALL, **sizes}
    original = DiffVQAHead(
        vis_dim=vis_dim, vocab_size=vocab_size, max_len=max_len, final_norm=final_norm, tie_weights=tie_weights, **sizes
    )
    randomize_(original, seed=seed, std=std).eval()
    special = vocab_size - 1
    config = LapvqaDiffVQAConfig(
        vis_dim=vis_dim,
        hidden_size=sizes["d_model"],
        num_attention_heads=sizes["nhead"],
        num_hidden_layers=sizes["num_layers"],
        intermediate_size=sizes["dim_feedforward"],
        vocab_size=vocab_size,
        max_position_embeddings=max_len,
        use_final_layer_norm=final_norm,
        tie_word_embeddings=tie_weights,
        bos_token_id=special,
        eos_token_id=special,
        pad_token_id=special,
    )
    model = LapvqaDiffVQAModel(config)
    model.load_state_dict(convert_state_dict(original.state_dict(), config), strict=not tie_weights)
    model.set_attn_implementation(attn_implementation)
    return original, model.eval()


def visual_features(batch: int, num_curr: int, num_ref: int, vis_dim: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, num_curr, vis_dim, generator=generator),
        torch.randn(batch, num_ref, vis_dim, generator=generator),
    )


def answers_of(generated: torch.Tensor, prompt_length: int, eos_token_id: int) -> list[list[int]]:
    """Strips the prompt and everything from the first eos on, as the upstream `generate` returns answers."""
    out = []
    for row in generated[:, prompt_length:].tolist():
        out.append(row[: row.index(eos_token_id)] if eos_token_id in row else row)
    return out


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    from lapvqa_hf.tokenization import build_gpt2_tokenizer

    return build_gpt2_tokenizer()
