"""What the LAPVQA Space does, without gradio: a tab per task of the package's kind registry, models loaded lazily
and kept (a few, least recently used first out), and one function that runs a task on uploaded files and returns
text, a picture and scores, or raises `SpaceError` with one line for the page.

The work is `lapvqa answer`'s: each run is one row for `lapvqa_hf.answer.Answerer`, whose checks, answers and
pictures (`--save-maps`: attention heat maps, boxes) are the command's own.
"""

import os
import re
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image

from lapvqa_hf.answer import Answerer, AnswerError
from lapvqa_hf.collection import ManifestError, load_collection
from lapvqa_hf.kinds import KINDS, Answering, kind_of
from lapvqa_hf.messages import first_line
from lapvqa_hf.model_folders import ModelFolderError, load_config
from lapvqa_hf.models.encoders import EncoderError
from lapvqa_hf.tables import TableRow, text_problems

NOTICE = (
    "**Research use only.** These models are not medical devices and were not validated for clinical use. Their "
    "answers and reports can be wrong; never base a diagnosis or a treatment on them."
)
MODELS_KEPT = 3  # models held in memory at once (a CPU Space has 16 GB; a ViT-L/14 encoder and its head ~1.5 GB)
# What loading or running a model may raise that is the user's to fix (a file, a name, the Hub): one line each.
EXPECTED_ERRORS = (AnswerError, ModelFolderError, EncoderError, ManifestError, OSError, ValueError, RuntimeError)
# How an image column is asked for, a text column, and what a run's text output is called.
IMAGE_LABELS = {"prior_image": "Prior (reference) X-ray", "current_image": "Current X-ray", "image": "X-ray"}
TEXT_LABELS = {"question": "Question", "labels": "Candidate findings, one per line", "phrase": "Phrase to ground"}
OUTPUT_LABELS = {"answer": "Answer", "report": "Report", "boxes": "Findings", "scores": "Scores", "box": "Box"}


class SpaceError(ValueError):
    """A run cannot be done; the message is one line for the page."""


@dataclass(frozen=True)
class Task:
    """A tab: the kinds of model it runs (all with the same `Answering` columns), one line about it, and the text
    its text boxes start with."""

    title: str
    kinds: tuple[str, ...]
    about: str
    defaults: dict[str, str] = field(default_factory=dict)

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.title.lower()).strip("-")

    @property
    def answering(self) -> Answering:
        return KINDS[self.kinds[0]].answering

    @property
    def picture(self) -> str | None:
        """What the task's runs draw (`Answering.picture`: "attention", "boxes"), where any of its kinds draws."""
        return next((KINDS[kind].answering.picture for kind in self.kinds if KINDS[kind].answering.picture), None)

    @property
    def image_columns(self) -> list[str]:
        return list(self.answering.images)

    @property
    def text_columns(self) -> list[str]:
        return [column for column in self.answering.columns if column not in self.answering.images]


TASKS = (
    Task("Differential VQA", ("diffvqa",), "A prior and a current X-ray of one patient, and a question about what "
         "changed between them.", {"question": "what has changed compared to the reference image?"}),
    Task("VQA", ("vqa",), "One X-ray and a question about it.", {"question": "is there a pleural effusion?"}),
    Task("Report generation", ("report-generation", "captioning"), "One X-ray: the report a radiologist would write."),
    Task("Detection", ("detection",), "One X-ray: boxes around VinDr-CXR's 14 abnormalities, with their scores."),
    Task("Zero-shot findings", ("two-tower",), "One X-ray and findings of your choice: how well each matches it.",
         {"labels": "pleural effusion\ncardiomegaly\npneumothorax\nno acute cardiopulmonary process"}),
    Task("Phrase grounding", ("grounding",), "One X-ray and a phrase of a report: the box it describes.",
         {"phrase": "small left pleural effusion"}),
)  # fmt: skip


def registered_tasks() -> list[Task]:
    """The tabs of the kinds registered now (`lapvqa_hf.kinds.KINDS`): each task with the kinds it has, and a tab of
    its own for any kind that `lapvqa answer` runs and no task names."""
    answerable = [name for name, kind in KINDS.items() if kind.answering is not None and kind.pipeline_class]
    tasks = [replace(task, kinds=kinds) for task in TASKS
             if (kinds := tuple(kind for kind in task.kinds if kind in answerable))]  # fmt: skip
    named = {kind for task in tasks for kind in task.kinds}
    tasks += [Task(kind, (kind,), f"The `{kind}` models.") for kind in answerable if kind not in named]
    return tasks


def collection_models(task: Task) -> list[str]:
    """The repo ids of the collection manifest that the task runs as they are (heads trained with a fine-tuned
    encoder need that encoder named: they are left out)."""
    models = load_collection().models
    return [m.repo_id for kind in task.kinds for m in models
            if m.kind == kind and m.convertible and not m.encoder_finetuned]  # fmt: skip


def model_kind(name: str) -> str:
    """The kind of a model: the manifest's for a repo of the collection (nothing is downloaded), else its
    `config.json`'s."""
    listed = {m.repo_id: m.kind for m in load_collection().models}
    if name in listed:
        return listed[name]
    model_type = load_config(name).model_type
    kind = kind_of(model_type)
    if kind is None:
        raise SpaceError(f"{name} is a {model_type} model, which this Space does not run.")
    return kind.name


