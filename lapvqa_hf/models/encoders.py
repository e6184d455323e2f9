"""The frozen encoders of the LAPVQA collection: one registry, read by the head configs, the converters, feature
extraction and the collection manifest.

The upstream cards do not say how each head's features were taken from its encoder; each `EncoderRecipe` pins it
(checkpoint, input size, normalisation, which output holds the tokens, CLS kept or dropped, token width). A recipe
is stored with extracted features and, as `feature_recipe`, in the `config.json` of every converted or trained
head, so that the head's folder says which encoder (checkpoint and revision) feeds it.

This module ships with the model files (remote code). It imports torch and transformers only inside the functions
that load and run an encoder, so that the head configs, which read the registry, stay light.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
HALF_MEAN, HALF_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EncoderRecipe:
    """How one frozen encoder turns an image into patch tokens `[num_patches, vis_dim]`."""

    name: str
    checkpoint: str  # a Hub id or a local folder
    library: str  # "transformers" (a class of transformers) or "lapvqa" (a class of this package, remote code)
    model_class: str
    image_size: int
    image_mean: list[float]
    image_std: list[float]
    output: str  # the model output (or method) holding the tokens
    drop_cls: bool
    vis_dim: int
    revision: str | None = None  # of `checkpoint` on the Hub; None is its default branch

    def __post_init__(self):  # lists, as JSON gives them back, so that a stored recipe compares equal
        object.__setattr__(self, "image_mean", [float(v) for v in self.image_mean])
        object.__setattr__(self, "image_std", [float(v) for v in self.image_std])


# fmt: off
RECIPES: dict[str, EncoderRecipe] = {recipe.name: recipe for recipe in (
    EncoderRecipe(
        name="clip-vit-l14", checkpoint="openai/clip-vit-large-patch14", library="transformers", model_class="CLIPVisionModel",
        image_size=224, image_mean=CLIP_MEAN, image_std=CLIP_STD, output="last_hidden_state", drop_cls=True, vis_dim=1024,
    ),
    EncoderRecipe(
        name="siglip", checkpoint="google/siglip-so400m-patch14-384", library="transformers", model_class="SiglipVisionModel",
        image_size=384, image_mean=HALF_MEAN, image_std=HALF_STD, output="last_hidden_state", drop_cls=False, vis_dim=1152,
    ),
    EncoderRecipe(
        name="owlv2", checkpoint="google/owlv2-large-patch14-ensemble", library="transformers", model_class="Owlv2VisionModel",
        image_size=960, image_mean=CLIP_MEAN, image_std=CLIP_STD, output="last_hidden_state", drop_cls=True, vis_dim=1024,
    ),
    EncoderRecipe(
        name="florence2", checkpoint="florence-community/Florence-2-large", library="transformers", model_class="Florence2ForConditionalGeneration",
        image_size=768, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, output="get_image_features", drop_cls=False, vis_dim=1024,
    ),
    EncoderRecipe(  # open_clip's coca_ViT-L-14 (mscoco_finetuned_laion2b_s13b_b90k), converted: `lapvqa convert coca-encoder`
        name="coca", checkpoint="dmusingu/lapvqa-coca-vit-l14", library="lapvqa", model_class="LapvqaCocaVisionModel",
        image_size=224, image_mean=CLIP_MEAN, image_std=CLIP_STD, output="last_hidden_state", drop_cls=False, vis_dim=768,
    ),
    EncoderRecipe(  # the detection heads' MAE encoder, run without masking
        name="mae-vit-l16", checkpoint="facebook/vit-mae-large", library="transformers", model_class="ViTMAEModel",
        image_size=224, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, output="last_hidden_state", drop_cls=True, vis_dim=1024,
    ),
    EncoderRecipe(  # the collection's own captioning-pretrained ViT-L/14
        name="lapvqa-vit-l14", checkpoint="dmusingu/lapvqa-vit-l14", library="lapvqa", model_class="LapvqaVisionModel",
        image_size=224, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, output="last_hidden_state", drop_cls=False, vis_dim=1024,
    ),
)}
# fmt: on

# The width of each encoder's patch tokens: what a head trained on it takes as `vis_dim`.
ENCODER_WIDTHS: dict[str, int] = {name: recipe.vis_dim for name, recipe in RECIPES.items()}


# Run as the package (`lapvqa_hf.encoders`), the package's registered classes load the collection's own encoders and no
# folder's code runs; run as a head folder's remote code (the user trusted that folder), an encoder folder's own code
# serves where the package is not installed.
_TRUST_ENCODER_CODE = not __name__.startswith("lapvqa_hf.")


class EncoderError(ValueError):
    """A frozen encoder cannot be loaded or run as its recipe says; the message says what was expected."""


def _unreachable(recipe: EncoderRecipe, source: str, error: Exception) -> EncoderError:
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return EncoderError(
        f"the {recipe.name} encoder could not be loaded from {source} ({reason}); a Hub id needs the Hub once (then "
        "the Hugging Face cache serves it offline), or pass a local folder of the encoder."
    )


def load_encoder(recipe: EncoderRecipe, checkpoint: str | None = None) -> "torch.nn.Module":
    """The frozen encoder of a recipe, from the Hub (at the recipe's revision; downloaded once, then read from the
    Hugging Face cache, offline too) or a local folder (`checkpoint` overrides the recipe's)."""
    from safetensors import SafetensorError

    source = checkpoint or recipe.checkpoint
    try:
        if recipe.library == "transformers":
            import transformers

            # MAE masks 75% of the patches at random by default; as a feature extractor it sees the whole image.
            options = {"mask_ratio": 0.0} if recipe.model_class == "ViTMAEModel" else {}
            model_class = getattr(transformers, recipe.model_class)
            return model_class.from_pretrained(source, revision=recipe.revision, **options).eval()
        # A folder of this package's encoders (the LAPVQA ViT, CoCa's image tower): the package's class when it is
        # installed, else the folder's own code.
        from transformers import AutoModel

        model = AutoModel.from_pretrained(
            source, revision=recipe.revision, trust_remote_code=_TRUST_ENCODER_CODE
        ).eval()
    except (OSError, RuntimeError, SafetensorError) as error:  # absent, unreachable, damaged, or not fitting
        raise _unreachable(recipe, source, error) from None
    if type(model).__name__ != recipe.model_class:
        raise EncoderError(
            f"the {recipe.name} recipe expects a {recipe.model_class} at {source}, found a {type(model).__name__}."
        )
    return model


def encoder_class(recipe: EncoderRecipe) -> type:
    """The model class a recipe names: transformers' own, or this package's (a sibling module, imported here by
    name so that it ships with every head folder's remote code)."""
    if recipe.library == "transformers":
        import transformers

        return getattr(transformers, recipe.model_class)
    from .modeling_lapvqa_coca import LapvqaCocaVisionModel
    from .modeling_lapvqa_vision import LapvqaVisionModel

    return {model_class.__name__: model_class for model_class in (LapvqaCocaVisionModel, LapvqaVisionModel)}[
        recipe.model_class
    ]


def load_encoder_config(recipe: EncoderRecipe, checkpoint: str | None = None, revision: str | None = None) -> dict:
    """The architecture of a recipe's encoder (its config, as a dict), read from `checkpoint` (default the recipe's):
    what a head that holds its own fine-tuned encoder records as `encoder_config`."""
    source = checkpoint or recipe.checkpoint
    try:
        config = encoder_class(recipe).config_class.from_pretrained(source, revision=revision or recipe.revision)
    except OSError as error:
        raise _unreachable(recipe, source, error) from None
    return config.to_dict()


def build_encoder(recipe: EncoderRecipe, encoder_config: dict) -> "torch.nn.Module":
    """The recipe's encoder with the architecture `encoder_config` gives (its weights initialised, to be loaded):
    the encoder a head holds when its folder carries the fine-tuned encoder."""
    model_class = encoder_class(recipe)
    config = model_class.config_class.from_dict(encoder_config)
    if recipe.model_class == "ViTMAEModel":
        config.mask_ratio = 0.0  # as in `load_encoder`: the whole image
    return model_class(config)


def load_encoder_image_processor(recipe: EncoderRecipe, checkpoint: str | None = None):
    """The encoder's own image processor: the one saved with its checkpoint (transformers' `AutoImageProcessor`; a
    `LapvqaImageProcessor` for the collection's ViT, open_clip's evaluation transform as a `CLIPImageProcessor`
    for CoCa)."""
    from transformers import AutoImageProcessor

    source = checkpoint or recipe.checkpoint
    try:
        return AutoImageProcessor.from_pretrained(
            source, revision=recipe.revision, trust_remote_code=recipe.library == "lapvqa" and _TRUST_ENCODER_CODE
        )
    except OSError as error:
        raise _unreachable(recipe, source, error) from None


def patch_tokens(recipe: EncoderRecipe, encoder: "torch.nn.Module", pixel_values: "torch.Tensor") -> "torch.Tensor":
    """`[batch, num_patches, vis_dim]` from the encoder as the recipe says."""
    import torch

    if recipe.output == "get_image_features":
        # Florence-2: the DaViT tokens after the multi-modal projector (position embeddings, projection, norm).
        tokens = encoder.get_image_features(pixel_values=pixel_values).pooler_output
    elif recipe.model_class == "ViTMAEModel":
        # MAE orders its patches by random noise before masking; ascending noise keeps the image's order.
        num_patches = (pixel_values.shape[-2] // encoder.config.patch_size) * (
            pixel_values.shape[-1] // encoder.config.patch_size
        )
        order = torch.arange(num_patches, device=pixel_values.device, dtype=torch.float32)
        tokens = encoder(pixel_values=pixel_values, noise=order.expand(len(pixel_values), -1)).last_hidden_state
    else:
        tokens = getattr(encoder(pixel_values=pixel_values), recipe.output)
    tokens = tokens[:, 1:] if recipe.drop_cls else tokens
    if tokens.ndim != 3 or tokens.shape[-1] != recipe.vis_dim:
        raise EncoderError(
            f"the {recipe.name} recipe expects [batch, patches, {recipe.vis_dim}] tokens, the encoder gave "
            f"{list(tokens.shape)}; check the checkpoint."
        )
    return tokens


def require_encoder_width(encoder_name: str | None, vis_dim: int) -> None:
    """A head named after a known encoder must take that encoder's token width."""
    expected = ENCODER_WIDTHS.get(encoder_name)
    if expected is not None and expected != vis_dim:
        raise ValueError(f"encoder_name={encoder_name!r} gives {expected}-dim features, but vis_dim is {vis_dim}.")


__all__ = [
    "ENCODER_WIDTHS",
    "RECIPES",
    "EncoderError",
    "EncoderRecipe",
    "build_encoder",
    "encoder_class",
    "load_encoder",
    "load_encoder_config",
    "load_encoder_image_processor",
    "patch_tokens",
    "require_encoder_width",
]
