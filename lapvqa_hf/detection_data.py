"""VinDr-CXR abnormality boxes as `datasets` datasets, for the detection heads; a synthetic release in its layout.

A release folder holds one annotation table per split, `annotations/annotations_train.csv` and
`annotations/annotations_test.csv` (PhysioNet's layout; `train.csv` / `test.csv` at the top, as the Kaggle
competition's, are read too), and the images `train/{image_id}.dicom` and `test/{image_id}.dicom` (`.dcm`, `.png`
and `.jpg` are found as well). A table holds one row per box and radiologist: `image_id, class_name, x_min, y_min,
x_max, y_max, rad_id` (in any order; other columns are ignored; `rad_id` may be absent where one reader labelled
every image). Boxes are in pixels of the image file; a radiologist who found nothing writes one `No finding` row
with empty coordinates. Each training image was read by 3 of 17 radiologists, each test image by a consensus of 5
(one set of boxes). VinDr-CXR is credentialed (PhysioNet): `write_synthetic_vindr_cxr` writes a stand-in in this
layout.

Boxes are normalised by each image's size, read from its header (a DICOM's `Rows` / `Columns`, a PNG's or JPEG's
size turned as its EXIF orientation says: the image as `LapvqaImageProcessor` reads it), so a resized copy of the
images needs its table rescaled too. The radiologists' boxes of an image are combined by `radiologists`:
`"fused"` (default) merges the boxes of one class drawn by different radiologists that overlap at IoU >=
`FUSION_IOU` into one, their mean, as weighted boxes fusion does with equal confidences (a finding drawn by one
radiologist only is kept); `"all"` keeps every radiologist's box as a box of its own.
"""

import csv
import hashlib
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from datasets import Dataset, DatasetDict, Features, List, Value
from PIL import ExifTags, Image

from .data import DataError, _read_csv, write_release
from .messages import first_line
from .models.configuration_lapvqa_detection import VINDR_CXR_CLASSES
from .models.xray_reading import DICOM_SUFFIXES, has_dicom_preamble

ANNOTATION_COLUMNS = ("image_id", "class_name", "x_min", "y_min", "x_max", "y_max")  # and `rad_id`, if present
NO_FINDING = "No finding"
IMAGE_SUFFIXES = (".dicom", ".dcm", ".png", ".jpg", ".jpeg")
RADIOLOGISTS = ("fused", "all")  # how the radiologists' boxes of one image are combined
FUSION_IOU = 0.4  # boxes of one class by different radiologists overlapping this much are one finding
VALIDATION_FRACTION = 0.1  # of the training images, held out for validation (VinDr-CXR has no validation split)
SPLIT_TABLES = {"train": "train", "test": "test"}  # release split -> image folder
FEATURES = Features(
    {
        "image_id": Value("string"),
        "image": Value("string"),
        "height": Value("int64"),
        "width": Value("int64"),
        "class_labels": List(Value("int64")),
        "boxes": List(List(Value("float64"), length=4)),
    }
)


def _annotation_table(root: Path, split: str) -> Path | None:
    for path in (root / "annotations" / f"annotations_{split}.csv", root / f"{split}.csv"):
        if path.is_file():
            return path
    return None


def image_file(folder: Path, image_id: str) -> Path:
    """The image `folder/{image_id}` with the first of `IMAGE_SUFFIXES` that exists."""
    for suffix in IMAGE_SUFFIXES:
        path = folder / f"{image_id}{suffix}"
        if path.is_file():
            return path
    raise DataError(f"{folder}: no image of image_id {image_id!r} (looked for {', '.join(IMAGE_SUFFIXES)}).")


