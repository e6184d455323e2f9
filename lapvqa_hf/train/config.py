"""The training configuration: `TrainConfig` (a JSON object with `--set` overrides), each task's own options
(`CaptioningOptions`, `DetectionOptions`) and the one check of it all (`config_problems`), done when a config is
read (`TrainConfig.from_file`) or made (`TrainConfig(...)`): a `TrainConfig` that exists is a valid one."""

import dataclasses
import difflib
import json
import math
import warnings
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field
from pathlib import Path

from accelerate.tracking import get_available_trackers
from accelerate.utils import LoggerType
from huggingface_hub.errors import StrictDataclassError
from transformers import PreTrainedConfig

from ..data import REPORT_SECTIONS
from ..detection_data import RADIOLOGISTS
from ..features import MANIFEST
from ..kinds import KINDS
from ..messages import first_line
from ..metrics.detection import IOU_THRESHOLDS, metric_name
from ..metrics.grounding import GROUNDING_METRICS
from ..metrics.retrieval import RETRIEVAL_METRICS
from ..models.encoders import RECIPES
from ..models.text_towers import TEXT_RECIPES


class TrainConfigError(ValueError):
    """The training config is invalid: one line per problem, each naming its key and how to fix it."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


class NonFiniteError(ValueError):
    """A training loss or gradient norm is NaN or infinite; the message names the step."""


@dataclass(frozen=True)
class CaptioningOptions:
    """What only captioning training takes."""

    report_sections: list[str] = field(default_factory=lambda: list(REPORT_SECTIONS))  # the report text learned
    vision_encoder: str | None = None  # the features' LapvqaVisionModel (default: the recipe's checkpoint)


@dataclass(frozen=True)
class DetectionOptions:
    """What only detection training takes."""

    radiologists: str = "fused"  # how VinDr-CXR's radiologists' boxes combine, "fused" or "all"


@dataclass(frozen=True)
class HeldEncoderOptions:
    """What DiffVQA and report-generation training from images (inputs "pixels", the "native" recipe) take: the
    encoder the head learns with, held by the model and saved in its folder (`init_from` may give it instead)."""

    encoder: str | None = None  # a recipe name (default: the one `init_from`'s head records)
    encoder_checkpoint: str | None = None  # where its starting weights are read from (default: the recipe's Hub id)


@dataclass(frozen=True)
class GroundingOptions:
    """What only phrase-grounding training takes: the text tower that embeds the phrases."""

    text_recipe: str | None = None  # a `TEXT_RECIPES` name (default: the one pinned for the features' encoder)
    text_checkpoint: str | None = None  # where its weights are read from (default: the recipe's Hub id)


# Renamed config fields, old name -> new: a config file (or a checkpoint's record) may still use the old name.
RENAMED_FIELDS = {"mimic_root": "data_root"}


@dataclass
class TrainConfig:
    """A training run. `data_root` is the dataset release's folder: MIMIC-Diff-VQA / MIMIC-CXR (DiffVQA,
    captioning), VinDr-CXR (detection) or MS-CXR (grounding); its earlier name `mimic_root` is still read, with a
    warning.

    `inputs` says what the model learns from: the encoder's stored features (`features_dir`; fast, the encoder
    frozen and never run), or images (`pixels`: the encoder in the loop, frozen or, with `train_encoder`, trained;
    only for tasks whose model holds its encoder).

    The fields under "task options" belong to some tasks only (`CaptioningOptions`, `DetectionOptions`,
    `GroundingOptions`, `HeldEncoderOptions`); setting one for another task is an error. Made with invalid values, it raises
    `TrainConfigError` (every problem)."""

    data_root: str
    output_dir: str
    features_dir: str | None = None  # the stored encoder features (`lapvqa extract-features`); inputs "features"
    task: str = "diffvqa"  # "diffvqa", "captioning" or "detection"
    inputs: str = "features"  # "features" (stored, the encoder never runs) or "pixels" (the encoder in the loop)
    train_encoder: bool = False  # inputs "pixels": train the model's encoder too (else it is frozen)
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, more time
    init_from: str | None = None  # a model folder of the task's class; None trains from scratch
    model: dict = field(default_factory=dict)  # config overrides (decoder sizes...) when training from scratch
    # task options
    report_sections: list[str] = field(default_factory=lambda: list(REPORT_SECTIONS))  # captioning
    vision_encoder: str | None = None  # captioning
    radiologists: str = "fused"  # detection
    text_recipe: str | None = None  # grounding
    text_checkpoint: str | None = None  # grounding
    encoder: str | None = None  # diffvqa, report-generation (inputs pixels)
    encoder_checkpoint: str | None = None  # diffvqa, report-generation (inputs pixels)
    # optimisation
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 100
    max_steps: int = 1000
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # "no", "bf16" or "fp16"
    checkpoint_every: int = 500
    save_total_limit: int | None = None  # checkpoints kept (the newest); None keeps them all
    eval_every: int = 500
    eval_max_new_tokens: int = 64
    best_metric: str = "bleu4"
    log_with: str | None = None  # an accelerate tracker, e.g. "tensorboard"
    seed: int = 0

    def __post_init__(self):
        problems = config_problems(dataclasses.asdict(self))
        if problems:
            raise TrainConfigError(problems)

    def options(self, options_class: type):
        """This config's options of one task (`CaptioningOptions`, `DetectionOptions`)."""
        return options_class(**{f.name: getattr(self, f.name) for f in dataclasses.fields(options_class)})

    @classmethod
    def from_file(cls, path: str | Path, overrides: list[str] = ()) -> "TrainConfig":
        """A JSON config with `--set key=value` overrides (values are JSON, else bare strings), checked whole:
        every problem of the file, the overrides and the values is reported at once as a `TrainConfigError`."""
        path = Path(path)
        try:
            values = json.loads(path.read_text())
        except OSError as error:
            raise TrainConfigError([f"{path}: cannot read the config ({error.strerror})."]) from None
        except json.JSONDecodeError as error:
            raise TrainConfigError(
                [f"{path}: invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}."]
            ) from None
        if not isinstance(values, dict):
            raise TrainConfigError([f"{path}: expected a JSON object of training fields, got {type(values).__name__}."])
        fields = dataclasses.fields(cls)
        known = [f.name for f in fields]
        problems = [
            f"{path}: unknown field {key!r}{_did_you_mean(key, known)}"
            for key in values
            if key not in known and key not in RENAMED_FIELDS
        ]
        for override in overrides:
            key, equals, raw = override.partition("=")
            shown = override.encode("unicode_escape").decode()  # one line, whatever it holds
            if not equals:
                problems.append(f"--set {shown}: expected key=value.")
            elif key in RENAMED_FIELDS:
                values[key] = json_or_text(raw)  # renamed_field_problems below moves it to its new name
            elif key not in known:
                problems.append(f"--set {shown.partition('=')[0]}: unknown field{_did_you_mean(key, known)}")
            else:
                values[key] = json_or_text(raw)
        problems += renamed_field_problems(values, f"{path} (or --set)")
        required = [f.name for f in fields if f.default is MISSING and f.default_factory is MISSING]
        problems += [f"{path}: missing field {key!r} (required)." for key in required if key not in values]
        values = {key: value for key, value in values.items() if key in known}
        if not problems:
            return cls(**values)  # checks the values (`__post_init__`)
        raise TrainConfigError(problems + config_problems(values))


