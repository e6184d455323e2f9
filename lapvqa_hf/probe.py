"""Linear probes of frozen image embeddings on NIH ChestX-ray14 and CheXpert: the mean AUC the upstream model cards
report, for any encoder of the collection.

    lapvqa probe MODEL --dataset nih-cxr14|chexpert --root DIR [--output DIR] [--uncertain ignore|ones|zeros]

MODEL is an encoder recipe name (`lapvqa_hf.models.encoders.RECIPES`, e.g. `siglip`; the embedding is the mean of
its patch tokens; `--encoder-checkpoint` points it at a local folder) or a converted model folder or Hub id: a
two-tower model (`lapvqa_two_tower`: the projected image embedding of `get_image_features`) or a vision encoder
(`lapvqa_vision`: its normed CLS token, `pooler_output`). Every image of the official train and test splits
(`lapvqa_hf.probe_data`) is embedded once; then, per label, a logistic regression (scikit-learn's
`LogisticRegression(max_iter=1000)` on standardised features) is fit on the train split and scored by ROC AUC on the
test split. A label with one class only in either split is skipped (no AUC, the reason given) and left out of the
mean, which covers NIH's 14 labels or CheXpert's 5 competition labels. The table goes to stdout; `--output DIR`
writes `DIR/probe.json` too (atomically).
"""

import argparse
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .files import write_json_atomically
from .messages import counted, first_line
from .probe_data import (
    BLANK_LABELS,
    DATASET_NAMES,
    PROBE_LABELS,
    UNCERTAIN_MEANINGS,
    UNCERTAIN_POLICIES,
    ProbeSplit,
    load_probe_dataset,
)

OUTPUT_FILE = "probe.json"
PROTOCOL = (
    "frozen image embeddings; per label, LogisticRegression(max_iter=1000) on standardised features fit on the train "
    "split, ROC AUC on the test split; labels with one class in either split skipped and left out of the mean"
)


class ProbeError(ValueError):
    """The probe cannot run as asked; the message says what was expected and what was found."""


@dataclass(frozen=True)
class Embedder:
    """Image files -> `[images, width]` embeddings of one frozen model."""

    model: str
    embedding: str  # what the embedding is, for the output
    embed: Callable[[list[str]], torch.Tensor]


def recipe_embedder(name: str, checkpoint: str | None, device: torch.device) -> Embedder:
    """The mean patch token of a registry encoder (`checkpoint`, a local folder or Hub id, instead of the
    recipe's), its images prepared by the encoder's own image processor."""
    from .models.encoders import RECIPES, load_encoder, load_encoder_image_processor, patch_tokens
    from .models.image_processing_lapvqa import LapvqaImageProcessor

    recipe = RECIPES[name]
    if checkpoint:
        recipe = dataclasses.replace(recipe, checkpoint=checkpoint, revision=None)
    encoder = load_encoder(recipe).to(device).eval()
    image_processor, reader = load_encoder_image_processor(recipe), LapvqaImageProcessor()
    dtype = next(encoder.parameters()).dtype

    def embed(paths: list[str]) -> torch.Tensor:
        pixel_values = reader.encoder_pixel_values(paths, image_processor).to(device, dtype)
        return patch_tokens(recipe, encoder, pixel_values).mean(dim=1)

    where = f" ({recipe.checkpoint})" if checkpoint else ""
    return Embedder(name + where, f"the mean of the {name} encoder's patch tokens", embed)


def folder_embedder(name: str, device: torch.device) -> Embedder:
    """The image embedding of a converted model whose kind gives one (`ModelKind.image_embedding`: a two-tower model,
    a vision encoder), folder or Hub id, its images prepared by the `LapvqaImageProcessor` saved with it."""
    from .kinds import KINDS, kind_of
    from .model_folders import load_config, load_model
    from .models.image_processing_lapvqa import LapvqaImageProcessor

    model_type = load_config(name).model_type
    kind = kind_of(model_type)
    if kind is None or kind.image_embedding is None:
        embedding_kinds = [k.model_type for k in KINDS.values() if k.image_embedding is not None]
        raise ProbeError(
            f"{name} is a {model_type} model; expected an encoder recipe name or a model of type "
            f"{' or '.join(embedding_kinds)} (a two-tower model or a vision encoder)."
        )
    model = load_model(kind.model_class, name).to(device).eval()
    try:
        image_processor = LapvqaImageProcessor.from_pretrained(name)
    except OSError as error:
        raise ProbeError(f"{name}: no image processor saved with the model ({first_line(error)}).") from None
    dtype = next(model.parameters()).dtype

    def embed(paths: list[str]) -> torch.Tensor:
        return kind.image_embedding.of(model, image_processor(paths)["pixel_values"].to(device, dtype))

    return Embedder(name, kind.image_embedding.what, embed)


