"""`lapvqa answer`: a converted LAPVQA model over a whole dataset, with pictures of where it looked.

    lapvqa answer MODEL --input questions.csv --output answers.jsonl [--save-maps maps/]
    accelerate launch -m lapvqa_hf.answer MODEL --input questions.csv --output answers.jsonl   # one shard per process

The input is CSV or JSON Lines (UTF-8, or UTF-16 with a byte-order mark) with the model's columns (DiffVQA
`prior_image, current_image, question`; VQA `image, question`; report generation and detection `image`; phrase
grounding `image, phrase`); relative image paths are read from `--image-root` (default: the input file's folder).
The output has one JSON line per input row, in input order: `{"row": N, "input": {...the row as read...}, ...}`
with the model's `answer`, `report`, `boxes` or the phrase's `box`, or an `error` saying why that row was not
answered. A row's problem (a missing image, an empty or too long question) is that row's error; the run goes on.

Each distinct image is encoded once (a cache of `--feature-cache-size` images; rows that share images, such as the
questions of one study pair, are best kept together), answers are generated in batches, and a progress bar shows
rows/s. Every process appends finished batches to its own part file (`.OUTPUT.part-R-of-W.jsonl`, flushed to disk
per batch); the output appears, merged in input order, only once every row is done. A killed run loses at most the
batch in flight: a re-run with the same arguments resumes from the part files, and only then: parts written by
another model (weights or code), dtype, generation options or input are refused.
"""

import argparse
import contextlib
import copy
import functools
import hashlib
import inspect
import json
import math
import os
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from .files import sha256_of, write_json_atomically
from .kinds import KINDS, ModelKind, kind_of
from .messages import first_line, summary
from .model_folders import LOADING_ERRORS, ModelFolderError, check_weights_fit_config, load_config
from .tables import TableError, TableRow, is_valid_text, read_table, text_problems

# How a picture names each image column.
IMAGE_TITLES = {"prior_image": "prior (reference)", "current_image": "current", "image": "image"}
MAP_SIDE = 320  # pixels of each image in a saved picture
OUTPUT_FORMAT = 2  # {"row", "input": {...}, model fields}; 1 (lapvqa-hf 0.4): the row's columns beside the model's
MAPS_MARKER = ".lapvqa-answer-maps.json"  # in a --save-maps folder: the run whose pictures it holds
ROW_ERRORS = (ValueError, RuntimeError, IndexError, OSError)  # what answering one row may raise: that row's error


class AnswerError(ValueError):
    """The run cannot start or go on; the message says what was expected and what was found."""


# --- input and output ---------------------------------------------------------------------------------------------


def read_input(path: str | os.PathLike, columns: tuple[str, ...]) -> list[TableRow]:
    """The rows of a CSV (with a header) or JSON Lines file (see `lapvqa_hf.tables`). A CSV whose header lacks a
    column of the model, or a file none of whose rows has them all, is refused in one line; any other row's problem
    is that row's."""
    path = Path(path)
    try:
        rows = read_table(path, columns)
    except TableError as error:
        raise AnswerError(str(error)) from None
    for row in rows:
        row.problem = row.problem or text_problems(row.values, columns)
    if all(row.problem for row in rows):
        raise AnswerError(
            f"{path}: no row has this model's columns {list(columns)} as non-empty text (line {rows[0].line}: "
            f"{rows[0].problem})."
        )
    return rows


def json_line(value: object) -> str:
    """One JSON line, non-ASCII text as is; text that UTF-8 cannot hold (a lone surrogate) escaped, so that every
    input value reaches the output as it was read."""
    text = json.dumps(value, ensure_ascii=False)
    return (text if is_valid_text(text) else json.dumps(value)) + "\n"


def _differing(found: dict, expected: dict) -> str:
    """The names of the run settings two run records disagree on, for messages."""
    found_run, expected_run = found.get("lapvqa_answer", {}), expected.get("lapvqa_answer", {})
    if not isinstance(found_run, dict):
        return "everything"
    names = sorted(key for key in expected_run.keys() | found_run.keys() if found_run.get(key) != expected_run.get(key))
    return ", ".join(names) or "nothing"


