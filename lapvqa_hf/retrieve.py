"""`lapvqa retrieve`: a two-tower model ranks a report corpus for each chest X-ray, or the X-rays for each report;
on paired data, Recall@1/5/10 in both directions.

    lapvqa retrieve MODEL --images images.csv --reports reports.csv --output ranked.jsonl
    lapvqa retrieve MODEL --pairs pairs.jsonl --output ranked.jsonl --direction report-to-image --top-k 5

`--images` holds `id, image` (relative paths are read from `--image-root`, default the file's folder), `--reports`
`id, report`; `--pairs` holds `image, report` (and `id`, else a row's id is its row number from 0), row i's image
matching row i's report. Files are CSV or JSON Lines, read as `lapvqa answer` reads its input. Every image and every
report is embedded once, in batches. The output has one JSON line per query, in input order: `{"id", "reports":
[{"id", "score"}, ...]}` (image-to-report) or `{"id", "images": [...]}` (report-to-image), the best `--top-k` first
(equal scores in corpus order), each score the model's logit. An image that cannot be read is its query's `error`
line, or is left out of the image corpus. The data is paired with `--pairs`, or when the images' and the reports'
ids are the same set: Recall@K of both directions is then printed and written beside the output
(`OUTPUT.metrics.json`).
"""

import argparse
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .answer import json_line
from .files import with_umask_permissions, write_json_atomically
from .messages import counted, first_line
from .model_folders import LOADING_ERRORS, ModelFolderError, load_config, load_model
from .models.configuration_lapvqa_two_tower import LapvqaTwoTowerConfig
from .tables import TableError, read_table, text_problems

DIRECTIONS = ("image-to-report", "report-to-image")
QUERY_CHUNK = 1024  # queries scored against the whole corpus at once

ItemId = str | int  # ids as read; a --pairs file without ids numbers its rows


class RetrieveError(ValueError):
    """The run cannot start; the message says what was expected and what was found."""


@dataclass
class Corpora:
    """The images `(id, path)` and reports `(id, text)` to retrieve among, and whether they are paired (the same
    ids on both sides: an image's match is the report of its id)."""

    images: list[tuple[ItemId, str]]
    reports: list[tuple[ItemId, str]]
    paired: bool


# --- input and output ---------------------------------------------------------------------------------------------


def read_rows(path: Path, columns: tuple[str, ...], ids_optional: bool = False) -> list[tuple[ItemId, dict]]:
    """`(id, row)` of every row of a CSV or JSON Lines file, each holding `id` and `columns` as non-empty text (with
    `ids_optional`, a file without ids numbers its rows from 0). A row without them, or an id seen twice, is
    refused in one line."""
    try:
        rows = read_table(path, columns)
    except TableError as error:
        raise RetrieveError(str(error)) from None
    numbered = ids_optional and not any(isinstance(row.values, dict) and "id" in row.values for row in rows)
    required = columns if numbered else ("id", *columns)
    read, seen = [], {}
    for row in rows:
        problem = row.problem or text_problems(row.values, required)
        if problem:
            raise RetrieveError(f"{path} line {row.line}: {problem}.")
        item_id = row.index if numbered else row.values["id"]
        if item_id in seen:
            raise RetrieveError(
                f"{path}: id {item_id!r} is on lines {seen[item_id]} and {row.line}; ids must be unique."
            )
        seen[item_id] = row.line
        read.append((item_id, row.values))
    return read


def read_corpora(
    images: Path | None, reports: Path | None, pairs: Path | None, image_root: Path | None = None
) -> Corpora:
    """The images and reports of `--images` + `--reports`, or of `--pairs`; relative image paths are read from
    `image_root` (default: the folder of the file that names them)."""
    separate = (images, reports)
    if (pairs is None and None in separate) or (pairs is not None and separate != (None, None)):
        raise RetrieveError("pass --images and --reports (id, image / id, report), or --pairs (image, report).")
    if pairs is not None:
        rows = read_rows(pairs, ("image", "report"), ids_optional=True)
        root = image_root or pairs.parent
        return Corpora(
            [(item_id, str(root / row["image"])) for item_id, row in rows],
            [(item_id, row["report"]) for item_id, row in rows],
            paired=True,
        )
    root = image_root or images.parent
    image_rows = [(item_id, str(root / row["image"])) for item_id, row in read_rows(images, ("image",))]
    report_rows = [(item_id, row["report"]) for item_id, row in read_rows(reports, ("report",))]
    paired = {item_id for item_id, _ in image_rows} == {item_id for item_id, _ in report_rows}
    return Corpora(image_rows, report_rows, paired)


