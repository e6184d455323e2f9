"""Frozen-encoder patch tokens, extracted once per image and stored for fast training (`lapvqa extract-features`).

The upstream DiffVQA card does not say how its features were taken from each encoder; `lapvqa_hf.models.encoders.RECIPES`
pins it (checkpoint, input size, normalisation, which hidden state, CLS kept or dropped). The recipe is stored
with the features and, later, in the config of a head trained on them.

Storage: `features-XXXXX.safetensors` shards (fp16 tensors keyed by image id, `[num_patches, vis_dim]`) and
`features.json` (the recipe and the shards written so far, each with its image ids and sha256). A shard is written
to a temporary name and renamed, then `features.json` is replaced atomically, so a crash loses at most the shard in
progress and a re-run resumes. Shards are checked whenever they are read (sha256, image ids, finite values); a
damaged one is named with its fix: delete it and re-run, which extracts its images again. Images that cannot be
read are skipped and listed in `failures.json` (a re-run retries them); non-finite features are never stored.

Across processes (`accelerate launch -m lapvqa_hf.cli extract-features ...`), the images not yet stored, sorted by
id, are dealt round-robin: process `r` writes its own shards (`features-rR-XXXXX.safetensors`) and lists them in its
own part (`features-part-rR.json`, replaced atomically). Once every process is done, process 0 folds the parts into
`features.json` and removes them; a killed run's parts are folded in first when it is resumed, so every shard
written survives, and the store reads as a 1-process one.
"""

import contextlib
import hashlib
import itertools
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save
from tqdm.auto import tqdm

from .files import write_json_atomically
from .models.encoders import (
    RECIPES,
    EncoderError,
    EncoderRecipe,
    load_encoder,
    load_encoder_image_processor,
    patch_tokens,
)
from .models.image_processing_lapvqa import LapvqaImageProcessor

MANIFEST = "features.json"
PART = "features-part-r{rank}.json"  # one process's shards (and unreadable images) of a multi-process run
FAILURES = "failures.json"  # the images the latest run could not read: image id, path and reason
# How images reach the encoder, recorded in the manifest: stores written by lapvqa-hf 0.1.x (which stretched
# images with the recipe's own normalisation instead) are not resumed with differently prepared images.
IMAGE_PREPARATION = "xray-as-8-bit-rgb, then the encoder's own image processor"
# How the detection heads' images are prepared: their folders' `LapvqaImageProcessor` (the recipe's size, mean and
# std; stretched, so that boxes normalised to the original image are those of the encoder's input).
DETECTION_IMAGE_PREPARATION = "xray-as-8-bit-rgb, then LapvqaImageProcessor(resize_mode=stretch) of the recipe"


class FeatureError(EncoderError):
    """Features cannot be extracted or read; the message says what was expected."""


def recipe_for(name: str) -> EncoderRecipe:
    if name not in RECIPES:
        raise FeatureError(f"unknown encoder {name!r}; expected one of {sorted(RECIPES)}.")
    return RECIPES[name]


def _read_manifest(output_dir: Path, name: str = MANIFEST) -> dict:
    """`features.json` (or a process's part): the recipe, how images were prepared, and the shards (file, image ids,
    sha256)."""
    path = output_dir / name
    try:
        manifest = json.loads(path.read_text())
        EncoderRecipe(**manifest["recipe"])
        if not all(isinstance(shard["file"], str) and isinstance(shard["ids"], list) for shard in manifest["shards"]):
            raise TypeError("a shard entry without its file name and image ids")
    except (ValueError, KeyError, TypeError) as error:  # incl. JSONDecodeError, UnicodeDecodeError
        raise FeatureError(
            f"{path}: not a features manifest ({error}); extract into a new folder, or delete {output_dir} and "
            "extract again."
        ) from None
    return manifest


