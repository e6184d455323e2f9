"""Fine-tune a LAPVQA head on frozen features with accelerate: a DiffVQA head, the captioning decoder or a detector.

    accelerate launch -m lapvqa_hf.train --config train.json [--set key=value ...]
    accelerate launch --multi_gpu --num_processes 2 -m lapvqa_hf.train --config train.json

The config is a JSON object of `TrainConfig` fields; `--set` overrides any of them. `task` says what is trained:

- `diffvqa`: a DiffVQA head on MIMIC-Diff-VQA; `question + [bos] + answer + [eos]`, the loss covers the answer
  and its eos (question and bos are masked with -100).
- `captioning`: the report decoder of `LapvqaCaptioningModel` on MIMIC-CXR reports (`report_sections`);
  `[bos] + report + [eos]`, the loss covers the report and its eos. The frozen ViT-L/14 is not trained and not
  run: the features are its stored patch tokens. It is loaded (from `vision_encoder`, by default the checkpoint
  the features were extracted with) only to complete the saved model, so that it also reports from pixels.
- `detection`: a DETR-style detection head on VinDr-CXR boxes (`lapvqa_hf.detection_data`), the radiologists' boxes
  combined by `radiologists`; transformers' DETR set loss; validated by mAP at IoU 0.4 and 0.5 (`map40`, `map50`).

All run the same loop; what differs (data, batches, model, validation predictions, scoring, saving) is a `Task`.
AdamW (no weight decay on biases, LayerNorm weights and embeddings, as in transformers' Trainer) with linear warmup
then cosine decay, gradient accumulation, clipping, mixed precision and trackers (`log_with`) come from accelerate;
the main process shows a progress bar (loss, learning rate, tokens/s). `checkpoint_every` steps the whole training
state is saved (`accelerator.save_state`; `save_total_limit` keeps the newest) and a re-run resumes from the latest
checkpoint to the same result as an uninterrupted run. Every `eval_every` steps the validation split is predicted
(generated greedily, or detected), shared among the processes, and scored (BLEU/ROUGE/CIDEr, or mAP); the best model
(by `best_metric`) is saved with `save_pretrained`, with its tokenizer (DiffVQA), processor (captioning) or image
processor (detection), ready for `lapvqa push`.

Faults: the config is checked whole before any work (one `error:` line per problem); checkpoints and the best model
are written under partial names and renamed into place, so that a kill at any instant loses nothing complete; a
resumed run applies config changes (and says so) or refuses them; a NaN or infinite loss or gradient norm stops
training before the update, so that no saved weights have it; under a launcher, the trainer exits with it.
"""

import argparse
import contextlib
import dataclasses
import difflib
import json
import math
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.scheduler import AcceleratedScheduler
from accelerate.tracking import get_available_trackers
from accelerate.utils import LoggerType, gather_object, set_seed
from datasets import DatasetDict
from huggingface_hub.errors import StrictDataclassError
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm
from transformers import (
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    get_cosine_schedule_with_warmup,
)
from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
from transformers.trainer_pt_utils import get_parameter_names

from .data import REPORT_SECTIONS, load_mimic_cxr_reports, load_mimic_diff_vqa
from .detection_data import RADIOLOGISTS, load_vindr_cxr
from .features import (
    DETECTION_IMAGE_PREPARATION,
    IMAGE_PREPARATION,
    MANIFEST,
    FeatureError,
    FeatureStore,
    detection_image_processor,
    image_id,
)
from .files import with_umask_permissions, write_json_atomically
from .kinds import KINDS, kind_of, save_pretrained_with_pipeline
from .messages import first_line, summary
from .metrics import score_answers
from .metrics.detection import IOU_THRESHOLDS, metric_name, score_detections
from .model_folders import load_model
from .models.configuration_lapvqa_captioning import LapvqaCaptioningConfig
from .models.configuration_lapvqa_detection import VINDR_CXR_CLASSES, LapvqaDetectionConfig
from .models.configuration_lapvqa_diffvqa import LapvqaDiffVQAConfig
from .models.configuration_lapvqa_vision import LapvqaVisionConfig
from .models.encoders import ENCODER_WIDTHS, load_encoder_image_processor
from .models.image_processing_lapvqa import LapvqaImageProcessor
from .models.modeling_lapvqa_captioning import LapvqaCaptioningModel
from .models.modeling_lapvqa_detection import LapvqaDetectionModel
from .models.modeling_lapvqa_diffvqa import LapvqaDiffVQAModel
from .models.modeling_lapvqa_vision import LapvqaVisionModel
from .models.processing_lapvqa import LapvqaProcessor, question_prompt
from .tokenization import build_gpt2_tokenizer, encode_questions


