"""MIMIC-Diff-VQA and MIMIC-CXR reports (and plain files of the same data) as `datasets` datasets; a synthetic release.

MIMIC-Diff-VQA's question table (`mimic_pair_questions.csv`) holds one row per question about a pair of studies:
`study_id` (the current study), `subject_id`, `ref_id` (the reference, i.e. prior, study), `question_type`,
`question`, `answer`, `split` (`train` / `val` / `test`). Images come from MIMIC-CXR-JPG
(`files/p{first two digits}/p{subject_id}/s{study_id}/{dicom_id}.jpg`); its metadata table
(`mimic-cxr-2.0.0-metadata.csv`) gives each image's `ViewPosition`, from which one frontal image per study is
chosen (PA before AP, then the smallest `dicom_id`, so the choice is reproducible), and its split table
(`mimic-cxr-2.0.0-split.csv`) each image's split (`train` / `validate` / `test`). MIMIC-CXR's free-text reports
lie next to the study folders (`files/p{..}/p{subject_id}/s{study_id}.txt`). All are credentialed (PhysioNet):
`write_synthetic_mimic_diff_vqa` writes a small stand-in in exactly that layout.
"""

import csv
import gzip
import io
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from datasets import Dataset, DatasetDict
from PIL import Image

from .files import with_umask_permissions
from .tables import TableError, decode_text, read_table, text_problems

QUESTIONS_FILE = "mimic_pair_questions.csv"
METADATA_FILE = "mimic-cxr-2.0.0-metadata.csv"
SPLIT_FILE = "mimic-cxr-2.0.0-split.csv"
QUESTION_COLUMNS = ("study_id", "subject_id", "ref_id", "question_type", "question", "answer", "split")
METADATA_COLUMNS = ("dicom_id", "subject_id", "study_id", "ViewPosition", "Rows", "Columns", "StudyDate")
SPLIT_COLUMNS = ("dicom_id", "study_id", "subject_id", "split")
FRONTAL_VIEWS = ("PA", "AP")  # in order of preference
SPLIT_NAMES = {
    "train": "train",
    "val": "validation",
    "validate": "validation",
    "validation": "validation",
    "test": "test",
}
PAIR_COLUMNS = ("prior_image", "current_image", "question", "answer")
REPORT_COLUMNS = ("image", "report")
REPORT_SECTIONS = ("findings", "impression")  # the report text a captioning model learns, in this order


class DataError(ValueError):
    """A data file is missing columns or rows; the message names the file, the row and what was expected."""