def _check_recipe(output_dir: Path, manifest: dict, recipe: EncoderRecipe, preparation: str) -> None:
    if EncoderRecipe(**manifest["recipe"]) != recipe:
        raise FeatureError(
            f"{output_dir} holds features of another recipe ({manifest['recipe']['name']}, checkpoint "
            f"{manifest['recipe']['checkpoint']}); use another folder, or the same encoder and --checkpoint."
        )
    found = manifest.get("image_preparation")
    if found != preparation:
        how = found or "by lapvqa-hf 0.1.x: stretched with the recipe's normalisation"
        raise FeatureError(
            f"{output_dir} holds features of images prepared otherwise ({how}); extract into a new folder, so that "
            "one store never mixes the two."
        )


def _new_manifest(recipe: EncoderRecipe, preparation: str) -> dict:
    return {"recipe": asdict(recipe), "image_preparation": preparation, "shards": []}


def _fold_parts(output_dir: Path, recipe: EncoderRecipe, preparation: str) -> tuple[dict, list[dict[str, str]]]:
    """The manifest (new when absent) with the shards of every process's part folded in and the listed shards whose
    file was deleted (the fix for a damaged one) forgotten, so that their images are extracted again; written when
    it changed, then the parts are removed. Also returns the unreadable images the parts list."""
    manifest = _read_manifest(output_dir) if (output_dir / MANIFEST).is_file() else _new_manifest(recipe, preparation)
    _check_recipe(output_dir, manifest, recipe, preparation)
    parts = sorted(output_dir.glob(PART.format(rank="*")))
    shards, failures = {shard["file"]: shard for shard in manifest["shards"]}, []
    for part_path in parts:
        part = _read_manifest(output_dir, part_path.name)
        _check_recipe(output_dir, part, recipe, preparation)
        for shard in part["shards"]:  # listed once, though a run killed while merging left it in both
            shards.setdefault(shard["file"], shard)
        failures += part.get("failures", [])
    present = [shard for shard in shards.values() if (output_dir / shard["file"]).is_file()]
    if parts or len(present) != len(manifest["shards"]):
        manifest["shards"] = present
        write_json_atomically(output_dir / MANIFEST, manifest)
        for part_path in parts:
            part_path.unlink()
    return manifest, failures


def _read_shard(output_dir: Path, shard: dict, vis_dim: int) -> dict[str, torch.Tensor]:
    """A shard's tensors, checked against the manifest: its sha256 (when recorded), its image ids, and
    `[num_patches, vis_dim]` finite features."""
    path = output_dir / shard["file"]
    fix = f"delete it and re-run `lapvqa extract-features` into {output_dir}, which extracts its images again."
    if not path.is_file():
        raise FeatureError(
            f"{path}: missing, though {MANIFEST} lists it; re-run `lapvqa extract-features` into {output_dir}, which "
            "extracts its images again."
        )
    data = path.read_bytes()
    expected = shard.get("sha256")  # absent in stores of lapvqa-hf 0.2.0 and before: read unverified
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise FeatureError(
            f"{path}: its sha256 differs from the one recorded in {MANIFEST} (truncated or changed); {fix}"
        )
    try:
        tensors = load(data)
    except SafetensorError as error:
        raise FeatureError(f"{path}: not a readable safetensors file ({error}); {fix}") from None
    if set(tensors) != set(shard["ids"]):
        raise FeatureError(
            f"{path}: holds the features of {len(tensors)} images, not those of the {len(shard['ids'])} that "
            f"{MANIFEST} lists for it; {fix}"
        )
    for image_id, tensor in tensors.items():
        if tensor.ndim != 2 or tensor.shape[-1] != vis_dim:
            raise FeatureError(
                f"{path}: the features of image {image_id!r} are {list(tensor.shape)}, expected "
                f"[num_patches, {vis_dim}]; {fix}"
            )
        if not torch.isfinite(tensor).all():
            raise FeatureError(f"{path}: the features of image {image_id!r} are NaN or infinite; {fix}")
    return tensors


def read_failures(output_dir: str | Path) -> list[dict[str, str]]:
    """The images the latest finished `extract_features` run into `output_dir` could not read (`image_id`, `path`,
    `reason`), from its `failures.json`; none when the file is absent."""
    path = Path(output_dir) / FAILURES
    return json.loads(path.read_text())["failures"] if path.is_file() else []