def json_or_text(raw: str):
    """A `--set` value: JSON, else a bare string."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def renamed_field_problems(values: dict, where: str) -> list[str]:
    """Moves fields given by an earlier name (`RENAMED_FIELDS`) to their new name in `values`, warning once each;
    both names at once is a problem."""
    problems = []
    for old, new in RENAMED_FIELDS.items():
        if old not in values:
            continue
        if values.get(new) is not None:
            problems.append(f"{where}: {old!r} is the earlier name of {new!r}; keep only {new!r}.")
            values.pop(old)
            continue
        values[new] = values.pop(old)
        warnings.warn(f"{where}: {old!r} is now called {new!r}; rename it.", FutureWarning, stacklevel=3)
    return problems


TASKS = tuple(name for name, kind in KINDS.items() if kind.training_task is not None)  # the kinds with a task
MIXED_PRECISIONS = ("no", "bf16", "fp16")
INPUTS = ("features", "pixels")
TEXT_METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "rouge1", "rougeL", "cider")  # what `score_answers` reports
DETECTION_METRICS = tuple(metric_name(threshold) for threshold in IOU_THRESHOLDS)  # what `score_detections` reports
METRICS = TEXT_METRICS + DETECTION_METRICS + RETRIEVAL_METRICS + GROUNDING_METRICS
TRACKERS = tuple(LoggerType.list())  # accelerate's (`log_with`)


def _did_you_mean(word: str, options: list[str] | tuple[str, ...]) -> str:
    """The end of an error about `word`: the closest of `options`, if one is close."""
    close = difflib.get_close_matches(word, options, n=1)
    return f"; did you mean {close[0]!r}?" if close else "."


def _is_text(value) -> bool:
    return isinstance(value, str) and bool(value)


def _is_integer(low: int, high: int | None = None) -> Callable[[object], bool]:
    return lambda value: type(value) is int and low <= value and (high is None or value <= high)


def _is_number(low: float, strictly: bool) -> Callable[[object], bool]:
    def check(value) -> bool:
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            return False
        return value > low if strictly else value >= low

    return check


# What each field accepts: a check of its value, and what the error says it expected.
_RULES: dict[str, tuple[Callable[[object], bool], str]] = {
    "data_root": (_is_text, "a folder path"),
    "features_dir": (lambda v: v is None or _is_text(v), "a folder path, or null with inputs pixels"),
    "inputs": (lambda v: v in INPUTS, f"one of {', '.join(INPUTS)}"),
    "train_encoder": (lambda v: isinstance(v, bool), "true or false"),
    "gradient_checkpointing": (lambda v: isinstance(v, bool), "true or false"),
    "output_dir": (_is_text, "a folder path"),
    "task": (lambda v: v in TASKS, f"one of {', '.join(TASKS)}"),
    "init_from": (lambda v: v is None or _is_text(v), "a model folder or Hub id, or null"),
    "model": (lambda v: isinstance(v, dict), "an object of model config fields"),
    "report_sections": (
        lambda v: isinstance(v, list | tuple) and bool(v) and all(_is_text(s) for s in v),
        "a non-empty list of report section names",
    ),
    "vision_encoder": (lambda v: v is None or _is_text(v), "a LapvqaVisionModel folder or Hub id, or null"),
    "radiologists": (lambda v: v in RADIOLOGISTS, f"one of {', '.join(RADIOLOGISTS)}"),
    "text_recipe": (
        lambda v: v is None or (isinstance(v, str) and v in TEXT_RECIPES),
        f"null or one of {', '.join(TEXT_RECIPES)}",
    ),
    "text_checkpoint": (lambda v: v is None or _is_text(v), "a text tower's folder or Hub id, or null"),
    "encoder": (lambda v: v is None or (isinstance(v, str) and v in RECIPES), f"null or one of {', '.join(RECIPES)}"),
    "encoder_checkpoint": (lambda v: v is None or _is_text(v), "an encoder's folder or Hub id, or null"),
    "learning_rate": (_is_number(0, strictly=True), "a finite number > 0"),
    "weight_decay": (_is_number(0, strictly=False), "a finite number >= 0"),
    "warmup_steps": (_is_integer(0), "an integer >= 0"),
    "max_steps": (_is_integer(1), "an integer >= 1"),
    "batch_size": (_is_integer(1), "an integer >= 1"),
    "gradient_accumulation_steps": (_is_integer(1), "an integer >= 1"),
    "max_grad_norm": (_is_number(0, strictly=True), "a finite number > 0"),
    "mixed_precision": (lambda v: v in MIXED_PRECISIONS, f"one of {', '.join(MIXED_PRECISIONS)}"),
    "checkpoint_every": (_is_integer(1), "an integer >= 1"),
    "save_total_limit": (lambda v: v is None or _is_integer(1)(v), "an integer >= 1, or null to keep all"),
    "eval_every": (_is_integer(1), "an integer >= 1"),
    "eval_max_new_tokens": (_is_integer(1), "an integer >= 1"),
    "best_metric": (lambda v: v in METRICS, f"one of {', '.join(METRICS)}"),
    "log_with": (lambda v: v is None or v in TRACKERS, f"null or one of {', '.join(TRACKERS)}"),
    "seed": (_is_integer(0, 2**32 - 1), "an integer from 0 to 2**32 - 1"),
}
_CHOICES = {
    "task": TASKS,
    "inputs": INPUTS,
    "radiologists": RADIOLOGISTS,
    "mixed_precision": MIXED_PRECISIONS,
    "best_metric": METRICS,
    "log_with": TRACKERS,
}


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def config_problems(values: dict) -> list[str]:
    """Every problem of training config values (`TrainConfig` fields, possibly not all), one line each naming its
    key: types and ranges, then the files they name and what the task's model config accepts."""
    problems = []
    for key, value in values.items():
        accepts, expected = _RULES[key]
        if not accepts(value):
            ending = _did_you_mean(value, _CHOICES[key]) if key in _CHOICES and isinstance(value, str) else "."
            problems.append(f"{key}={value!r}: expected {expected}{ending}")
    valid = {key: value for key, value in values.items() if _RULES[key][0](value)}
    if "data_root" in valid and not Path(valid["data_root"]).is_dir():
        problems.append(f"data_root: no folder {valid['data_root']}; set it to the dataset release's folder.")
    inputs = valid.get("inputs", "features")
    task = values.get("task", "diffvqa")
    pixels_only = task in TASKS and not KINDS[task].training_task_class().trains_from_features
    if inputs == "features" and pixels_only:
        problems.append(
            f"inputs=features: task {task} trains from images only (both towers run); set inputs to pixels."
        )
    elif inputs == "features" and "features_dir" in values and values["features_dir"] is None:
        problems.append(
            "features_dir: required with inputs features; run `lapvqa extract-features` and name its folder."
        )
    if inputs == "features" and valid.get("train_encoder"):
        problems.append("train_encoder: only used with inputs pixels (stored features have no encoder to train).")
    if valid.get("features_dir") and not (Path(valid["features_dir"]) / MANIFEST).is_file():
        problems.append(
            f"features_dir: {valid['features_dir']} has no {MANIFEST}; run `lapvqa extract-features` first, or fix "
            "the path."
        )
    if "output_dir" in valid and Path(valid["output_dir"]).is_file():
        problems.append(f"output_dir: {valid['output_dir']} is a file; set it to a folder.")
    if valid.get("log_with") not in (None, "all", *(tracker.value for tracker in get_available_trackers())):
        problems.append(f"log_with: {valid['log_with']} is not installed; install it, or remove log_with.")
    if task not in TASKS:
        return problems
    task_class = KINDS[task].training_task_class()
    used_by: dict[str, list[str]] = {}  # options of other tasks, set to other than their default -> those tasks
    for other in TASKS:
        options_class = KINDS[other].training_task_class().options_class
        if other == task or options_class is None or options_class is task_class.options_class:
            continue
        for option in dataclasses.fields(options_class):
            default = option.default if option.default is not MISSING else option.default_factory()
            if option.name in valid and _plain(valid[option.name]) != _plain(default):
                used_by.setdefault(option.name, []).append(other)
    for option, tasks in used_by.items():
        problems.append(f"{option}: only used with task {' or '.join(tasks)}; remove it.")
    if task_class.options_class is HeldEncoderOptions and inputs == "features":
        for key in ("encoder", "encoder_checkpoint"):
            if valid.get(key):
                problems.append(
                    f"{key}: only used with inputs pixels (the stored features name their encoder); remove it."
                )
    if inputs == "pixels" and not task_class.trains_from_pixels:
        problems.append(
            f"inputs=pixels: task {task} trains on stored features only (its frozen encoder is not part of its "
            "model); set inputs to features."
        )
    elif inputs == "pixels":
        problems += task_class.pixel_input_problems(valid)
    if valid.get("best_metric", "bleu4") not in task_class.metrics:
        problems.append(
            f"best_metric={valid.get('best_metric', 'bleu4')!r}: task {task} is scored by "
            f"{', '.join(task_class.metrics)}; set best_metric to one of them."
        )
    if valid.get("init_from"):
        problems += _init_from_problems(valid["init_from"], task_class.model_class.config_class.model_type)
        if valid.get("model"):
            problems.append("model: not used with init_from (the model comes from there); remove one of them.")
    elif "model" in valid:
        problems += _model_problems(valid["model"], task_class.model_class.config_class, task_class.derived_fields)
    return problems