class TrainConfigError(ValueError):
    """The training config is invalid: one line per problem, each naming its key and how to fix it."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


class NonFiniteError(ValueError):
    """A training loss or gradient norm is NaN or infinite; the message names the step."""


@dataclass
class TrainConfig:
    mimic_root: str
    features_dir: str
    output_dir: str
    task: str = "diffvqa"  # "diffvqa", "captioning" or "detection"
    init_from: str | None = None  # a model folder of the task's class; None trains from scratch
    model: dict = field(default_factory=dict)  # config overrides (decoder sizes...) when training from scratch
    report_sections: list[str] = field(default_factory=lambda: list(REPORT_SECTIONS))  # captioning: report text
    vision_encoder: str | None = None  # captioning: the features' LapvqaVisionModel (default: the recipe's checkpoint)
    radiologists: str = "fused"  # detection: how VinDr-CXR's radiologists' boxes combine, "fused" or "all"
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
        problems = [f"{path}: unknown field {key!r}{_did_you_mean(key, known)}" for key in values if key not in known]
        for override in overrides:
            key, equals, raw = override.partition("=")
            shown = override.encode("unicode_escape").decode()  # one line, whatever it holds
            if not equals:
                problems.append(f"--set {shown}: expected key=value.")
            elif key not in known:
                problems.append(f"--set {shown.partition('=')[0]}: unknown field{_did_you_mean(key, known)}")
            else:
                try:
                    values[key] = json.loads(raw)
                except json.JSONDecodeError:
                    values[key] = raw  # a bare string
        required = [f.name for f in fields if f.default is MISSING and f.default_factory is MISSING]
        problems += [f"{path}: missing field {key!r} (required)." for key in required if key not in values]
        values = {key: value for key, value in values.items() if key in known}
        problems += config_problems(values)
        if problems:
            raise TrainConfigError(problems)
        return cls(**values)


TASKS = tuple(name for name, kind in KINDS.items() if kind.training_task is not None)  # the kinds with a task
MIXED_PRECISIONS = ("no", "bf16", "fp16")
TEXT_METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "rouge1", "rougeL", "cider")  # what `score_answers` reports
DETECTION_METRICS = tuple(metric_name(threshold) for threshold in IOU_THRESHOLDS)  # what `score_detections` reports
METRICS = TEXT_METRICS + DETECTION_METRICS
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
    "mimic_root": (_is_text, "a folder path"),
    "features_dir": (_is_text, "a folder path"),
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
    "radiologists": RADIOLOGISTS,
    "mixed_precision": MIXED_PRECISIONS,
    "best_metric": METRICS,
    "log_with": TRACKERS,
}


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
    if "mimic_root" in valid and not Path(valid["mimic_root"]).is_dir():
        problems.append(f"mimic_root: no folder {valid['mimic_root']}; set it to the MIMIC release's folder.")
    if "features_dir" in valid and not (Path(valid["features_dir"]) / MANIFEST).is_file():
        problems.append(
            f"features_dir: {valid['features_dir']} has no {MANIFEST}; run `lapvqa extract-features` first, or fix "
            "the path."
        )
    if "output_dir" in valid and Path(valid["output_dir"]).is_file():
        problems.append(f"output_dir: {valid['output_dir']} is a file; set it to a folder.")
    if valid.get("log_with") not in (None, "all", *(tracker.value for tracker in get_available_trackers())):
        problems.append(f"log_with: {valid['log_with']} is not installed; install it, or remove log_with.")
    task = values.get("task", "diffvqa")
    if task not in TASKS:
        return problems
    if task != "captioning":
        if valid.get("vision_encoder") is not None:
            problems.append("vision_encoder: only used with task captioning; remove it.")
        if list(valid.get("report_sections", REPORT_SECTIONS)) != list(REPORT_SECTIONS):
            problems.append("report_sections: only used with task captioning; remove it.")
    if task != "detection" and valid.get("radiologists", "fused") != "fused":
        problems.append("radiologists: only used with task detection; remove it.")
    task_class = KINDS[task].training_task_class()
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


# --- what the tasks share ---------------------------------------------------------------------------------------


def _right_padded(sequences: list[list[int]], labels: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Token sequences and their labels, right-padded (pad ids, mask 0, label -100)."""
    width = max(len(s) for s in sequences)
    return {
        "input_ids": torch.tensor([s + [pad_token_id] * (width - len(s)) for s in sequences]),
        "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences]),
        "labels": torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels]),
    }


def require_features(features: FeatureStore, ids: list[str]) -> None:
    """Checks that every image of a split has stored features, before any training or generation starts."""
    missing = sorted({i for i in ids if i not in features})
    if missing:
        raise FeatureError(
            f"{features.output_dir} has no features for {len(missing)} image(s) of the data, e.g. {missing[0]!r}; "
            "extract them with `lapvqa extract-features` (it adds the missing ones)."
        )


@torch.no_grad()
def _generate_split(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    max_new_tokens: int,
    inputs_of: Callable[[list[dict]], dict[str, torch.Tensor]],
) -> list[str]:
    """Greedy continuations of `inputs_of(examples)` (prompt + visual inputs) for every example, decoded."""
    texts = []
    for start in range(0, len(dataset), batch_size):
        examples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        inputs = {key: value.to(model.device) for key, value in inputs_of(examples).items()}
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        texts += tokenizer.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return [t.strip() for t in texts]


def predict_across_processes(
    task: "DiffVQATask | CaptioningTask | DetectionTask",
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    max_new_tokens: int,
) -> list:
    """`task.predict` for every example of `dataset`, shared among the processes (process R of W predicts examples
    R, R+W, ...) and gathered, in the dataset's order, on every process."""
    state = PartialState()
    indices = list(range(state.process_index, len(dataset), state.num_processes))
    predictions = task.predict(model, tokenizer, Subset(dataset, indices), batch_size, max_new_tokens)
    gathered = gather_object(list(zip(indices, predictions, strict=True)))
    return [prediction for _, prediction in sorted(gathered, key=lambda pair: pair[0])]


def batch_tokens(batch: dict) -> torch.Tensor:
    """The tokens a training batch feeds the model (for tokens/s): its text tokens, or its visual tokens (detection)."""
    if "attention_mask" in batch:
        return batch["attention_mask"].sum()
    return torch.tensor(batch["image_features"].shape[:2].numel(), device=batch["image_features"].device)


# --- DiffVQA ----------------------------------------------------------------------------------------------------


class DiffVQAExamples(torch.utils.data.Dataset):
    """Rows of a split with their stored features: (prior and current image features, question, answer, question type)."""

    def __init__(self, rows, features: FeatureStore, root: Path):
        self.rows = list(rows)
        self.features = features
        self.ids = [(image_id(row["prior_image"], root), image_id(row["current_image"], root)) for row in self.rows]
        require_features(features, [i for pair in self.ids for i in pair])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        prior_id, current_id = self.ids[index]
        return {
            "prior_image_features": self.features[prior_id].float(),
            "current_image_features": self.features[current_id].float(),
            "question": row["question"],
            "answer": row["answer"],
            "question_type": row["question_type"],
        }