def _write_failures(output_dir: Path, failures: list[dict[str, str]]) -> None:
    if failures:
        write_json_atomically(output_dir / FAILURES, {"failures": failures})
    else:
        (output_dir / FAILURES).unlink(missing_ok=True)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`device` as a torch device (default: cuda when available), refused when this machine has no such device."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise FeatureError(f"device must be a torch device such as cpu, cuda or cuda:1, got {device!r}.") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise FeatureError(f"device {device!r} asked for, but CUDA is not available here; use cpu.")
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise FeatureError(f"device {device!r} asked for, but this machine has {torch.cuda.device_count()} GPU(s).")
    return resolved


def _storable(tokens: torch.Tensor, image_id: str, path: str | Path, recipe: EncoderRecipe) -> torch.Tensor:
    """An image's tokens as the fp16 tensor stored, refused when not finite (before or after the cast)."""
    if not torch.isfinite(tokens).all():
        raise FeatureError(
            f"the {recipe.name} encoder gave NaN or infinite features for image {image_id!r} ({path}); nothing of "
            "its shard was stored: check the encoder checkpoint and its dtype."
        )
    half = tokens.to("cpu", torch.float16).contiguous()
    if not torch.isfinite(half).all():
        raise FeatureError(
            f"the {recipe.name} encoder gave features beyond the fp16 range (|x| > 65504) for image {image_id!r} "
            f"({path}); nothing of its shard was stored: they cannot be stored as fp16."
        )
    return half


def extract_features(
    images: dict[str, str | Path],
    recipe: EncoderRecipe,
    output_dir: str | Path,
    encoder: torch.nn.Module | None = None,
    image_processor=None,
    batch_size: int = 8,
    shard_size: int = 256,
    device: str | torch.device | None = None,
    progress: bool = True,
    rank: int = 0,
    world: int = 1,
    barrier: Callable[[], None] = lambda: None,
    image_preparation: str = IMAGE_PREPARATION,
) -> Path:
    """Encodes every image (`{image_id: path}`) not yet stored in `output_dir`; returns `output_dir`.

    `encoder` and `image_processor` default to the recipe's checkpoint and the encoder's own image processor saved
    with it (`lapvqa_hf.models.encoders.load_encoder_image_processor`); X-rays are read by `LapvqaImageProcessor` first.
    `image_preparation` names how `image_processor` prepares images (`IMAGE_PREPARATION`, or
    `DETECTION_IMAGE_PREPARATION` with `detection_image_processor(recipe)`); it is recorded in the manifest, and a
    store prepared otherwise is not resumed.
    An image that cannot be read is skipped and listed in `output_dir/failures.json` (see `read_failures`); a
    later run retries it. Stored shards are checked first; a listed shard whose file was deleted is extracted again.

    With `world` processes (each calling this with the same images and its `rank`, `barrier()` waiting for them all,
    e.g. `accelerate.PartialState`'s), process `rank` encodes every `world`-th image not yet stored, sorted by id, into
    shards of its own, and process 0 merges them into the one store once all are done (see the module docstring).
    """
    for name, value in (("batch_size", batch_size), ("shard_size", shard_size)):
        if not isinstance(value, int) or value < 1:
            raise FeatureError(f"{name} must be a positive number of images, got {value!r}.")
    if not isinstance(world, int) or world < 1 or not isinstance(rank, int) or not 0 <= rank < world:
        raise FeatureError(f"rank must be 0 to world - 1 (world at least 1), got rank {rank!r} of world {world!r}.")
    device = resolve_device(device)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:  # a killed multi-process run's parts are folded in, so that its shards count as stored
        manifest, _ = _fold_parts(output_dir, recipe, image_preparation)
    barrier()
    if rank != 0:  # the manifest process 0 checked (and wrote, when it changed)
        exists = (output_dir / MANIFEST).is_file()
        manifest = _read_manifest(output_dir) if exists else _new_manifest(recipe, image_preparation)
    for shard in manifest["shards"][rank::world]:  # a damaged shard is not trusted to hold its images
        _read_shard(output_dir, shard, recipe.vis_dim)
    done = {image_id for shard in manifest["shards"] for image_id in shard["ids"]}
    todo = [image_id for image_id in images if image_id not in done]
    if not todo:
        if rank == 0:
            _write_failures(output_dir, [])  # every image is stored: none failed
        return output_dir
    share = todo if world == 1 else sorted(todo)[rank::world]
    # 1 process records its shards in the manifest, as it goes; several, each in its own part, merged at the end
    part = (_new_manifest(recipe, image_preparation), PART.format(rank=rank))
    record, record_name = (manifest, MANIFEST) if world == 1 else part
    prefix = "features-" if world == 1 else f"features-r{rank}-"
    failures: list[dict[str, str]] = []
    shards = _encoded_shards(images, share, recipe, encoder, image_processor, batch_size, shard_size, device,
                             progress and rank == 0, failures)  # fmt: skip
    for tensors in shards:
        _write_shard(output_dir, record, record_name, tensors, recipe, prefix, manifest["shards"])
    if world == 1:
        _write_failures(output_dir, failures)
        return output_dir
    write_json_atomically(output_dir / record_name, {**record, "failures": failures})
    barrier()
    if rank == 0:
        _, failures = _fold_parts(output_dir, recipe, image_preparation)
        order = {image_id: index for index, image_id in enumerate(images)}
        _write_failures(output_dir, sorted(failures, key=lambda failure: order[failure["image_id"]]))
    barrier()  # no process returns before the store is whole
    return output_dir


