"""The text towers that encode the grounding heads' phrases: one registry, read by the grounding config, its
converter, its pipeline and its training task.

A grounding head (`dmusingu/lapvqa-pg`) takes one vector per phrase. No card says which text tower made it; the
pins (docs/converting.md) are the projected text embedding (`get_text_features`) of the text tower that goes with the
frozen image encoder, L2-normalised: SigLIP so400m's for `siglip`, OWLv2 large's for `owlv2`, CLIP ViT-L/14's for
every other encoder (MAE and the collection's own ViT have no text tower; Florence-2's is an encoder-decoder).
A `TextRecipe` is stored, as `text_recipe`, in the `config.json` of every converted or trained grounding head.

This module ships with the model files (remote code). It imports torch and transformers only inside the functions
that load and run a text tower, so that the grounding config, which reads the registry, stays light.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TextRecipe:
    """Which text tower turns a phrase into the grounding head's `text_features` `[text_dim]`."""

    name: str
    checkpoint: str  # a Hub id or a local folder: transformers' `AutoModel` (with `get_text_features`) and tokenizer
    text_dim: int
    revision: str | None = None  # of `checkpoint` on the Hub; None is its default branch


# fmt: off
TEXT_RECIPES: dict[str, TextRecipe] = {recipe.name: recipe for recipe in (
    TextRecipe(name="clip-vit-l14", checkpoint="openai/clip-vit-large-patch14", text_dim=768),
    TextRecipe(name="siglip", checkpoint="google/siglip-so400m-patch14-384", text_dim=1152),
    TextRecipe(name="owlv2", checkpoint="google/owlv2-large-patch14-ensemble", text_dim=768),
)}
# fmt: on
ENCODER_TEXT_RECIPES = {"siglip": "siglip", "owlv2": "owlv2"}  # image encoder -> its text tower's recipe
DEFAULT_TEXT_RECIPE = "clip-vit-l14"  # every other image encoder's


def text_recipe_for(encoder: str | None) -> TextRecipe:
    """The text tower pinned for a head on the image encoder `encoder` (docs/converting.md)."""
    return TEXT_RECIPES[ENCODER_TEXT_RECIPES.get(encoder, DEFAULT_TEXT_RECIPE)]


class TextTowerError(ValueError):
    """A text tower cannot be loaded or does not fit its head; the message says what was expected."""


def load_text_model(recipe: TextRecipe, checkpoint: str | None = None) -> "torch.nn.Module":
    """The text tower's model (`AutoModel`, in eval mode): from the Hub at the recipe's revision (downloaded once,
    then read from the Hugging Face cache, offline too) or a local folder (`checkpoint` overrides the recipe's)."""
    from transformers import AutoModel

    source = checkpoint or recipe.checkpoint
    try:
        model = AutoModel.from_pretrained(source, revision=recipe.revision)
    except OSError as error:
        raise _unreachable(recipe, source, error) from None
    if not hasattr(model, "get_text_features"):
        raise TextTowerError(
            f"the {recipe.name} text tower at {source} is a {type(model).__name__}, which has no get_text_features; "
            "name a two-tower checkpoint (CLIP, SigLIP, OWLv2)."
        )
    return model.eval()


def load_text_tokenizer(recipe: TextRecipe, checkpoint: str | None = None):
    """The text tower's own tokenizer (`AutoTokenizer`), from where `load_text_model` reads the model."""
    from transformers import AutoTokenizer

    source = checkpoint or recipe.checkpoint
    try:
        return AutoTokenizer.from_pretrained(source, revision=recipe.revision)
    except (OSError, ValueError) as error:
        raise _unreachable(recipe, source, error) from None


def _unreachable(recipe: TextRecipe, source: str, error: Exception) -> TextTowerError:
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return TextTowerError(
        f"the {recipe.name} text tower could not be loaded from {source} ({reason}); a Hub id needs the Hub once "
        "(then the Hugging Face cache serves it offline), or pass a local folder of the text tower."
    )


def encode_phrases(model, tokenizer, phrases: list[str], normalize: bool = True) -> "torch.Tensor":
    """`[len(phrases), text_dim]` float32: each phrase's projected text embedding (`get_text_features`),
    L2-normalised with `normalize`. Phrases are padded to the tokenizer's `model_max_length`, as SigLIP's text tower
    (pooled at the last position) was trained; CLIP's and OWLv2's pool at their end token, unaffected by padding."""
    import torch

    if not phrases or not all(isinstance(phrase, str) and phrase.strip() for phrase in phrases):
        raise ValueError(f"phrases must be a non-empty list of non-empty strings, got {phrases!r}.")
    inputs = tokenizer(phrases, padding="max_length", truncation=True, return_tensors="pt")
    with torch.no_grad():
        features = model.get_text_features(**inputs.to(model.device)).pooler_output.float()
    return torch.nn.functional.normalize(features, dim=-1) if normalize else features


__all__ = [
    "DEFAULT_TEXT_RECIPE",
    "ENCODER_TEXT_RECIPES",
    "TEXT_RECIPES",
    "TextRecipe",
    "TextTowerError",
    "encode_phrases",
    "load_text_model",
    "load_text_tokenizer",
    "text_recipe_for",
]