def training_collate(tokenizer, max_positions: int):
    """question + [bos] + answer + [eos], right-padded; labels only on the answer and its eos."""

    def collate(examples: list[dict]) -> dict:
        eos = tokenizer.eos_token_id
        sequences, labels = [], []
        for example in examples:
            prompt = question_prompt(tokenizer, example["question"])  # question + [bos]
            answer = tokenizer(example["answer"], add_special_tokens=False)["input_ids"]
            sequences.append((prompt + answer + [eos])[:max_positions])
            labels.append(([-100] * len(prompt) + answer + [eos])[:max_positions])
        return {
            **_right_padded(sequences, labels, eos),
            "current_image_features": torch.stack([e["current_image_features"] for e in examples]),
            "prior_image_features": torch.stack([e["prior_image_features"] for e in examples]),
        }

    return collate


def answer_split(model, tokenizer, dataset: DiffVQAExamples, batch_size: int, max_new_tokens: int) -> list[str]:
    """Greedy answers for every row of `dataset`."""

    def inputs_of(examples: list[dict]) -> dict[str, torch.Tensor]:
        return {
            **encode_questions(tokenizer, [e["question"] for e in examples]),
            "current_image_features": torch.stack([e["current_image_features"] for e in examples]),
            "prior_image_features": torch.stack([e["prior_image_features"] for e in examples]),
        }

    return _generate_split(model, tokenizer, dataset, batch_size, max_new_tokens, inputs_of)


class DiffVQATask:
    """A DiffVQA head on MIMIC-Diff-VQA questions about (prior, current) pairs, scored per question type."""

    name = "diffvqa"
    model_class = LapvqaDiffVQAModel
    derived_fields = ("vis_dim", "encoder_name", "feature_recipe")  # model config fields set from the features
    group_label = "question type"
    metrics = TEXT_METRICS
    generates_text = True

    @classmethod
    def from_config(cls, config: "TrainConfig") -> "DiffVQATask":
        return cls()

    @classmethod
    def from_model_config(cls, model_config) -> "DiffVQATask":
        return cls()

    def load_splits(self, mimic_root: str | Path) -> DatasetDict:
        return load_mimic_diff_vqa(mimic_root)

    def examples(self, rows, features: FeatureStore, root: Path) -> DiffVQAExamples:
        require_image_preparation(features, IMAGE_PREPARATION)
        return DiffVQAExamples(rows, features, root)

    def feature_width(self, model: LapvqaDiffVQAModel) -> int:
        return model.config.vis_dim

    def build_model(self, config: TrainConfig, features: FeatureStore) -> LapvqaDiffVQAModel:
        if config.init_from:
            return model_to_init_from(self, config.init_from, features)
        recipe = features.recipe
        return LapvqaDiffVQAModel(
            LapvqaDiffVQAConfig(vis_dim=recipe.vis_dim, encoder_name=registered_encoder_name(recipe), **config.model)
        )

    def collate(self, tokenizer, max_positions: int) -> Callable[[list[dict]], dict]:
        return training_collate(tokenizer, max_positions)

    def predict(self, model, tokenizer, dataset: DiffVQAExamples, batch_size: int, max_new_tokens: int) -> list[str]:
        return answer_split(model, tokenizer, dataset, batch_size, max_new_tokens)

    def references(self, dataset: DiffVQAExamples) -> list[str]:
        return [row["answer"] for row in dataset.rows]

    def score(self, predictions: list[str], dataset: DiffVQAExamples) -> dict[str, dict[str, float]]:
        return score_answers(predictions, self.references(dataset), [row["question_type"] for row in dataset.rows])

    def save(self, model: LapvqaDiffVQAModel, tokenizer, features: FeatureStore, target: Path) -> None:
        save_pretrained_with_pipeline(model, target)
        tokenizer.save_pretrained(target)


# --- captioning -------------------------------------------------------------------------------------------------


class OneImageExamples(torch.utils.data.Dataset):
    """Rows of a split that each name one image (`row["image"]`), with its stored features."""

    def __init__(self, rows, features: FeatureStore, root: Path):
        self.rows = list(rows)
        self.features = features
        self.ids = [image_id(row["image"], root) for row in self.rows]
        require_features(features, self.ids)

    def __len__(self) -> int:
        return len(self.rows)


class ReportExamples(OneImageExamples):
    """Rows of a split with the stored features of their image: (image_features, report)."""

    def __getitem__(self, index: int) -> dict:
        return {"image_features": self.features[self.ids[index]].float(), "report": self.rows[index]["report"]}


def report_collate(tokenizer, max_positions: int):
    """[bos] + report + [eos] (cut to the model's positions), right-padded; labels on the report and its eos."""

    def collate(examples: list[dict]) -> dict:
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        sequences = [
            ([bos] + tokenizer(e["report"], add_special_tokens=False)["input_ids"] + [eos])[:max_positions]
            for e in examples
        ]
        # Labels are aligned with the inputs and shifted inside the loss: bos is never a target.
        return {
            **_right_padded(sequences, sequences, eos),
            "image_features": torch.stack([e["image_features"] for e in examples]),
        }

    return collate


def report_split(model, tokenizer, dataset: ReportExamples, batch_size: int, max_new_tokens: int) -> list[str]:
    """Greedy reports, from `[bos]`, for every image of `dataset`."""

    def inputs_of(examples: list[dict]) -> dict[str, torch.Tensor]:
        bos = torch.full((len(examples), 1), tokenizer.bos_token_id)
        image_features = torch.stack([e["image_features"] for e in examples])
        return {"input_ids": bos, "attention_mask": torch.ones_like(bos), "image_features": image_features}

    return _generate_split(model, tokenizer, dataset, batch_size, max_new_tokens, inputs_of)