def _encoded_shards(
    images: dict[str, str | Path],
    todo: list[str],
    recipe: EncoderRecipe,
    encoder: torch.nn.Module | None,
    image_processor,
    batch_size: int,
    shard_size: int,
    device: torch.device,
    progress: bool,
    failures: list[dict[str, str]],
) -> Iterator[dict[str, torch.Tensor]]:
    """The stored tensors of `todo`, a shard (`{image_id: fp16 tokens}`) at a time; the images that cannot be read
    are added to `failures`. The encoder is loaded only when there is something to encode."""
    if not todo:
        return
    encoder = (encoder or load_encoder(recipe)).to(device).eval()
    trained_size = getattr(getattr(encoder, "config", None), "image_size", None)
    if trained_size is not None and trained_size != recipe.image_size:
        raise FeatureError(
            f"the {recipe.name} recipe feeds {recipe.image_size} px images, but this encoder takes {trained_size} px; "
            "use the recipe's checkpoint or a matching one."
        )
    image_processor = image_processor or load_encoder_image_processor(recipe)
    reader = LapvqaImageProcessor()  # X-ray files (16-bit, DICOM) become the 8-bit RGB the encoder's processor takes
    dtype = next(encoder.parameters()).dtype
    bar = tqdm(total=len(todo), desc=f"extracting {recipe.name} features", unit="image", disable=not progress)
    for start in range(0, len(todo), shard_size):
        shard_ids = todo[start : start + shard_size]
        tensors = {}
        for batch_start in range(0, len(shard_ids), batch_size):
            batch_ids = shard_ids[batch_start : batch_start + batch_size]
            rgb = _read_images(reader, {image_id: images[image_id] for image_id in batch_ids}, failures)
            if rgb:
                pixels = image_processor(images=list(rgb.values()), return_tensors="pt")["pixel_values"]
                with torch.inference_mode():
                    tokens = patch_tokens(recipe, encoder, pixels.to(device, dtype))
                for image_id, image_tokens in zip(rgb, tokens, strict=True):
                    tensors[image_id] = _storable(image_tokens, image_id, images[image_id], recipe)
            bar.update(len(batch_ids))
        if tensors:
            yield tensors
    bar.close()


def _read_images(reader: LapvqaImageProcessor, images: dict[str, str | Path], failures: list[dict[str, str]]) -> dict:
    """`{image_id: 8-bit RGB PIL image}` of the images that can be read; the others are added to `failures`."""
    rgb = {}
    for image_id, path in images.items():
        try:
            rgb[image_id] = reader.load_rgb(path)
        except ValueError as error:  # the image processor's one-line refusal, naming the file
            failures.append({"image_id": image_id, "path": str(path), "reason": str(error)})
    return rgb