def load_embedder(model: str, encoder_checkpoint: str | None = None, device: str | None = None) -> Embedder:
    """`model` as an `Embedder`: an encoder recipe name, else a model folder or Hub id."""
    from .features import resolve_device
    from .models.encoders import RECIPES

    resolved = resolve_device(device)
    if model in RECIPES:
        return recipe_embedder(model, encoder_checkpoint, resolved)
    if encoder_checkpoint:
        raise ProbeError(
            f"--encoder-checkpoint goes with an encoder recipe name ({', '.join(sorted(RECIPES))}); got MODEL {model!r}."
        )
    if "/" not in model and not Path(model).exists():
        raise ProbeError(
            f"{model!r} is no encoder recipe name ({', '.join(sorted(RECIPES))}) and no model folder or Hub id."
        )
    return folder_embedder(model, resolved)


def embed_images(embedder: Embedder, paths: list[str], batch_size: int, progress: bool = True) -> np.ndarray:
    """`[images, width]` float32 embeddings of `paths`, `batch_size` images per call."""
    chunks = []
    bar = tqdm(total=len(paths), desc=f"embedding images with {embedder.model}", unit="image", disable=not progress)
    with torch.inference_mode():
        for start in range(0, len(paths), batch_size):
            batch = paths[start : start + batch_size]
            embeddings = embedder.embed(batch).float().cpu()
            if embeddings.ndim != 2 or len(embeddings) != len(batch):
                raise ProbeError(f"{embedder.model} gave embeddings of shape {list(embeddings.shape)} for "
                                 f"{len(batch)} images; expected [{len(batch)}, width].")  # fmt: skip
            if not torch.isfinite(embeddings).all():
                raise ProbeError(f"{embedder.model} gave NaN or infinite embeddings for an image among {batch}.")
            chunks.append(embeddings)
            bar.update(len(batch))
    bar.close()
    return torch.cat(chunks).numpy()


def _counts(labels: np.ndarray) -> dict[str, int]:
    return {"positives": int((labels == 1).sum()), "examples": len(labels)}


