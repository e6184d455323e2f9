"""Training throughput of the real-size heads, per process and in all, alone or under `accelerate launch`.

    python benchmarks/train.py --task diffvqa                      # one process (all cores), fp32
    ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 accelerate launch --multi_gpu --num_processes 2 \\
        benchmarks/train.py --task diffvqa                          # two CPU processes (DDP over gloo)
    python benchmarks/train.py --task captioning --device cuda --dtype bfloat16 --batch-sizes 32,128

One step = forward with the loss, backward (gradients all-reduced across processes), AdamW step, on random
features of the real encoder sizes. `--batch-sizes` are per process. Tasks:

- diffvqa: `LapvqaDiffVQAModel`, vis_dim 1152 (SigLIP so400m), 729 patches per image (two images per question),
  `--text-tokens` question + answer tokens with the question's third masked out of the loss;
- captioning: `LapvqaCaptioningModel`'s decoder on ViT-L/14 features (256 patches + CLS, width 1024), a
  `--text-tokens`-token report (the trained model has no vision tower, as in `lapvqa train`);
- detection: `LapvqaDetectionModel`, vis_dim 1024 (CLIP ViT-L/14, 256 patches), DETR's set loss over 3 boxes
  per image.

Text tasks report trained tokens/s (tokens scored by the loss); all report samples/s.
"""

import argparse
import platform
import resource
import time
from datetime import date

import torch
from accelerate import Accelerator
from timing import synchronize

from lapvqa_hf import (
    LapvqaCaptioningConfig,
    LapvqaCaptioningModel,
    LapvqaDetectionConfig,
    LapvqaDetectionModel,
    LapvqaDiffVQAConfig,
    LapvqaDiffVQAModel,
)
from lapvqa_hf.processes import process_state


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux: the process's peak RSS


def text_inputs(batch: int, text_tokens: int, masked: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    input_ids = torch.randint(0, 50256, (batch, text_tokens), device=device)
    labels = input_ids.clone()
    labels[:, :masked] = -100
    return input_ids, labels


def build(task: str, batch: int, text_tokens: int, device: torch.device) -> tuple[torch.nn.Module, dict, int]:
    """The model, one batch of its inputs, and the tokens the loss scores per batch (0 for detection)."""
    torch.manual_seed(0)
    if task == "diffvqa":
        model = LapvqaDiffVQAModel(LapvqaDiffVQAConfig(vis_dim=1152))
        input_ids, labels = text_inputs(batch, text_tokens, text_tokens // 3, device)
        features = {
            name: torch.randn(batch, 729, 1152, device=device)
            for name in ("current_image_features", "prior_image_features")
        }
        inputs = {"input_ids": input_ids, "labels": labels, "use_cache": False, **features}
        return model, inputs, batch * (text_tokens - text_tokens // 3)  # the loss shifts labels by one
    if task == "captioning":
        model = LapvqaCaptioningModel(LapvqaCaptioningConfig())
        model.vision_model = None  # trained on the encoder's stored output, as `lapvqa train` does
        vision = model.config.vision_config
        tokens = (vision.image_size // vision.patch_size) ** 2 + 1
        input_ids, labels = text_inputs(batch, text_tokens, 1, device)  # [bos] is not scored
        features = torch.randn(batch, tokens, vision.hidden_size, device=device)
        inputs = {"input_ids": input_ids, "labels": labels, "image_features": features, "use_cache": False}
        return model, inputs, batch * (text_tokens - 1)
    if task == "detection":
        model = LapvqaDetectionModel(LapvqaDetectionConfig(vis_dim=1024))
        centres, sizes = torch.rand(batch, 3, 2) * 0.6 + 0.2, torch.rand(batch, 3, 2) * 0.2 + 0.05
        labels = [
            {"class_labels": torch.randint(0, 14, (3,), device=device), "boxes": torch.cat([c, s], -1).to(device)}
            for c, s in zip(centres, sizes, strict=True)
        ]
        return model, {"image_features": torch.randn(batch, 256, 1024, device=device), "labels": labels}, 0
    raise ValueError(f"--task {task!r}: expected diffvqa, captioning or detection.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="diffvqa", choices=["diffvqa", "captioning", "detection"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch-sizes", default="8", help="per process")
    parser.add_argument("--text-tokens", type=int, default=48, help="question + answer, or report, tokens")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per batch size (after one warm-up)")
    args = parser.parse_args()

    state = process_state(args.device)  # joins the processes `accelerate launch` started, over gloo on CPUs
    mixed_precision = {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}[args.dtype]
    accelerator = Accelerator(cpu=args.device == "cpu", mixed_precision=mixed_precision)
    device = accelerator.device
    if accelerator.is_main_process:
        device_name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "CPU"
        print(
            f"# {date.today()}  task: {args.task}  device: {device_name}  {state.num_processes} process(es) x "
            f"{torch.get_num_threads()} threads  precision: {args.dtype}  torch {torch.__version__}"
        )
        print("| processes | batch / process | s / step | samples/s | tokens/s | samples/s / process | peak GiB |")
        print("|---|---|---|---|---|---|---|")
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        model, inputs, scored_tokens = build(args.task, batch, args.text_tokens, device)
        model = model.to(device).train()
        model.set_attn_implementation("sdpa")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        model, optimizer = accelerator.prepare(model, optimizer)

        def step():
            with accelerator.autocast():
                loss = model(**inputs).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()  # warm-up
        accelerator.wait_for_everyone()
        synchronize(device.type)
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        synchronize(device.type)
        accelerator.wait_for_everyone()
        seconds = (time.perf_counter() - start) / args.steps
        peak = accelerator.gather(torch.tensor([peak_memory_gib(device)], device=device)).max().item()
        if accelerator.is_main_process:
            processes = accelerator.num_processes
            tokens = f"{scored_tokens * processes / seconds:.0f}" if scored_tokens else "-"
            print(
                f"| {processes} | {batch} | {seconds:.3f} | {batch * processes / seconds:.2f} | {tokens} | "
                f"{batch / seconds:.2f} | {peak:.2f} |",
                flush=True,
            )
        accelerator.free_memory()


if __name__ == "__main__":
    main()