class CaptioningTask:
    """The report decoder of `LapvqaCaptioningModel` on MIMIC-CXR reports, trained on the encoder's stored features.

    The model trains without its `vision_model` (frozen, never run: the features are its output); the encoder the
    features were extracted with (`vision_encoder`) is loaded once, on the CPU, when the best model is saved.
    """

    name = "captioning"
    model_class = LapvqaCaptioningModel
    derived_fields = ("vision_config", "feature_recipe")  # model config fields set from the features' encoder
    group_label = "reports"
    metrics = TEXT_METRICS
    generates_text = True

    def __init__(
        self, report_sections: list[str] | tuple[str, ...] = REPORT_SECTIONS, vision_encoder: str | None = None
    ):
        if not report_sections:
            raise ValueError(f"report_sections is empty; name the report sections to learn, e.g. {REPORT_SECTIONS}.")
        self.report_sections = list(report_sections)
        self.vision_encoder = vision_encoder
        self._encoder: LapvqaVisionModel | None = None

    @classmethod
    def from_config(cls, config: "TrainConfig") -> "CaptioningTask":
        return cls(config.report_sections, config.vision_encoder)

    @classmethod
    def from_model_config(cls, model_config) -> "CaptioningTask":
        return cls(getattr(model_config, "report_sections", None) or REPORT_SECTIONS)

    def load_splits(self, mimic_root: str | Path) -> DatasetDict:
        return load_mimic_cxr_reports(mimic_root, sections=self.report_sections)

    def examples(self, rows, features: FeatureStore, root: Path) -> ReportExamples:
        require_image_preparation(features, IMAGE_PREPARATION)
        return ReportExamples(rows, features, root)

    def feature_width(self, model: LapvqaCaptioningModel) -> int:
        return model.config.vision_config.hidden_size

    def _encoder_config(self, features: FeatureStore) -> LapvqaVisionConfig:
        """The config of the encoder that made the features; checks that it is a `LapvqaVisionModel` that fits them."""
        recipe = features.recipe
        if recipe.library != "lapvqa":
            raise FeatureError(
                f"{features.output_dir} holds {recipe.name} features, but the captioning model's encoder is a "
                "LapvqaVisionModel: extract features with `lapvqa extract-features --encoder lapvqa-vit-l14`."
            )
        self.vision_encoder = self.vision_encoder or recipe.checkpoint
        try:
            encoder_config = LapvqaVisionConfig.from_pretrained(self.vision_encoder)
        except OSError as error:
            raise OSError(
                f"Cannot load the encoder the features were extracted with ({self.vision_encoder}): {error} Set "
                "`vision_encoder` to that LapvqaVisionModel's folder or Hub id."
            ) from None
        found = (encoder_config.hidden_size, encoder_config.image_size)
        if found != (recipe.vis_dim, recipe.image_size):
            raise FeatureError(
                f"{self.vision_encoder} gives {found[0]}-dim tokens of {found[1]} px images, but the features in "
                f"{features.output_dir} are {recipe.vis_dim}-dim tokens of {recipe.image_size} px images; set "
                "`vision_encoder` to the encoder they were extracted with."
            )
        return encoder_config

    def build_model(self, config: TrainConfig, features: FeatureStore) -> LapvqaCaptioningModel:
        encoder_config = self._encoder_config(features)
        if config.init_from:
            model = model_to_init_from(self, config.init_from, features)
        else:
            model = LapvqaCaptioningModel(LapvqaCaptioningConfig(vision_config=encoder_config, **config.model))
        if config.eval_max_new_tokens > model.config.max_position_embeddings:
            raise ValueError(
                f"eval_max_new_tokens={config.eval_max_new_tokens} exceeds the model's "
                f"{model.config.max_position_embeddings} learned positions; lower it."
            )
        model.config.vision_config = encoder_config
        model.config.report_sections = self.report_sections  # what `lapvqa evaluate` scores against
        model.vision_model = None  # trained on its stored output: no encoder in the optimizer or the checkpoints
        return model

    def collate(self, tokenizer, max_positions: int) -> Callable[[list[dict]], dict]:
        return report_collate(tokenizer, max_positions)

    def predict(self, model, tokenizer, dataset: ReportExamples, batch_size: int, max_new_tokens: int) -> list[str]:
        return report_split(model, tokenizer, dataset, batch_size, max_new_tokens)

    def references(self, dataset: ReportExamples) -> list[str]:
        return [row["report"] for row in dataset.rows]

    def score(self, predictions: list[str], dataset: ReportExamples) -> dict[str, dict[str, float]]:
        return score_answers(predictions, self.references(dataset))

    def save(self, model: LapvqaCaptioningModel, tokenizer, features: FeatureStore, target: Path) -> None:
        """The whole captioning model (decoder + the features' encoder) with the processor of the features' recipe."""
        if self._encoder is None:
            self._encoder = LapvqaVisionModel.from_pretrained(self.vision_encoder).eval()
        model.vision_model = self._encoder.to(model.device)
        try:
            save_pretrained_with_pipeline(model, target)
        finally:
            model.vision_model = None
            self._encoder.to("cpu")
        # The encoder's own image processor, so that the model reports from pixels as it learned from the features.
        image_processor = load_encoder_image_processor(features.recipe, self.vision_encoder)
        LapvqaProcessor(image_processor, tokenizer).save_pretrained(target)


# --- detection --------------------------------------------------------------------------------------------------


class DetectionExamples(OneImageExamples):
    """Images of a split with their stored features and boxes: (image_features, class_labels, boxes)."""

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        return {
            "image_features": self.features[self.ids[index]].float(),
            "class_labels": torch.tensor(row["class_labels"], dtype=torch.long),
            "boxes": torch.tensor(row["boxes"], dtype=torch.float32).reshape(-1, 4),
        }


def detection_collate(examples: list[dict]) -> dict:
    """Stacked features and transformers' DETR `labels`: a dict of `class_labels` and `boxes` per image."""
    return {
        "image_features": torch.stack([e["image_features"] for e in examples]),
        "labels": [{"class_labels": e["class_labels"], "boxes": e["boxes"]} for e in examples],
    }


