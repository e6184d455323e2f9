"""Answers/s and tokens/s of DiffVQA generation: the card's naive loop vs. generate() (dynamic cache) vs. a
static cache + torch.compile, at the real size (vis_dim 768, N = 256 patches per image, 64 new tokens).

    python benchmarks/generate.py                                   # CPU, fp32
    python benchmarks/generate.py --device cuda --dtype bfloat16    # GPU, bf16 + SDPA

Weights are random (upstream layout); every mode generates exactly --new-tokens tokens per sample.
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
    print(
        f"# {date.today()}  device: {device_name}  dtype: {args.dtype}  attention: {args.attn_implementation}  torch {torch.__version__}"
    )
    print("| batch | mode | s / batch | answers/s | tokens/s | speed-up vs naive |")
    print("|---|---|---|---|---|---|")
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
        for mode in args.modes.split(","):
            with torch.inference_mode():
                seconds = time_call(runs[mode], args.device, args.repeats)
            naive_seconds = seconds if mode == "naive" else naive_seconds
            speedup = f"{naive_seconds / seconds:.1f}x" if naive_seconds else "-"
            row = dict(
                batch=batch,
                mode=mode,
                seconds=seconds,
                answers_per_s=batch / seconds,
                tokens_per_s=batch * args.new_tokens / seconds,
            )
            results.append(row)
            print(
                f"| {batch} | {mode} | {seconds:.3f} | {row['answers_per_s']:.1f} | {row['tokens_per_s']:.0f} | {speedup} |",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as file:
            json.dump(
                {"device": device_name, "dtype": args.dtype, "args": vars(args), "results": results}, file, indent=1
            )


if __name__ == "__main__":
    main()
