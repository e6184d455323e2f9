"""MS-CXR phrase boxes as `datasets` datasets, for the grounding heads; a synthetic release in its layout.

The layout assumed is MS-CXR v0.1's local-alignment table, `MS_CXR_Local_Alignment_v1.0.0.csv` at the release's
top, one row per box: `dicom_id, category_name, label_text, path, x, y, w, h, image_width, image_height, split` (in
any order; other columns are ignored). `label_text` is the report phrase, `category_name` its finding (MS-CXR's
eight: Atelectasis, Cardiomegaly, Consolidation, Edema, Lung Opacity, Pleural Effusion, Pneumonia, Pneumothorax),
`path` the MIMIC-CXR-JPG image relative to the release folder (`files/p../p{subject}/s{study}/{dicom_id}.jpg`: put or
link MIMIC-CXR-JPG's `files/` there), `x, y, w, h` the box (top-left corner, width, height) in pixels of the image
of `image_width` x `image_height`, and `split` `train`, `val` or `test`. These columns could not be checked against
the release here (it is credentialed, PhysioNet); a release that differs is refused naming the missing columns.

Boxes are normalised by `image_width` / `image_height` (so a resized copy of the images needs no new table). A
phrase that marks several regions (a bilateral finding) has a row per box: the rows of one image and phrase become
one example, whose `boxes` are all of them and whose `box`, the target of a single-box head, encloses them all.
`write_synthetic_ms_cxr` writes a stand-in in this layout.
"""

import csv
import hashlib
import random
from pathlib import Path

import numpy as np
from datasets import Dataset, DatasetDict, Features, List, Value
from PIL import Image

from .data import SPLIT_NAMES, DataError, _read_csv, write_release
from .metrics.grounding import enclosing_box

TABLE = "MS_CXR_Local_Alignment_v1.0.0.csv"
COLUMNS = ("dicom_id", "category_name", "label_text", "path", "x", "y", "w", "h", "image_width", "image_height",
           "split")  # fmt: skip
FEATURES = Features(
    {
        "dicom_id": Value("string"),
        "image": Value("string"),
        "category": Value("string"),
        "phrase": Value("string"),
        "height": Value("int64"),
        "width": Value("int64"),
        "boxes": List(List(Value("float64"), length=4)),
        "box": List(Value("float64"), length=4),
    }
)


def _number(row: dict[str, str], key: str, where: str) -> float:
    try:
        value = float(row[key])
    except ValueError:
        raise DataError(f"{where}: {key} must be a number, got {row[key]!r}.") from None
    if not np.isfinite(value):
        raise DataError(f"{where}: {key} must be finite, got {row[key]!r}.")
    return value


def _box(row: dict[str, str], where: str) -> tuple[tuple[float, float, float, float], int, int]:
    """A row's box as pixel corners clipped to the image, and the image's (height, width)."""
    x, y, w, h = (_number(row, key, where) for key in ("x", "y", "w", "h"))
    width, height = (_number(row, key, where) for key in ("image_width", "image_height"))
    if width < 1 or height < 1 or width != int(width) or height != int(height):
        raise DataError(f"{where}: image_width and image_height must be whole pixels >= 1, got {width} x {height}.")
    x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)
    if w <= 0 or h <= 0 or x1 <= x0 or y1 <= y0:
        raise DataError(
            f"{where}: the box (x {x}, y {y}, w {w}, h {h}) must have w, h > 0 and overlap the {int(width)} x "
            f"{int(height)} image."
        )
    return (x0, y0, x1, y1), int(height), int(width)


