"""Shared fixtures: a private Hugging Face home per test, offline Hub, the GPT-2 vocabulary from ../shared, and
upstream-layout heads with random weights."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

# Nothing a test does may reach the user's Hugging Face home: point every cache at a throwaway folder before
# huggingface_hub / transformers / datasets read their constants (at import), and per test below.
_HF_CACHE_VARIABLES = (
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "HF_ASSETS_CACHE",
    "HF_MODULES_CACHE",
    "HF_DATASETS_CACHE",
    "HF_EVALUATE_CACHE",
    "HF_TOKEN_PATH",
    "TRANSFORMERS_CACHE",
)
for _name in _HF_CACHE_VARIABLES:
    os.environ.pop(_name, None)
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="lapvqa-tests-hf-home-")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
_TIKTOKEN_CACHE = Path(__file__).resolve().parents[1].parent / "shared" / "tiktoken-cache"
if _TIKTOKEN_CACHE.is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(_TIKTOKEN_CACHE))

import huggingface_hub.constants  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from lapvqa_hf.convert.diffvqa import convert_state_dict  # noqa: E402
from lapvqa_hf.convert.original import DiffVQAHead, randomize_  # noqa: E402

from lapvqa_hf import LapvqaDiffVQAConfig, LapvqaDiffVQAModel  # noqa: E402

# The weight scales numerics are tested at: every weight std 0.02 (outputs of a few units or less); the output layer
# std 1 as in a trained head (logits of tens); every weight std 3 (outputs of thousands). See `randomize_at_scale_`.
WEIGHT_SCALES = ("tiny", "trained-like", "large")


def randomize_at_scale_(module: torch.nn.Module, scale: str, output_layers: tuple[str, ...], seed: int = 0):
    """Fills `module` with seeded noise at one of `WEIGHT_SCALES`; `output_layers` names the parameters that a
    trained-like scale draws with std 1 (a tied `lm_head.weight` is the token embedding too)."""
    if scale not in WEIGHT_SCALES:
        raise ValueError(f"scale must be one of {WEIGHT_SCALES}, got {scale!r}")
    randomize_(module, seed=seed, std=3.0 if scale == "large" else 0.02)
    if scale == "trained-like":
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name in output_layers:
                parameter = module.get_parameter(name)
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return module.eval()


# A small decoder with the real vocabulary; real-size cases say so explicitly.
SMALL = dict(d_model=64, nhead=4, num_layers=2, dim_feedforward=96)
# The config of a decoder small enough to train in seconds (training tests), without dropout.
TINY_DECODER = dict(
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
    dropout=0.0,
    attention_dropout=0.0,
    activation_dropout=0.0,
)


def make_pair(
    vis_dim: int = 768,
    final_norm: bool = True,
    tie_weights: bool = False,
    vocab_size: int = 50257,
    max_len: int = 200,
    seed: int = 0,
    attn_implementation: str = "eager",
    std: float = 0.05,
    scale: str | None = None,
    **sizes,
) -> tuple[DiffVQAHead, LapvqaDiffVQAModel]:
    """An upstream `DiffVQAHead` with random weights (std `std`, or at one of `WEIGHT_SCALES`) and the
    `LapvqaDiffVQAModel` converted from its state dict."""
    sizes = {**SMALL, **sizes}
    original = DiffVQAHead(
        vis_dim=vis_dim, vocab_size=vocab_size, max_len=max_len, final_norm=final_norm, tie_weights=tie_weights, **sizes
    )
    if scale is None:
        randomize_(original, seed=seed, std=std).eval()
    else:
        randomize_at_scale_(original, scale, ("lm_head.weight",), seed=seed)
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


# Two float32 computations of the same logits by different kernels differ by float32 rounding: ~1e-6 of the logits'
# scale. The bound is relative, so it holds for small logits and for trained-like logits of tens alike.
FLOAT32_RELATIVE = 1e-5


def float32_bound(original_float32: torch.Tensor, original_float64: torch.Tensor) -> float:
    """The error a converted float32 model may have against the float64 original: float32 rounding relative to the
    logits' scale, or 10x the original's own float32 error where weights saturate attention (std 3) and rounding
    costs the original itself more."""
    return max(FLOAT32_RELATIVE, 10 * relative_error(original_float32, original_float64))


def relative_error(found: torch.Tensor, expected: torch.Tensor) -> float:
    """max |found - expected| / max |expected|, in float64: a difference judged against the outputs' scale."""
    found, expected = found.detach().double(), expected.detach().double()
    assert found.shape == expected.shape, (found.shape, expected.shape)
    return ((found - expected).abs().max() / expected.abs().max()).item()


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


def pytest_collection_modifyitems(config, items):
    """Tests marked `slow` (whole fine-tuning runs, several processes, real-size models) run only with
    LAPVQA_SLOW_TESTS=1: README's test command stays quick, and .ci/run runs them in its newest-torch environment."""
    if os.environ.get("LAPVQA_SLOW_TESTS") == "1":
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