class PartFile:
    """One process's finished rows, a JSON line each after a header line naming the run; appended per batch and
    flushed to disk, so that a kill loses at most the batch in flight. A torn last line is dropped on resume."""

    def __init__(self, path: Path, header: dict):
        self.path, self.done = path, {}
        if path.exists():
            lines = path.read_bytes().split(b"\n")
            complete, torn = lines[:-1], lines[-1]  # a finished file ends with a newline: `torn` is empty
            try:
                found = json.loads(complete[0]) if complete else None
                if found is not None and found != header:
                    raise AnswerError(
                        f"{path} holds rows of another run ({_differing(found, header)} differ); pass --overwrite "
                        "to start again, or another --output."
                    )
                for line in complete[1:]:
                    row = json.loads(line)
                    self.done[row["row"]] = row
            except (ValueError, KeyError, TypeError, AttributeError) as error:
                if isinstance(error, AnswerError):
                    raise
                raise AnswerError(
                    f"{path} is damaged ({first_line(error)}); pass --overwrite to start again."
                ) from None
            if torn or not complete:
                with open(path, "r+b") as file:
                    file.truncate(sum(len(line) + 1 for line in complete))
        if not self.done and (not path.exists() or path.stat().st_size == 0):
            self._append([header])

    def append(self, rows: list[dict]) -> None:
        self._append(rows)
        self.done.update((row["row"], row) for row in rows)

    def _append(self, rows: list[dict]) -> None:
        with open(self.path, "a", encoding="utf-8") as file:
            file.write("".join(map(json_line, rows)))
            file.flush()
            os.fsync(file.fileno())


def part_path(output: Path, rank: int, world: int) -> Path:
    return output.with_name(f".{output.name}.part-{rank:03d}-of-{world:03d}.jsonl")


def record_path(output: Path) -> Path:
    """Beside a finished output: the run that wrote it (what `lapvqa answer` checks before resuming or replacing)."""
    return output.with_name(f".{output.name}.lapvqa-answer.json")


def merge_parts(output: Path, world: int, total: int, header: dict) -> list[dict]:
    """Writes the output, in input order, from every process's part file (atomically, after the record of the run
    beside it), then removes the parts; returns the merged rows."""
    rows: dict[int, dict] = {}
    for rank in range(world):
        lines = part_path(output, rank, world).read_bytes().split(b"\n")[1:-1]  # after the header, before the end
        rows.update((row["row"], row) for row in map(json.loads, lines))
    if sorted(rows) != list(range(total)):
        raise AnswerError(f"the part files hold {len(rows)} of {total} rows; re-run to finish them.")
    merged = [rows[i] for i in range(total)]
    write_json_atomically(record_path(output), {**header, "rows": total})
    temporary = output.with_name(f".{output.name}.merging")
    with open(temporary, "w", encoding="utf-8") as file:
        file.write("".join(map(json_line, merged)))
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, output)
    for rank in range(world):
        part_path(output, rank, world).unlink()
    return merged


def _is_a_legacy_answer_output(path: Path) -> bool:
    """Whether `path` looks like an output of lapvqa-hf 0.4 (no record beside it): JSON lines numbered 0..n-1."""
    try:
        with open(path, encoding="utf-8", newline="\n") as file:
            for expected, line in enumerate(file):
                row = json.loads(line)
                if not isinstance(row, dict) or row.get("row") != expected:
                    return False
    except (OSError, ValueError):
        return False
    return True