@torch.no_grad()
def detect_split(model: LapvqaDetectionModel, dataset: DetectionExamples, batch_size: int) -> list[dict]:
    """Every query's detection for every image of `dataset`, as DETR is evaluated: its most likely class (not
    no-object) and that class's probability, and its box (x0, y0, x1, y1) normalised to the image."""
    post_processor = LapvqaImageProcessor()  # without target sizes, its post-processing keeps boxes normalised
    detections = []
    for start in range(0, len(dataset), batch_size):
        examples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        outputs = model(image_features=torch.stack([e["image_features"] for e in examples]).to(model.device))
        for found in post_processor.post_process_object_detection(outputs, threshold=0.0):
            detections.append({key: found[key].tolist() for key in ("boxes", "scores", "labels")})
    return detections


def corners(boxes: list[list[float]]) -> list[list[float]]:
    """(cx, cy, w, h) boxes -> (x0, y0, x1, y1)."""
    return [[cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2] for cx, cy, w, h in boxes]


class DetectionTask:
    """A DETR-style detection head (`LapvqaDetectionModel`) on VinDr-CXR boxes, scored by mAP at IoU 0.4 and 0.5
    overall and per class. The radiologists' boxes are combined by `radiologists` (`lapvqa_hf.detection_data`), for
    the training targets and the validation ground truth alike."""

    name = "detection"
    model_class = LapvqaDetectionModel
    derived_fields = ("vis_dim", "encoder_name", "feature_recipe")  # model config fields set from the features
    group_label = "class"
    metrics = DETECTION_METRICS
    generates_text = False

    def __init__(self, radiologists: str = "fused", classes: list[str] | tuple[str, ...] = VINDR_CXR_CLASSES):
        self.radiologists = radiologists
        self.classes = list(classes)  # the model's, once it is built

    @classmethod
    def from_config(cls, config: "TrainConfig") -> "DetectionTask":
        return cls(config.radiologists)

    @classmethod
    def from_model_config(cls, model_config) -> "DetectionTask":
        classes = [model_config.id2label[index] for index in range(model_config.num_labels)]
        return cls(getattr(model_config, "radiologists", None) or "fused", classes)

    def load_splits(self, root: str | Path) -> DatasetDict:
        return load_vindr_cxr(root, radiologists=self.radiologists, classes=self.classes)

    def examples(self, rows, features: FeatureStore, root: Path) -> DetectionExamples:
        require_image_preparation(features, DETECTION_IMAGE_PREPARATION)
        return DetectionExamples(rows, features, root)

    def feature_width(self, model: LapvqaDetectionModel) -> int:
        return model.config.vis_dim

    def build_model(self, config: TrainConfig, features: FeatureStore) -> LapvqaDetectionModel:
        recipe = features.recipe
        if config.init_from:
            model = model_to_init_from(self, config.init_from, features)
        else:
            model = LapvqaDetectionModel(
                LapvqaDetectionConfig(
                    vis_dim=recipe.vis_dim, encoder_name=registered_encoder_name(recipe), **config.model
                )
            )
        self.classes = [model.config.id2label[index] for index in range(model.config.num_labels)]
        model.config.radiologists = self.radiologists  # what `lapvqa evaluate` scores against
        return model

    def collate(self, tokenizer, max_positions: int | None) -> Callable[[list[dict]], dict]:
        return detection_collate

    def predict(self, model, tokenizer, dataset: DetectionExamples, batch_size: int, max_new_tokens: int) -> list[dict]:
        return detect_split(model, dataset, batch_size)

    def references(self, dataset: DetectionExamples) -> list[dict]:
        return [{"boxes": corners(row["boxes"]), "labels": row["class_labels"]} for row in dataset.rows]

    def score(self, predictions: list[dict], dataset: DetectionExamples) -> dict[str, dict[str, float]]:
        return score_detections(predictions, self.references(dataset), dict(enumerate(self.classes)))

    def save(self, model: LapvqaDetectionModel, tokenizer, features: FeatureStore, target: Path) -> None:
        """The model with the image processor its features were prepared by, so that it detects from pixels."""
        save_pretrained_with_pipeline(model, target)
        detection_image_processor(features.recipe).save_pretrained(target)


def task_for(config: TrainConfig):
    """The training task of `config.task`, a kind of `lapvqa_hf.kinds` that has one."""
    if config.task not in TASKS:
        raise ValueError(f"task={config.task!r}: expected one of {TASKS}.")
    return KINDS[config.task].training_task_class().from_config(config)


def task_for_model(model_config):
    """The task of a saved model (for `lapvqa evaluate`), from its config."""
    kind = kind_of(model_config.model_type)
    if kind is None or kind.training_task is None:
        raise ValueError(
            f"model_type {model_config.model_type!r} has no training task; expected one of "
            f"{', '.join(KINDS[name].model_type for name in TASKS)}."
        )
    return kind.training_task_class().from_model_config(model_config)


def require_image_preparation(features: FeatureStore, expected: str) -> None:
    """Refuse features whose images were prepared otherwise than the task's model takes them: a detection head needs
    its own stretched images (so that the boxes fit), the text heads the encoder's own processor."""
    found = features.image_preparation
    if found == expected or (found is None and expected == IMAGE_PREPARATION):  # lapvqa-hf 0.1.x: text tasks only
        return
    task, option = ("detection", " --task detection") if expected == DETECTION_IMAGE_PREPARATION else ("text", "")
    raise FeatureError(
        f"{features.output_dir} holds features of images prepared otherwise ({found or 'by lapvqa-hf 0.1.x'}); a "
        f"{task} head needs {expected!r}: extract with `lapvqa extract-features{option}` into another folder."
    )


def registered_encoder_name(recipe) -> str | None:
    """The recipe's encoder name for a new head's config; a recipe resized for experiments (other width) keeps its
    record in `feature_recipe` instead."""
    return recipe.name if ENCODER_WIDTHS.get(recipe.name) == recipe.vis_dim else None


def model_to_init_from(task, init_from: str, features: FeatureStore):
    """The task's model saved at `init_from`, checked to take the width of `features`."""
    model = load_model(task.model_class, init_from)
    check_feature_width(init_from, task.feature_width(model), features)
    return model


