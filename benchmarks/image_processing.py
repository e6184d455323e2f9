"""Milliseconds for `LapvqaImageProcessor` to take a large 16-bit X-ray PNG to the encoder's pixel values, against
the time to decode the file alone.

    python benchmarks/image_processing.py
    git show 1c53073:lapvqa_hf/image_processing_lapvqa.py > /tmp/before.py
    python benchmarks/image_processing.py --processor-file /tmp/before.py   # the same, with an older processor

The PNG is synthetic (seeded): a body-shaped bright region, rib-like stripes and noise in 12 of the 16 bits, the
size of a chest radiograph (3000 x 2500). Every figure is the median of `--repeats` calls after one warm-up call.
"""

import argparse
import importlib.util
import os
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import PIL
import transformers
from PIL import Image

from lapvqa_hf import LapvqaImageProcessor


def synthetic_xray(height: int, width: int) -> np.ndarray:
    rows, columns = np.mgrid[0:height, 0:width].astype(np.float32)
    body = np.exp(-(((columns - width / 2) / (width / 3)) ** 2) - ((rows - height / 2) / (height / 2.5)) ** 2)
    ribs = np.sin(columns / 40) * np.sin(rows / 55)
    noise = np.random.default_rng(0).normal(0, 40, (height, width))
    return np.clip(1500 + 1200 * body + 300 * ribs + noise, 0, 4095).astype(np.uint16)


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def processor_class(path: str | None) -> type:
    if path is None:
        return LapvqaImageProcessor
    spec = importlib.util.spec_from_file_location("processor_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.LapvqaImageProcessor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--height", type=int, default=3000)
    parser.add_argument("--width", type=int, default=2500)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--processor-file", help="a file defining LapvqaImageProcessor (default: the installed one)")
    args = parser.parse_args()

    processor = processor_class(args.processor_file)()  # 224 px, bicubic, padded: the default
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "xray16.png"
        Image.fromarray(synthetic_xray(args.height, args.width)).save(path)

        def decode():
            with Image.open(path) as image:
                image.load()

        decode_ms = median_ms(decode, args.repeats)
        load_ms = median_ms(lambda: processor.load_image(path), args.repeats)
        total_ms = median_ms(lambda: processor(path)["pixel_values"], args.repeats)
        size_mb = path.stat().st_size / 1e6

    print(
        f"# {date.today()}  device: {platform.processor() or 'CPU'} x{os.cpu_count()} cores  "
        f"load average {os.getloadavg()[0]:.2f}  Pillow {PIL.__version__}  transformers {transformers.__version__}  "
        f"processor: {args.processor_file or 'lapvqa_hf'}"
    )
    print(f"{args.height} x {args.width} 16-bit PNG ({size_mb:.1f} MB) -> [1, 3, 224, 224], "
          f"median of {args.repeats}")  # fmt: skip
    print("| step | ms | x decode |")
    print("|---|---|---|")
    for step, ms in [
        ("decode (PIL)", decode_ms),
        ("load_image: decode + [0, 1]", load_ms),
        ("path -> pixel_values", total_ms),
    ]:
        print(f"| {step} | {ms:.1f} | {ms / decode_ms:.2f} |")


if __name__ == "__main__":
    main()
