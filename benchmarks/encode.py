"""Images/s of the LAPVQA ViT-L/14 encoder and reports/s of the captioning model, with the FLOP rate reached.

    python benchmarks/encode.py                                             # CPU, fp32
    python benchmarks/encode.py --device cuda --dtype bfloat16 --compile    # GPU, bf16 + SDPA (+ torch.compile)

Weights are random (the real ViT-L/14 shape). The card says 384 px but 384 is not a multiple of 14; the default
sizes are 224 px (16x16 = 256 patches, what the card's own [B, 256, 1024] output implies) and 378 px (27x27),
the multiple of 14 closest to 384.
"""

import argparse
import platform
from datetime import date

import torch
from timing import time_call

from lapvqa_hf import LapvqaCaptioningConfig, LapvqaCaptioningModel, LapvqaVisionConfig, LapvqaVisionModel

# Dense bf16 tensor-core peaks, for the model FLOPs utilisation column.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def encoder_flops(config: LapvqaVisionConfig) -> float:
    """Forward FLOPs of one image (multiply-adds counted as 2)."""
    tokens, width = config.num_patches + 1, config.hidden_size
    patch_embedding = 2 * config.num_patches * width * config.num_channels * config.patch_size**2
    per_layer = 2 * tokens * width * (4 * width + 2 * config.intermediate_size) + 4 * tokens**2 * width
    return patch_embedding + config.num_hidden_layers * per_layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--attn-implementation", default="sdpa", choices=["eager", "sdpa"])
    parser.add_argument("--image-sizes", default="224,378")
    parser.add_argument("--batch-sizes", default="1,4,8")
    parser.add_argument("--caption-batch-sizes", default="1,4")
    parser.add_argument("--new-tokens", type=int, default=64, help="report tokens for the captioning rows")
    parser.add_argument("--compile", action="store_true", help="torch.compile the encoder")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, help="device peak for the MFU column (known GPUs are filled in)")
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    if args.device.startswith("cuda"):
        device_name = torch.cuda.get_device_name()
        peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)
    else:
        device_name, peak = f"{platform.processor() or 'CPU'} x{torch.get_num_threads()} threads", args.peak_tflops
    print(
        f"# {date.today()}  device: {device_name}  dtype: {args.dtype}  attention: {args.attn_implementation}  "
        f"compile: {args.compile}  torch {torch.__version__}"
    )
    print("| model | image px | patches | batch | s / batch | images/s | TFLOP/s | MFU |")
    print("|---|---|---|---|---|---|---|---|")
    for image_size in [int(s) for s in args.image_sizes.split(",")]:
        config = LapvqaVisionConfig(image_size=image_size)
        encoder = LapvqaVisionModel(config).to(args.device, dtype).eval()
        encoder.set_attn_implementation(args.attn_implementation)
        forward = torch.compile(encoder) if args.compile else encoder
        for batch in [int(b) for b in args.batch_sizes.split(",")]:
            pixels = torch.randn(batch, 3, image_size, image_size, device=args.device, dtype=dtype)
            with torch.inference_mode():
                seconds = time_call(lambda: forward(pixels), args.device, args.repeats)
            tflops = encoder_flops(config) * batch / seconds / 1e12
            mfu = f"{100 * tflops / peak:.1f}%" if peak else "n/a"
            print(
                f"| encoder | {image_size} | {config.num_patches} | {batch} | {seconds:.3f} | {batch / seconds:.2f} "
                f"| {tflops:.2f} | {mfu} |",
                flush=True,
            )

    print()
    print(f"| model | image px | batch | s / batch | reports/s | tokens/s ({args.new_tokens} per report) |")
    print("|---|---|---|---|---|---|")
    image_size = int(args.image_sizes.split(",")[0])
    model = LapvqaCaptioningModel(LapvqaCaptioningConfig(vision_config={"image_size": image_size}))
    model = model.to(args.device, dtype).eval()
    model.set_attn_implementation(args.attn_implementation)
    for batch in [int(b) for b in args.caption_batch_sizes.split(",")]:
        pixels = torch.randn(batch, 3, image_size, image_size, device=args.device, dtype=dtype)
        bos = torch.full((batch, 1), 50256, device=args.device)
        kwargs = dict(
            pixel_values=pixels,
            input_ids=bos,
            attention_mask=torch.ones_like(bos),
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            do_sample=False,
        )
        with torch.inference_mode():
            seconds = time_call(lambda: model.generate(**kwargs), args.device, args.repeats)
        print(
            f"| captioning | {image_size} | {batch} | {seconds:.3f} | {batch / seconds:.2f} "
            f"| {batch * args.new_tokens / seconds:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