def probe_label(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> dict:
    """One label: a logistic regression on standardised features fit on train, ROC AUC on test. Examples labelled
    NaN are left out; a split with one class only is a skip (`auc` None, `skipped` the reason)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train_kept, test_kept = ~np.isnan(train_y), ~np.isnan(test_y)
    train_y, test_y = train_y[train_kept], test_y[test_kept]
    result = {"auc": None, "train": _counts(train_y), "test": _counts(test_y), "skipped": None}
    for split, labels in (("train", train_y), ("test", test_y)):
        if len(np.unique(labels)) < 2:
            kind = "no examples" if not len(labels) else "only " + ("positives" if labels[0] == 1 else "negatives")
            result["skipped"] = f"{kind} in the {split} split"
            return result
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    classifier.fit(train_x[train_kept], train_y)
    result["auc"] = float(roc_auc_score(test_y, classifier.predict_proba(test_x[test_kept])[:, 1]))
    return result


def probe_splits(embeddings: dict[str, np.ndarray], splits: dict[str, ProbeSplit], labels: tuple[str, ...]) -> dict:
    """`{label: probe_label(...)}` of every label, from the train and test splits' embeddings and labels."""
    train, test = splits["train"].labels, splits["test"].labels
    return {
        label: probe_label(embeddings["train"], train[:, column], embeddings["test"], test[:, column])
        for column, label in enumerate(labels)
    }


def mean_auc_line(payload: dict) -> str:
    """`mean AUC over 14 labels: 0.653`, as the cards write it, naming the labels left out (of `run_probe`'s result)."""
    skipped = ", ".join(payload["mean_excludes"])
    if payload["mean_auc"] is None:
        return f"mean AUC: none (every label skipped: {skipped})"
    line = f"mean AUC over {counted(len(payload['mean_over']), 'label')}: {payload['mean_auc']:.3f}"
    return line + (f" (skipped, not in the mean: {skipped})" if skipped else "")


def results_table(results: dict) -> str:
    """A Markdown table: label, positives / examples in train and test, AUC (or why it was skipped)."""
    lines = ["| label | train positives | test positives | AUC |", "|---|---|---|---|"]
    for label, row in results.items():
        auc = f"{row['auc']:.3f}" if row["auc"] is not None else f"skipped: {row['skipped']}"
        train, test = row["train"], row["test"]
        lines.append(f"| {label} | {train['positives']}/{train['examples']} | "
                     f"{test['positives']}/{test['examples']} | {auc} |")  # fmt: skip
    return "\n".join(lines)


def _versions() -> dict[str, str]:
    import sklearn
    import transformers

    from . import __version__

    return {"lapvqa-hf": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "scikit-learn": sklearn.__version__}  # fmt: skip


def run_probe(
    model: str,
    dataset: str,
    root: str | Path,
    uncertain: str | None = None,
    encoder_checkpoint: str | None = None,
    batch_size: int = 32,
    device: str | None = None,
    max_images: int | None = None,
    progress: bool = True,
) -> dict:
    """Probes `model`'s embeddings on `dataset` (see the module docstring); returns what `probe.json` holds.
    `uncertain` is CheXpert's policy for uncertain labels (default `ignore`; NIH has none)."""
    if dataset not in DATASET_NAMES:
        raise ProbeError(f"dataset must be one of {list(DATASET_NAMES)}, got {dataset!r}.")
    if dataset == "nih-cxr14" and uncertain is not None:
        raise ProbeError("--uncertain applies to CheXpert; NIH ChestX-ray14 has no uncertain labels.")
    if uncertain is not None and uncertain not in UNCERTAIN_POLICIES:
        raise ProbeError(f"--uncertain must be one of {list(UNCERTAIN_POLICIES)}, got {uncertain!r}.")
    for option, value in (("--batch-size", batch_size), ("--max-images", max_images)):
        if value is not None and value < 1:
            raise ProbeError(f"{option} must be a positive number of images, got {value}.")
    policy = (uncertain or "ignore") if dataset == "chexpert" else None
    splits = load_probe_dataset(dataset, root, policy or "ignore", max_images)
    embedder = load_embedder(model, encoder_checkpoint, device)
    images = list(dict.fromkeys(path for split in splits.values() for path in split.images))  # each image once
    embedded = embed_images(embedder, images, batch_size, progress)
    row_of = {path: index for index, path in enumerate(images)}
    embeddings = {name: embedded[[row_of[path] for path in split.images]] for name, split in splits.items()}
    results = probe_splits(embeddings, splits, PROBE_LABELS[dataset])
    scored = [label for label, row in results.items() if row["auc"] is not None]
    return {
        "model": embedder.model,
        "embedding": embedder.embedding,
        "dataset": dataset,
        "dataset_name": DATASET_NAMES[dataset],
        "root": str(Path(root).absolute()),
        "splits": {name: {"source": split.source, "images": len(split.images)} for name, split in splits.items()},
        "max_images": max_images,
        "uncertain_policy": policy,
        "uncertain_labels": UNCERTAIN_MEANINGS[policy] if policy else None,
        "blank_labels": BLANK_LABELS if dataset == "chexpert" else None,
        "protocol": PROTOCOL,
        "labels": results,
        "mean_auc": float(np.mean([results[label]["auc"] for label in scored])) if scored else None,
        "mean_over": scored,
        "mean_excludes": [label for label in results if label not in scored],
        "versions": _versions(),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        metavar="MODEL",
        help="an encoder recipe name (siglip, clip-vit-l14, lapvqa-vit-l14, ...), or a two-tower or vision-encoder "
        "model folder or Hub id",
    )
    parser.add_argument("--dataset", required=True, choices=list(DATASET_NAMES), help="the benchmark to probe on")
    parser.add_argument(
        "--root",
        type=Path,
        required=True,
        help="the release: NIH's folder (Data_Entry_2017.csv, train_val_list.txt, test_list.txt, images*/) or "
        "CheXpert-v1.0-small (train.csv, valid.csv, train/, valid/)",
    )
    parser.add_argument("--output", type=Path, help=f"also write {OUTPUT_FILE} into this folder")
    parser.add_argument(
        "--uncertain",
        choices=list(UNCERTAIN_POLICIES),
        help="CheXpert's uncertain (-1) labels: ignore (default: left out of that label's fit and score), ones "
        "(U-Ones) or zeros (U-Zeros); blank labels are negatives either way",
    )
    parser.add_argument(
        "--encoder-checkpoint",
        help="with a recipe name: a local folder (or Hub id) of the encoder instead of the recipe's",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="images per encoder call (default 32)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument(
        "--max-images", type=int, help="only the first N images of each split: a quick check, not the protocol"
    )


def run(args: argparse.Namespace) -> int:
    from .messages import run_reporting_errors

    def probe() -> None:
        if args.output is not None and args.output.exists() and not args.output.is_dir():
            raise ProbeError(f"--output {args.output} is a file; expected a folder to write {OUTPUT_FILE} into.")
        payload = run_probe(
            args.model,
            args.dataset,
            args.root,
            uncertain=args.uncertain,
            encoder_checkpoint=args.encoder_checkpoint,
            batch_size=args.batch_size,
            device=args.device,
            max_images=args.max_images,
        )
        splits = payload["splits"]
        policy = f"; uncertain labels: {payload['uncertain_policy']}" if payload["uncertain_policy"] else ""
        print(f"{payload['dataset_name']}, {payload['model']}: train {splits['train']['images']} images "
              f"({splits['train']['source']}), test {splits['test']['images']} ({splits['test']['source']}){policy}")  # fmt: skip
        print(results_table(payload["labels"]))
        print(mean_auc_line(payload))
        if args.output is not None:
            args.output.mkdir(parents=True, exist_ok=True)
            write_json_atomically(args.output / OUTPUT_FILE, payload)
            print(f"wrote {args.output / OUTPUT_FILE}")

    return run_reporting_errors(probe, errors=(ValueError, OSError))  # DataError, EncoderError, ModelFolderError too


__all__ = [
    "Embedder",
    "ProbeError",
    "add_arguments",
    "embed_images",
    "load_embedder",
    "mean_auc_line",
    "probe_label",
    "results_table",
    "run",
    "run_probe",
]
