"""`lapvqa answer`: a converted LAPVQA model over a whole dataset, with pictures of where it looked.

    lapvqa answer MODEL --input questions.csv --output answers.jsonl [--save-maps maps/]
    accelerate launch -m lapvqa_hf.answer MODEL --input questions.csv --output answers.jsonl   # one shard per process

The input is CSV or JSON Lines with the model's columns (DiffVQA `prior_image, current_image, question`; VQA
`image, question`; report generation and detection `image`); relative image paths are read from `--image-root`
(default: the input file's folder). The output has one JSON line per input row, in input order, with the row's
fields and its `answer`, `report` or `boxes`, or an `error` saying why that row was skipped.

Each distinct image is encoded once (a cache of `--feature-cache-size` images; rows that share images, such as the
questions of one study pair, are best kept together), answers are generated in batches, and a progress bar shows
rows/s. Every process appends finished batches to its own part file (`.OUTPUT.part-R-of-W.jsonl`, flushed to disk
per batch); the output appears, merged in input order, only once every row is done. A killed run loses at most the
batch in flight: a re-run with the same arguments resumes from the part files.
"""

import argparse
import contextlib
import csv
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

from .convert.checkpoint import first_line, sha256_of

COLUMNS = {
    "lapvqa_diffvqa": ("prior_image", "current_image", "question"),
    "lapvqa_vqa": ("image", "question"),
    "lapvqa_captioning": ("image",),
    "lapvqa_detection": ("image",),
}
IMAGE_COLUMNS = ("prior_image", "current_image", "image")
MAP_SIDE = 320  # pixels of each image in a saved picture


class AnswerError(ValueError):
    """The run cannot start or go on; the message says what was expected and what was found."""


# --- input and output ---------------------------------------------------------------------------------------------


def read_rows(path: str | os.PathLike, columns: tuple[str, ...]) -> list[dict]:
    """The rows of a CSV (with a header) or JSON Lines file, each with every column in `columns`."""
    path = Path(path)
    if not path.is_file():
        raise AnswerError(f"{path}: no such input file.")
    if path.suffix.lower() in (".jsonl", ".json"):
        rows = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise AnswerError(f"{path} line {number}: not JSON ({error.msg}).") from None
            if not isinstance(row, dict):
                raise AnswerError(f"{path} line {number}: expected a JSON object, found {type(row).__name__}.")
            rows.append((number, row))
    elif path.suffix.lower() == ".csv":
        with open(path, newline="") as file:
            rows = [(number, row) for number, row in enumerate(csv.DictReader(file), start=2)]
    else:
        raise AnswerError(f"{path}: expected a .csv or .jsonl file, found {path.suffix or 'no suffix'}.")
    for number, row in rows:
        missing = [column for column in columns if not isinstance(row.get(column), str) or not row[column].strip()]
        if missing:
            raise AnswerError(
                f"{path} line {number}: this model needs the columns {list(columns)}; {missing} missing or empty."
            )
    if not rows:
        raise AnswerError(f"{path}: no rows.")
    return [row for _, row in rows]


class PartFile:
    """One process's finished rows, a JSON line each after a header line naming the run; appended per batch and
    flushed to disk, so that a kill loses at most the batch in flight. A torn last line is dropped on resume."""

    def __init__(self, path: Path, header: dict):
        self.path, self.done = path, {}
        if path.exists():
            lines = path.read_bytes().split(b"\n")
            complete, torn = lines[:-1], lines[-1]  # a finished file ends with a newline: `torn` is empty
            found = json.loads(complete[0]) if complete else None
            if found is not None and found != header:
                raise AnswerError(
                    f"{path} holds rows of another run (other input, model or options); pass --overwrite to start "
                    "again, or another --output."
                )
            for line in complete[1:]:
                row = json.loads(line)
                self.done[row["row"]] = row
            if torn or not complete:
                with open(path, "r+b") as file:
                    file.truncate(sum(len(line) + 1 for line in complete))
        if not self.done and (not path.exists() or path.stat().st_size == 0):
            self._append([header])

    def append(self, rows: list[dict]) -> None:
        self._append(rows)
        self.done.update((row["row"], row) for row in rows)

    def _append(self, rows: list[dict]) -> None:
        with open(self.path, "a") as file:
            file.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
            file.flush()
            os.fsync(file.fileno())