@pytest.fixture(autouse=True)
def private_hf_home(tmp_path_factory, monkeypatch) -> Path:
    """Each test gets its own empty Hugging Face home (the environment for subprocesses, the Hub constants here)."""
    home = tmp_path_factory.mktemp("hf-home")
    monkeypatch.setenv("HF_HOME", str(home))
    constants = huggingface_hub.constants
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_ASSETS_CACHE", str(home / "assets"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    return home


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """`activation_checkpointing_enable` (transformers >= 5.23), `gradient_checkpointing_enable` before it."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    from lapvqa_hf.tokenization import build_gpt2_tokenizer

    return build_gpt2_tokenizer()


_WITHOUT_LAPVQA_HF = """
import sys, importlib.abc

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "lapvqa_hf" or name.startswith("lapvqa_hf."):
            raise ImportError("lapvqa_hf is blocked in this test")

sys.meta_path.insert(0, Block())
"""


def run_without_lapvqa_hf(code: str, args: list, tmp_path) -> subprocess.CompletedProcess:
    """Runs Python `code` with `args` in a fresh interpreter where `lapvqa_hf` cannot be imported (as a user of a
    converted folder without the package), its remote-code modules cached under `tmp_path`."""
    script = tmp_path / "without_lapvqa_hf.py"
    script.write_text(_WITHOUT_LAPVQA_HF + code)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, str(script), *map(str, args)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


_REMOTE_CODE_SCRIPT = """
import torch
import transformers

request = torch.load(sys.argv[2], weights_only=True)
auto_class = getattr(transformers, request["auto_class"])
model = auto_class.from_pretrained(sys.argv[1], trust_remote_code=True, attn_implementation="eager").eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
assert "lapvqa_hf" not in sys.modules
with torch.no_grad():
    outputs = model(**request["inputs"])
result = {"class": type(model).__name__, "outputs": {k: v for k, v in outputs.items() if torch.is_tensor(v)}}
if request["generate"] is not None:
    result["generated"] = model.generate(**request["inputs"], **request["generate"])
    result["generated_without_cache"] = model.generate(**request["inputs"], **request["generate"], use_cache=False)
if request["post_process"] is not None:
    processor = transformers.AutoImageProcessor.from_pretrained(sys.argv[1], trust_remote_code=True)
    result["detections"] = processor.post_process_object_detection(outputs, **request["post_process"])
torch.save(result, sys.argv[3])
"""


def run_with_remote_code(
    folder,
    inputs: dict,
    tmp_path,
    generate: dict | None = None,
    post_process: dict | None = None,
    auto_class: str = "AutoModel",
) -> dict:
    """Loads `folder` with `auto_class(trust_remote_code=True)` in a Python where `lapvqa_hf` cannot be imported,
    runs `model(**inputs)` (then `model.generate(**inputs, **generate)`, and the image processor's
    `post_process_object_detection(outputs, **post_process)`), and returns the class name and the results.
    Generation there must give the same tokens with and without the cache."""
    request = {"inputs": inputs, "generate": generate, "post_process": post_process, "auto_class": auto_class}
    torch.save(request, tmp_path / "request.pt")
    run_without_lapvqa_hf(_REMOTE_CODE_SCRIPT, [folder, tmp_path / "request.pt", tmp_path / "result.pt"], tmp_path)
    remote = torch.load(tmp_path / "result.pt", weights_only=True)
    if generate is not None:
        assert torch.equal(remote["generated"], remote["generated_without_cache"]), "the cache changed the answers"
    return remote


def upstream_detection_checkpoint(head: torch.nn.Module, encoder: str, **metadata) -> dict:
    """The upstream file layout: the state dict plus the architecture and training record."""
    first_query_shape = head.object_queries.shape
    return {
        "state_dict": head.state_dict(),
        "vis_dim": head.vis_proj.in_features,
        "d_model": first_query_shape[2],
        "num_queries": first_query_shape[1],
        "num_enc": len(head.encoder.layers),
        "num_dec": len(head.decoder.layers),
        "encoder": encoder,
        "epoch": 37,
        "val_map40": 0.048,
        "val_map50": 0.031,
        **metadata,
    }


def upstream_report_checkpoint(head: torch.nn.Module, encoder: str, **changes) -> dict:
    """The upstream `ReportGenerationHead` file: `{state_dict, vis_dim, d_model, num_layers, nhead, encoder, epoch,
    val_bleu4}`."""
    return {
        "state_dict": head.state_dict(),
        "vis_dim": head.vis_proj.in_features,
        "d_model": head.tok_emb.embedding_dim,
        "num_layers": len(head.decoder.layers),
        "nhead": head.decoder.layers[0].self_attn.num_heads,
        "encoder": encoder,
        "epoch": 14,
        "val_bleu4": 0.031,
        **changes,
    }


def upstream_grounding_checkpoint(head: torch.nn.Module, encoder: str, **metadata) -> dict:
    """The upstream `VisualGroundingHead` file: the state dict plus the architecture and training record."""
    return {
        "state_dict": head.state_dict(),
        "vis_dim": head.vis_proj.in_features,
        "txt_dim": head.txt_proj.in_features,
        "d_model": head.vis_proj.out_features,
        "num_layers": len(head.encoder.layers),
        "encoder": encoder,
        "epoch": 21,
        "val_miou": 0.318,
        "val_acc50": 0.274,
        **metadata,
    }


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def accelerate_launch(module: str, args: list, processes: int = 2, timeout: float = 600) -> subprocess.CompletedProcess:
    """`accelerate launch -m MODULE ARGS` with `processes` CPU processes joined over gloo (DDP), as on a machine
    without GPUs. accelerate's `--cpu` would start a single process whatever `--num_processes` says."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu" if processes > 1 else "--cpu"]
    command += ["--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no"]
    command += ["--dynamo_backend", "no", "--main_process_port", str(_free_port()), "-m", module, *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)


