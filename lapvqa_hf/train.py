"""Fine-tune a DiffVQA head on frozen features with accelerate.

    accelerate launch -m lapvqa_hf.train --config train.json [--set key=value ...]
    accelerate launch --multi_gpu --num_processes 2 -m lapvqa_hf.train --config train.json

The config is a JSON object of `TrainConfig` fields; `--set` overrides any of them. The loss covers the answer
tokens only (question and bos are masked with -100). AdamW with linear warmup then cosine decay, gradient
accumulation, clipping and mixed precision come from accelerate; `checkpoint_every` steps the whole training state
is saved (`accelerator.save_state`) and a re-run resumes from the latest checkpoint to the same result as an
uninterrupted run. Every `eval_every` steps the validation split is answered greedily and scored (BLEU/ROUGE); the
best model (by `best_metric`) is saved with `save_pretrained`, with its tokenizer, ready for `lapvqa push`.
"""

import argparse
import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from transformers import get_cosine_schedule_with_warmup

from .configuration_lapvqa_diffvqa import KNOWN_ENCODERS, LapvqaDiffVQAConfig
from .data import load_mimic_diff_vqa
from .features import FeatureStore, images_of
from .metrics import score_answers
from .modeling_lapvqa_diffvqa import LapvqaDiffVQAModel
from .tokenization import build_gpt2_tokenizer, encode_questions


@dataclass
class TrainConfig:
    mimic_root: str
    features_dir: str
    output_dir: str
    init_from: str | None = None  # a converted DiffVQA folder; None trains from scratch
    model: dict = field(default_factory=dict)  # LapvqaDiffVQAConfig overrides when training from scratch
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


class DiffVQAExamples(torch.utils.data.Dataset):
    """Rows of a split with their stored features: (ref_vis, curr_vis, question, answer, question_type)."""

    def __init__(self, rows, features: FeatureStore, root: Path):
        self.rows = list(rows)
        self.features = features
        self.ids = [tuple(images_of([row], root=root)) for row in self.rows]  # (prior id, current id)

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
            sequence = (question + [bos] + answer + [eos])[:max_positions]
            sequences.append(sequence)
            labels.append(([-100] * (len(question) + 1) + answer + [eos])[:max_positions])
        width = max(len(s) for s in sequences)
        return {
            "input_ids": torch.tensor([s + [eos] * (width - len(s)) for s in sequences]),
            "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences]),
            "labels": torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels]),
            "curr_vis": torch.stack([e["curr_vis"] for e in examples]),
            "ref_vis": torch.stack([e["ref_vis"] for e in examples]),
        }

    return collate


@torch.no_grad()
def answer_split(model, tokenizer, dataset: DiffVQAExamples, batch_size: int, max_new_tokens: int) -> list[str]:
    """Greedy answers for every row of `dataset`."""
    answers = []
    for start in range(0, len(dataset), batch_size):
        examples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        prompt = encode_questions(tokenizer, [e["question"] for e in examples]).to(model.device)
        generated = model.generate(
            **prompt,
            curr_vis=torch.stack([e["curr_vis"] for e in examples]).to(model.device),
            ref_vis=torch.stack([e["ref_vis"] for e in examples]).to(model.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
        answers += tokenizer.batch_decode(generated[:, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    return [a.strip() for a in answers]


def build_model(config: TrainConfig, features: FeatureStore) -> LapvqaDiffVQAModel:
    if config.init_from:
        model = LapvqaDiffVQAModel.from_pretrained(config.init_from)
        if model.config.vis_dim != features.recipe.vis_dim:
            raise ValueError(
                f"{config.init_from} takes {model.config.vis_dim}-dim features but {config.features_dir} holds "
                f"{features.recipe.vis_dim}-dim ones ({features.recipe.name})."
            )
        return model
    recipe = features.recipe
    # A recipe resized for experiments (other width) keeps its record in `feature_recipe`, not as encoder_name.
    encoder_name = recipe.name if KNOWN_ENCODERS.get(recipe.name) == recipe.vis_dim else None
    model_config = LapvqaDiffVQAConfig(vis_dim=recipe.vis_dim, encoder_name=encoder_name, **config.model)
    return LapvqaDiffVQAModel(model_config)


def latest_checkpoint(output_dir: Path) -> tuple[Path | None, int]:
    checkpoints = sorted((output_dir / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    return (checkpoints[-1], int(checkpoints[-1].name.split("-")[1])) if checkpoints else (None, 0)


def train(config: TrainConfig) -> dict:
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
    splits = load_mimic_diff_vqa(config.mimic_root)
    train_set = DiffVQAExamples(splits["train"], features, root)
    eval_set = DiffVQAExamples(splits["validation"], features, root) if "validation" in splits else None
    tokenizer = build_gpt2_tokenizer()
    model = build_model(config, features)
    model.config.feature_recipe = dataclasses.asdict(features.recipe)  # how the training features were made
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(
        train_set,
        batch_size=config.batch_size,
        shuffle=True,
        generator=generator,
        collate_fn=training_collate(tokenizer, model.config.max_position_embeddings),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.max_steps)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    if config.log_with:
        accelerator.init_trackers(
            "lapvqa-diffvqa", config=dataclasses.asdict(config) | {"model": json.dumps(config.model)}
        )

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
                best = evaluate_and_keep_best(config, accelerator, model, tokenizer, eval_set, step, best)
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
    config, accelerator, model, tokenizer, eval_set, step: int, best: dict | None
) -> dict | None:
    """Scores the validation split; the main process saves the model when `best_metric` improves."""
    output_dir = Path(config.output_dir)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model).eval()
        predictions = answer_split(unwrapped, tokenizer, eval_set, config.batch_size, config.eval_max_new_tokens)
        scores = score_answers(
            predictions, [r["answer"] for r in eval_set.rows], [r["question_type"] for r in eval_set.rows]
        )
        accelerator.log({f"eval/{k}": v for k, v in scores["overall"].items()}, step=step)
        if best is None or scores["overall"][config.best_metric] > best["score"]:
            best = {"step": step, "score": scores["overall"][config.best_metric], "scores": scores}
            target = output_dir / "best"
            shutil.rmtree(target, ignore_errors=True)
            unwrapped.save_pretrained(target)
            tokenizer.save_pretrained(target)
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