def _write_shard(
    output_dir: Path,
    record: dict,
    record_name: str,
    tensors: dict[str, torch.Tensor],
    recipe: EncoderRecipe,
    prefix: str,
    taken: list[dict],
) -> None:
    """Stores `tensors` as the next shard (`{prefix}XXXXX.safetensors`) under a name no shard of `record` or `taken`
    has, then records it in `record`, written to `output_dir/record_name`."""
    listed = {shard["file"] for shard in [*record["shards"], *taken]}
    names = (f"{prefix}{index:05d}.safetensors" for index in itertools.count())
    shard_name = next(name for name in names if name not in listed)
    data = save(tensors, metadata={"encoder": recipe.name, "recipe": json.dumps(asdict(recipe))})
    temporary = output_dir / f".{shard_name}.tmp"
    temporary.write_bytes(data)
    os.replace(temporary, output_dir / shard_name)
    record["shards"].append({"file": shard_name, "ids": list(tensors), "sha256": hashlib.sha256(data).hexdigest()})
    write_json_atomically(output_dir / record_name, record)


class FeatureStore:
    """Read access to extracted features: `store[image_id]` is `[num_patches, vis_dim]` fp16.

    Every shard is checked when the store opens (see `extract_features`); a damaged one is a `FeatureError` naming
    the file and its fix."""

    def __init__(self, output_dir: str | Path):
        self.output_dir = Path(output_dir)
        if not (self.output_dir / MANIFEST).is_file():
            raise FeatureError(f"{self.output_dir}: no {MANIFEST}; run `lapvqa extract-features` first.")
        manifest = _read_manifest(self.output_dir)
        self.recipe = EncoderRecipe(**manifest["recipe"])
        self.image_preparation: str | None = manifest.get("image_preparation")  # None: lapvqa-hf 0.1.x
        self._tensors: dict[str, torch.Tensor] = {}
        for shard in manifest["shards"]:
            self._tensors.update(_read_shard(self.output_dir, shard, self.recipe.vis_dim))

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._tensors

    def __getitem__(self, image_id: str) -> torch.Tensor:
        if image_id not in self._tensors:
            raise KeyError(f"no features for image {image_id!r} in {self.output_dir}")
        return self._tensors[image_id]


def detection_image_processor(recipe: EncoderRecipe, resize_mode: str = "stretch") -> LapvqaImageProcessor:
    """The image processor of a detection head on `recipe`'s encoder: the recipe's input size and normalisation, and
    `resize_mode`, which `post_process_object_detection` undoes to map boxes back to the original image."""
    return LapvqaImageProcessor(
        size={"height": recipe.image_size, "width": recipe.image_size},
        image_mean=list(recipe.image_mean),
        image_std=list(recipe.image_std),
        resize_mode=resize_mode,
    )


IMAGE_COLUMNS = ("prior_image", "current_image", "image")  # DiffVQA pairs; captioning (and VQA) rows


def image_id(path: str | Path, root: str | Path | None = None) -> str:
    """The key of an image's features: its path relative to `root` (the release), else its absolute path.

    Links are followed only where the path itself does not lie under `root`: a release's `files/` is often a link to
    another disk, and its images still belong to the release."""
    if root is None:
        return str(Path(path).resolve())
    for found, base in ((os.path.abspath(path), os.path.abspath(root)), (Path(path).resolve(), Path(root).resolve())):
        with contextlib.suppress(ValueError):
            return str(Path(found).relative_to(base))
    raise FeatureError(f"{path} is not inside the release folder {root}; its image paths must lie under it.")


def images_of(rows: Iterable[dict], root: str | Path | None = None) -> dict[str, str]:
    """`{image_id: path}` of every image of dataset rows (`prior_image`, `current_image` or `image` columns)."""
    images = {}
    for row in rows:
        for key in IMAGE_COLUMNS:
            if key in row:
                images[image_id(row[key], root)] = str(Path(row[key]).resolve())
    return images


__all__ = [
    "DETECTION_IMAGE_PREPARATION",
    "IMAGE_PREPARATION",
    "FeatureError",
    "FeatureStore",
    "detection_image_processor",
    "extract_features",
    "image_id",
    "images_of",
    "read_failures",
    "recipe_for",
    "resolve_device",
]
