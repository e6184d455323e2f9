"""Inference on CPU: the decoders' linears multiply by a weight packed once for oneDNN, and bf16 decoding."""

import copy
import pickle

import pytest
import torch
from conftest import WEIGHT_SCALES, make_pair, relative_error, visual_features
from torch import nn

from lapvqa_hf.models.modeling_lapvqa_common import CACHE_OUTPUT_FIELD, LapvqaLinear, _onednn_linear_dtypes

# Relative to the outputs' scale (max |Δ| / max |nn.Linear's output|): a few ulps of float32, one rounding of bf16.
RELATIVE_TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 1e-2}
WEIGHT_STD = {"tiny": 0.02, "trained-like": 1.0, "large": 3.0}


def _linear(dtype=torch.float32, bias=True, seed=0, scale="trained-like") -> LapvqaLinear:
    torch.manual_seed(seed)
    module = LapvqaLinear(96, 160, bias=bias)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(0, WEIGHT_STD[scale])
    return module.to(dtype)


def _assert_is_nn_linear(module: LapvqaLinear, x: torch.Tensor) -> None:
    with torch.no_grad():
        expected = nn.functional.linear(x, module.weight, module.bias)
        assert relative_error(module(x), expected) <= RELATIVE_TOLERANCE[x.dtype]


@pytest.mark.parametrize("scale", WEIGHT_SCALES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 96), (8, 1, 96), (3, 5, 96)])
def test_inference_gives_what_nn_linear_gives(dtype, bias, shape, scale):
    module = _linear(dtype, bias, scale=scale)
    x = torch.randn(shape, dtype=dtype)
    _assert_is_nn_linear(module, x)
    with torch.inference_mode():
        expected = nn.functional.linear(x, module.weight, module.bias)
        assert relative_error(module(x), expected) <= RELATIVE_TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_weight_is_packed_once_for_inference_on_cpu(dtype):
    module, x = _linear(dtype), torch.randn(2, 96, dtype=dtype)
    with torch.no_grad():
        module(x)
        packed = module._packed_weight
        module(x)
    assert (packed is not None) == (dtype in _onednn_linear_dtypes())
    assert module._packed_weight is packed


def test_the_private_onednn_ops_it_relies_on_exist_in_this_torch():
    # `LapvqaLinear` uses inductor's private oneDNN ops; a torch without them falls back to `nn.Linear` (slower,
    # same answers). On the torch this package is tested with they must be there, or the fast path is silently gone.
    for op in ("_reorder_linear_weight", "_linear_pointwise", "_is_mkldnn_acl_supported", "_is_mkldnn_bf16_supported"):
        assert hasattr(torch.ops.mkldnn, op), f"torch {torch.__version__} has no torch.ops.mkldnn.{op}"
    assert torch.float32 in _onednn_linear_dtypes(), "oneDNN's fp32 inner product is expected on x86 CPUs"


def test_the_packed_copy_follows_in_place_updates_loads_and_replacements():
    module, x = _linear(), torch.randn(4, 96)
    _assert_is_nn_linear(module, x)
    with torch.no_grad():
        module.weight.mul_(-2)  # what an optimizer step does
    _assert_is_nn_linear(module, x)
    module.load_state_dict(_linear(seed=1).state_dict())
    _assert_is_nn_linear(module, x)
    module.weight = nn.Parameter(torch.randn(160, 96) * 3)
    _assert_is_nn_linear(module, x)


@pytest.mark.parametrize("conversion", ["to", "bfloat16", "float"])
def test_the_packed_copy_follows_dtype_conversions(conversion):
    module = _linear()
    _assert_is_nn_linear(module, torch.randn(4, 96))
    converted = {
        "to": lambda: module.to(torch.bfloat16),
        "bfloat16": module.bfloat16,
        "float": lambda: module.bfloat16().float(),
    }[conversion]()
    _assert_is_nn_linear(converted, torch.randn(4, 96, dtype=converted.weight.dtype))


def test_a_module_used_for_inference_copies_and_pickles():
    module, x = _linear(), torch.randn(4, 96)
    _assert_is_nn_linear(module, x)
    _assert_is_nn_linear(copy.deepcopy(module), x)
    _assert_is_nn_linear(pickle.loads(pickle.dumps(module)), x)  # a whole module, as multiprocessing sends it
    assert list(module.state_dict()) == ["weight", "bias"]


def test_training_differentiates_as_nn_linear():
    module, x = _linear(), torch.randn(4, 96, requires_grad=True)
    with torch.no_grad():
        module(x)  # a packed copy exists; autograd must not use it
    module(x).square().sum().backward()
    expected = x.detach().clone().requires_grad_(True)
    reference = nn.Linear(96, 160)
    reference.load_state_dict(module.state_dict())
    reference(expected).square().sum().backward()
    torch.testing.assert_close(x.grad, expected.grad)
    torch.testing.assert_close(module.weight.grad, reference.weight.grad)


def _cached_decoding_logits(model, prompt, mask, curr_vis, ref_vis, continuation) -> torch.Tensor:
    """Logits of a cached decoding run that is fed `continuation` one token at a time (teacher forcing)."""
    dtype = model.dtype
    with torch.no_grad():
        visual = dict(current_image_features=curr_vis.to(dtype), prior_image_features=ref_vis.to(dtype))
        out = model(input_ids=prompt, attention_mask=mask, use_cache=True, **visual)
        logits = [out.logits[:, -1]]
        for token in continuation.T:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            out = model(input_ids=token[:, None], attention_mask=mask, cache=getattr(out, CACHE_OUTPUT_FIELD))
            logits.append(out.logits[:, -1])
    return torch.stack(logits, dim=1).float()


@pytest.mark.parametrize("scale", WEIGHT_SCALES)
def test_bfloat16_decoding_follows_float32_logits(scale):
    """bf16 answers can differ from fp32 ones where fp32's top two logits are closer than bf16's rounding; the logits
    themselves must agree to bf16 precision, relative to their scale, at every cached step: within 2% of the logits'
    scale, or within twice what the original module itself loses in bf16 where that is more (weights of std 3
    saturate attention, and bf16 rounding then moves the original's logits by half their scale)."""
    original, model = make_pair(768, scale=scale, attn_implementation="sdpa")
    curr_vis, ref_vis = visual_features(4, 16, 12, 768)
    prompt = torch.randint(0, 50256, (4, 6), generator=torch.Generator().manual_seed(0))
    prompt[:, -1] = 50256
    mask = torch.ones_like(prompt)
    mask[:2, :2] = 0  # left padding
    continuation = torch.randint(0, 50256, (4, 8), generator=torch.Generator().manual_seed(1))
    expected = _cached_decoding_logits(model, prompt, mask, curr_vis, ref_vis, continuation)
    found = _cached_decoding_logits(model.to(torch.bfloat16), prompt, mask, curr_vis, ref_vis, continuation)

    unpadded = torch.cat([prompt, continuation], dim=1)[2:]
    with torch.no_grad():
        original_in_float32 = original(curr_vis[2:], ref_vis[2:], unpadded)
        original.to(torch.bfloat16)
        original_in_bfloat16 = original(curr_vis[2:].bfloat16(), ref_vis[2:].bfloat16(), unpadded)
    original_error = relative_error(original_in_bfloat16, original_in_float32)
    assert relative_error(found, expected) <= max(0.02, 2 * original_error)