def check_feature_width(model_source: str, width: int, features: FeatureStore) -> None:
    if width != features.recipe.vis_dim:
        raise FeatureError(
            f"{model_source} takes {width}-dim features but {features.output_dir} holds {features.recipe.vis_dim}-dim "
            f"ones ({features.recipe.name})."
        )


# --- saving safely: checkpoints, the best model, resuming ------------------------------------------------------

PARTIAL = ".partial-"  # prefix of a folder still being written: `checkpoints/.partial-step-N`, `.partial-best`
PREVIOUS_BEST = ".previous-best"  # the replaced best model, between the two renames of a swap
CHECKPOINT_CONFIG = "train_config.json"  # in each checkpoint: the config it was trained with
# Fields a resumed run cannot change: the data, its order and the model would no longer be those of the checkpoint.
FIXED_ON_RESUME = (
    "task",
    "init_from",
    "model",
    "mimic_root",
    "features_dir",
    "report_sections",
    "vision_encoder",
    "radiologists",
    "batch_size",
    "gradient_accumulation_steps",
    "seed",
)
SCHEDULE_FIELDS = ("learning_rate", "warmup_steps", "max_steps")  # a change rebuilds the learning-rate schedule


def _write_json(path: Path, payload: dict) -> None:
    """`write_json_atomically`, under a `.partial-` temporary name that `recover_interrupted_saves` cleans up."""
    write_json_atomically(path, payload, temporary_prefix=f"{PARTIAL}{path.name}.")


def latest_checkpoint(output_dir: Path) -> tuple[Path | None, int]:
    """The last complete checkpoint and its step: only `checkpoints/step-N` (partial ones have another name)."""
    steps = [
        int(match.group(1))
        for folder in (output_dir / "checkpoints").glob("step-*")
        if (match := re.fullmatch(r"step-(\d+)", folder.name))
    ]
    return (output_dir / "checkpoints" / f"step-{max(steps)}", max(steps)) if steps else (None, 0)


def recorded_config(config: TrainConfig) -> dict:
    """The config as recorded with checkpoints: JSON values, with local paths absolute (Hub ids stay as they are)."""
    values = dataclasses.asdict(config)
    for key in ("mimic_root", "features_dir", "init_from", "vision_encoder"):
        if values[key] and Path(values[key]).exists():
            values[key] = str(Path(values[key]).resolve())
    return json.loads(json.dumps(values))


def save_checkpoint(accelerator: Accelerator, config: TrainConfig, output_dir: Path, step: int) -> None:
    """The whole training state at `step`, with the config it was trained with, as `checkpoints/step-N`: written
    under a partial name and renamed once complete, so that a resumed run never reads a half-written one."""
    partial = output_dir / "checkpoints" / f"{PARTIAL}step-{step}"
    target = output_dir / "checkpoints" / f"step-{step}"
    accelerator.save_state(str(partial))  # every process writes its random states there
    if accelerator.is_main_process:
        _write_json(partial / CHECKPOINT_CONFIG, recorded_config(config))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with_umask_permissions(partial)
        os.replace(partial, target)
    accelerator.wait_for_everyone()


def rotate_checkpoints(output_dir: Path, limit: int | None, keep: Path | None = None) -> list[Path]:
    """Deletes the oldest complete checkpoints beyond the newest `limit` (all kept when None), never `keep` (the one
    the run resumed from); each is renamed to a partial name first, so that a kill mid-deletion leaves no half
    checkpoint. Returns the deleted ones."""
    if limit is None:
        return []
    folders = sorted(
        (int(match.group(1)), folder)
        for folder in (output_dir / "checkpoints").glob("step-*")
        if (match := re.fullmatch(r"step-(\d+)", folder.name))
    )
    deleted = []
    for _, folder in folders[:-limit]:
        if keep is not None and folder.resolve() == keep.resolve():
            continue
        doomed = folder.with_name(f"{PARTIAL}deleted-{folder.name}")
        os.replace(folder, doomed)
        shutil.rmtree(doomed)
        deleted.append(folder)
    return deleted


def save_best(output_dir: Path, write: Callable[[Path], None], record: dict) -> None:
    """`write`s the new best model into a partial folder, then swaps it for `best/` (old one renamed away, new one
    renamed in, old one deleted) and records it in `best.json`: a kill at any instant leaves a complete best model,
    in `best/` or, between the two renames, in `.previous-best/` (put back by `recover_interrupted_saves`)."""
    target, partial, previous = output_dir / "best", output_dir / f"{PARTIAL}best", output_dir / PREVIOUS_BEST
    shutil.rmtree(partial, ignore_errors=True)
    write(partial)
    with_umask_permissions(partial)
    if target.exists():
        os.replace(target, previous)
    os.replace(partial, target)
    _write_json(output_dir / "best.json", record)
    if previous.exists():
        shutil.rmtree(previous)


def recover_interrupted_saves(output_dir: Path) -> None:
    """Cleans up after a run killed while saving: partial checkpoints and best models are deleted, and a best model
    moved aside for a successor that never arrived is put back."""
    leftovers = [*(output_dir / "checkpoints").glob(f"{PARTIAL}*"), *output_dir.glob(f"{PARTIAL}*")]
    for leftover in leftovers:
        print(f"removing {leftover}, left unfinished by an interrupted run")
        if leftover.is_dir():
            shutil.rmtree(leftover)
        else:
            leftover.unlink()
    previous = output_dir / PREVIOUS_BEST
    if previous.is_dir() and (output_dir / "best").is_dir():
        shutil.rmtree(previous)  # the swap was complete
    elif previous.is_dir():
        print(f"restoring {output_dir / 'best'}, moved aside by an interrupted run")
        os.replace(previous, output_dir / "best")