def metrics_path(output: Path) -> Path:
    """Beside the output: Recall@K of a run on paired data."""
    return output.with_name(f"{output.name}.metrics.json")


def check_output(output: Path, inputs: list[Path]) -> None:
    """The output must be a file that is none of the inputs."""
    if output.is_dir():
        raise RetrieveError(f"--output {output} is a folder; name a .jsonl file to write.")
    for path in inputs:
        if output.resolve() == path.resolve():
            raise RetrieveError(f"--output {output} is the input file {path}; write the rankings to another file.")


def write_lines_atomically(path: Path, lines: list[dict]) -> None:
    """JSON Lines under a temporary name beside `path`, renamed over it once complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write("".join(map(json_line, lines)))
            file.flush()
            os.fsync(file.fileno())
        with_umask_permissions(temporary)
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)


# --- the model --------------------------------------------------------------------------------------------------


def load_two_tower(name: str, device: torch.device):
    """The two-tower model (`AutoModel`, in eval mode on `device`) and its processor (`AutoProcessor`) of a folder or
    Hub id; any other model is refused in one line naming its type."""
    from transformers import AutoModel, AutoProcessor

    model_type = load_config(name).model_type
    if model_type != LapvqaTwoTowerConfig.model_type:
        raise RetrieveError(
            f"{name} is a {model_type} model; `lapvqa retrieve` takes a two-tower model "
            f"({LapvqaTwoTowerConfig.model_type}: lapvqa-contrastive or lapvqa-sigmoid)."
        )
    model = load_model(AutoModel, name)
    try:
        processor = AutoProcessor.from_pretrained(name)
    except LOADING_ERRORS as error:
        raise ModelFolderError(f"{name}: its processor could not be loaded ({first_line(error)}).") from None
    return model.eval().to(device), processor


def embed_images(
    model, processor, paths: list[str], batch_size: int, progress: bool = True
) -> tuple[torch.Tensor, list[int], dict[int, str]]:
    """The L2-normalised embeddings (float32, on the model's device) of the images that could be read, their
    indices in `paths`, and each other image's one-line error."""
    embeddings, readable, errors = [], [], {}
    bar = tqdm(total=len(paths), unit="image", desc="images", disable=not progress)
    for start in range(0, len(paths), batch_size):
        pixels = {}
        for index in range(start, min(start + batch_size, len(paths))):
            try:
                pixels[index] = processor.image_processor(paths[index], return_tensors="pt")["pixel_values"]
            except (ValueError, OSError) as error:
                errors[index] = f"image: {first_line(error)}"
        if pixels:
            batch = torch.cat(list(pixels.values())).to(model.device, model.dtype)
            features = model.get_image_features(pixel_values=batch).pooler_output.float()
            for index, feature in zip(pixels, features, strict=True):
                if torch.isfinite(feature).all():
                    readable.append(index)
                    embeddings.append(feature)
                else:
                    errors[index] = "the model gave a non-finite embedding (NaN or inf) for this image"
        bar.update(min(batch_size, len(paths) - start))
    bar.close()
    if not embeddings:
        raise RetrieveError(f"none of the {counted(len(paths), 'image')} could be read ({errors[0]}).")
    return torch.nn.functional.normalize(torch.stack(embeddings), dim=-1), readable, errors


def embed_reports(model, processor, reports: list[tuple[ItemId, str]], batch_size: int, progress: bool = True):
    """The L2-normalised embeddings (float32, on the model's device) of the reports, in order; texts beyond the
    report encoder's positions are truncated, as the processor does."""
    embeddings = []
    bar = tqdm(total=len(reports), unit="report", desc="reports", disable=not progress)
    for start in range(0, len(reports), batch_size):
        batch = reports[start : start + batch_size]
        inputs = processor(text=[text for _, text in batch]).to(model.device)
        features = model.get_text_features(**inputs).pooler_output.float()
        for (item_id, _), feature in zip(batch, features, strict=True):
            if not torch.isfinite(feature).all():
                raise RetrieveError(
                    f"report {item_id!r}: the model gave a non-finite embedding (NaN or inf); check its weights."
                )
        embeddings.append(features)
        bar.update(len(batch))
    bar.close()
    return torch.nn.functional.normalize(torch.cat(embeddings), dim=-1)


def ranked(model, queries: torch.Tensor, corpus: torch.Tensor, top_k: int, images_are_queries: bool):
    """Each query's `(scores, corpus indices)` of its best `top_k` items, best first (equal scores in corpus order),
    scored by the model's `similarity` (`[images, texts]` logits) a chunk of queries at a time."""
    for start in range(0, len(queries), QUERY_CHUNK):
        chunk = queries[start : start + QUERY_CHUNK]
        scores = model.similarity(chunk, corpus) if images_are_queries else model.similarity(corpus, chunk).T
        order = scores.sort(dim=1, descending=True, stable=True).indices[:, :top_k]
        yield from zip(scores.gather(1, order).tolist(), order.tolist(), strict=True)


def paired_recall(model, corpora: Corpora, images: torch.Tensor, readable: list[int], reports: torch.Tensor) -> dict:
    """The K values and Recall@K of both directions over the pairs whose image could be read: each such image
    against their reports, each of their reports against their images."""
    from .metrics.retrieval import RECALL_KS, recall_at_k  # here: the metrics package imports `evaluate` (seconds)

    report_of = {item_id: j for j, (item_id, _) in enumerate(corpora.reports)}
    matching = reports[[report_of[corpora.images[i][0]] for i in readable]]
    similarity = model.similarity(images, matching).float().cpu()
    recall = {
        direction: {f"R@{k}": recall_at_k(matrix, k) for k in RECALL_KS}
        for direction, matrix in zip(DIRECTIONS, (similarity, similarity.T), strict=True)
    }
    return {"k": list(RECALL_KS), "recall": recall}


# --- the run ----------------------------------------------------------------------------------------------------


def retrieve(
    model: str,
    output: str | os.PathLike,
    images: str | os.PathLike | None = None,
    reports: str | os.PathLike | None = None,
    pairs: str | os.PathLike | None = None,
    direction: str = "image-to-report",
    top_k: int = 10,
    image_root: str | os.PathLike | None = None,
    batch_size: int = 32,
    device: str | None = None,
    progress: bool = True,
) -> dict | None:
    """Ranks the corpus for every query into `output` (see the module's docstring) and, on paired data, writes and
    returns Recall@K of both directions (else None, and a stale metrics file of `output` is removed)."""
    from .features import resolve_device

    if direction not in DIRECTIONS:
        raise RetrieveError(f"--direction must be one of {list(DIRECTIONS)}, got {direction!r}.")
    if top_k < 1 or batch_size < 1:
        raise RetrieveError(f"--top-k and --batch-size must be at least 1, got {top_k} and {batch_size}.")
    output = Path(output)
    images, reports, pairs, image_root = (
        Path(p) if p is not None else None for p in (images, reports, pairs, image_root)
    )
    corpora = read_corpora(images, reports, pairs, image_root)
    check_output(output, [path for path in (images, reports, pairs) if path is not None])
    two_tower, processor = load_two_tower(str(model), resolve_device(device))
    with torch.inference_mode():
        image_embeddings, readable, errors = embed_images(
            two_tower, processor, [path for _, path in corpora.images], batch_size, progress
        )
        report_embeddings = embed_reports(two_tower, processor, corpora.reports, batch_size, progress)
        if direction == "image-to-report":
            lines = _image_queries(two_tower, corpora, image_embeddings, errors, report_embeddings, top_k)
        else:
            corpus_ids = [corpora.images[i][0] for i in readable]
            found = ranked(two_tower, report_embeddings, image_embeddings, top_k, images_are_queries=False)
            lines = [
                {"id": item_id, "images": _results(corpus_ids, *result)}
                for (item_id, _), result in zip(corpora.reports, found, strict=True)
            ]
        scores = (
            paired_recall(two_tower, corpora, image_embeddings, readable, report_embeddings) if corpora.paired else None
        )
    write_lines_atomically(output, lines)
    query = "image" if direction == "image-to-report" else "report"
    said = f"wrote {output}: {counted(len(lines), f'{query} query', f'{query} queries')}, top {top_k} each"
    if errors:
        said += f"; {counted(len(errors), 'image')} could not be read (first: {errors[min(errors)]})"
    print(said)
    if scores is None:
        metrics_path(output).unlink(missing_ok=True)
        return None
    metrics = {
        "model": str(model),
        "direction": direction,
        "images": len(corpora.images),
        "reports": len(corpora.reports),
        "pairs": len(readable),  # those whose image could be read
        "unreadable_images": len(errors),
        **scores,
    }
    write_json_atomically(metrics_path(output), metrics)
    print(f"| Recall@K ({len(readable)} pairs) | {' | '.join(f'R@{k}' for k in scores['k'])} |")
    print(f"|---|{'---|' * len(scores['k'])}")
    for name, values in scores["recall"].items():
        print(f"| {name} | {' | '.join(f'{value:.3f}' for value in values.values())} |")
    return metrics


def _results(corpus_ids: list[ItemId], scores: list[float], indices: list[int]) -> list[dict]:
    return [{"id": corpus_ids[j], "score": round(score, 4)} for score, j in zip(scores, indices, strict=True)]


def _image_queries(model, corpora: Corpora, images, errors: dict[int, str], reports, top_k: int) -> list[dict]:
    """The image-to-report lines, in input order: each readable image's best reports, each other image's error."""
    found = ranked(model, images, reports, top_k, images_are_queries=True)
    report_ids = [item_id for item_id, _ in corpora.reports]
    lines = []
    for i, (item_id, _) in enumerate(corpora.images):
        lines.append(
            {"id": item_id, "error": errors[i]}
            if i in errors
            else {"id": item_id, "reports": _results(report_ids, *next(found))}
        )
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a two-tower model folder or Hub id (lapvqa-contrastive or lapvqa-sigmoid)")
    parser.add_argument("--images", type=Path, help="CSV or JSON Lines file of id, image")
    parser.add_argument("--reports", type=Path, help="CSV or JSON Lines file of id, report: the report corpus")
    parser.add_argument(
        "--pairs", type=Path, help="instead of --images and --reports: a file of image, report (optional id), paired"
    )
    parser.add_argument("--output", required=True, type=Path, help="JSON Lines file to write, one line per query")
    parser.add_argument(
        "--direction", choices=DIRECTIONS, default="image-to-report", help="what the queries are (default: images)"
    )
    parser.add_argument("--top-k", type=int, default=10, help="best items listed per query (default 10)")
    parser.add_argument("--image-root", type=Path, help="folder of relative image paths (default: their file's)")
    parser.add_argument("--batch-size", type=int, default=32, help="images or reports per model call (default 32)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")


def run(args: argparse.Namespace) -> int:
    from .features import FeatureError
    from .messages import run_reporting_errors

    def retrieve_all() -> None:
        retrieve(
            args.model,
            args.output,
            images=args.images,
            reports=args.reports,
            pairs=args.pairs,
            direction=args.direction,
            top_k=args.top_k,
            image_root=args.image_root,
            batch_size=args.batch_size,
            device=args.device,
        )

    return run_reporting_errors(retrieve_all, errors=(RetrieveError, ModelFolderError, FeatureError, OSError))