def part_path(output: Path, rank: int, world: int) -> Path:
    return output.with_name(f".{output.name}.part-{rank:03d}-of-{world:03d}.jsonl")


def merge_parts(output: Path, world: int, total: int) -> list[dict]:
    """Writes the output, in input order, from every process's part file (atomically), then removes the parts;
    returns the merged rows."""
    rows: dict[int, dict] = {}
    for rank in range(world):
        lines = part_path(output, rank, world).read_text().splitlines()[1:]
        rows.update((row["row"], row) for row in map(json.loads, lines))
    if sorted(rows) != list(range(total)):
        raise AnswerError(f"the part files hold {len(rows)} of {total} rows; re-run to finish them.")
    merged = [rows[i] for i in range(total)]
    temporary = output.with_name(f".{output.name}.merging")
    with open(temporary, "w") as file:
        file.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in merged))
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, output)
    for rank in range(world):
        part_path(output, rank, world).unlink()
    return merged


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
    pixels), label and score."""
    factor = 2 * MAP_SIDE / max(image.size)
    picture = image.convert("RGB").resize((round(image.width * factor), round(image.height * factor)))
    draw = ImageDraw.Draw(picture)
    for found in boxes:
        box = [found["box"][key] * factor for key in ("xmin", "ymin", "xmax", "ymax")]
        draw.rectangle(box, outline="red", width=2)
        label = f"{found['label']} {found['score']:.2f}"
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


class Answerer:
    """Answers rows of one model kind in batches: images encoded once (`ImageCache`), prompts left-padded."""

    def __init__(
        self,
        model: str,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        generate_kwargs: dict | None = None,
        threshold: float = 0.5,
        save_maps: str | os.PathLike | None = None,
        feature_cache_size: int = 4096,
    ):
        from transformers import pipeline

        options = {"attn_implementation": "eager"} if save_maps else {}  # attention weights need eager attention
        self.pipe = pipeline(model=model, trust_remote_code=True, device=device, dtype=dtype, model_kwargs=options)
        self.model, self.model_type = self.pipe.model, self.pipe.model.config.model_type
        if self.model_type not in COLUMNS:
            raise AnswerError(f"{model} is a {self.model_type} model; `lapvqa answer` takes {sorted(COLUMNS)}.")
        self.columns = COLUMNS[self.model_type]
        self.image_columns = [column for column in self.columns if column in IMAGE_COLUMNS]
        self.generate_kwargs = {"do_sample": False, **(generate_kwargs or {})}
        self.threshold = threshold
        self.maps = Path(save_maps) if save_maps else None
        if self.maps is not None:
            if self.generate_kwargs.get("num_beams", 1) != 1:
                raise AnswerError("--save-maps draws greedy answers; leave --num-beams at 1.")
            self.maps.mkdir(parents=True, exist_ok=True)
        self.images = ImageCache(self._encode_images, feature_cache_size)

    # Encoding: one batch of distinct images; a bad image becomes its error and the others go on.
    def _encode_images(self, paths: list[str]) -> list:
        prepared, values = {}, {}
        for path in paths:
            try:
                prepared[path] = self._pixels(path)
            except (ValueError, OSError) as error:
                values[path] = first_line(error)
        if prepared:
            pixels = torch.cat([p for p, _ in prepared.values()])
            with torch.inference_mode(), self._pooled_tokens_to_patches() as to_patches:
                tokens = self._tokens(pixels)
            for i, (path, (_, size)) in enumerate(prepared.items()):
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

        def record(module, inputs, output) -> None:
            queries, context = inputs
            batch, heads = len(queries), module.config.pooler_num_attention_heads
            query = module.q_proj(queries).view(batch, queries.shape[1], heads, -1).transpose(1, 2)
            key = module.k_proj(context).view(batch, context.shape[1], heads, -1).transpose(1, 2)
            weights = torch.softmax(query @ key.transpose(-1, -2) * module.scaling, dim=-1).mean(dim=1)
            weights = weights[:, 1:, 1:]  # tokens after the image embedding's query; patches after CLS
            found.extend(weights / weights.sum(dim=-1, keepdim=True))

        hook = pooler.attention.register_forward_hook(record)
        try:
            yield found
        finally:
            hook.remove()

    def _pixels(self, path: str) -> tuple[torch.Tensor, tuple[int, int]]:
        pipe = self.pipe
        if self.model_type == "lapvqa_detection":  # the folder's own processor, whose resize the boxes undo
            image = pipe.image_processor.load_image(path)  # read once: its size maps the boxes back
            return pipe.image_processor(image)["pixel_values"], image.shape[:2]
        if self.model_type == "lapvqa_captioning":
            return pipe.image_processor(path)["pixel_values"], (0, 0)
        return pipe.pixel_values([path]), (0, 0)

    def _tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.model_type == "lapvqa_captioning":  # the model's own encoder; its tokens are the image features
            vision = self.model.vision_model
            return vision(pixels.to(self.model.device, self.model.dtype)).last_hidden_state
        return self.pipe.encode(pixels)

    def answer(self, rows: list[tuple[int, dict]]) -> list[dict]:
        """The output lines of `rows` (`(index, row)`), in their order."""
        paths = [row[column] for _, row in rows for column in self.image_columns]
        images = self.images.get(paths)
        results, ready = {}, []
        for index, row in rows:
            errors = [f"{c}: {images[row[c]]}" for c in self.image_columns if isinstance(images[row[c]], str)]
            if errors:
                results[index] = {"row": index, **row, "error": "; ".join(errors)}
            else:
                ready.append((index, row))
        if ready:
            with torch.inference_mode():
                answered = self._answer_ready(ready, images)
            results.update((index, {"row": index, **row, **answered[i]}) for i, (index, row) in enumerate(ready))
        return [results[index] for index, _ in rows]

    def _answer_ready(self, rows: list[tuple[int, dict]], images: dict) -> list[dict]:
        def stack(column: str) -> torch.Tensor:
            return torch.stack([images[row[column]][0] for _, row in rows])

        if self.model_type == "lapvqa_detection":
            return self._detect(rows, images, stack("image"))
        if self.model_type == "lapvqa_captioning":
            visual = {"image_features": stack("image")}
            prompts = [[self.model.config.bos_token_id]] * len(rows)
        elif self.model_type == "lapvqa_diffvqa":
            visual = {"curr_vis": stack("current_image"), "ref_vis": stack("prior_image")}
            prompts = [self.pipe._question_prompt(row["question"])["input_ids"][0].tolist() for _, row in rows]
        else:
            visual = {"image_features": stack("image")}
            prompts = [self.pipe._question_prompt(row["question"])["input_ids"][0].tolist() for _, row in rows]
        input_ids, attention_mask = self._left_padded(prompts)
        generated = self.model.generate(
            input_ids=input_ids, attention_mask=attention_mask, **visual, **self.generate_kwargs
        )
        new_tokens = generated[:, input_ids.shape[1] :]
        texts = [t.strip() for t in self.pipe.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
        key = "report" if self.model_type == "lapvqa_captioning" else "answer"
        outputs = [{key: text} for text in texts]
        if self.maps is not None and self.model_type != "lapvqa_captioning":
            to_patches = {path: value[2] for path, value in images.items() if not isinstance(value, str)}
            pictures = self._attention_maps(rows, texts, generated, attention_mask, visual, to_patches)
            for output, picture in zip(outputs, pictures, strict=True):
                output.update(picture)
        return outputs

    def _left_padded(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width, pad = max(map(len, prompts)), self.model.config.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.model.device)
        return input_ids, mask

    def _attention_maps(self, rows, answers: list[str], generated, prompt_mask, visual, to_patches) -> list[dict]:
        """Cross-attention of the answer's tokens over the visual memory (mean over layers, heads and answer
        tokens), from one teacher-forced forward over prompt + answer, drawn over the images."""
        eos, prompt_width = self.model.config.eos_token_id, prompt_mask.shape[1]
        answer_mask = torch.ones_like(generated[:, prompt_width:])
        for i, answer in enumerate(generated[:, prompt_width:].tolist()):  # positions after eos are padding
            if eos in answer:
                answer_mask[i, answer.index(eos) + 1 :] = 0
        mask = torch.cat([prompt_mask, answer_mask], dim=1)
        outputs = self.model(input_ids=generated, attention_mask=mask, output_attentions=True, **visual)
        attention = torch.stack(outputs.cross_attentions).float().mean(dim=(0, 2))  # [batch, length, memory]
        pictures = []
        for i, (index, row) in enumerate(rows):
            # The logits that chose the answer's tokens: from the prompt's last position to the last answer token's.
            chose = range(prompt_width - 1, prompt_width - 1 + int(answer_mask[i].sum()))
            weights = attention[i, list(chose)].mean(dim=0).cpu().numpy()
            pictures.append(self._draw(index, row, answers[i], weights, to_patches))
        return pictures

    def _draw(self, index: int, row: dict, answer: str, weights: np.ndarray, to_patches: dict) -> dict:
        reader = self.pipe.xray_reader
        weights = weights / weights.sum()
        columns = ["prior_image", "current_image"] if self.model_type == "lapvqa_diffvqa" else ["image"]
        parts = np.split(weights, len(columns))  # DiffVQA's memory is [prior tokens ; current tokens]
        names = ["prior (reference)", "current"] if len(columns) == 2 else ["image"]
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
        save_atomically(captioned(panels, titles, f"Q: {row['question']}\nA: {answer}"), path)
        return {"map": str(path)}

    def _detect(self, rows, images, tokens: torch.Tensor) -> list[dict]:
        from types import SimpleNamespace

        outputs = self.model(image_features=tokens)
        sizes = [list(images[row["image"]][1]) for _, row in rows]
        detections = self.pipe.image_processor.post_process_object_detection(
            SimpleNamespace(logits=outputs.logits, pred_boxes=outputs.pred_boxes),
            threshold=self.threshold,
            target_sizes=sizes,
        )
        labels, results = self.model.config.id2label, []
        for (index, row), found in zip(rows, detections, strict=True):
            boxes = [
                {
                    "score": round(score.item(), 4),
                    "label": labels[int(label)],
                    "box": dict(
                        zip(("xmin", "ymin", "xmax", "ymax"), (round(v, 2) for v in box.tolist()), strict=True)
                    ),
                }
                for score, label, box in zip(found["scores"], found["labels"], found["boxes"], strict=True)
            ]
            result = {"boxes": boxes}
            if self.maps is not None:
                path = self.maps / f"{index:07d}.png"
                save_atomically(boxes_picture(self.pipe.xray_reader.load_rgb(row["image"]), boxes), path)
                result["map"] = str(path)
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
    `rank, rank + world, ...`, and process 0 merges the parts once `barrier()` says every process is done."""
    input_path, output = Path(input_path), Path(output)
    if output.exists() and not overwrite:
        print(f"{output} is complete already; pass --overwrite to answer again.")
        return output
    answerer = answerer or Answerer(model, **answerer_options)
    rows = read_rows(input_path, answerer.columns)
    root = Path(image_root) if image_root is not None else input_path.parent
    for row in rows:  # relative image paths are read from the image root
        for column in answerer.image_columns:
            row[column] = str(root / row[column])
    header = {
        "lapvqa_answer": {
            "input_sha256": sha256_of(input_path),
            "model": str(model),
            "image_root": str(root),
            "generate": answerer.generate_kwargs,
            "threshold": answerer.threshold,
            "maps": str(answerer.maps) if answerer.maps else None,
        }
    }
    part = part_path(output, rank, world)
    if overwrite and rank == 0 and output.exists():
        output.unlink()  # our own output, replaced whole; nothing else is removed
    if overwrite:
        part.unlink(missing_ok=True)
    part_file = PartFile(part, header)
    mine = [(i, row) for i, row in enumerate(rows) if i % world == rank and i not in part_file.done]
    bar = tqdm(total=len(range(rank, len(rows), world)), initial=len(part_file.done), unit="row", disable=not progress)
    for start in range(0, len(mine), batch_size):
        batch = mine[start : start + batch_size]
        part_file.append(answerer.answer(batch))
        bar.update(len(batch))
    bar.close()
    barrier()
    if rank == 0:
        failed = sum("error" in row for row in merge_parts(output, world, len(rows)))
        print(
            f"wrote {output}: {len(rows)} rows ({world} process{'es' if world > 1 else ''}), {failed} skipped with an error"
        )
    return output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a converted model folder or Hub id (DiffVQA, VQA, report generation, detection)")
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
    parser.add_argument("--overwrite", action="store_true", help="answer again, replacing the output")


def run(args: argparse.Namespace) -> int:
    from .convert.common import run_reporting_errors
    from .encoders import EncoderError
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
        )

    return leave_processes(state, run_reporting_errors(answer, errors=(AnswerError, EncoderError, OSError)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lapvqa_hf.answer", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