def resume_changes(config: TrainConfig, checkpoint: Path, step: int) -> dict[str, tuple]:
    """What changed in `config` since `checkpoint` was saved, as `{key: (then, now)}`: the changes a resumed run
    applies. Those it cannot apply raise a `TrainConfigError`, one line per key."""
    record = checkpoint / CHECKPOINT_CONFIG
    if not record.is_file():  # saved by lapvqa-hf before configs were recorded
        return {}
    then = json.loads(record.read_text())
    changes, problems = {}, []
    for key, now in recorded_config(config).items():
        old = then.get(key, now)
        if key == "output_dir" or old == now:
            continue
        if key in FIXED_ON_RESUME or (key == "mixed_precision" and "fp16" in (old, now)):
            problems.append(
                f"{key}: {old!r} in {checkpoint}, {now!r} now; a resumed run cannot change it: set it back, or "
                "train into a new output_dir (with init_from to start from a saved model)."
            )
        elif key == "max_steps" and now < step:
            problems.append(
                f"max_steps: {now} is below the {step} steps of {checkpoint}; raise it, or train into a new output_dir."
            )
        else:
            changes[key] = (old, now)
    if problems:
        raise TrainConfigError(problems)
    return changes


def apply_resume_changes(
    changes: dict[str, tuple], config: TrainConfig, optimizer: AcceleratedOptimizer, scheduler: AcceleratedScheduler
) -> None:
    """Makes the optimizer and schedule restored by `load_state` follow the changed config."""
    if "weight_decay" in changes:
        optimizer.param_groups[0]["weight_decay"] = config.weight_decay  # the decayed group (or the only one)
    if changes.keys() & set(SCHEDULE_FIELDS):
        schedule = scheduler.scheduler  # a LambdaLR, built for the current warmup_steps and max_steps
        for group in optimizer.param_groups:
            group["initial_lr"] = config.learning_rate
        schedule.base_lrs = [config.learning_rate] * len(optimizer.param_groups)
        schedule.last_epoch -= 1
        schedule.step()  # takes the current step again: sets the new schedule's learning rate for it


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups as transformers' Trainer makes them: weight decay on the weights of other layers, none on biases,
    LayerNorm weights and embeddings (the first group decays, the second does not)."""
    decayed = set(get_parameter_names(model, [*ALL_LAYERNORM_LAYERS, torch.nn.Embedding], [r"bias", r"layernorm"]))
    named = [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]
    return [
        {"params": [p for name, p in named if name in decayed], "weight_decay": weight_decay},
        {"params": [p for name, p in named if name not in decayed], "weight_decay": 0.0},
    ]


def single_group_checkpoint(checkpoint: Path | None) -> bool:
    """Whether `checkpoint`'s optimizer has one group: saved before biases, LayerNorm weights and embeddings left
    weight decay; its run resumes with weight decay on every parameter, as it started."""
    optimizer_file = checkpoint / "optimizer.bin" if checkpoint is not None else None
    if optimizer_file is None or not optimizer_file.is_file():
        return False
    return len(torch.load(optimizer_file, map_location="cpu", weights_only=True, mmap=True)["param_groups"]) == 1


def check_finite(step: int, losses: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
    """Stops training at a NaN or infinite loss (of any micro-batch on any process) or gradient norm, before the
    weights are updated: nothing of this step is saved."""
    advice = "lower learning_rate or max_grad_norm (a re-run resumes from the last checkpoint with the new values)"
    bad = losses[~torch.isfinite(losses)]
    if len(bad):
        raise NonFiniteError(f"step {step}: the training loss is {bad[0].item()}; stopped before the update; {advice}.")
    if grad_norm is not None and not torch.isfinite(grad_norm):
        raise NonFiniteError(
            f"step {step}: the gradient norm is {grad_norm.item()}; stopped before the update; {advice}."
        )


# --- the loop ---------------------------------------------------------------------------------------------------


def train(config: TrainConfig) -> dict:
    problems = config_problems(dataclasses.asdict(config))
    if problems:
        raise TrainConfigError(problems)
    output_dir = Path(config.output_dir)
    checkpoint, step = latest_checkpoint(output_dir)
    changes = resume_changes(config, checkpoint, step) if checkpoint is not None else {}
    task = task_for(config)
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=config.log_with,
        project_dir=str(output_dir),
    )
    if accelerator.is_main_process:
        recover_interrupted_saves(output_dir)
    accelerator.wait_for_everyone()
    set_seed(config.seed)
    features = FeatureStore(config.features_dir)
    model = task.build_model(config, features)  # checks first that the features fit the model
    model.config.feature_recipe = dataclasses.asdict(features.recipe)  # how the training features were made
    root = Path(os.path.abspath(config.mimic_root))  # not resolved: `files/` may link to another disk
    splits = task.load_splits(config.mimic_root)
    train_set = task.examples(splits["train"], features, root)
    eval_set = task.examples(splits["validation"], features, root) if "validation" in splits else None
    max_positions = getattr(model.config, "max_position_embeddings", None)  # none: detection
    tokenizer = build_gpt2_tokenizer(max_positions) if task.generates_text else None
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(
        train_set,
        batch_size=config.batch_size,
        shuffle=True,
        generator=generator,
        collate_fn=task.collate(tokenizer, max_positions),
    )
    if single_group_checkpoint(checkpoint):
        groups = [{"params": list(model.parameters()), "weight_decay": config.weight_decay}]
        accelerator.print(f"{checkpoint} decays every parameter: resuming so (a new output_dir decays weights only)")
    else:
        groups = parameter_groups(model, config.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=config.learning_rate)
    # accelerate steps the schedule once per process at each optimizer step (which sees a batch per process).
    processes = accelerator.num_processes
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, config.warmup_steps * processes, config.max_steps * processes
    )
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    flat = {"model": json.dumps(config.model), "report_sections": ",".join(config.report_sections)}
    accelerator.init_trackers(f"lapvqa-{task.name}", config=dataclasses.asdict(config) | flat)  # none: no-op

    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        apply_resume_changes(changes, config, optimizer, scheduler)
        accelerator.print(f"resumed from {checkpoint}")
        for key, (old, new) in changes.items():
            effect = "the learning-rate schedule is rebuilt" if key in SCHEDULE_FIELDS else "applied from now on"
            accelerator.print(f"{key} changed from {old!r} to {new!r} since {checkpoint.name}: {effect}")
    batches_per_epoch = len(loader)
    best = json.loads((output_dir / "best.json").read_text()) if (output_dir / "best.json").is_file() else None
    history, micro_losses = [], []
    tokens, started = torch.zeros((), dtype=torch.long, device=accelerator.device), time.perf_counter()
    with tqdm(
        total=config.max_steps, initial=step, desc=f"training {task.name}", disable=not accelerator.is_main_process
    ) as progress:  # closed (its line ended) also when training stops with an error
        model.train()
        while step < config.max_steps:
            epoch, offset = divmod(step * config.gradient_accumulation_steps, batches_per_epoch)
            # The sampler's generator is re-seeded per epoch so that a resumed run sees the same order.
            generator.manual_seed(config.seed + epoch)
            epoch_loader = accelerator.skip_first_batches(loader, offset) if offset else loader
            for batch in epoch_loader:
                with accelerator.accumulate(model):
                    loss = model(**batch).loss
                    micro_losses.append(loss.detach())
                    tokens += batch_tokens(batch)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                        # With fp16, an infinite gradient norm is the loss scaler's: it skips the step and
                        # lowers the scale.
                        checked_norm = grad_norm if accelerator.scaler is None else None
                        check_finite(step + 1, accelerator.gather(torch.stack(micro_losses)), checked_norm)
                        micro_losses = []
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                if not accelerator.sync_gradients:
                    continue
                step += 1
                loss_value = accelerator.gather(loss.detach()).mean().item()
                history.append(loss_value)
                tokens_per_second = accelerator.reduce(tokens, "sum").item() / (time.perf_counter() - started)
                learning_rate = scheduler.get_last_lr()[0]
                logged = {
                    "train/loss": loss_value,
                    "train/lr": learning_rate,
                    "train/tokens_per_second": tokens_per_second,
                }
                accelerator.log(logged, step=step)
                progress.update()
                progress.set_postfix(
                    loss=f"{loss_value:.4f}", lr=f"{learning_rate:.2e}", tokens_s=f"{tokens_per_second:.0f}"
                )
                # Validation first: a checkpoint at step N means that step N was validated (and its best model saved).
                if eval_set is not None and (step % config.eval_every == 0 or step == config.max_steps):
                    best = evaluate_and_keep_best(
                        config, task, accelerator, model, tokenizer, features, eval_set, step, best
                    )
                    model.train()
                if step % config.checkpoint_every == 0 or step == config.max_steps:
                    save_checkpoint(accelerator, config, output_dir, step)
                    if accelerator.is_main_process:
                        rotate_checkpoints(output_dir, config.save_total_limit, keep=checkpoint)
                if step >= config.max_steps:
                    break
                tokens, started = torch.zeros_like(tokens), time.perf_counter()  # the next step's, without validation
    accelerator.end_training()
    return {
        "steps": step,
        "losses": history,
        "best": best,
        "num_processes": accelerator.num_processes,
        "is_main_process": accelerator.is_main_process,
    }


def evaluate_and_keep_best(
    config: TrainConfig,
    task: DiffVQATask | CaptioningTask | DetectionTask,
    accelerator: Accelerator,
    model,
    tokenizer,
    features: FeatureStore,
    eval_set,
    step: int,
    best: dict | None,
) -> dict | None:
    """Predicts the validation split across the processes and scores it; the main process saves the model when
    `best_metric` improves."""
    output_dir = Path(config.output_dir)
    unwrapped = accelerator.unwrap_model(model).eval()
    predictions = predict_across_processes(
        task, unwrapped, tokenizer, eval_set, config.batch_size, config.eval_max_new_tokens
    )
    if accelerator.is_main_process:
        scores = task.score(predictions, eval_set)
        accelerator.log({f"eval/{k}": v for k, v in scores["overall"].items()}, step=step)
        score = scores["overall"][config.best_metric]
        # Compared by the current best_metric, also when a resumed run changed it.
        if best is None or score > best["scores"]["overall"][config.best_metric]:
            best = {"step": step, "metric": config.best_metric, "score": score, "scores": scores}
            save_best(output_dir, lambda target: task.save(unwrapped, tokenizer, features, target), best)
    accelerator.wait_for_everyone()
    return json.loads((output_dir / "best.json").read_text()) if (output_dir / "best.json").is_file() else best


# --- the command ------------------------------------------------------------------------------------------------


def exit_with_launcher(poll_seconds: float = 1.0) -> None:
    """Under a launcher (`accelerate launch`, torchrun), exits this process when the launcher dies rather than
    training on as an orphan; a re-run of the command resumes from the last checkpoint."""
    if "LOCAL_RANK" not in os.environ and "ACCELERATE_DYNAMO_BACKEND" not in os.environ:  # both set by launchers
        return
    launcher = os.getppid()

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(poll_seconds)
        with contextlib.suppress(OSError):
            print(f"error: the launcher (pid {launcher}) is gone; stopping. Re-run to resume.", file=sys.stderr)
            sys.stderr.flush()
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-launcher", daemon=True).start()


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="accelerate launch -m lapvqa_hf.train",
        description=summary(__doc__),
        epilog=config_fields_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, type=Path, help="JSON file of TrainConfig fields")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="override a field: key=value")
    args = parser.parse_args(argv)
    exit_with_launcher()
    try:
        config = TrainConfig.from_file(args.config, args.overrides)
        result = train(config)
    except TrainConfigError as error:
        if os.environ.get("RANK", "0") == "0":  # every process finds the same problems: one of them reports
            for problem in error.problems:
                print(f"error: {problem}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as error:  # incl. NonFiniteError, DataError, FeatureError
        print(f"error: {first_line(error)}", file=sys.stderr)
        return 1
    if result["is_main_process"]:
        result_path = Path(config.output_dir) / "result.json"
        _write_json(result_path, {k: result[k] for k in ("steps", "losses", "best", "num_processes")})
        print(f"done: {result['steps']} steps; results in {result_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