def _read_csv(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    """Rows of `path`, or of `path.gz` as PhysioNet distributes the MIMIC-CXR-JPG tables."""
    compressed = path.with_name(path.name + ".gz")
    if not path.is_file() and compressed.is_file():
        path = compressed
    if not path.is_file():
        raise DataError(f"{path}: no such file.")
    with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as file:
        text = decode_text(file.read(), path)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = [c for c in required if c not in (reader.fieldnames or [])]
    if missing:
        raise DataError(f"{path}: missing columns {missing}; found {reader.fieldnames}.")
    try:
        return list(reader)
    except csv.Error as error:
        raise DataError(f"{path} line {reader.line_num}: not CSV ({error}).") from None


def image_path(subject_id: str, study_id: str, dicom_id: str) -> str:
    """MIMIC-CXR-JPG's relative path of one image."""
    return f"files/p{subject_id[:2]}/p{subject_id}/s{study_id}/{dicom_id}.jpg"


def report_path(subject_id: str, study_id: str) -> str:
    """MIMIC-CXR's relative path of one study's free-text report."""
    return f"files/p{subject_id[:2]}/p{subject_id}/s{study_id}.txt"


def frontal_images(metadata_csv: str | Path) -> dict[str, str]:
    """`study_id -> relative path` of each study's frontal image (PA preferred, then AP; smallest dicom_id)."""
    best: dict[str, tuple[int, str, str]] = {}
    for row in _read_csv(Path(metadata_csv), METADATA_COLUMNS):
        if row["ViewPosition"] not in FRONTAL_VIEWS:
            continue
        rank = (FRONTAL_VIEWS.index(row["ViewPosition"]), row["dicom_id"])
        candidate = (*rank, image_path(row["subject_id"], row["study_id"], row["dicom_id"]))
        if row["study_id"] not in best or candidate[:2] < best[row["study_id"]][:2]:
            best[row["study_id"]] = candidate
    return {study: choice[2] for study, choice in best.items()}


def load_mimic_diff_vqa(root: str | Path, image_root: str | Path | None = None) -> DatasetDict:
    """The release's question table joined with frontal MIMIC-CXR-JPG images, one `Dataset` per split.

    `root` holds `mimic_pair_questions.csv` and `mimic-cxr-2.0.0-metadata.csv`; `image_root` (default: `root`)
    holds `files/`. Questions whose current or reference study has no frontal image are dropped, as no image
    can be shown for them. Splits are named `train`, `validation` and `test`.
    """
    root = Path(root)
    image_root = Path(image_root) if image_root is not None else root
    frontal = frontal_images(root / METADATA_FILE)
    columns: dict[str, dict[str, list]] = {}
    for line, row in enumerate(_read_csv(root / QUESTIONS_FILE, QUESTION_COLUMNS), start=2):
        split = SPLIT_NAMES.get(row["split"])
        if split is None:
            raise DataError(f"{root / QUESTIONS_FILE}, line {line}: unknown split {row['split']!r}.")
        current, prior = frontal.get(row["study_id"]), frontal.get(row["ref_id"])
        if current is None or prior is None:
            continue
        target = columns.setdefault(
            split,
            {
                k: []
                for k in (
                    "subject_id",
                    "study_id",
                    "ref_study_id",
                    "question_type",
                    "question",
                    "answer",
                    "prior_image",
                    "current_image",
                )
            },
        )
        target["subject_id"].append(row["subject_id"])
        target["study_id"].append(row["study_id"])
        target["ref_study_id"].append(row["ref_id"])
        target["question_type"].append(row["question_type"])
        target["question"].append(row["question"])
        target["answer"].append(row["answer"])
        target["prior_image"].append(str(image_root / prior))
        target["current_image"].append(str(image_root / current))
    return DatasetDict({split: Dataset.from_dict(data) for split, data in sorted(columns.items())})


def _load_table(path: Path, required: tuple[str, ...], image_columns: tuple[str, ...], split: str) -> Dataset:
    """A CSV or JSON Lines file (read as `lapvqa_hf.tables` reads every user table) whose rows all hold the
    `required` columns as text; relative paths in `image_columns` resolved against its folder."""
    try:
        rows = read_table(path, required)
    except TableError as error:
        raise DataError(str(error)) from None
    for row in rows:
        problem = row.problem or text_problems(row.values, required)
        if problem:
            raise DataError(f"{path} line {row.line}: {problem}.")
    columns = list(dict.fromkeys(key for row in rows for key in row.values))
    records = [{column: row.values.get(column) for column in columns} for row in rows]
    for record in records:
        record.update({key: str((path.parent / record[key]).resolve()) for key in image_columns})
    return Dataset.from_list(records, split=split)


def load_pairs(path: str | Path, split: str = "train") -> Dataset:
    """A CSV or JSON Lines file of `prior_image, current_image, question, answer` (optional `question_type`).

    Relative image paths are resolved against the file's folder.
    """
    dataset = _load_table(Path(path), PAIR_COLUMNS, ("prior_image", "current_image"), split)
    if "question_type" not in dataset.column_names:
        dataset = dataset.add_column("question_type", ["unknown"] * len(dataset))
    return dataset


# --- radiology reports ------------------------------------------------------------------------------------------

# A section header of a MIMIC-CXR report: upper-case words and a colon at the start of a line ("FINDINGS:").
_SECTION_HEADER = re.compile(r"^[ \t]*([A-Z][A-Z &/,()-]*[A-Z)])[ \t]*:", re.MULTILINE)


def normalize_whitespace(text: str) -> str:
    return " ".join(text.split())


def report_sections(report: str) -> dict[str, str]:
    """The sections of a MIMIC-CXR free-text report: `{lower-case header: whitespace-normalised text}`.

    A header is an upper-case line start ending in a colon (`FINDINGS:`, `IMPRESSION:`, `WET READ:`); the text
    before the first header (`FINAL REPORT`) is no section. A header seen twice gets both texts, in order.
    """
    headers = list(_SECTION_HEADER.finditer(report))
    sections: dict[str, str] = {}
    for index, header in enumerate(headers):
        end = headers[index + 1].start() if index + 1 < len(headers) else len(report)
        name = normalize_whitespace(header.group(1)).lower()
        body = normalize_whitespace(report[header.end() : end])
        if body:
            sections[name] = f"{sections[name]} {body}" if name in sections else body
    return sections


def report_text(report: str, sections: tuple[str, ...] | list[str] = REPORT_SECTIONS) -> str:
    """The chosen sections of a report (default FINDINGS then IMPRESSION), joined by a space; "" if none is there."""
    found = report_sections(report)
    return " ".join(found[name.lower()] for name in sections if name.lower() in found)


def load_mimic_cxr_reports(
    root: str | Path,
    image_root: str | Path | None = None,
    report_root: str | Path | None = None,
    sections: tuple[str, ...] | list[str] = REPORT_SECTIONS,
) -> DatasetDict:
    """MIMIC-CXR reports joined with each study's frontal MIMIC-CXR-JPG image, one `Dataset` per split.

    `root` holds `mimic-cxr-2.0.0-metadata.csv` and `mimic-cxr-2.0.0-split.csv` (or their `.csv.gz`);
    `image_root` (default: `root`) holds the images under `files/`, `report_root` (default: `image_root`) the
    reports (`files/p{..}/p{subject_id}/s{study_id}.txt`). A report becomes the text of `sections` (default
    FINDINGS + IMPRESSION, whitespace-normalised, see `report_text`). Studies without a frontal image, without a
    report file or whose report has none of the sections are left out. The split is the split table's for the
    chosen image (`train`, `validation`, `test`). Columns: `subject_id`, `study_id`, `image`, `report`.
    """
    root = Path(root)
    image_root = Path(image_root) if image_root is not None else root
    report_root = Path(report_root) if report_root is not None else image_root
    split_of = {row["dicom_id"]: row for row in _read_csv(root / SPLIT_FILE, SPLIT_COLUMNS)}
    columns: dict[str, dict[str, list]] = {}
    for study, image in frontal_images(root / METADATA_FILE).items():
        entry = split_of.get(Path(image).stem)
        if entry is None:
            raise DataError(f"{root / SPLIT_FILE}: no split for image {Path(image).stem} (study {study}).")
        split = SPLIT_NAMES.get(entry["split"])
        if split is None:
            raise DataError(f"{root / SPLIT_FILE}: unknown split {entry['split']!r} of image {Path(image).stem}.")
        report_file = report_root / report_path(entry["subject_id"], study)
        if not report_file.is_file():
            continue
        text = report_text(report_file.read_text(), sections)
        if not text:
            continue
        target = columns.setdefault(split, {key: [] for key in ("subject_id", "study_id", "image", "report")})
        target["subject_id"].append(entry["subject_id"])
        target["study_id"].append(study)
        target["image"].append(str(image_root / image))
        target["report"].append(text)
    return DatasetDict({split: Dataset.from_dict(data) for split, data in sorted(columns.items())})


def load_reports(path: str | Path, split: str = "train") -> Dataset:
    """A CSV or JSON Lines file of `image, report`; the report is taken whole, whitespace-normalised.

    Relative image paths are resolved against the file's folder.
    """
    dataset = _load_table(Path(path), REPORT_COLUMNS, ("image",), split)
    return dataset.map(lambda row: {"report": normalize_whitespace(row["report"])})


# --- a synthetic release ----------------------------------------------------------------------------------------

_SIDES = ("left", "right")
_SIZES = ("small", "moderate", "large")
_RELEASE_SPLITS = {"train": "train", "val": "validate", "test": "test"}  # MIMIC-Diff-VQA -> MIMIC-CXR-JPG names


def _synthetic_xray(rng: np.random.Generator, effusion: int, side: str, size: int = 96) -> Image.Image:
    """A gray chest-like image; an 'effusion' brightens the lower part of one side (0 = none, 1..3 = size)."""
    y, x = np.mgrid[0:size, 0:size] / size
    lungs = 0.35 + 0.25 * np.exp(-(((x - 0.3) ** 2) / 0.02 + ((y - 0.5) ** 2) / 0.08))
    lungs += 0.25 * np.exp(-(((x - 0.7) ** 2) / 0.02 + ((y - 0.5) ** 2) / 0.08))
    if effusion:
        column = x < 0.5 if side == "right" else x >= 0.5  # radiological convention: patient's right on the left
        lungs = np.where(column & (y > 1.0 - 0.2 * effusion), 0.95, lungs)
    image = np.clip(lungs + rng.normal(0, 0.03, lungs.shape), 0, 1)
    return Image.fromarray((image * 255).astype(np.uint8))


def _synthetic_report(effusion: int, side: str, view: str, has_prior: bool) -> str:
    """A MIMIC-CXR-style free-text report whose FINDINGS and IMPRESSION describe the synthetic image."""
    examination = "CHEST (PA AND LAT)" if view == "PA" else "CHEST (PORTABLE AP)"
    if effusion:
        size = _SIZES[effusion - 1]
        findings = (
            f"There is a {size} {side} pleural effusion. No pneumothorax is seen.\n "
            "The cardiomediastinal silhouette is within normal limits."
        )
        impression = f"{size.capitalize()} {side} pleural effusion."
    else:
        findings = (
            "The lungs are clear. There is no pleural effusion or pneumothorax.\n "
            "The cardiomediastinal silhouette is within normal limits."
        )
        impression = "No acute cardiopulmonary process."
    return (
        "                                 FINAL REPORT\n"
        f" EXAMINATION:  {examination}\n \n"
        " INDICATION:  ___-year-old with shortness of breath, evaluate for effusion.\n \n"
        f" COMPARISON:  {'Chest radiograph from ___.' if has_prior else 'None.'}\n \n"
        f" FINDINGS: \n \n {findings}\n \n"
        f" IMPRESSION: \n \n {impression}\n"
    )


def write_synthetic_mimic_diff_vqa(root: str | Path, num_subjects: int = 12, seed: int = 0) -> Path:
    """Writes a small MIMIC-Diff-VQA + MIMIC-CXR-JPG look-alike (same files, columns and paths) under `root`.

    Each subject has two studies (prior, current) with a frontal (PA or AP) and a lateral image; the current study
    may show a pleural effusion that appeared, grew or resolved. Questions of three MIMIC-Diff-VQA types are
    answered from that ground truth, and every study has a MIMIC-CXR-style report (`s{study_id}.txt`) whose
    FINDINGS and IMPRESSION describe its frontal image, so a model can learn both. Subjects are split 60/20/20
    into train/val/test, in the question table and in the split table (`mimic-cxr-2.0.0-split.csv`).

    `root` must be new or empty: an existing release is never written into. The release is written into a
    temporary folder beside it and renamed into place when complete, so a killed run leaves no half release.
    """
    return write_release(root, lambda staging: _write_synthetic_release(staging, num_subjects, seed))


def write_release(root: str | Path, write: Callable[[Path], None]) -> Path:
    """`write(folder)`s a new release into a temporary folder beside `root`, renamed to `root` once complete (so a
    killed run leaves no half release); `root` must be new or empty. Returns `root`, absolute."""
    target = Path(root).absolute()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise DataError(f"{target} exists and is not empty; synthesize writes a new release: choose a new --output.")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(staging)
        with_umask_permissions(staging)
        if target.exists():
            target.rmdir()  # empty, checked above
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _write_synthetic_release(root: Path, num_subjects: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    picker = random.Random(seed)
    metadata, questions, splits = [], [], []
    for index in range(num_subjects):
        subject = str(10000000 + index * 1013)
        prior_study, current_study = str(50000000 + index * 2), str(50000000 + index * 2 + 1)
        side = picker.choice(_SIDES)
        before, after = picker.randrange(0, 4), picker.randrange(0, 4)
        split = "train" if index < 0.6 * num_subjects else ("val" if index < 0.8 * num_subjects else "test")
        for study, effusion, date in ((prior_study, before, "21500101"), (current_study, after, "21500601")):
            views = [(picker.choice(FRONTAL_VIEWS), True), ("LATERAL", False)]
            for number, (view, frontal) in enumerate(views):
                dicom = f"{subject[-4:]}{study[-4:]}-{number:02d}{'f' if frontal else 'l'}"
                path = root / image_path(subject, study, dicom)
                path.parent.mkdir(parents=True, exist_ok=True)
                image = _synthetic_xray(rng, effusion if frontal else 0, side)
                image.save(path, quality=95)
                metadata.append(
                    dict(
                        dicom_id=dicom,
                        subject_id=subject,
                        study_id=study,
                        ViewPosition=view,
                        Rows=image.height,
                        Columns=image.width,
                        StudyDate=date,
                    )
                )
                splits.append(dict(dicom_id=dicom, study_id=study, subject_id=subject, split=_RELEASE_SPLITS[split]))
            report = _synthetic_report(effusion, side, views[0][0], has_prior=study == current_study)
            (root / report_path(subject, study)).write_text(report)
        if after > before:
            difference = f"the main image has an additional finding of {_SIZES[after - 1]} {side} pleural effusion than the reference image."
        elif after < before:
            difference = (
                f"the main image is missing the finding of {side} pleural effusion compared to the reference image."
                if after == 0
                else f"the {side} pleural effusion has decreased."
            )
        else:
            difference = "nothing has changed."
        rows = [
            ("difference", "what has changed compared to the reference image?", difference),
            ("presence", "is there evidence of pleural effusion in this image?", "yes" if after else "no"),
            ("location", "where is the pleural effusion located?", side if after else "no pleural effusion"),
        ]
        for question_type, question, answer in rows:
            questions.append(
                dict(
                    study_id=current_study,
                    subject_id=subject,
                    ref_id=prior_study,
                    question_type=question_type,
                    question=question,
                    answer=answer,
                    split=split,
                )
            )
    for name, rows, columns in (
        (METADATA_FILE, metadata, METADATA_COLUMNS),
        (SPLIT_FILE, splits, SPLIT_COLUMNS),
        (QUESTIONS_FILE, questions, QUESTION_COLUMNS),
    ):
        with open(root / name, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)


__all__ = [
    "REPORT_SECTIONS",
    "DataError",
    "frontal_images",
    "load_mimic_cxr_reports",
    "load_mimic_diff_vqa",
    "load_pairs",
    "load_reports",
    "report_sections",
    "report_text",
    "write_synthetic_mimic_diff_vqa",
]
