"""End-to-end rows/s of `lapvqa answer` (images read, encoded once each, batched generation, JSON Lines written) for
every head type, with tiny and real-size random weights.

    python benchmarks/answer.py                       # CPU, fp32
    python benchmarks/answer.py --device cuda --dtype bfloat16

Real size: a random CLIP ViT-L/14 (24 layers, 224 px) as the frozen encoder; DiffVQA / VQA heads at the upstream
size (width 512, 6 layers, GPT-2 vocabulary), the DETR-style detection head, and the captioning model (ViT-L/14 +
6-layer decoder). Tiny: a 1-layer encoder and 1-layer heads. Rows share images as a dataset's do (two questions per
image or image pair); every answer runs to --new-tokens tokens (a random head rarely says eos).
"""

import argparse
import json
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from lapvqa_hf.convert.original import CaptioningModel, DetectionHead, DiffVQAHead, VQAHead, randomize_
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

from lapvqa_hf.answer import Answerer, answer_dataset
from lapvqa_hf.cli import main as lapvqa

SIZES = {
    "tiny": dict(
        encoder=dict(hidden_size=1024, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, patch_size=56),
        head=dict(d_model=32, nhead=4, num_layers=1, dim_feedforward=48, max_len=200),
        detection=dict(d_model=32, dim_feedforward=48),
        captioning=dict(
            vision_width=64,
            vision_depth=1,
            vision_heads=4,
            d_model=32,
            nhead=4,
            num_layers=1,
            dim_feedforward=48,
            max_len=200,
        ),  # fmt: skip
        heads=["--num-heads", "4"],
        vision_heads=["--vision-num-heads", "4"],
    ),
    "real": dict(
        encoder=dict(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14
        ),
        head=dict(),
        detection=dict(),
        captioning=dict(),
        heads=[],
        vision_heads=[],
    ),
}


def write_rows(folder: Path, kind: str, rows: int) -> Path:
    """`rows` rows over `rows // 2` images (or image pairs), as 8-bit PNGs of 512 x 512."""
    generator = np.random.default_rng(0)
    for i in range(rows):
        Image.fromarray(generator.integers(0, 255, (512, 512), dtype=np.uint8)).save(folder / f"{i}.png")
    questions = ["what has changed compared to the reference image?", "is there any pleural effusion?"]
    with open(folder / f"{kind}.jsonl", "w") as file:
        for i in range(rows):
            pair = i // 2
            row = {
                "diffvqa": {"prior_image": f"{2 * pair}.png", "current_image": f"{2 * pair + 1}.png"},
                "vqa": {"image": f"{pair}.png"},
            }.get(kind, {"image": f"{pair}.png"})
            if kind in ("diffvqa", "vqa"):
                row["question"] = questions[i % 2]
            file.write(json.dumps(row) + "\n")
    return folder / f"{kind}.jsonl"


def build_model(kind: str, size: str, folder: Path, encoder: Path) -> str:
    spec = SIZES[size]
    output = folder / f"{kind}-{size}"
    if kind == "captioning":
        image = {"img_size": 224, "patch_size": 56 if size == "tiny" else 14}
        torch.save(randomize_(CaptioningModel(**image, **spec["captioning"]), std=0.02).state_dict(), folder / "c.pt")
        arguments = ["convert", "captioning", str(folder / "c.pt"), *spec["heads"], *spec["vision_heads"]]
    else:
        head = {
            "diffvqa": lambda: DiffVQAHead(vis_dim=1024, **spec["head"]),
            "vqa": lambda: VQAHead(vis_dim=1024, **{**spec["head"], "max_len": 150}),
            "detection": lambda: DetectionHead(vis_dim=1024, **spec["detection"]),
        }[kind]()
        torch.save(randomize_(head, std=0.02).state_dict(), folder / f"{kind}.pt")
        heads = spec["heads"] if kind != "detection" else []
        arguments = ["convert", kind, str(folder / f"{kind}.pt"), "--encoder", "clip-vit-l14", "--encoder-checkpoint",
                     str(encoder), *heads]  # fmt: skip
    assert lapvqa([*arguments, "--no-verify", "--output", str(output)]) == 0
    return str(output)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--kinds", default="diffvqa,vqa,captioning,detection")
    parser.add_argument("--sizes", default="tiny,real")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    device_name = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"{platform.processor() or 'CPU'} x{torch.get_num_threads()} threads"
    )
    print(f"# {date.today()}  device: {device_name}  dtype: {args.dtype}  torch {torch.__version__}")
    print(
        f"{args.rows} rows over {args.rows // 2} images or pairs, batch {args.batch_size}, {args.new_tokens} new tokens"
    )
    print("| head | size | rows/s | images encoded | s total | s of which model loading |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        for size in args.sizes.split(","):
            encoder = folder / f"clip-{size}"
            torch.manual_seed(0)
            CLIPVisionModel(CLIPVisionConfig(image_size=224, **SIZES[size]["encoder"])).save_pretrained(encoder)
            CLIPImageProcessor(size={"shortest_edge": 224}, crop_size=224).save_pretrained(encoder)
            for kind in args.kinds.split(","):
                model = build_model(kind, size, folder, encoder)
                rows = write_rows(folder, kind, args.rows)
                start = time.perf_counter()
                generate = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens}
                answerer = Answerer(
                    model,
                    device=args.device,
                    dtype=getattr(torch, args.dtype),
                    generate_kwargs={} if kind == "detection" else generate,
                )
                loaded = time.perf_counter()
                answer_dataset(model, rows, folder / f"{kind}-{size}.out.jsonl", batch_size=args.batch_size,
                               answerer=answerer, progress=False)  # fmt: skip
                done = time.perf_counter()
                print(
                    f"| {kind} | {size} | {args.rows / (done - loaded):.2f} | {answerer.images.encoded} "
                    f"| {done - start:.1f} | {loaded - start:.1f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
