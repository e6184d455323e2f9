"""Fine-tune a LAPVQA decoder on frozen features with accelerate: a DiffVQA head or the captioning decoder.

    accelerate launch -m lapvqa_hf.train --config train.json [--set key=value ...]
    accelerate launch --multi_gpu --num_processes 2 -m lapvqa_hf.train --config train.json

The config is a JSON object of `TrainConfig` fields; `--set` overrides any of them. `task` says what is trained:

- `diffvqa`: a DiffVQA head on MIMIC-Diff-VQA; `question + [bos] + answer + [eos]`, the loss covers the answer
  and its eos (question and bos are masked with -100).
- `captioning`: the report decoder of `LapvqaCaptioningModel` on MIMIC-CXR reports (`report_sections`);
  `[bos] + report + [eos]`, the loss covers the report and its eos. The frozen ViT-L/14 is not trained and not
  run: the features are its stored patch tokens. It is loaded (from `vision_encoder`, by default the checkpoint
  the features were extracted with) only to complete the saved model, so that it also reports from pixels.

Both run the same loop; what differs (data, batches, model, validation generation, scoring, saving) is a `Task`.
AdamW with linear warmup then cosine decay, gradient accumulation, clipping and mixed precision come from
accelerate; `checkpoint_every` steps the whole training state is saved (`accelerator.save_state`) and a re-run
resumes from the latest checkpoint to the same result as an uninterrupted run. Every `eval_every` steps the
validation split is generated greedily and scored (BLEU/ROUGE/CIDEr); the best model (by `best_metric`) is saved
with `save_pretrained`, with its tokenizer (DiffVQA) or processor (captioning), ready for `lapvqa push`.
"""

import argparse
import dataclasses
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from datasets import DatasetDict
from torch.utils.data import DataLoader
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_cosine_schedule_with_warmup

from .configuration_lapvqa_captioning import LapvqaCaptioningConfig
from .configuration_lapvqa_diffvqa import LapvqaDiffVQAConfig
from .configuration_lapvqa_vision import LapvqaVisionConfig
from .data import REPORT_SECTIONS, load_mimic_cxr_reports, load_mimic_diff_vqa
from .encoders import ENCODER_WIDTHS, load_encoder_image_processor
from .features import FeatureError, FeatureStore, image_id
from .metrics import score_answers
from .modeling_lapvqa_captioning import LapvqaCaptioningModel
from .modeling_lapvqa_diffvqa import LapvqaDiffVQAModel
from .modeling_lapvqa_vision import LapvqaVisionModel
from .pipeline_lapvqa import save_pretrained_with_pipeline
from .processing_lapvqa import LapvqaProcessor
from .tokenization import build_gpt2_tokenizer, encode_questions


@dataclass
class TrainConfig:
    mimic_root: str
    features_dir: str
    output_dir: str
    task: str = "diffvqa"  # "diffvqa" or "captioning"
    init_from: str | None = None  # a model folder of the task's class; None trains from scratch
    model: dict = field(default_factory=dict)  # config overrides (decoder sizes...) when training from scratch
    report_sections: list[str] = field(default_factory=lambda: list(REPORT_SECTIONS))  # captioning: report text
    vision_encoder: str | None = None  # captioning: the features' LapvqaVisionModel (default: the recipe's checkpoint)
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 100
    max_steps: int = 1000
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # "no", "bf16" or "fp16"
    checkpoint_every: int = 500
    eval_every: int = 500
    eval_max_new_tokens: int = 64
    best_metric: str = "bleu4"
    log_with: str | None = None  # an accelerate tracker, e.g. "tensorboard"
    seed: int = 0

    @classmethod
    def from_file(cls, path: str | Path, overrides: list[str] = ()) -> "TrainConfig":
        values = json.loads(Path(path).read_text())
        known = {f.name: f for f in dataclasses.fields(cls)}
        for override in overrides:
            key, _, raw = override.partition("=")
            if key not in known:
                raise ValueError(f"--set {key}: unknown field; known: {sorted(known)}.")
            try:
                values[key] = json.loads(raw)
            except json.JSONDecodeError:
                values[key] = raw  # a bare string
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"{path}: unknown fields {unknown}; known: {sorted(known)}.")
        return cls(**values)


# --- what the tasks share ---------------------------------------------------------------------------------------