def _normalised(box: list[float], height: int, width: int) -> list[float]:
    """Pixel (x0, y0, x1, y1) -> (cx, cy, w, h) in [0, 1]."""
    x0, y0, x1, y1 = box
    return [(x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height]


def load_ms_cxr(root: str | Path) -> DatasetDict:
    """An MS-CXR release (see the module docstring) as `train`, `validation` and `test` datasets (those present), an
    (image, phrase) example per row.

    Columns: `dicom_id`, `image` (its path), `category`, `phrase`, `height` and `width` (the table's), `boxes` (every
    box of the phrase) and `box` (the box enclosing them), boxes as (cx, cy, w, h) normalised to [0, 1] by the image
    size. Examples keep the table's order (of each image and phrase's first row).
    """
    root = Path(root)
    table = root / TABLE
    if not table.is_file():
        raise DataError(f"{root}: no {TABLE}; expected an MS-CXR release's folder.")
    examples: dict[tuple[str, str, str], dict] = {}
    images_seen: set[Path] = set()
    for line, row in enumerate(_read_csv(table, COLUMNS), start=2):
        where = f"{table}, line {line}"
        split = SPLIT_NAMES.get(row["split"])
        if split is None:
            raise DataError(f"{where}: unknown split {row['split']!r}; expected train, val or test.")
        for key in ("dicom_id", "category_name", "label_text", "path"):
            if not row[key].strip():
                raise DataError(f"{where}: {key} is empty.")
        box, height, width = _box(row, where)
        image = root / row["path"]
        if image not in images_seen:
            if not image.is_file():
                raise DataError(f"{where}: no image {image} (the path column is read from {root}).")
            images_seen.add(image)
        key = (split, row["dicom_id"], row["label_text"])
        example = examples.setdefault(key, {
            "dicom_id": row["dicom_id"], "image": str(image), "category": row["category_name"],
            "phrase": row["label_text"], "height": height, "width": width, "corners": [],
        })  # fmt: skip
        if (example["height"], example["width"]) != (height, width):
            raise DataError(
                f"{where}: image {row['dicom_id']} is {width} x {height} here but {example['width']} x "
                f"{example['height']} in an earlier row of the same phrase."
            )
        example["corners"].append(list(box))
    columns: dict[str, dict[str, list]] = {}
    for (split, _, _), example in examples.items():
        corners = example.pop("corners")
        size = (example["height"], example["width"])
        example["boxes"] = [_normalised(box, *size) for box in corners]
        example["box"] = _normalised(enclosing_box(corners), *size)
        target = columns.setdefault(split, {name: [] for name in FEATURES})
        for name, value in example.items():
            target[name].append(value)
    splits = {split: Dataset.from_dict(data, features=FEATURES) for split, data in columns.items()}
    return DatasetDict({split: splits[split] for split in ("train", "validation", "test") if split in splits})


# --- a synthetic release ----------------------------------------------------------------------------------------

# Phrases of the synthetic images: each with its MS-CXR category and a bright box per region it names (cx, cy, w, h,
# normalised; the patient's left is the image's right).
_SYNTHETIC_PHRASES = {
    "small left pleural effusion": ("Pleural Effusion", [(0.75, 0.86, 0.34, 0.2)]),
    "right pleural effusion": ("Pleural Effusion", [(0.25, 0.86, 0.34, 0.2)]),
    "bilateral pleural effusions": ("Pleural Effusion", [(0.25, 0.86, 0.34, 0.2), (0.75, 0.86, 0.34, 0.2)]),
    "enlarged cardiac silhouette": ("Cardiomegaly", [(0.5, 0.62, 0.5, 0.3)]),
    "right upper lobe opacity": ("Lung Opacity", [(0.3, 0.3, 0.22, 0.18)]),
    "left upper lobe pneumonia": ("Pneumonia", [(0.7, 0.3, 0.22, 0.18)]),
    "left apical pneumothorax": ("Pneumothorax", [(0.72, 0.14, 0.26, 0.14)]),
}
_SYNTHETIC_SIZES = ((96, 80), (80, 64), (88, 88))  # (height, width): X-rays are rarely square
_SPLITS = (("train", 0.7), ("val", 0.85), ("test", 1.0))  # each split up to this fraction of the images


def _synthetic_image(rng: np.random.Generator, height: int, width: int, boxes: list[tuple[float, ...]]) -> Image.Image:
    """A gray chest-like image with a bright rectangle per region (pixel corners)."""
    y, x = np.mgrid[0:height, 0:width]
    lungs = 0.3 + 0.2 * np.exp(-(((x / width - 0.3) ** 2) / 0.02 + ((y / height - 0.5) ** 2) / 0.08))
    lungs += 0.2 * np.exp(-(((x / width - 0.7) ** 2) / 0.02 + ((y / height - 0.5) ** 2) / 0.08))
    for x0, y0, x1, y1 in boxes:
        lungs[round(y0) : round(y1), round(x0) : round(x1)] = 0.95
    image = np.clip(lungs + rng.normal(0, 0.02, lungs.shape), 0, 1)
    return Image.fromarray((image * 255).astype(np.uint8))


def write_synthetic_ms_cxr(root: str | Path, num_images: int = 40, seed: int = 0) -> Path:
    """Writes a small MS-CXR look-alike (the same table and columns; JPEG images in MIMIC-CXR-JPG's folders) under
    `root`: `num_images` images, the first 70% `train`, then 15% `val` and `test`, each with one or two findings drawn
    as bright boxes where their phrase says (a few pixels apart from image to image) and a row per box of each
    phrase. `root` must be new or empty; the release is renamed into place when complete."""

    def write(staging: Path) -> None:
        rng, picker = np.random.default_rng(seed), random.Random(seed)
        rows = []
        for index in range(num_images):
            split = next(name for name, upto in _SPLITS if index < upto * num_images)
            subject, study = 10000000 + index * 1013, 50000000 + index
            dicom_id = hashlib.md5(f"ms-cxr-{seed}-{index}".encode()).hexdigest()
            relative = f"files/p{str(subject)[:2]}/p{subject}/s{study}/{dicom_id}.jpg"
            height, width = picker.choice(_SYNTHETIC_SIZES)
            drawn = []
            for phrase in picker.sample(sorted(_SYNTHETIC_PHRASES), picker.randint(1, 2)):
                category, regions = _SYNTHETIC_PHRASES[phrase]
                for cx, cy, w, h in regions:
                    x0 = round((cx - w / 2) * width + picker.uniform(-2, 2))
                    y0 = round((cy - h / 2) * height + picker.uniform(-2, 2))
                    box = (max(x0, 0), max(y0, 0), round(w * width), round(h * height))
                    box = (*box[:2], min(box[2], width - box[0]), min(box[3], height - box[1]))
                    drawn.append((box[0], box[1], box[0] + box[2], box[1] + box[3]))
                    rows.append(dict(dicom_id=dicom_id, category_name=category, label_text=phrase, path=relative,
                                     x=box[0], y=box[1], w=box[2], h=box[3], image_width=width, image_height=height,
                                     split=split))  # fmt: skip
            (staging / relative).parent.mkdir(parents=True)
            _synthetic_image(rng, height, width, drawn).save(staging / relative, quality=95)
        with open(staging / TABLE, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    return write_release(root, write)


__all__ = ["COLUMNS", "TABLE", "load_ms_cxr", "write_synthetic_ms_cxr"]