class Models:
    """Answerers by (kind, name), loaded on first use and kept, least recently used first out; each draws its
    pictures into a temporary folder of its own. `lock` serialises the work: one run at a time on the CPUs."""

    def __init__(self, capacity: int = MODELS_KEPT):
        self.capacity, self.entries = capacity, OrderedDict()
        self.lock = threading.Lock()

    def get(self, kind: str, name: str) -> Answerer:
        key = (kind, name)
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        maps = tempfile.mkdtemp(prefix="lapvqa-space-") if KINDS[kind].answering.picture else None
        try:
            answerer = Answerer(name, save_maps=maps)
        except BaseException:
            if maps:
                shutil.rmtree(maps)
            raise
        self.entries[key] = answerer
        while len(self.entries) > self.capacity:
            _, evicted = self.entries.popitem(last=False)
            if evicted.maps is not None:
                shutil.rmtree(evicted.maps, ignore_errors=True)
        return answerer


MODELS = Models()


@dataclass
class Result:
    """What a run shows: its text, its picture (heat maps or boxes; None where the kind draws none), the scores of
    a zero-shot run (label, score; best first) and a status line."""

    text: str
    picture: Image.Image | None
    scores: list[tuple[str, float]]
    status: str


def no_progress(fraction: float, desc: str | None = None) -> None:
    """The progress callback of a run without a page (`gradio.Progress` in the Space)."""


def run(
    task: Task,
    model: str,
    values: dict[str, str | None],
    threshold: float = 0.5,
    progress: Callable[..., object] = no_progress,
    models: Models = MODELS,
) -> Result:
    """Runs `model` (a repo id of the collection, or a model folder) on one row of `task`: `values` maps each of its
    image columns to a file path (PNG/JPEG, 8 or 16 bit, or DICOM) and each text column to its text (candidate
    findings one per line). `threshold`: the lowest detection score shown. Raises `SpaceError`, in one line."""
    model = os.path.expanduser(model.strip())
    if not model:
        raise SpaceError("Choose a model of the collection, or type a model folder.")
    for column in task.image_columns:
        if not values.get(column):
            raise SpaceError(f"{IMAGE_LABELS.get(column, column)}: upload a PNG, JPEG or DICOM file.")
    paths = {column: str(values[column]) for column in task.image_columns}
    texts = {column: (values.get(column) or "").strip() for column in task.text_columns}
    if task.answering.mode == "score":  # the row's candidate findings, separated by ";"
        texts = {column: ";".join(re.split(r"[;\n]", text)) for column, text in texts.items()}
    row = {**paths, **texts}
    try:
        kind = model_kind(model)
        if kind not in task.kinds:
            raise SpaceError(f"{model} is a {kind} model; the {task.title} tab runs {' or '.join(task.kinds)} models.")
        started = time.monotonic()
        with models.lock:
            if (kind, model) not in models.entries:
                progress(0.1, desc=f"Loading {model}")
            answerer = models.get(kind, model)
            progress(0.5, desc="Reading the images and answering")
            answerer.threshold = threshold
            problem = text_problems(row, answerer.answering.columns)
            (output,) = answerer.answer([(TableRow(0, 1, row, problem), paths)])
            picture = _picture(output)
    except SpaceError:
        raise
    except EXPECTED_ERRORS as error:
        raise SpaceError(first_line(error)) from None
    if "error" in output:
        message = output["error"]
        for path in paths.values():  # an upload's temporary folder says nothing to its user; its name does
            message = message.replace(path, Path(path).name)
        raise SpaceError(message)
    field = answerer.answering.field
    scores = [(found["label"], found["score"]) for found in output.get("scores", [])]
    status = f"Done in {time.monotonic() - started:.1f} s by {model}."
    if output.get("map_error"):
        status += f" No picture: {output['map_error']}."
    return Result(_text(field, output[field], texts, threshold), picture, scores, status)


def _picture(output: dict) -> Image.Image | None:
    """The picture the answerer drew for this run (read into memory; its file removed)."""
    if not output.get("map"):
        return None
    path = Path(output["map"])
    with Image.open(path) as picture:
        picture.load()
    path.unlink()
    return picture


def _text(field: str, value: object, texts: dict[str, str], threshold: float) -> str:
    """A run's output field as text for the page."""
    if field == "boxes":
        lines = [f"{box['label']}: {box['score']:.2f} at {_corners(box['box'])}" for box in value]
        return "\n".join(lines) or f"No finding scored {threshold:.2f} or more."
    if field == "scores":
        return "\n".join(f"{found['label']}: {found['score']:.3f}" for found in value)
    if field == "box":
        return f"{next(iter(texts.values()))}: {_corners(value)}"
    return str(value)


def _corners(box: dict) -> str:
    return "({:.0f}, {:.0f}) to ({:.0f}, {:.0f}) px".format(*(box[key] for key in ("xmin", "ymin", "xmax", "ymax")))


__all__ = [
    "IMAGE_LABELS",
    "MODELS",
    "NOTICE",
    "OUTPUT_LABELS",
    "TASKS",
    "TEXT_LABELS",
    "Models",
    "Result",
    "SpaceError",
    "Task",
    "collection_models",
    "model_kind",
    "registered_tasks",
    "run",
]