def _right_padded(sequences: list[list[int]], labels: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Token sequences and their labels, right-padded (pad ids, mask 0, label -100)."""
    width = max(len(s) for s in sequences)
    return {
        "input_ids": torch.tensor([s + [pad_token_id] * (width - len(s)) for s in sequences]),
        "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences]),
        "labels": torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels]),
    }


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


# --- DiffVQA ----------------------------------------------------------------------------------------------------


class DiffVQAExamples(torch.utils.data.Dataset):
    """Rows of a split with their stored features: (ref_vis, curr_vis, question, answer, question_type)."""

    def __init__(self, rows, features: FeatureStore, root: Path):
        self.rows = list(rows)
        self.features = features
        self.ids = [(image_id(row["prior_image"], root), image_id(row["current_image"], root)) for row in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        prior_id, current_id = self.ids[index]
        return {
            "ref_vis": self.features[prior_id].float(),
            "curr_vis": self.features[current_id].float(),
            "question": row["question"],
            "answer": row["answer"],
            "question_type": row["question_type"],
        }


def training_collate(tokenizer, max_positions: int):
    """question + [bos] + answer + [eos], right-padded; labels only on the answer and its eos."""

    def collate(examples: list[dict]) -> dict:
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        sequences, labels = [], []
        for example in examples:
            question = tokenizer(example["question"], add_special_tokens=False)["input_ids"]
            answer = tokenizer(example["answer"], add_special_tokens=False)["input_ids"]
            sequences.append((question + [bos] + answer + [eos])[:max_positions])
            labels.append(([-100] * (len(question) + 1) + answer + [eos])[:max_positions])
        return {
            **_right_padded(sequences, labels, eos),
            "curr_vis": torch.stack([e["curr_vis"] for e in examples]),
            "ref_vis": torch.stack([e["ref_vis"] for e in examples]),
        }

    return collate


def answer_split(model, tokenizer, dataset: DiffVQAExamples, batch_size: int, max_new_tokens: int) -> list[str]:
    """Greedy answers for every row of `dataset`."""

    def inputs_of(examples: list[dict]) -> dict[str, torch.Tensor]:
        return {
            **encode_questions(tokenizer, [e["question"] for e in examples]),
            "curr_vis": torch.stack([e["curr_vis"] for e in examples]),
            "ref_vis": torch.stack([e["ref_vis"] for e in examples]),
        }

    return _generate_split(model, tokenizer, dataset, batch_size, max_new_tokens, inputs_of)


class DiffVQATask:
    """A DiffVQA head on MIMIC-Diff-VQA questions about (prior, current) pairs, scored per question type."""

    name = "diffvqa"
    model_class = LapvqaDiffVQAModel
    group_label = "question type"

    def load_splits(self, mimic_root: str | Path) -> DatasetDict:
        return load_mimic_diff_vqa(mimic_root)

    def examples(self, rows, features: FeatureStore, root: Path) -> DiffVQAExamples:
        return DiffVQAExamples(rows, features, root)

    def feature_width(self, model: LapvqaDiffVQAModel) -> int:
        return model.config.vis_dim

    def build_model(self, config: TrainConfig, features: FeatureStore) -> LapvqaDiffVQAModel:
        recipe = features.recipe
        if config.init_from:
            model = LapvqaDiffVQAModel.from_pretrained(config.init_from)
            check_feature_width(config.init_from, self.feature_width(model), features)
            return model
        # A recipe resized for experiments (other width) keeps its record in `feature_recipe`, not as encoder_name.
        encoder_name = recipe.name if ENCODER_WIDTHS.get(recipe.name) == recipe.vis_dim else None
        return LapvqaDiffVQAModel(
            LapvqaDiffVQAConfig(vis_dim=recipe.vis_dim, encoder_name=encoder_name, **config.model)
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


class ReportExamples(torch.utils.data.Dataset):
    """Rows of a split with the stored features of their image: (image_features, report)."""

    def __init__(self, rows, features: FeatureStore, root: Path):
        self.rows = list(rows)
        self.features = features
        self.ids = [image_id(row["image"], root) for row in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

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
    group_label = "reports"

    def __init__(
        self, report_sections: list[str] | tuple[str, ...] = REPORT_SECTIONS, vision_encoder: str | None = None
    ):
        if not report_sections:
            raise ValueError(f"report_sections is empty; name the report sections to learn, e.g. {REPORT_SECTIONS}.")
        self.report_sections = list(report_sections)
        self.vision_encoder = vision_encoder
        self._encoder: LapvqaVisionModel | None = None

    def load_splits(self, mimic_root: str | Path) -> DatasetDict:
        return load_mimic_cxr_reports(mimic_root, sections=self.report_sections)

    def examples(self, rows, features: FeatureStore, root: Path) -> ReportExamples:
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
            model = LapvqaCaptioningModel.from_pretrained(config.init_from)
            check_feature_width(config.init_from, self.feature_width(model), features)
        else:
            if "vision_config" in config.model:
                raise ValueError("`model` must not set vision_config: it is the features' encoder (`vision_encoder`).")
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


TASKS = ("diffvqa", "captioning")


def task_for(config: TrainConfig) -> DiffVQATask | CaptioningTask:
    if config.task == "diffvqa":
        return DiffVQATask()
    if config.task == "captioning":
        return CaptioningTask(config.report_sections, config.vision_encoder)
    raise ValueError(f"task={config.task!r}: expected one of {TASKS}.")


def task_for_model(model_config) -> DiffVQATask | CaptioningTask:
    """The task of a saved model (for `lapvqa evaluate`), from its config."""
    if model_config.model_type == "lapvqa_diffvqa":
        return DiffVQATask()
    if model_config.model_type == "lapvqa_captioning":
        return CaptioningTask(getattr(model_config, "report_sections", None) or REPORT_SECTIONS)
    raise ValueError(
        f"model_type {model_config.model_type!r} has no training task; expected lapvqa_diffvqa or lapvqa_captioning."
    )


def check_feature_width(model_source: str, width: int, features: FeatureStore) -> None:
    if width != features.recipe.vis_dim:
        raise FeatureError(
            f"{model_source} takes {width}-dim features but {features.output_dir} holds {features.recipe.vis_dim}-dim "
            f"ones ({features.recipe.name})."
        )


# --- the loop ---------------------------------------------------------------------------------------------------


def latest_checkpoint(output_dir: Path) -> tuple[Path | None, int]:
    checkpoints = sorted((output_dir / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    return (checkpoints[-1], int(checkpoints[-1].name.split("-")[1])) if checkpoints else (None, 0)


def train(config: TrainConfig) -> dict:
    task = task_for(config)
    output_dir = Path(config.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=config.log_with,
        project_dir=str(output_dir),
    )
    set_seed(config.seed)
    features = FeatureStore(config.features_dir)
    root = Path(config.mimic_root).resolve()
    splits = task.load_splits(config.mimic_root)
    train_set = task.examples(splits["train"], features, root)
    eval_set = task.examples(splits["validation"], features, root) if "validation" in splits else None
    model = task.build_model(config, features)
    model.config.feature_recipe = dataclasses.asdict(features.recipe)  # how the training features were made
    max_positions = model.config.max_position_embeddings
    tokenizer = build_gpt2_tokenizer(max_positions)
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(
        train_set,
        batch_size=config.batch_size,
        shuffle=True,
        generator=generator,
        collate_fn=task.collate(tokenizer, max_positions),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.max_steps)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    if config.log_with:
        flat = {"model": json.dumps(config.model), "report_sections": ",".join(config.report_sections)}
        accelerator.init_trackers(f"lapvqa-{task.name}", config=dataclasses.asdict(config) | flat)

    checkpoint, step = latest_checkpoint(output_dir)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        accelerator.print(f"resumed from {checkpoint}")
    batches_per_epoch = len(loader)
    best = json.loads((output_dir / "best.json").read_text()) if (output_dir / "best.json").is_file() else None
    history = []
    model.train()
    while step < config.max_steps:
        epoch, offset = divmod(step * config.gradient_accumulation_steps, batches_per_epoch)
        # The sampler's generator is re-seeded per epoch so that a resumed run sees the same order.
        generator.manual_seed(config.seed + epoch)
        epoch_loader = accelerator.skip_first_batches(loader, offset) if offset else loader
        for batch in epoch_loader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            step += 1
            loss_value = accelerator.gather(loss.detach()).mean().item()
            history.append(loss_value)
            accelerator.log({"train/loss": loss_value, "train/lr": scheduler.get_last_lr()[0]}, step=step)
            if step % config.checkpoint_every == 0 or step == config.max_steps:
                accelerator.save_state(str(output_dir / "checkpoints" / f"step-{step}"))
            if eval_set is not None and (step % config.eval_every == 0 or step == config.max_steps):
                best = evaluate_and_keep_best(
                    config, task, accelerator, model, tokenizer, features, eval_set, step, best
                )
                model.train()
            if step >= config.max_steps:
                break
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
    task: DiffVQATask | CaptioningTask,
    accelerator: Accelerator,
    model,
    tokenizer,
    features: FeatureStore,
    eval_set,
    step: int,
    best: dict | None,
) -> dict | None:
    """Scores the validation split; the main process saves the model when `best_metric` improves."""
    output_dir = Path(config.output_dir)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model).eval()
        predictions = task.predict(unwrapped, tokenizer, eval_set, config.batch_size, config.eval_max_new_tokens)
        scores = task.score(predictions, eval_set)
        accelerator.log({f"eval/{k}": v for k, v in scores["overall"].items()}, step=step)
        if best is None or scores["overall"][config.best_metric] > best["score"]:
            best = {"step": step, "score": scores["overall"][config.best_metric], "scores": scores}
            target = output_dir / "best"
            shutil.rmtree(target, ignore_errors=True)
            task.save(unwrapped, tokenizer, features, target)
            (output_dir / "best.json").write_text(json.dumps(best, indent=1))
    accelerator.wait_for_everyone()
    return json.loads((output_dir / "best.json").read_text()) if (output_dir / "best.json").is_file() else best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="accelerate launch -m lapvqa_hf.train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, type=Path, help="JSON file of TrainConfig fields")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="override a field: key=value")
    args = parser.parse_args(argv)
    config = TrainConfig.from_file(args.config, args.overrides)
    result = train(config)
    if result["is_main_process"]:
        result_path = Path(config.output_dir) / "result.json"
        result_path.write_text(
            json.dumps({k: result[k] for k in ("steps", "losses", "best", "num_processes")}, indent=1)
        )
        print(f"done: {result['steps']} steps; results in {result_path}")


if __name__ == "__main__":
    main()
