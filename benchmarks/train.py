"""Training samples/s and peak memory of the real-size DiffVQA head (vis_dim 1152, N = 729 patches per image).

    python benchmarks/train.py                                   # CPU, fp32
    python benchmarks/train.py --device cuda --dtype bfloat16    # GPU, bf16 autocast + SDPA

One step = forward over question + answer tokens (answer-only loss), backward, AdamW step. Features and text are
random; the text is --text-tokens long (MIMIC-Diff-VQA question + answer are typically 20-60 tokens).
"""

import argparse
import platform
import resource
from datetime import date

import torch
from timing import synchronize, time_call

from lapvqa_hf import LapvqaDiffVQAConfig, LapvqaDiffVQAModel


def peak_memory_gib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux: the process's peak RSS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch-sizes", default="4,8")
    parser.add_argument("--vis-dim", type=int, default=1152)
    parser.add_argument("--patches", type=int, default=729, help="patch tokens per image")
    parser.add_argument("--text-tokens", type=int, default=48)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per batch size (after one warm-up)")
    args = parser.parse_args()

    model = LapvqaDiffVQAModel(LapvqaDiffVQAConfig(vis_dim=args.vis_dim)).to(args.device).train()
    model.set_attn_implementation("sdpa")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast_dtype = getattr(torch, args.dtype)
    device_name = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"{platform.processor() or 'CPU'} x{torch.get_num_threads()} threads"
    )
    print(f"# {date.today()}  device: {device_name}  autocast: {args.dtype}  torch {torch.__version__}")
    print(
        f"# vis_dim {args.vis_dim}, {args.patches} patches per image ({2 * args.patches} memory tokens), {args.text_tokens} text tokens"
    )
    print("| batch | s / step | samples/s | peak memory (GiB) |")
    print("|---|---|---|---|")
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        curr_vis = torch.randn(batch, args.patches, args.vis_dim, device=args.device)
        ref_vis = torch.randn(batch, args.patches, args.vis_dim, device=args.device)
        input_ids = torch.randint(0, 50256, (batch, args.text_tokens), device=args.device)
        labels = input_ids.clone()
        labels[:, : args.text_tokens // 3] = -100  # the question is not scored

        def step():
            with torch.autocast(args.device.split(":")[0], dtype=autocast_dtype, enabled=args.dtype != "float32"):
                loss = model(
                    input_ids=input_ids, curr_vis=curr_vis, ref_vis=ref_vis, labels=labels, use_cache=False
                ).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        seconds = time_call(step, args.device, args.steps)
        synchronize(args.device)
        print(f"| {batch} | {seconds:.3f} | {batch / seconds:.2f} | {peak_memory_gib(args.device):.2f} |", flush=True)


if __name__ == "__main__":
    main()