def check_output(output: Path, input_path: Path, header: dict, overwrite: bool) -> bool:
    """Whether `output` is complete already for this very run. An output written by another run is replaced only
    with `overwrite`; a file that `lapvqa answer` did not write, or the input itself, never is."""
    if output.resolve() == input_path.resolve() or (output.exists() and output.samefile(input_path)):
        raise AnswerError(f"--output {output} is the input file; write the answers to another file.")
    if output.exists() and not output.is_file():
        raise AnswerError(f"--output {output} is not a file; name a .jsonl file to write.")
    if not output.exists():
        return False
    try:
        recorded = json.loads(record_path(output).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        recorded = None
    if isinstance(recorded, dict):
        recorded = {key: value for key, value in recorded.items() if key != "rows"}
        if recorded == header and not overwrite:
            return True
        if not overwrite:
            raise AnswerError(
                f"{output} holds the answers of another run ({_differing(recorded, header)} differ); pass "
                "--overwrite to replace it, or choose another --output."
            )
        return False
    if not _is_a_legacy_answer_output(output):
        raise AnswerError(
            f"{output} exists and was not written by `lapvqa answer`; it is never replaced: choose another --output."
        )
    if not overwrite:
        raise AnswerError(f"{output} exists (written by an earlier lapvqa-hf); pass --overwrite to replace it.")
    return False


def claim_maps_folder(maps: Path, output: Path) -> None:
    """`--save-maps` writes only into a folder of its own: new or empty (then marked as this output's), or marked
    by an earlier run of the same output. Any other folder, the images' own say, is refused: nothing is overwritten."""
    if maps.exists() and not maps.is_dir():
        raise AnswerError(f"--save-maps {maps} is a file; name a new or empty folder.")
    claim = {"lapvqa_answer_maps_of": str(output.resolve())}
    marker = maps / MAPS_MARKER
    if maps.is_dir() and any(maps.iterdir()):
        try:
            found = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            example = sorted(path.name for path in maps.iterdir())[0]
            raise AnswerError(
                f"--save-maps {maps} already holds files that lapvqa answer did not write (e.g. {example}); "
                "pictures go into a new or empty folder."
            ) from None
        if found != claim:
            raise AnswerError(
                f"--save-maps {maps} holds the pictures of another output ({found.get('lapvqa_answer_maps_of')}); "
                "choose another folder."
            )
        return
    maps.mkdir(parents=True, exist_ok=True)
    write_json_atomically(marker, claim)


# --- pictures ---------------------------------------------------------------------------------------------------


def patch_grid(weights: np.ndarray) -> np.ndarray | None:
    """Attention over an encoder's tokens as its square patch grid; a leading summary token (Florence-2's mean) is
    dropped. `None` when the tokens form no square grid."""
    for skip in (0, 1):
        side = math.isqrt(len(weights) - skip)
        if side * side == len(weights) - skip and side > 0:
            return weights[skip:].reshape(side, side)
    return None


def heat_overlay(image: Image.Image, grid: np.ndarray, low: float, high: float) -> Image.Image:
    """The image (grey) under the attention grid, upsampled and coloured from clear (`low`) through red to yellow
    (`high`); the range is shared by the panels of one picture, so that they compare."""
    base = image.convert("L").resize((MAP_SIDE, MAP_SIDE)).convert("RGB")
    normalised = np.clip((grid - low) / (high - low), 0.0, 1.0) if high > low else np.zeros_like(grid)
    heat = Image.fromarray(np.uint8(normalised * 255), mode="L").resize((MAP_SIDE, MAP_SIDE), Image.BILINEAR)
    level = np.asarray(heat, dtype=np.float32)[..., None] / 255.0
    colour = np.concatenate([np.ones_like(level), level, np.zeros_like(level)], axis=-1) * 255  # red -> yellow
    blended = np.asarray(base, dtype=np.float32) * (1 - 0.6 * level) + colour * 0.6 * level
    return Image.fromarray(np.uint8(blended.clip(0, 255)))


def captioned(panels: list[Image.Image], titles: list[str], caption: str) -> Image.Image:
    """Panels side by side with a title above each and a wrapped caption below."""
    width = MAP_SIDE * len(panels)
    lines = []
    for paragraph in caption.splitlines():
        words, line = paragraph.split(), ""
        for word in words:
            if len(line) + len(word) + 1 > width // 7:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}".strip()
        lines.append(line)
    picture = Image.new("RGB", (width, MAP_SIDE + 20 + 14 * len(lines) + 8), "white")
    draw = ImageDraw.Draw(picture)
    for i, (panel, title) in enumerate(zip(panels, titles, strict=True)):
        draw.text((i * MAP_SIDE + 4, 4), title, fill="black")
        picture.paste(panel, (i * MAP_SIDE, 20))
    for j, line in enumerate(lines):
        draw.text((4, MAP_SIDE + 24 + 14 * j), line, fill="black")
    return picture


def boxes_picture(image: Image.Image, boxes: list[dict]) -> Image.Image:
    """The image, its long side scaled to twice `MAP_SIDE`, with each detection's box (given in the image's own
    pixels), label and score (a grounded phrase's box has no score: None)."""
    factor = 2 * MAP_SIDE / max(image.size)
    picture = image.convert("RGB").resize((round(image.width * factor), round(image.height * factor)))
    draw = ImageDraw.Draw(picture)
    for found in boxes:
        box = [found["box"][key] * factor for key in ("xmin", "ymin", "xmax", "ymax")]
        draw.rectangle(box, outline="red", width=2)
        label = found["label"] if found["score"] is None else f"{found['label']} {found['score']:.2f}"
        draw.rectangle(draw.textbbox((box[0] + 3, box[1] + 3), label), fill="black")
        draw.text((box[0] + 3, box[1] + 3), label, fill="yellow")
    return picture


def save_atomically(picture: Image.Image, path: Path) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    picture.save(temporary, format="PNG")
    os.replace(temporary, path)


# --- the run ----------------------------------------------------------------------------------------------------


class ImageCache:
    """Encoded images by path, least recently used first out; an image that cannot be read is remembered as its
    one-line error."""

    def __init__(self, encode: Callable[[list[str]], list], capacity: int):
        self.encode, self.capacity, self.entries = encode, capacity, OrderedDict()
        self.encoded = 0  # images encoded so far (cache misses)

    def get(self, paths: list[str]) -> dict[str, object]:
        missing = list(dict.fromkeys(p for p in paths if p not in self.entries))
        if missing:
            self.encoded += len(missing)
            for path, value in zip(missing, self.encode(missing), strict=True):
                self.entries[path] = value
        for path in paths:
            self.entries.move_to_end(path)
        found = {path: self.entries[path] for path in paths}
        while len(self.entries) > max(self.capacity, len(found)):
            self.entries.popitem(last=False)
        return found


def load_pipeline(
    model: str,
    trust_remote_code: bool = False,
    revision: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    model_kwargs: dict | None = None,
):
    """The model's pipeline. As transformers' own rule goes, the package's classes serve folders of its model types
    and no folder's code runs unless `trust_remote_code`; every failure to load is one line naming the model."""
    from transformers import pipeline

    name = str(model)
    config = load_config(name, revision, trust_remote_code)
    options = dict(revision=revision, device=device, dtype=dtype, model_kwargs=model_kwargs or {})
    kind = answerable_kind(name, config.model_type)
    try:
        if trust_remote_code:  # the folder's own pipeline code, for the task `lapvqa answer` runs
            return pipeline(task=kind.pipeline_task, model=name, trust_remote_code=True, **options)
        check_weights_fit_config(name, config, revision)
        return pipeline(task=kind.pipeline_task, model=name, pipeline_class=kind.pipeline_class,
                        trust_remote_code=False, **options)  # fmt: skip
    except (AnswerError, ModelFolderError):
        raise
    except LOADING_ERRORS as error:  # incl. EncoderError (also a remote-code folder's own copy of it)
        raise AnswerError(f"{name}: the model could not be loaded ({first_line(error)}).") from None


def answerable_kind(name: str, model_type: str) -> ModelKind:
    """The kind of a model `lapvqa answer` can run (`lapvqa_hf.kinds`), or a one-line refusal."""
    kind = kind_of(model_type)
    if kind is None or kind.answering is None or kind.pipeline_class is None:
        answerable = sorted(k.model_type for k in KINDS.values() if k.answering is not None)
        raise AnswerError(
            f"{name} is a {model_type} model; `lapvqa answer` takes {answerable} (a folder's own code runs only with "
            "--trust-remote-code)."
        )
    return kind


def fingerprint(modules: list[torch.nn.Module], classes: list[type]) -> str:
    """sha256 of what a model's answers depend on: every tensor of `modules` (names, dtypes, shapes, values), the
    source files of `classes`, and the torch and transformers releases. The same model loaded from a relative or an
    absolute path, a folder or the Hub cache, has the same fingerprint."""
    import transformers

    digest = hashlib.sha256(f"torch {torch.__version__} transformers {transformers.__version__}".encode())
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    for source in sorted({inspect.getsourcefile(cls) or "" for cls in classes} - {""}):
        digest.update(Path(source).read_bytes())
    return digest.hexdigest()


class Answerer:
    """Answers rows of one model kind in batches: images encoded once (`ImageCache`), prompts left-padded, each row's
    problem its own error."""

    def __init__(
        self,
        model: str,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        generate_kwargs: dict | None = None,
        threshold: float = 0.5,
        save_maps: str | os.PathLike | None = None,
        feature_cache_size: int = 4096,
        trust_remote_code: bool = False,
        revision: str | None = None,
    ):
        options = {"attn_implementation": "eager"} if save_maps else {}  # attention weights need eager attention
        self.pipe = load_pipeline(model, trust_remote_code, revision, device, dtype, options)
        self.model = self.pipe.model
        self.answering = answerable_kind(str(model), self.model.config.model_type).answering
        if not all(hasattr(self.pipe, method) for method in ("prepare_image", "encode", self.answering.batch_method)):
            raise AnswerError(
                f"{model}: its own pipeline code predates lapvqa-hf 0.5 (no batch methods); run without "
                "--trust-remote-code (the package's classes serve it), or convert the folder again."
            )
        self.columns = self.answering.columns
        self.image_columns = list(self.answering.images)
        self.generate_kwargs = {"do_sample": False, **(generate_kwargs or {})}
        self.threshold = threshold
        self.maps = Path(save_maps) if save_maps else None
        if self.maps is not None and self.generate_kwargs.get("num_beams", 1) != 1:
            raise AnswerError("--save-maps draws greedy answers; leave --num-beams at 1.")
        self.images = ImageCache(self._encode_images, feature_cache_size)
        self.capped: dict[int, int] = {}  # rows whose answers were capped to fit the positions: row -> tokens

    def identity(self) -> dict:
        """What this answerer's answers depend on, beyond the input: recorded with the part files and the output,
        and compared before anything is resumed or called complete."""
        towers = [getattr(self.pipe, name, None) for name in ("encoder", "text_encoder")]  # frozen image / text
        modules = [self.model] + [tower for tower in towers if tower is not None]
        processors = [getattr(self.pipe, name, None) for name in ("image_processor", "encoder_image_processor")]
        classes = [type(self.model), type(self.pipe)] + [type(m) for m in modules[1:]]
        classes += [type(processor) for processor in processors if processor is not None]
        generation = None
        if self.answering.generates_text:  # the options generate() runs with, defaults left out
            generation = copy.deepcopy(self.model.generation_config)
            generation.update(**self.generate_kwargs)
            # Fields left unset take generate()'s global defaults: spelled out or not, the same options.
            generation.update(**generation._get_default_generation_params(), defaults_only=True)
            generation = {k: v for k, v in generation.to_diff_dict().items() if k != "transformers_version"}
        identity = {
            "format": OUTPUT_FORMAT,
            "model": fingerprint(modules, classes),
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "generate": generation,
            "maps": str(self.maps.resolve()) if self.maps is not None else None,
        }
        if self.answering.mode == "detect":
            identity["threshold"] = self.threshold
        return identity

    # Encoding: one batch of distinct images; a bad image becomes its error and the others go on.
    def _encode_images(self, paths: list[str]) -> list:
        prepared, values = {}, {}
        for path in paths:
            try:
                prepared[path] = self.pipe.prepare_image(path)
            except (ValueError, OSError) as error:
                values[path] = first_line(error)
        if prepared:
            pixels = torch.cat([p for p, _ in prepared.values()])
            with torch.inference_mode(), self._pooled_tokens_to_patches() as to_patches:
                tokens = self.pipe.encode(pixels)
            for i, (path, (_, size)) in enumerate(prepared.items()):
                if not torch.isfinite(tokens[i]).all():
                    values[path] = "the encoder gave non-finite features (NaN or inf) for this image"
                    continue
                values[path] = (tokens[i], size, to_patches[i] if to_patches else None)
        return [values[path] for path in paths]

    @contextlib.contextmanager
    def _pooled_tokens_to_patches(self) -> Iterator[list]:
        """For heat maps over an attentional pooler's tokens (CoCa's 255, which form no patch grid): yields a list
        that the encoding fills with, per image, the pooler's attention from each token over the patches (mean over
        heads, CLS dropped, rows summing to 1), which carries attention over tokens back onto the patch grid."""
        pooler = getattr(getattr(self.pipe, "encoder", None), "attentional_pooler", None)
        found: list[torch.Tensor] = []
        if self.maps is None or pooler is None:
            yield found
            return

        def record(module, args, kwargs, output) -> None:
            queries, context = args[0], kwargs["key_value_states"]
            batch, heads = len(queries), module.num_heads
            query = module.q_proj(queries).view(batch, queries.shape[1], heads, -1).transpose(1, 2)
            key = module.k_proj(context).view(batch, context.shape[1], heads, -1).transpose(1, 2)
            weights = torch.softmax(query @ key.transpose(-1, -2) * module.scaling, dim=-1).mean(dim=1)
            weights = weights[:, 1:, 1:]  # tokens after the image embedding's query; patches after CLS
            found.extend(weights / weights.sum(dim=-1, keepdim=True))

        hook = pooler.attention.register_forward_hook(record, with_kwargs=True)
        try:
            yield found
        finally:
            hook.remove()

    def answer(self, rows: list[tuple[TableRow, dict[str, str]]]) -> list[dict]:
        """The output lines of `rows` (each an input row and the paths its image columns name), in their order."""
        paths = [path for row, row_paths in rows if row.problem is None for path in row_paths.values()]
        images = self.images.get(paths)
        outputs, ready = {}, []
        for row, row_paths in rows:
            if row.problem is not None:
                outputs[row.index] = {"error": row.problem}
                continue
            errors = [
                f"{column}: {images[path]}" for column, path in row_paths.items() if isinstance(images[path], str)
            ]
            if errors:
                outputs[row.index] = {"error": "; ".join(errors)}
            else:
                ready.append((row.index, {**row.values, **row_paths}))
        outputs.update(self._answer_ready(ready, images))
        return [{"row": row.index, "input": row.values, **outputs[row.index]} for row, _ in rows]

    def _answer_ready(self, rows: list[tuple[int, dict]], images: dict) -> dict[int, dict]:
        """The model's fields (or an `error`) of each row whose images were read; rows are generated together where
        their prompts leave the same room for new tokens."""
        if self.answering.mode == "detect":
            return self._rows_answered(rows, lambda batch: self._detect(batch, images))
        if self.answering.mode == "score":
            return self._rows_answered(rows, lambda batch: self._score(batch, images))
        if self.answering.mode == "ground":
            return self._rows_answered(rows, lambda batch: self._ground(batch, images))
        outputs, groups = {}, {}
        for index, row in rows:
            try:
                prompt = self._prompt(row)
            except ValueError as error:
                outputs[index] = {"error": first_line(error)}
                continue
            tokens = self._new_tokens_for(len(prompt))
            groups.setdefault(tokens, []).append((index, row, prompt))
        for tokens, group in groups.items():
            prompts = {index: prompt for index, _, prompt in group}
            batch = [(index, row) for index, row, _ in group]
            generate = functools.partial(self._generate, images=images, prompts=prompts, tokens=tokens)
            outputs.update(self._rows_answered(batch, generate))
        return outputs

    def _rows_answered(self, rows: list[tuple[int, dict]], answer_batch: Callable) -> dict[int, dict]:
        """`answer_batch(rows)` for the whole batch; where that fails, row by row, so that one row's problem is that
        row's error, never the run's."""
        try:
            with torch.inference_mode():
                return {index: output for (index, _), output in zip(rows, answer_batch(rows), strict=True)}
        except ROW_ERRORS as error:
            if len(rows) == 1:
                return {rows[0][0]: {"error": first_line(error)}}
        outputs = {}
        for row in rows:
            outputs.update(self._rows_answered([row], answer_batch))
        return outputs

    def _prompt(self, row: dict) -> list[int]:
        column = self.answering.prompt_column
        return self.pipe.prompt_ids(row[column] if column is not None else None)

    def _new_tokens_for(self, prompt_length: int) -> int:
        """`max_new_tokens` (asked for, else the model's), capped to the room a prompt leaves in the positions."""
        from .models.pipeline_lapvqa import room_for_new_tokens

        wanted = self.generate_kwargs.get("max_new_tokens") or self.model.generation_config.max_new_tokens
        room = room_for_new_tokens(self.model.config, prompt_length)
        return min(wanted, room) if wanted else room

    def _generate(self, rows: list[tuple[int, dict]], images: dict, prompts: dict, tokens: int) -> list[dict]:
        def stack(column: str) -> torch.Tensor:
            return torch.stack([images[row[column]][0] for _, row in rows])

        visual = {argument: stack(column) for column, argument in self.answering.images.items()}
        generate_kwargs = {**self.generate_kwargs, "max_new_tokens": tokens}
        generated = self.pipe.generate_texts([prompts[index] for index, _ in rows], visual, **generate_kwargs)
        wanted = self.generate_kwargs.get("max_new_tokens") or self.model.generation_config.max_new_tokens
        if wanted and tokens < wanted:
            self.capped.update((index, tokens) for index, _ in rows)
        outputs = [{self.answering.field: text} for text in generated.texts]
        if self.maps is not None and self.answering.picture == "attention":
            to_patches = {path: value[2] for path, value in images.items() if not isinstance(value, str)}
            pictures = self._attention_maps(
                rows, generated.texts, generated.sequences, generated.prompt_attention_mask, visual, to_patches
            )
            for output, picture in zip(outputs, pictures, strict=True):
                output.update(picture)
        return outputs

    def _attention_maps(self, rows, answers: list[str], generated, prompt_mask, visual, to_patches) -> list[dict]:
        """Cross-attention of the answer's tokens over the visual memory (mean over layers, heads and answer
        tokens), from one teacher-forced forward over prompt + answer, drawn over the images."""
        eos, prompt_width = self.model.config.eos_token_id, prompt_mask.shape[1]
        answer_mask = torch.ones_like(generated[:, prompt_width:])
        for i, answer in enumerate(generated[:, prompt_width:].tolist()):  # positions after eos are padding
            if eos in answer:
                answer_mask[i, answer.index(eos) + 1 :] = 0
        mask = torch.cat([prompt_mask, answer_mask], dim=1)
        # The last token chose nothing and has no position when the answer fills the room (`room_for_new_tokens`).
        inputs = dict(input_ids=generated[:, :-1], attention_mask=mask[:, :-1])
        outputs = self.model(**inputs, output_attentions=True, **visual)
        attention = torch.stack(outputs.cross_attentions).float().mean(dim=(0, 2))  # [batch, length, memory]
        pictures = []
        for i, (index, row) in enumerate(rows):
            # The logits that chose the answer's tokens: from the prompt's last position to the last answer token's.
            chose = range(prompt_width - 1, prompt_width - 1 + int(answer_mask[i].sum()))
            weights = attention[i, list(chose)].mean(dim=0).cpu().numpy()
            try:
                pictures.append(self._draw(index, row, answers[i], weights, to_patches))
            except (ValueError, OSError) as error:  # the answer stands; its picture could not be drawn
                pictures.append({"map": None, "map_error": first_line(error)})
        return pictures

    def _draw(self, index: int, row: dict, answer: str, weights: np.ndarray, to_patches: dict) -> dict:
        reader = self.pipe.xray_image_processor
        weights = weights / weights.sum()
        columns = list(self.answering.images)  # the visual memory is their tokens, in this order
        parts = np.split(weights, len(columns))
        names = [IMAGE_TITLES.get(column, column) for column in columns]
        images = [reader.load_rgb(row[column]) for column in columns]
        for i, column in enumerate(columns):  # pooled tokens (CoCa) back onto the patch grid
            if to_patches.get(row[column]) is not None:
                parts[i] = parts[i] @ to_patches[row[column]].float().cpu().numpy()
        grids = [patch_grid(part) for part in parts]
        if any(grid is None for grid in grids):
            return {"map": None, "map_error": f"the encoder's {len(weights)} tokens form no square patch grid"}
        titles = [f"{name}: {100 * part.sum():.0f}% of the attention" for name, part in zip(names, parts, strict=True)]
        low, high = min(grid.min() for grid in grids), max(grid.max() for grid in grids)
        panels = [heat_overlay(image, grid, low, high) for image, grid in zip(images, grids, strict=True)]
        path = self.maps / f"{index:07d}.png"
        prompt = row[self.answering.prompt_column] if self.answering.prompt_column else ""
        caption = f"Q: {prompt}\nA: {answer}" if prompt else answer
        save_atomically(captioned(panels, titles, caption), path)
        return {"map": str(path)}

    def _score(self, rows: list[tuple[int, dict]], images: dict) -> list[dict]:
        """Each row's candidate findings (`labels`, separated by ";") ranked by the model's scores for its image."""
        embeddings = torch.stack([images[row["image"]][0] for _, row in rows])
        labels = [[label.strip() for label in row["labels"].split(";") if label.strip()] for _, row in rows]
        results = []
        for found in self.pipe.score(embeddings, labels):
            if found is None:
                results.append({"error": "the model gave non-finite scores (NaN or inf) for this image"})
            else:
                results.append({"scores": [{"label": s["label"], "score": round(s["score"], 4)} for s in found]})
        return results

    def _detect(self, rows: list[tuple[int, dict]], images: dict) -> list[dict]:
        features = torch.stack([images[row["image"]][0] for _, row in rows])
        sizes = [images[row["image"]][1] for _, row in rows]
        results = []
        for (index, row), found in zip(rows, self.pipe.detect(features, sizes, self.threshold), strict=True):
            if found is None:
                results.append({"error": "the model gave non-finite scores or boxes (NaN or inf) for this image"})
                continue
            boxes = [{**box, "score": round(box["score"], 4)} for box in found]
            result = {"boxes": boxes}
            if self.maps is not None:
                path = self.maps / f"{index:07d}.png"
                try:
                    save_atomically(boxes_picture(self.pipe.xray_image_processor.load_rgb(row["image"]), boxes), path)
                    result["map"] = str(path)
                except (ValueError, OSError) as error:
                    result.update(map=None, map_error=first_line(error))
            results.append(result)
        return results

    def _ground(self, rows: list[tuple[int, dict]], images: dict) -> list[dict]:
        """Each row's phrase grounded in its image: one box in the image's pixels."""
        features = torch.stack([images[row["image"]][0] for _, row in rows])
        sizes = [images[row["image"]][1] for _, row in rows]
        results = []
        for (index, row), found in zip(rows, self.pipe.ground(features, [row["phrase"] for _, row in rows], sizes),
                                       strict=True):  # fmt: skip
            if found is None:
                results.append({"error": "the model gave a non-finite box (NaN or inf) for this image and phrase"})
                continue
            result = {"box": found["box"]}
            if self.maps is not None:
                path = self.maps / f"{index:07d}.png"
                picture = [{"box": found["box"], "label": row["phrase"], "score": None}]
                try:
                    save_atomically(boxes_picture(self.pipe.xray_image_processor.load_rgb(row["image"]), picture), path)
                    result["map"] = str(path)
                except (ValueError, OSError) as error:
                    result.update(map=None, map_error=first_line(error))
            results.append(result)
        return results


def answer_dataset(
    model: str,
    input_path: str | os.PathLike,
    output: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    batch_size: int = 8,
    overwrite: bool = False,
    rank: int = 0,
    world: int = 1,
    barrier: Callable[[], None] = lambda: None,
    progress: bool = True,
    answerer: Answerer | None = None,
    **answerer_options,
) -> Path:
    """Answers every row of `input_path` into `output` (JSON Lines, input order); this process takes the rows
    `rank, rank + world, ...`, and process 0 merges the parts once `barrier()` says every process is done.

    Part files are resumed, and an existing output is called complete, only when they were written by the same run:
    the same input (its bytes), image root, model (weights and code), dtype and generation options."""
    input_path, output = Path(input_path), Path(output)
    if not input_path.is_file():
        raise AnswerError(f"{input_path}: no such input file.")
    answerer = answerer or Answerer(model, **answerer_options)
    rows = read_input(input_path, answerer.columns)
    root = Path(image_root) if image_root is not None else input_path.parent
    header = {
        "lapvqa_answer": {
            "input_sha256": sha256_of(input_path),
            "image_root": str(root.resolve()),
            **answerer.identity(),
        }
    }
    if check_output(output, input_path, header, overwrite):
        if rank == 0:
            print(
                f"{output} is complete already (the same input, model and options); pass --overwrite to answer again."
            )
        return output
    if answerer.maps is not None:
        claim_maps_folder(answerer.maps, output)
    part = part_path(output, rank, world)
    if overwrite:
        part.unlink(missing_ok=True)
    part_file = PartFile(part, header)
    mine = [row for row in rows if row.index % world == rank and row.index not in part_file.done]
    bar = tqdm(total=len(range(rank, len(rows), world)), initial=len(part_file.done), unit="row", disable=not progress)
    for start in range(0, len(mine), batch_size):
        batch = mine[start : start + batch_size]
        paths = [{column: str(root / row.values[column]) for column in answerer.image_columns} if row.problem is None
                 else {} for row in batch]  # fmt: skip
        part_file.append(answerer.answer(list(zip(batch, paths, strict=True))))
        bar.update(len(batch))
    bar.close()
    if answerer.capped:
        print(
            f"{len(answerer.capped)} of this process's rows had questions too long for the requested answer length "
            f"within the model's {answerer.model.config.max_position_embeddings} learned positions: their answers "
            f"stop at the room left (as few as {min(answerer.capped.values())} tokens).",
            file=sys.stderr,
        )
    barrier()
    if rank == 0:
        failed = sum("error" in row for row in merge_parts(output, world, len(rows), header))
        print(
            f"wrote {output}: {len(rows)} rows ({world} process{'es' if world > 1 else ''}), {failed} skipped with an error"
        )
    return output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        help="a converted model folder or Hub id (DiffVQA, VQA, report generation, detection, zero-shot findings, "
        "phrase grounding)",
    )
    parser.add_argument("--input", required=True, type=Path, help="CSV or JSON Lines file of the model's columns")
    parser.add_argument("--output", required=True, type=Path, help="JSON Lines file to write (appears when complete)")
    parser.add_argument("--image-root", type=Path, help="folder of relative image paths (default: the input's)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per generate() call (default 8)")
    parser.add_argument("--max-new-tokens", type=int, help="answer / report length limit (default: the model's)")
    parser.add_argument("--num-beams", type=int, help="beam search width (default: greedy)")
    parser.add_argument("--threshold", type=float, default=0.5, help="detection: lowest score kept (default 0.5)")
    parser.add_argument("--save-maps", type=Path, help="folder for a picture per row: attention heat maps or boxes")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: the process's accelerator, else cpu)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="model dtype (default: float32)")
    parser.add_argument("--feature-cache-size", type=int, default=4096, help="encoded images kept (default 4096)")
    parser.add_argument(
        "--overwrite", action="store_true", help="answer again, replacing the output (only one lapvqa answer wrote)"
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the model folder's own code (its pipeline and model files) instead of this package's classes; "
        "read that code first (default: the package's classes, for the model types it knows)",
    )
    parser.add_argument("--revision", help="branch, tag or commit of a Hub model to use (pin one with remote code)")