def prepare_training_release(base: Path) -> Path:
    """A synthetic MIMIC-Diff-VQA release (`base/mimic`) and the features of its images from a tiny 32-wide
    encoder (`base/features`): what the training tests train on."""
    import dataclasses

    from lapvqa_hf import LapvqaImageProcessor, LapvqaVisionConfig, LapvqaVisionModel
    from lapvqa_hf.data import load_mimic_diff_vqa, write_synthetic_mimic_diff_vqa
    from lapvqa_hf.features import extract_features, images_of, recipe_for

    root = write_synthetic_mimic_diff_vqa(base / "mimic", num_subjects=10)
    rows = [row for split in load_mimic_diff_vqa(root).values() for row in split]
    torch.manual_seed(0)
    encoder = LapvqaVisionModel(
        LapvqaVisionConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48, image_size=28
        )
    )
    recipe = dataclasses.replace(recipe_for("lapvqa-vit-l14"), image_size=28, vis_dim=32)
    processor = LapvqaImageProcessor(size={"height": 28, "width": 28}, resize_mode="stretch")  # the tiny encoder's own
    extract_features(
        images_of(rows, root=root.resolve()), recipe, base / "features", encoder, processor, progress=False
    )
    return base


def training_config_values(base: Path, output: Path, **changes) -> dict:
    """A short DiffVQA training run of the tiny decoder on `prepare_training_release(base)`."""
    values = dict(
        data_root=str(base / "mimic"),
        features_dir=str(base / "features"),
        output_dir=str(output),
        model=TINY_DECODER,
        learning_rate=0.01,
        warmup_steps=1,
        max_steps=6,
        batch_size=3,
        checkpoint_every=2,
        eval_every=1000,
        eval_max_new_tokens=8,
    )
    return values | changes


@pytest.fixture(scope="module")
def xrays(tmp_path_factory) -> list[str]:
    """An 8-bit PNG, a 16-bit PNG and a MONOCHROME1 DICOM (the image tests of report generation and native heads)."""
    import numpy as np
    from PIL import Image
    from test_image_processing import write_dicom

    folder = tmp_path_factory.mktemp("xrays")
    generator = np.random.default_rng(0)
    Image.fromarray(generator.integers(0, 255, (40, 36), dtype=np.uint8)).save(folder / "cxr.png")
    Image.fromarray(generator.integers(200, 3000, (50, 44), dtype=np.uint16)).save(folder / "cxr16.png")
    dicom = write_dicom(folder / "cxr.dcm", generator.integers(0, 4096, (48, 40)), "MONOCHROME1", window=(2048, 4096))
    return [str(folder / "cxr.png"), str(folder / "cxr16.png"), str(dicom)]


@pytest.fixture
def fresh_accelerator_state():
    """accelerate's state is a process-wide singleton: each training test starts and ends without one."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models train fastest on one thread, and more spin against other processes on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def kill_after_the_first_checkpoint(run, monkeypatch) -> None:
    """Calls `run()` (a training run) and kills it with `KeyboardInterrupt` as soon as its first checkpoint is on
    disk, as a kill between steps would; the next run of the same config resumes from that checkpoint."""
    from accelerate.state import AcceleratorState

    import lapvqa_hf.train.loop as training

    save_checkpoint = training.save_checkpoint

    def save_then_die(*args):
        save_checkpoint(*args)
        raise KeyboardInterrupt("killed after the first checkpoint")

    monkeypatch.setattr(training, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(training, "save_checkpoint", save_checkpoint)
    AcceleratorState._reset_state(True)
