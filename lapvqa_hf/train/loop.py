"""The training loop, the same for every task: AdamW with warmup and cosine decay, gradient accumulation, clipping,
mixed precision and trackers from accelerate; validation every `eval_every` steps, shared among the processes, with
the best model kept; checkpoints every `checkpoint_every` steps, resumed to the same result as an uninterrupted run."""

import dataclasses
import json
import os
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import (
    get_cosine_schedule_with_warmup,
)
from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
from transformers.trainer_pt_utils import get_parameter_names

from ..features import FeatureStore
from .checkpoints import (
    SCHEDULE_FIELDS,
    apply_resume_changes,
    latest_checkpoint,
    recover_interrupted_saves,
    resume_changes,
    rotate_checkpoints,
    save_best,
    save_checkpoint,
    single_group_checkpoint,
)
from .config import NonFiniteError, TrainConfig
from .tasks import TrainingTask, batch_tokens, predict_across_processes, task_for


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups as transformers' Trainer makes them: weight decay on the weights of other layers, none on biases,
    LayerNorm weights and embeddings (the first group decays, the second does not)."""
    decayed = set(get_parameter_names(model, [*ALL_LAYERNORM_LAYERS, torch.nn.Embedding], [r"bias", r"layernorm"]))
    named = [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]
    return [
        {"params": [p for name, p in named if name in decayed], "weight_decay": weight_decay},
        {"params": [p for name, p in named if name not in decayed], "weight_decay": 0.0},
    ]


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
    """Trains `config.task` (a valid config: `TrainConfig` checks itself); returns the steps, losses and best model."""
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
    features = FeatureStore(config.features_dir) if config.inputs == "features" else None  # None: from pixels
    model = task.build_model(config, features)  # checks first that the features fit the model
    if features is not None:
        model.config.feature_recipe = dataclasses.asdict(features.recipe)  # how the training features were made
    if config.gradient_checkpointing:  # `activation_checkpointing_enable` from transformers 5.25 (the old name warns)
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    root = Path(os.path.abspath(config.data_root))  # not resolved: `files/` may link to another disk
    splits = task.load_splits(config.data_root)
    train_set = task.examples(splits["train"], features, root)
    eval_set = task.examples(splits["validation"], features, root) if "validation" in splits else None
    max_positions = getattr(model.config, "max_position_embeddings", None)  # none: detection, two-tower
    tokenizer = task.tokenizer(model)
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
                    loss = task.training_loss(model, batch)
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
    task: TrainingTask,
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
