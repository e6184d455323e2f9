"""NIH ChestX-ray14 and CheXpert as image-level labels for linear probes (`lapvqa probe`); synthetic releases in
their published layouts.

NIH ChestX-ray14 (`nih-cxr14`): `Data_Entry_2017.csv` (`Image Index`, `Finding Labels`: labels joined by `|`, or
`No Finding`; the 2020 re-release's `Data_Entry_2017_v2020.csv` is read too), the official split lists
`train_val_list.txt` and `test_list.txt` (an image file name a line) and the PNG images under `images/` or the
release's `images_001/images/` ... `images_012/images/` (any file under a folder `images*` is found by its name).
The probe fits on `train_val_list.txt` and scores on `test_list.txt`, over the 14 labels.

CheXpert (`chexpert`, the v1.0-small layout): `train.csv` and `valid.csv`, whose `Path` column (such as
`CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg`) is read relative to the parent of the root, or the
root itself, or, where the folder was renamed, the root with the path's first folder dropped (whichever holds the
table's first image). The probe fits on `train.csv` and scores on `valid.csv` (CheXpert's test set is not public),
over the 5 competition labels, every image (frontal and lateral) an example. A label is 1.0 (positive), 0.0
(negative), -1.0 (uncertain) or blank (not mentioned in the report): blanks are negatives (the common convention),
uncertain labels follow a policy (`UNCERTAIN_POLICIES`).

Both datasets are credentialed or large downloads: `write_synthetic_probe_release` writes a small stand-in of either.
"""

import csv
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .data import DataError, _read_csv, write_release

NIH_LABELS = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NIH_NO_FINDING = "No Finding"
NIH_TABLES = ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv")  # the 2017 release's, the 2020 re-release's
NIH_SPLITS = {"train": "train_val_list.txt", "test": "test_list.txt"}
NIH_COLUMNS = (
    "Image Index",
    "Finding Labels",
    "Follow-up #",
    "Patient ID",
    "Patient Age",
    "Patient Gender",
    "View Position",
    "OriginalImage[Width",
    "Height]",
    "OriginalImagePixelSpacing[x",
    "y]",
)

CHEXPERT_LABELS = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
CHEXPERT_COMPETITION_LABELS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
CHEXPERT_SPLITS = {"train": "train.csv", "test": "valid.csv"}
CHEXPERT_FOLDER = "CheXpert-v1.0-small"
CHEXPERT_COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS)
# What an uncertain (-1.0) CheXpert label becomes: NaN leaves the image out of that label's fit and score.
UNCERTAIN_POLICIES = {"ignore": float("nan"), "ones": 1.0, "zeros": 0.0}
UNCERTAIN_MEANINGS = {
    "ignore": "uncertain (-1) labels are left out of that label's fit and score",
    "ones": "uncertain (-1) labels are positives (U-Ones)",
    "zeros": "uncertain (-1) labels are negatives (U-Zeros)",
}
BLANK_LABELS = "blank labels (not mentioned in the report) are negatives"

DATASET_NAMES = {"nih-cxr14": "NIH ChestX-ray14", "chexpert": "CheXpert (v1.0-small)"}
PROBE_LABELS = {"nih-cxr14": NIH_LABELS, "chexpert": CHEXPERT_COMPETITION_LABELS}
SPLIT_SOURCES = {"nih-cxr14": NIH_SPLITS, "chexpert": CHEXPERT_SPLITS}


@dataclass(frozen=True)
class ProbeSplit:
    """One official split: its image files and their labels, `[images, labels]` of 1.0, 0.0 or NaN (left out)."""

    source: str  # the list or table it was read from
    images: list[str]
    labels: np.ndarray


def _first_names(names: list[str], count: int = 3) -> str:
    more = f" and {len(names) - count} more" if len(names) > count else ""
    return ", ".join(names[:count]) + more


def _found_in(root: Path) -> str:
    """What a folder holds, for messages: its first entries."""
    if not root.is_dir():
        return "no such folder"
    names = sorted(path.name + ("/" if path.is_dir() else "") for path in root.iterdir())
    return _first_names(names, 6) if names else "an empty folder"


def _require_file(root: Path, names: tuple[str, ...], release: str, expected: str) -> Path:
    """The first of `names` in `root`, or a one-line DataError saying what the release holds and what was found."""
    for name in names:
        if (root / name).is_file():
            return root / name
    raise DataError(f"{root}: no {names[0]}; expected {release} ({expected}), found {_found_in(root)}.")