def _init_from_problems(init_from: str, model_type: str) -> list[str]:
    try:
        found, _ = PreTrainedConfig.get_config_dict(init_from)
    except OSError as error:
        reason = first_line(error)
        return [f"init_from: cannot load {init_from} ({reason}); set it to a saved model folder or Hub id."]
    if found.get("model_type") != model_type:
        what = f"a {found['model_type']} model" if found.get("model_type") else "no model config.json"
        return [f"init_from: {init_from} holds {what}, but this task trains {model_type} models."]
    return []


def _model_problems(overrides: dict, config_class: type[PreTrainedConfig], derived: tuple[str, ...]) -> list[str]:
    known = [f.name for f in dataclasses.fields(config_class)]
    problems = []
    for key in overrides:
        if key in derived:
            problems.append(f"model.{key}: set by training from the features (or vision_encoder); remove it.")
        elif key not in known:
            problems.append(f"model.{key}: unknown field of {config_class.__name__}{_did_you_mean(key, known)}")
    if not problems:
        try:
            config_class(**overrides)
        except StrictDataclassError as error:
            problems.append(f"model: {' '.join(line.strip() for line in str(error).splitlines())}")
    return problems


def config_fields_help() -> str:
    """The `TrainConfig` fields for `--help`: each with what it accepts and its default."""
    lines = ["config fields (JSON keys, or --set key=value):"]
    for f in dataclasses.fields(TrainConfig):
        if f.default is MISSING and f.default_factory is MISSING:
            default = "required"
        else:
            default = f"default {json.dumps(f.default if f.default is not MISSING else f.default_factory())}"
        lines.append(f"  {f.name}: {_RULES[f.name][1]}; {default}")
    return "\n".join(lines)
