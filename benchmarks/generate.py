"""Answers/s and tokens/s of DiffVQA generation: the card's naive loop vs. generate() (dynamic cache) vs. a
static cache + torch.compile, at the real size (vis_dim 768, N = 256 patches per image, 64 new tokens).

    python benchmarks/generate.py                                   # CPU, fp32
    python benchmarks/generate.py --device cuda --dtype bfloat16    # GPU, bf16 + SDPA

Weights are random (upstream layout); every mode generates exactly --new-tokens tokens per sample.

The floor of a decode step is the bytes it must read (every decoder weight but the cross-attention key/value
projections, `lm_head`, and the cached cross- and self-attention keys/values) divided by the device's read
bandwidth, measured first with a large `tensor.sum()`; `ms / step` is a call's time over the new tokens (prefill
included), and `x floor` their ratio.
"""

import argparse
import json
import platform
from datetime import date

import torch
from lapvqa_hf.convert.diffvqa import convert_state_dict
from timing import time_call
from transformers.generation import CompileConfig

from lapvqa_hf import LapvqaDiffVQAConfig, LapvqaDiffVQAModel
from lapvqa_hf.original import DiffVQAHead, randomize_

NEVER = -1  # an eos id the naive loop never sees, so it runs the full length like the other modes


def build_models(vis_dim: int, device: str, dtype: torch.dtype, attn_implementation: str):
    original = randomize_(DiffVQAHead(vis_dim=vis_dim), seed=0, std=0.02).eval()
    config = LapvqaDiffVQAConfig(vis_dim=vis_dim)
    model = LapvqaDiffVQAModel(config)
    model.load_state_dict(convert_state_dict(original.state_dict(), config))
    model.set_attn_implementation(attn_implementation)
    return original.to(device, dtype), model.to(device, dtype).eval()


def read_bandwidth(device: str, dtype: torch.dtype, megabytes: int = 1024) -> float:
    """Bytes per second that a `sum()` over a tensor far larger than the caches reads."""
    data = torch.ones(megabytes * 2**20 // torch.finfo(dtype).bits * 8, dtype=dtype, device=device)
    return data.numel() * data.element_size() / time_call(data.sum, device, repeats=5)


def decode_step_bytes(model: LapvqaDiffVQAModel, batch: int, memory_tokens: int, text_tokens: int) -> int:
    """What one cached decode step must read: weights (cross-attention k/v projections excluded: their outputs are
    cached), one `lm_head` pass, and the cached keys/values of every layer."""
    config, size = model.config, next(model.parameters()).element_size()
    skipped = (
        "visual_projection",
        "frame_embeddings",
        "embed_tokens",
        "embed_positions",
        "encoder_attn.k_proj",
        "encoder_attn.v_proj",
    )
    weights = sum(p.numel() for name, p in model.named_parameters() if not any(s in name for s in skipped))
    cached = 2 * config.num_hidden_layers * batch * (memory_tokens + text_tokens) * config.hidden_size
    return (weights + cached) * size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--attn-implementation", default="sdpa", choices=["eager", "sdpa"])
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--modes", default="naive,dynamic,static-compiled")
    parser.add_argument("--vis-dim", type=int, default=768)
    parser.add_argument("--patches", type=int, default=256, help="patch tokens per image")
    parser.add_argument("--prompt-tokens", type=int, default=12, help="question tokens + bos")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    original, model = build_models(args.vis_dim, args.device, dtype, args.attn_implementation)
    compile_config = CompileConfig(
        fullgraph=True, mode="reduce-overhead" if args.device.startswith("cuda") else "default"
    )
    compile_config._compile_all_devices = True
    device_name = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"{platform.processor() or 'CPU'} x{torch.get_num_threads()} threads"
    )
    bandwidth = read_bandwidth(args.device, dtype)
    print(
        f"# {date.today()}  device: {device_name}  dtype: {args.dtype}  attention: {args.attn_implementation}  torch {torch.__version__}"
        f"  read bandwidth: {bandwidth / 1e9:.1f} GB/s"
    )
    print("| batch | mode | s / batch | answers/s | tokens/s | speed-up vs naive | ms / step | floor ms | x floor |")
    print("|---|---|---|---|---|---|---|---|---|")
    results = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        curr_vis = torch.randn(batch, args.patches, args.vis_dim, device=args.device, dtype=dtype)
        ref_vis = torch.randn(batch, args.patches, args.vis_dim, device=args.device, dtype=dtype)
        question = torch.randint(0, 50256, (batch, args.prompt_tokens - 1), device=args.device)
        prompt = torch.cat([question, torch.full((batch, 1), 50256, device=args.device)], dim=1)
        common = dict(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            curr_vis=curr_vis,
            ref_vis=ref_vis,
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            do_sample=False,
        )
        runs = {
            "naive": lambda: original.generate(curr_vis, ref_vis, question, 50256, NEVER, args.new_tokens),
            "dynamic": lambda: model.generate(**common),
            "static-compiled": lambda: model.generate(
                **common, cache_implementation="static", compile_config=compile_config
            ),
        }
        naive_seconds = None
        text_tokens = args.prompt_tokens + args.new_tokens // 2  # the self-attention cache's mean length
        floor_ms = 1e3 * decode_step_bytes(model, batch, 2 * args.patches, text_tokens) / bandwidth
        for mode in args.modes.split(","):
            try:
                with torch.inference_mode():
                    seconds = time_call(runs[mode], args.device, args.repeats)
            except Exception as error:  # one failing mode (e.g. a compile error) must not lose the other rows
                print(f"| {batch} | {mode} | failed: {type(error).__name__}: {str(error).splitlines()[0][:200]} |")
                continue
            naive_seconds = seconds if mode == "naive" else naive_seconds
            speedup = f"{naive_seconds / seconds:.1f}x" if naive_seconds else "-"
            step_ms = 1e3 * seconds / args.new_tokens
            row = dict(
                batch=batch,
                mode=mode,
                seconds=seconds,
                answers_per_s=batch / seconds,
                tokens_per_s=batch * args.new_tokens / seconds,
                step_ms=step_ms,
                floor_ms=floor_ms,
            )
            results.append(row)
            print(
                f"| {batch} | {mode} | {seconds:.3f} | {row['answers_per_s']:.1f} | {row['tokens_per_s']:.0f} | {speedup} "
                f"| {step_ms:.2f} | {floor_ms:.2f} | {step_ms / floor_ms:.1f}x |",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as file:
            json.dump(
                {
                    "device": device_name,
                    "dtype": args.dtype,
                    "read_bandwidth_gb_s": bandwidth / 1e9,
                    "args": vars(args),
                    "results": results,
                },
                file,
                indent=1,
            )


if __name__ == "__main__":
    main()
