"""Frozen-encoder patch tokens, extracted once per image and stored for fast training (`lapvqa extract-features`).

The upstream DiffVQA card does not say how its features were taken from each encoder; `lapvqa_hf.encoders.RECIPES`
pins it (checkpoint, input size, normalisation, which hidden state, CLS kept or dropped). The recipe is stored
with the features and, later, in the config of a head trained on them.

Storage: `features-XXXXX.safetensors` shards (fp16 tensors keyed by image id, `[num_patches, vis_dim]`) and
`features.json` (the recipe and the shards written so far). A shard is written to a temporary name and renamed,
then `features.json` is replaced atomically, so a crash loses at most the shard in progress and a re-run resumes.
"""

import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .encoders import RECIPES, EncoderError, EncoderRecipe, load_encoder, load_encoder_image_processor, patch_tokens
from .image_processing_lapvqa import LapvqaImageProcessor

MANIFEST = "features.json"
# How images reach the encoder, recorded in the manifest: stores written by lapvqa-hf 0.1.x (which stretched
# images with the recipe's own normalisation instead) are not resumed with differently prepared images.
IMAGE_PREPARATION = "xray-as-8-bit-rgb, then the encoder's own image processor"


class FeatureError(EncoderError):
    """Features cannot be extracted or read; the message says what was expected."""


def recipe_for(name: str) -> EncoderRecipe:
    if name not in RECIPES:
        raise FeatureError(f"unknown encoder {name!r}; expected one of {sorted(RECIPES)}.")
    return RECIPES[name]


def _write_json_atomically(path: Path, payload: dict) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "w") as file:
        json.dump(payload, file, indent=1)
    os.replace(temporary, path)


def extract_features(
    images: dict[str, str | Path],
    recipe: EncoderRecipe,
    output_dir: str | Path,
    encoder: torch.nn.Module | None = None,
    image_processor=None,
    batch_size: int = 8,
    shard_size: int = 256,
    device: str | None = None,
    progress: bool = True,
) -> Path:
    """Encodes every image (`{image_id: path}`) not yet stored in `output_dir`; returns `output_dir`.

    `encoder` and `image_processor` default to the recipe's checkpoint and the encoder's own image processor saved
    with it (`lapvqa_hf.encoders.load_encoder_image_processor`); X-rays are read by `LapvqaImageProcessor` first.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = output_dir / MANIFEST
    manifest = {"recipe": asdict(recipe), "image_preparation": IMAGE_PREPARATION, "shards": []}
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if EncoderRecipe(**manifest["recipe"]) != recipe:
            raise FeatureError(
                f"{output_dir} holds features of another recipe ({manifest['recipe']['name']}, checkpoint "
                f"{manifest['recipe']['checkpoint']}); use another folder, or the same encoder and --checkpoint."
            )
        if manifest.get("image_preparation") != IMAGE_PREPARATION:
            raise FeatureError(
                f"{output_dir} holds features of images prepared otherwise (by lapvqa-hf 0.1.x: stretched with the "
                "recipe's normalisation); extract into a new folder, so that one store never mixes the two."
            )
    done = {image_id for shard in manifest["shards"] for image_id in shard["ids"]}
    todo = [image_id for image_id in images if image_id not in done]
    if not todo:
        return output_dir
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
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
            pixels = reader.encoder_pixel_values([images[i] for i in batch_ids], image_processor).to(device, dtype)
            with torch.inference_mode():
                tokens = patch_tokens(recipe, encoder, pixels)
            tensors.update({i: t.to("cpu", torch.float16).contiguous() for i, t in zip(batch_ids, tokens, strict=True)})
            bar.update(len(batch_ids))
        shard_name = f"features-{len(manifest['shards']):05d}.safetensors"
        temporary = output_dir / f".{shard_name}.tmp"
        save_file(tensors, temporary, metadata={"encoder": recipe.name, "recipe": json.dumps(asdict(recipe))})
        os.replace(temporary, output_dir / shard_name)
        manifest["shards"].append({"file": shard_name, "ids": shard_ids})
        _write_json_atomically(manifest_path, manifest)
    bar.close()
    return output_dir


class FeatureStore:
    """Read access to extracted features: `store[image_id]` is `[num_patches, vis_dim]` fp16."""

    def __init__(self, output_dir: str | Path):
        self.output_dir = Path(output_dir)
        manifest_path = self.output_dir / MANIFEST
        if not manifest_path.is_file():
            raise FeatureError(f"{self.output_dir}: no {MANIFEST}; run `lapvqa extract-features` first.")
        manifest = json.loads(manifest_path.read_text())
        self.recipe = EncoderRecipe(**manifest["recipe"])
        self._tensors: dict[str, torch.Tensor] = {}
        for shard in manifest["shards"]:
            self._tensors.update(load_file(self.output_dir / shard["file"]))

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._tensors

    def __getitem__(self, image_id: str) -> torch.Tensor:
        if image_id not in self._tensors:
            raise KeyError(f"no features for image {image_id!r} in {self.output_dir}")
        return self._tensors[image_id]


IMAGE_COLUMNS = ("prior_image", "current_image", "image")  # DiffVQA pairs; captioning (and VQA) rows


def image_id(path: str | Path, root: str | Path | None = None) -> str:
    """The key of an image's features: its path relative to `root` (the release), else its absolute path."""
    path = Path(path).resolve()
    return str(path.relative_to(root)) if root is not None else str(path)


def images_of(rows: Iterable[dict], root: str | Path | None = None) -> dict[str, str]:
    """`{image_id: path}` of every image of dataset rows (`prior_image`, `current_image` or `image` columns)."""
    images = {}
    for row in rows:
        for key in IMAGE_COLUMNS:
            if key in row:
                images[image_id(row[key], root)] = str(Path(row[key]).resolve())
    return images


__all__ = [
    "FeatureError",
    "FeatureStore",
    "extract_features",
    "image_id",
    "images_of",
    "recipe_for",
]