def image_size(path: Path) -> tuple[int, int]:
    """`(height, width)` of an image file as `LapvqaImageProcessor` reads it, from its header only."""
    try:
        if path.suffix.lower() in DICOM_SUFFIXES or has_dicom_preamble(path):
            try:
                import pydicom
            except ImportError:
                raise ImportError("Reading DICOM needs pydicom: pip install 'lapvqa-hf[dicom]'.") from None
            dataset = pydicom.dcmread(path, stop_before_pixels=True)
            return int(dataset.Rows), int(dataset.Columns)
        with Image.open(path) as image:
            width, height = image.size
            turned = image.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)  # a quarter turn
        return (width, height) if turned else (height, width)
    except ImportError:
        raise
    except Exception as error:  # pydicom and Pillow raise many types for broken files
        raise DataError(f"{path}: cannot read the image's size: {first_line(error)}") from None


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    intersection = width * height
    return intersection / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - intersection)


def fuse_radiologists(
    boxes: list[tuple[str, int, tuple[float, float, float, float]]], iou_threshold: float = FUSION_IOU
) -> list[tuple[int, tuple[float, ...]]]:
    """`(radiologist, class id, (x0, y0, x1, y1))` boxes of one image -> `(class id, box)` findings: each box joins
    the finding of its class, not yet drawn by its radiologist, whose mean box it overlaps most at IoU >=
    `iou_threshold`, else starts one; a finding's box is the mean of its boxes. Boxes are taken in the given order."""
    findings: list[tuple[int, set[str], list[tuple[float, ...]]]] = []
    for radiologist, label, box in boxes:
        best, best_iou = None, iou_threshold
        for finding in findings:
            if finding[0] != label or radiologist in finding[1]:
                continue
            overlap = _iou(np.mean(finding[2], axis=0), box)
            if overlap >= best_iou and (best is None or overlap > best_iou):
                best, best_iou = finding, overlap
        if best is None:
            findings.append((label, {radiologist}, [box]))
        else:
            best[1].add(radiologist)
            best[2].append(box)
    return [(label, tuple(float(v) for v in np.mean(members, axis=0))) for label, _, members in findings]