def run(args: argparse.Namespace) -> int:
    from .messages import run_reporting_errors
    from .models.encoders import EncoderError
    from .processes import leave_processes, process_state

    state = process_state(args.device)
    generate_kwargs = {
        key: value
        for key, value in (("max_new_tokens", args.max_new_tokens), ("num_beams", args.num_beams))
        if value is not None
    }

    def answer() -> None:
        if args.batch_size < 1 or args.feature_cache_size < 1:
            raise AnswerError("--batch-size and --feature-cache-size must be at least 1.")
        answer_dataset(
            args.model,
            args.input,
            args.output,
            image_root=args.image_root,
            batch_size=args.batch_size,
            overwrite=args.overwrite,
            rank=state.process_index,
            world=state.num_processes,
            barrier=state.wait_for_everyone,
            progress=state.is_local_main_process,
            device=args.device or state.device,
            dtype=getattr(torch, args.dtype) if args.dtype else None,
            generate_kwargs=generate_kwargs,
            threshold=args.threshold,
            save_maps=args.save_maps,
            feature_cache_size=args.feature_cache_size,
            trust_remote_code=args.trust_remote_code,
            revision=args.revision,
        )

    return leave_processes(
        state, run_reporting_errors(answer, errors=(AnswerError, ModelFolderError, EncoderError, OSError))
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lapvqa_hf.answer", description=summary(__doc__))
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
