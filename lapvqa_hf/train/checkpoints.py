"""Saving safely and resuming: checkpoints (`checkpoints/step-N`), the best model (`best/`, `best.json`), cleaning
up after a kill, and what a resumed run may change. Everything is written under a partial name and renamed into
place, so that a kill at any instant loses nothing complete."""

import dataclasses
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.scheduler import AcceleratedScheduler

from ..files import with_umask_permissions, write_json_atomically
from .config import RENAMED_FIELDS, TrainConfig, TrainConfigError

PARTIAL = ".partial-"  # prefix of a folder still being written: `checkpoints/.partial-step-N`, `.partial-best`
PREVIOUS_BEST = ".previous-best"  # the replaced best model, between the two renames of a swap
CHECKPOINT_CONFIG = "train_config.json"  # in each checkpoint: the config it was trained with
# Fields a resumed run cannot change: the data, its order and the model would no longer be those of the checkpoint.
FIXED_ON_RESUME = (
    "task",
    "init_from",
    "model",
    "data_root",
    "features_dir",
    "inputs",
    "train_encoder",
    "report_sections",
    "vision_encoder",
    "radiologists",
    "batch_size",
    "gradient_accumulation_steps",
    "seed",
)
SCHEDULE_FIELDS = ("learning_rate", "warmup_steps", "max_steps")  # a change rebuilds the learning-rate schedule


def write_json(path: Path, payload: dict) -> None:
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
    for key in ("data_root", "features_dir", "init_from", "vision_encoder"):
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
        write_json(partial / CHECKPOINT_CONFIG, recorded_config(config))
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
    write_json(output_dir / "best.json", record)
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
    then = {RENAMED_FIELDS.get(key, key): value for key, value in json.loads(record.read_text()).items()}
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


def single_group_checkpoint(checkpoint: Path | None) -> bool:
    """Whether `checkpoint`'s optimizer has one group: saved before biases, LayerNorm weights and embeddings left
    weight decay; its run resumes with weight decay on every parameter, as it started."""
    optimizer_file = checkpoint / "optimizer.bin" if checkpoint is not None else None
    if optimizer_file is None or not optimizer_file.is_file():
        return False
    return len(torch.load(optimizer_file, map_location="cpu", weights_only=True, mmap=True)["param_groups"]) == 1