def _normalised(box: tuple[float, ...], height: int, width: int) -> list[float]:
    """Pixel (x0, y0, x1, y1), clipped to the image -> (cx, cy, w, h) in [0, 1]."""
    x0, x1 = (min(max(v, 0.0), width) for v in (box[0], box[2]))
    y0, y1 = (min(max(v, 0.0), height) for v in (box[1], box[3]))
    return [(x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height]


def _read_split(root: Path, table: Path, folder: str, classes: Sequence[str], radiologists: str) -> dict[str, list]:
    """One annotation table as dataset columns, an image per row (in the table's order)."""
    index = {name: position for position, name in enumerate(classes)}
    images: dict[str, list[tuple[str, int, tuple[float, ...]]]] = {}
    for line, row in enumerate(_read_csv(table, ANNOTATION_COLUMNS), start=2):
        boxes = images.setdefault(row["image_id"], [])
        if row["class_name"] == NO_FINDING or row["class_name"] not in index:
            continue  # no box; a class the model does not have (VinDr-CXR's rarer local labels) is left out
        try:
            box = tuple(float(row[key]) for key in ("x_min", "y_min", "x_max", "y_max"))
        except ValueError:
            raise DataError(
                f"{table}, line {line}: a {row['class_name']} box needs numeric x_min, y_min, x_max, y_max, got "
                f"{[row[key] for key in ('x_min', 'y_min', 'x_max', 'y_max')]}."
            ) from None
        if not (np.isfinite(box).all() and box[0] < box[2] and box[1] < box[3]):
            raise DataError(f"{table}, line {line}: expected x_min < x_max and y_min < y_max, got {list(box)}.")
        boxes.append((row.get("rad_id") or "", index[row["class_name"]], box))
    columns: dict[str, list] = {name: [] for name in FEATURES}
    for image_id, boxes in images.items():
        path = image_file(root / folder, image_id)
        height, width = image_size(path)
        findings = [(label, box) for _, label, box in boxes] if radiologists == "all" else fuse_radiologists(boxes)
        columns["image_id"].append(image_id)
        columns["image"].append(str(path))
        columns["height"].append(height)
        columns["width"].append(width)
        columns["class_labels"].append([label for label, _ in findings])
        columns["boxes"].append([_normalised(box, height, width) for _, box in findings])
    return columns


def _held_out(image_ids: list[str], fraction: float) -> set[str]:
    """The `round(fraction * n)` image ids first by sha256: a validation split that depends on the ids alone."""
    ranked = sorted(image_ids, key=lambda image_id: hashlib.sha256(image_id.encode()).hexdigest())
    return set(ranked[: round(fraction * len(image_ids))])


def load_vindr_cxr(
    root: str | Path,
    radiologists: str = "fused",
    classes: Sequence[str] = VINDR_CXR_CLASSES,
    validation_fraction: float = VALIDATION_FRACTION,
) -> DatasetDict:
    """A VinDr-CXR release (see the module docstring) as `train`, `validation` and `test` datasets, an image per row.

    Columns: `image_id`, `image` (its path), `height`, `width`, `class_labels` (ids into `classes`) and `boxes`
    ((cx, cy, w, h) normalised to [0, 1] by the image size, transformers' DETR convention), the radiologists'
    boxes combined by `radiologists` (`"fused"` or `"all"`). `No finding` images have no boxes. `validation` holds
    `validation_fraction` of the training table's images, chosen by the hash of their id; `test` is the test table's
    (absent when the release has none).
    """
    root = Path(root)
    if radiologists not in RADIOLOGISTS:
        raise ValueError(f"radiologists must be one of {RADIOLOGISTS}, got {radiologists!r}.")
    tables = {split: _annotation_table(root, split) for split in SPLIT_TABLES}
    if tables["train"] is None:
        raise DataError(
            f"{root}: no annotations/annotations_train.csv (nor train.csv); expected a VinDr-CXR release's folder."
        )
    columns = {
        split: _read_split(root, table, SPLIT_TABLES[split], classes, radiologists)
        for split, table in tables.items()
        if table is not None
    }
    held_out = _held_out(columns["train"]["image_id"], validation_fraction)
    rows = columns.pop("train")
    for split, keep in (("train", False), ("validation", True)):
        chosen = [index for index, image_id in enumerate(rows["image_id"]) if (image_id in held_out) == keep]
        columns[split] = {name: [values[index] for index in chosen] for name, values in rows.items()}
    splits = {split: Dataset.from_dict(data, features=FEATURES) for split, data in columns.items()}
    return DatasetDict({split: splits[split] for split in ("train", "validation", "test") if split in splits})


# --- a synthetic release ----------------------------------------------------------------------------------------

# Findings of the synthetic images: a bright box where each class's finding lies (cx, cy, w, h, normalised).
_SYNTHETIC_FINDINGS = {
    "Cardiomegaly": [(0.5, 0.62, 0.5, 0.3)],
    "Pleural effusion": [(0.25, 0.86, 0.34, 0.2), (0.75, 0.86, 0.34, 0.2)],  # the patient's right, then left
    "Nodule/Mass": [(0.3, 0.3, 0.14, 0.12), (0.7, 0.3, 0.14, 0.12), (0.3, 0.5, 0.14, 0.12), (0.7, 0.5, 0.14, 0.12)],
}
_SYNTHETIC_SIZES = ((96, 80), (80, 64), (88, 88))  # (height, width): X-rays are rarely square
_TABLE_COLUMNS = ("image_id", "class_name", "x_min", "y_min", "x_max", "y_max", "rad_id")


def _synthetic_image(rng: np.random.Generator, height: int, width: int, boxes: list[tuple[float, ...]]) -> Image.Image:
    """A gray chest-like image with a bright rectangle per finding (pixel boxes)."""
    y, x = np.mgrid[0:height, 0:width]
    lungs = 0.3 + 0.2 * np.exp(-(((x / width - 0.3) ** 2) / 0.02 + ((y / height - 0.5) ** 2) / 0.08))
    lungs += 0.2 * np.exp(-(((x / width - 0.7) ** 2) / 0.02 + ((y / height - 0.5) ** 2) / 0.08))
    for x0, y0, x1, y1 in boxes:
        lungs[round(y0) : round(y1), round(x0) : round(x1)] = 0.95
    image = np.clip(lungs + rng.normal(0, 0.02, lungs.shape), 0, 1)
    return Image.fromarray((image * 255).astype(np.uint8))


def _synthetic_split(
    root: Path, folder: str, count: int, readers_per_image: int, rng: np.random.Generator, picker: random.Random
) -> list[dict]:
    """Writes `count` images into `root/folder` and returns their annotation rows."""
    (root / folder).mkdir()
    rows = []
    for index in range(count):
        image_id = hashlib.md5(f"{folder}-{index}-{picker.random()}".encode()).hexdigest()
        height, width = picker.choice(_SYNTHETIC_SIZES)
        findings = []
        if picker.random() > 0.25:  # a quarter of the images: no finding
            for name in picker.sample(sorted(_SYNTHETIC_FINDINGS), picker.randint(1, 2)):
                cx, cy, w, h = picker.choice(_SYNTHETIC_FINDINGS[name])
                findings.append((name, ((cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width,
                                        (cy + h / 2) * height)))  # fmt: skip
        _synthetic_image(rng, height, width, [box for _, box in findings]).save(root / folder / f"{image_id}.png")
        readers = picker.sample([f"R{number}" for number in range(1, 18)], readers_per_image)
        for reader in readers:
            # Each radiologist draws each finding a little differently, and the second of three misses some.
            drawn = [
                (name, [value + picker.uniform(-1.5, 1.5) for value in box])
                for name, box in findings
                if readers_per_image == 1 or reader != readers[1] or picker.random() > 0.3
            ]
            for name, box in drawn:
                x0, y0, x1, y1 = (
                    round(min(max(v, 0), limit), 1) for v, limit in zip(box, (width, height) * 2, strict=True)
                )
                rows.append(dict(image_id=image_id, class_name=name, x_min=x0, y_min=y0, x_max=x1, y_max=y1,
                                 rad_id=reader))  # fmt: skip
            if not drawn:
                rows.append(dict(image_id=image_id, class_name=NO_FINDING, x_min="", y_min="", x_max="", y_max="",
                                 rad_id=reader))  # fmt: skip
    return rows


def write_synthetic_vindr_cxr(root: str | Path, num_images: int = 40, seed: int = 0) -> Path:
    """Writes a small VinDr-CXR look-alike (the same tables, columns and folders; PNG images) under `root`.

    `num_images` training images, each read by 3 radiologists who draw its findings (Cardiomegaly, Pleural effusion
    and Nodule/Mass as bright boxes at their places; a quarter of the images have none) a pixel or two apart, one of
    them missing some; and a quarter as many test images, read once (as the consensus). `root` must be new or empty;
    the release is renamed into place when complete.
    """

    def write(staging: Path) -> None:
        rng, picker = np.random.default_rng(seed), random.Random(seed)
        (staging / "annotations").mkdir()
        for split, count, readers in (("train", num_images, 3), ("test", max(1, num_images // 4), 1)):
            rows = _synthetic_split(staging, split, count, readers, rng, picker)
            with open(staging / "annotations" / f"annotations_{split}.csv", "w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=_TABLE_COLUMNS)
                writer.writeheader()
                writer.writerows(rows)

    return write_release(root, write)


__all__ = [
    "FUSION_IOU",
    "RADIOLOGISTS",
    "fuse_radiologists",
    "image_size",
    "load_vindr_cxr",
    "write_synthetic_vindr_cxr",
]