def _check_images(paths: list[str], names: list[str], listed_in: Path, where: str) -> None:
    """Every listed image (`names`, as the list writes them) must be a file (`paths`)."""
    missing = [name for name, path in zip(names, paths, strict=True) if not Path(path).is_file()]
    if missing:
        raise DataError(
            f"{len(missing)} of the {len(paths)} images listed in {listed_in} are missing (expected under {where}): "
            f"{_first_names(missing)}."
        )


def _read_list(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def load_nih_cxr14(root: str | Path, max_images: int | None = None) -> dict[str, ProbeSplit]:
    """NIH ChestX-ray14's official `train` (`train_val_list.txt`) and `test` (`test_list.txt`) splits, labelled
    with its 14 labels (see the module docstring); `max_images` keeps the first images of each list."""
    root = Path(root)
    expected = "Data_Entry_2017.csv, train_val_list.txt, test_list.txt and images*/"
    table = _require_file(root, NIH_TABLES, "an NIH ChestX-ray14 release", expected)
    lists = {split: _require_file(root, (name,), "an NIH ChestX-ray14 release", expected)
             for split, name in NIH_SPLITS.items()}  # fmt: skip
    labels_of: dict[str, np.ndarray] = {}
    for line, row in enumerate(_read_csv(table, ("Image Index", "Finding Labels")), start=2):
        findings = [name.strip() for name in row["Finding Labels"].split("|") if name.strip()]
        unknown = [name for name in findings if name not in (*NIH_LABELS, NIH_NO_FINDING)]
        if unknown or not findings:
            raise DataError(
                f"{table}, line {line}: Finding Labels {row['Finding Labels']!r}; expected {NIH_NO_FINDING!r} or "
                f"labels among {list(NIH_LABELS)} joined by '|'."
            )
        labels_of[row["Image Index"]] = np.array([float(name in findings) for name in NIH_LABELS])
    files: dict[str, Path] = {}
    for folder in sorted(path for path in root.glob("images*") if path.is_dir()):
        for path in sorted(folder.rglob("*")):
            files.setdefault(path.name, path)
    names = {split: _read_list(path)[:max_images] for split, path in lists.items()}
    both = sorted(set(names["train"]) & set(names["test"]))
    if both:
        raise DataError(f"{len(both)} images are in both {lists['train']} and {lists['test']}: {_first_names(both)}.")
    splits = {}
    for split, listed in names.items():
        unlabelled = [name for name in listed if name not in labels_of]
        if unlabelled:
            raise DataError(
                f"{len(unlabelled)} of the {len(listed)} images listed in {lists[split]} have no row in {table}: "
                f"{_first_names(unlabelled)}."
            )
        paths = [str(files.get(name, root / "images" / name)) for name in listed]
        _check_images(paths, listed, lists[split], f"{root}/images*/")
        labels = np.stack([labels_of[name] for name in listed]) if listed else np.zeros((0, len(NIH_LABELS)))
        splits[split] = ProbeSplit(lists[split].name, paths, labels)
    return splits


def _chexpert_locator(root: Path, first: str) -> Callable[[str], Path]:
    """How the table's `Path`s are found: under the root's parent, the root, or the root with the path's first
    folder dropped (a renamed release folder); the first that holds `first`, else the first."""
    rules = (
        lambda path: root.parent / path,
        lambda path: root / path,
        lambda path: root.joinpath(*Path(path).parts[1:]),
    )
    return next((rule for rule in rules if rule(first).is_file()), rules[0])


def chexpert_label(value: str, uncertain: str) -> float:
    """A CheXpert label cell as the probe takes it: 1.0, 0.0 or blank (negative), -1.0 by the `uncertain` policy."""
    number = float(value) if value.strip() else 0.0
    if number == -1.0:
        return UNCERTAIN_POLICIES[uncertain]
    if number not in (0.0, 1.0):
        raise ValueError(value)
    return number


def load_chexpert(root: str | Path, uncertain: str = "ignore", max_images: int | None = None) -> dict[str, ProbeSplit]:
    """CheXpert's `train` (`train.csv`) and `test` (`valid.csv`) splits, labelled with the 5 competition labels,
    uncertain labels by the `uncertain` policy (see the module docstring); `max_images` keeps each table's first."""
    if uncertain not in UNCERTAIN_POLICIES:
        raise ValueError(f"uncertain must be one of {list(UNCERTAIN_POLICIES)}, got {uncertain!r}.")
    root = Path(root)
    splits = {}
    for split, name in CHEXPERT_SPLITS.items():
        table = _require_file(root, (name,), f"a {CHEXPERT_FOLDER} release", "train.csv, valid.csv, train/, valid/")
        rows = _read_csv(table, ("Path", *CHEXPERT_COMPETITION_LABELS))[:max_images]
        labels = np.zeros((len(rows), len(CHEXPERT_COMPETITION_LABELS)))
        for index, row in enumerate(rows):
            for column, label in enumerate(CHEXPERT_COMPETITION_LABELS):
                try:
                    labels[index, column] = chexpert_label(row[label], uncertain)
                except ValueError:
                    raise DataError(
                        f"{table}, line {index + 2}: {label} is {row[label]!r}; expected 1.0, 0.0, -1.0 or blank."
                    ) from None
        locate = _chexpert_locator(root, rows[0]["Path"]) if rows else None
        paths = [str(locate(row["Path"])) for row in rows]
        _check_images(paths, [row["Path"] for row in rows], table, f"{root.parent} or {root}")
        splits[split] = ProbeSplit(name, paths, labels)
    return splits


def load_probe_dataset(
    dataset: str, root: str | Path, uncertain: str = "ignore", max_images: int | None = None
) -> dict[str, ProbeSplit]:
    """`{"train": ..., "test": ...}` of `dataset` (`nih-cxr14` or `chexpert`), labelled with `PROBE_LABELS[dataset]`."""
    if dataset not in DATASET_NAMES:
        raise ValueError(f"dataset must be one of {list(DATASET_NAMES)}, got {dataset!r}.")
    splits = load_nih_cxr14(root, max_images) if dataset == "nih-cxr14" else load_chexpert(root, uncertain, max_images)
    for split in splits.values():
        if not split.images:
            raise DataError(f"{Path(root) / split.source} lists no images; expected the split's images.")
    return splits


# --- synthetic releases -----------------------------------------------------------------------------------------


def _synthetic_xray(rng: np.random.Generator, height: int, width: int, findings: dict[int, float]) -> Image.Image:
    """A gray chest-like image with a bright blob per finding `{label index: brightness}`, each label at its own
    place of a 4 x 4 grid: what a probe of even a random encoder can pick up."""
    y, x = np.mgrid[0:height, 0:width]
    image = 0.3 + 0.2 * np.exp(-(((x / width - 0.3) ** 2) / 0.02 + ((y / height - 0.5) ** 2) / 0.08))
    image += 0.2 * np.exp(-(((x / width - 0.7) ** 2) / 0.02 + ((y / height - 0.5) ** 2) / 0.08))
    for label, brightness in findings.items():
        cx, cy = (label % 4 + 0.5) / 4, (label // 4 + 0.5) / 4
        image = np.where((x / width - cx) ** 2 + (y / height - cy) ** 2 < 0.1**2, brightness, image)
    image = np.clip(image + rng.normal(0, 0.02, image.shape), 0, 1)
    return Image.fromarray((image * 255).astype(np.uint8), mode="L")


def _with_both_classes(table: list[list[str]], picker: random.Random, positive: str, negatives: tuple[str, ...]):
    """Gives each column of `table` (images x labels) a positive and a negative, where it has two rows or more."""
    if len(table) < 2:
        return
    for column in range(len(table[0])):
        if all(row[column] != positive for row in table):
            picker.choice(table)[column] = positive
        if all(row[column] not in negatives for row in table):
            others = [row for row in table if row[column] != positive] or table
            picker.choice(others)[column] = negatives[0]


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[dict]) -> None:
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _write_nih(root: Path, num_patients: int, seed: int) -> None:
    rng, picker = np.random.default_rng(seed), random.Random(seed)
    images = {"train": [], "test": []}  # (file name, the patient's Follow-up #, ID, age and sex) per image
    for patient in range(1, num_patients + 1):
        split = "test" if patient > round(0.7 * num_patients) else "train"
        age, sex = picker.randint(20, 80), picker.choice("MF")
        images[split] += [(f"{patient:08d}_{follow_up:03d}.png", follow_up, patient, age + follow_up, sex)
                          for follow_up in range(picker.randint(1, 3))]  # fmt: skip
    entries = []
    for split, split_images in images.items():
        table = [["1" if picker.random() < 0.3 else "0" for _ in NIH_LABELS] for _ in split_images]
        _with_both_classes(table, picker, "1", ("0",))
        for (name, follow_up, patient, age, sex), values in zip(split_images, table, strict=True):
            folder = root / f"images_{1 + (patient - 1) * 2 // num_patients:03d}" / "images"  # two, as the release's 12
            folder.mkdir(parents=True, exist_ok=True)
            findings = {label: 0.95 for label, value in enumerate(values) if value == "1"}
            _synthetic_xray(rng, 64, 64, findings).save(folder / name)
            finding_labels = "|".join(NIH_LABELS[label] for label in findings) or NIH_NO_FINDING
            view = picker.choice(("PA", "AP"))
            cells = (name, finding_labels, follow_up, patient, age, sex, view, 64, 64, 0.143, 0.143)  # size, spacing
            entries.append(dict(zip(NIH_COLUMNS, cells, strict=True)))
        (root / NIH_SPLITS[split]).write_text("".join(f"{name}\n" for name, *_ in split_images))
    _write_csv(root / NIH_TABLES[0], NIH_COLUMNS, sorted(entries, key=lambda entry: entry["Image Index"]))


def _write_chexpert(root: Path, num_patients: int, seed: int) -> None:
    rng, picker = np.random.default_rng(seed), random.Random(seed)
    patients = {"train": range(1, num_patients + 1), "valid": range(64541, 64541 + max(2, num_patients // 2))}
    labels = CHEXPERT_LABELS[1:]  # "No Finding" follows from them
    for split, numbers in patients.items():
        views = []  # (relative path, the patient's sex and age, view) per image
        for patient in numbers:
            sex, age = picker.choice(("Male", "Female")), picker.randint(20, 80)
            for study in range(1, (picker.randint(1, 2) if split == "train" else 1) + 1):
                folder = f"{split}/patient{patient:05d}/study{study}"
                views.append((f"{folder}/view1_frontal.jpg", sex, age + study, "Frontal", picker.choice(("AP", "PA"))))
                if picker.random() < 0.4:
                    views.append((f"{folder}/view2_lateral.jpg", sex, age + study, "Lateral", ""))
        if split == "train":  # positive, negative, uncertain, or not mentioned (blank)
            states = [picker.choices(["1.0", "0.0", "-1.0", ""], weights=[3, 2, 1, 4], k=len(labels)) for _ in views]
        else:  # the validation set's labels are the radiologists' consensus: never uncertain or blank
            states = [["1.0" if picker.random() < 0.3 else "0.0" for _ in labels] for _ in views]
        _with_both_classes(states, picker, "1.0", ("0.0", ""))
        rows = []
        for (path, *demographics_and_view), values in zip(views, states, strict=True):
            findings = {label: {"1.0": 0.95, "-1.0": 0.7}[value] for label, value in enumerate(values)
                        if value in ("1.0", "-1.0")}  # fmt: skip
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            _synthetic_xray(rng, 72, 64, findings).save(root / path, quality=95)
            no_finding = "1.0" if "1.0" not in values else ("0.0" if split == "valid" else "")
            cells = (f"{CHEXPERT_FOLDER}/{path}", *demographics_and_view, no_finding, *values)
            rows.append(dict(zip(CHEXPERT_COLUMNS, cells, strict=True)))
        _write_csv(root / f"{split}.csv", CHEXPERT_COLUMNS, rows)


def write_synthetic_probe_release(dataset: str, root: str | Path, num_patients: int = 12, seed: int = 0) -> Path:
    """Writes a small NIH ChestX-ray14 (`nih-cxr14`) or CheXpert v1.0-small (`chexpert`) look-alike under `root`:
    the same tables, lists, columns and folders, grayscale PNG (NIH) or JPEG (CheXpert) images with a bright blob at
    each positive label's own place (fainter for an uncertain one), seeded.

    NIH: `num_patients` patients of 1-3 images each, the last 30% of them in `test_list.txt`, images in
    `images_001/images/` and `images_002/images/`. CheXpert: `num_patients` training patients of 1-2 studies, half
    as many (at least 2) validation patients of one study, each study a frontal and sometimes a lateral image, paths
    `CheXpert-v1.0-small/...` as in the release. Every label has a positive and a negative in each split that has
    two images or more. `root` must be new or empty; the release is renamed into place when complete.
    """
    writers = {"nih-cxr14": _write_nih, "chexpert": _write_chexpert}
    if dataset not in writers:
        raise ValueError(f"dataset must be one of {list(writers)}, got {dataset!r}.")
    return write_release(root, lambda staging: writers[dataset](staging, num_patients, seed))


__all__ = [
    "BLANK_LABELS",
    "CHEXPERT_COMPETITION_LABELS",
    "DATASET_NAMES",
    "NIH_LABELS",
    "PROBE_LABELS",
    "SPLIT_SOURCES",
    "UNCERTAIN_MEANINGS",
    "UNCERTAIN_POLICIES",
    "ProbeSplit",
    "chexpert_label",
    "load_chexpert",
    "load_nih_cxr14",
    "load_probe_dataset",
    "write_synthetic_probe_release",
]
