"""Convert an upstream `VisualGroundingHead` checkpoint (`dmusingu/lapvqa-pg`, `{encoder}.pt`) into a Transformers
folder.

    lapvqa convert grounding siglip.pt --output lapvqa-pg-siglip
    python -m lapvqa_hf.convert.grounding siglip.pt --output lapvqa-pg-siglip

The upstream file is `{state_dict, vis_dim, txt_dim, d_model, num_layers, encoder, epoch, val_miou, val_acc50}`:
the metadata is checked against the weights and the training record kept in `config.json`. A plain state dict is
accepted too, with `--encoder`. Everything the weights reveal (widths, layers, FFN width, learned positions, final
norm) is read from them; what they cannot reveal (heads, activation, LayerNorm eps, the text tower that embeds the
phrase and whether its embedding is normalised) is an option recorded in `config.json`. The folder also holds a
`LapvqaImageProcessor` whose `boxes_to_original` maps the boxes back onto the original image. The converted model
is verified against the faithful original after the folder is written and before it is published.
"""

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from lapvqa_hf.features import detection_image_processor
from lapvqa_hf.messages import counted, run_reporting_errors
from lapvqa_hf.model_folders import looks_like_a_local_path
from lapvqa_hf.models.configuration_lapvqa_grounding import LapvqaGroundingConfig
from lapvqa_hf.models.encoders import RECIPES
from lapvqa_hf.models.image_processing_lapvqa import RESIZE_MODES, LapvqaImageProcessor
from lapvqa_hf.models.modeling_lapvqa_grounding import LapvqaGroundingModel
from lapvqa_hf.models.text_towers import TEXT_RECIPES, TextRecipe, text_recipe_for

from .checkpoint import ConversionError, StateDictMapper, conversion_record, load_untrusted_checkpoint, local_checkpoint
from .common import (
    add_common_arguments,
    add_encoder_arguments,
    check_encoder_width,
    command_line,
    encoder_options,
    encoder_record,
    expected_shapes,
    folder_verifier,
    map_torch_encoder_layers,
    numbered_blocks,
    tensor_shape,
    verify_and_write_options,
    write_verified,
)
from .original import VisualGroundingHead
from .verify import DEFAULT_FLOAT32_BUDGET, DEFAULT_TOLERANCE, Outputs, Probe, dtype_of

WHAT = "VisualGroundingHead"
ARCHITECTURE_METADATA = ("vis_dim", "txt_dim", "d_model", "num_layers", "encoder")
TRAINING_METADATA = ("epoch", "val_miou", "val_acc50")

ASSUMPTIONS = (
    "encoder is torch.nn.TransformerEncoder(norm_first=True, batch_first=True) with PyTorch's state-dict keys",
    "sequence [reg_token ; vis_proj(patch tokens) ; txt_proj(phrase)]; pos_emb, where present, added to its first rows",
    "box_head = Sequential(Linear, ReLU, Linear) + sigmoid at [REG] -> (cx, cy, w, h) in [0, 1] of the encoder's input",
    "the phrase feature is the text tower's projected embedding (get_text_features), one vector per phrase",
)


def text_record(
    encoder: str, name: str | None = None, checkpoint: str | None = None, revision: str | None = None
) -> TextRecipe:
    """The head's text tower: the recipe `name` (default: the one pinned for `encoder`), its weights read from
    `checkpoint` (a Hub id or a local folder, default the recipe's) at `revision`."""
    recipe = TEXT_RECIPES[name] if name is not None else text_recipe_for(encoder)
    if checkpoint is not None:
        if Path(checkpoint).is_dir():
            checkpoint = str(Path(checkpoint).resolve())
        elif Path(checkpoint).exists():
            raise ConversionError(f"--text-checkpoint {checkpoint}: a file; name the text tower's folder or Hub id.")
        elif looks_like_a_local_path(checkpoint):
            raise ConversionError(f"--text-checkpoint {checkpoint}: no such folder (and no Hub id).")
    return dataclasses.replace(recipe, checkpoint=checkpoint or recipe.checkpoint, revision=revision or recipe.revision)


def infer_config(
    state_dict: dict[str, torch.Tensor],
    encoder: str,
    text_recipe: TextRecipe,
    num_attention_heads: int = 8,
    activation_function: str = "relu",
    layer_norm_eps: float = 1e-5,
) -> LapvqaGroundingConfig:
    """Reads the architecture from the weights; the pinned (or given) conventions fill in the rest."""
    d_model, vis_dim = tensor_shape(state_dict, "vis_proj.weight", 2, WHAT)
    text_width, txt_dim = tensor_shape(state_dict, "txt_proj.weight", 2, WHAT)
    if text_width != d_model:
        raise ConversionError(f"txt_proj.weight should be [{d_model}, txt_dim], found {[text_width, txt_dim]}.")
    reg_shape = tensor_shape(state_dict, "reg_token", 3, WHAT)
    if list(reg_shape) != [1, 1, d_model]:
        raise ConversionError(f"reg_token should be [1, 1, {d_model}], found {list(reg_shape)}.")
    positions = None
    if "pos_emb" in state_dict:
        position_shape = tensor_shape(state_dict, "pos_emb", 3, WHAT)
        if position_shape[0] != 1 or position_shape[2] != d_model or position_shape[1] < 3:
            raise ConversionError(
                f"pos_emb should be [1, L, {d_model}] with L >= 3 ([REG], a visual token, the phrase), found "
                f"{list(position_shape)}."
            )
        positions = position_shape[1]
    if d_model % num_attention_heads:
        raise ConversionError(f"--num-heads {num_attention_heads} does not divide the width {d_model}.")
    check_encoder_width(encoder, vis_dim)
    if text_recipe.text_dim != txt_dim:
        raise ConversionError(
            f"the {text_recipe.name} text tower gives {text_recipe.text_dim}-dim phrase features, but the checkpoint's "
            f"txt_proj takes {txt_dim}; pick the text tower the head was trained with (--text-recipe)."
        )
    return LapvqaGroundingConfig(
        vis_dim=vis_dim,
        txt_dim=txt_dim,
        d_model=d_model,
        encoder_layers=numbered_blocks(state_dict, "encoder.layers."),
        num_attention_heads=num_attention_heads,
        encoder_ffn_dim=tensor_shape(state_dict, "encoder.layers.0.linear1.weight", 2, WHAT)[0],
        activation_function=activation_function,
        encoder_final_layer_norm="encoder.norm.weight" in state_dict,
        max_position_embeddings=positions,
        layer_norm_eps=layer_norm_eps,
        encoder_name=encoder,
        text_recipe=dataclasses.asdict(text_recipe),
    )


def resolve_encoder(metadata: dict[str, object], encoder: str | None) -> str:
    """The encoder named by the checkpoint's metadata and/or `--encoder`; they must agree."""
    if not metadata:
        if encoder is None:
            raise ConversionError("a plain state dict carries no encoder name; pass --encoder.")
        return encoder
    unknown = sorted(set(metadata) - set(ARCHITECTURE_METADATA) - set(TRAINING_METADATA))
    missing = [key for key in ARCHITECTURE_METADATA if key not in metadata]
    if unknown or missing:
        raise ConversionError(
            f"checkpoint metadata should hold {list(ARCHITECTURE_METADATA + TRAINING_METADATA)}; "
            f"found unknown keys {unknown} and missing keys {missing}."
        )
    check_training_record(metadata)
    if not isinstance(metadata["encoder"], str) or metadata["encoder"] not in RECIPES:
        raise ConversionError(
            f"the checkpoint names an unknown encoder {metadata['encoder']!r}; expected one of {sorted(RECIPES)}."
        )
    if encoder is not None and encoder != metadata["encoder"]:
        raise ConversionError(f"--encoder {encoder} contradicts the checkpoint's encoder {metadata['encoder']!r}.")
    return metadata["encoder"]


def check_training_record(metadata: dict[str, object]) -> None:
    """The training record goes into `config.json` and the model card: a whole epoch count, mIoU and Acc@0.5 in
    [0, 1]."""
    epoch = metadata.get("epoch")
    if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0):
        raise ConversionError(f"checkpoint metadata: epoch must be a whole number of at least 0, found {epoch!r}.")
    for key in ("val_miou", "val_acc50"):
        value = metadata.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1
        ):
            raise ConversionError(f"checkpoint metadata: {key} must be a number in [0, 1], found {value!r}.")


def check_metadata(metadata: dict[str, object], config: LapvqaGroundingConfig) -> None:
    """The checkpoint's own architecture record must match what its weights say."""
    found_in_weights = {
        "vis_dim": (config.vis_dim, "vis_proj.weight"),
        "txt_dim": (config.txt_dim, "txt_proj.weight"),
        "d_model": (config.d_model, "vis_proj.weight"),
        "num_layers": (config.encoder_layers, "encoder.layers.*"),
    }
    for key, (from_weights, source) in found_in_weights.items():
        if key in metadata and metadata[key] != from_weights:
            raise ConversionError(
                f"checkpoint metadata says {key}={metadata[key]!r}, but the weights ({source}) give {from_weights}."
            )


def convert_state_dict(state_dict: dict[str, torch.Tensor], config: LapvqaGroundingConfig) -> dict[str, torch.Tensor]:
    """Upstream names -> `LapvqaGroundingModel` names; fused attention projections are split into q/k/v."""
    mapper = StateDictMapper(state_dict)
    mapper.rename_prefix("vis_proj.", "visual_projection.")
    mapper.rename_prefix("txt_proj.", "text_projection.")
    mapper.rename("reg_token", "reg_token")
    if config.max_position_embeddings is not None:
        mapper.rename("pos_emb", "position_embeddings")
    map_torch_encoder_layers(mapper, "encoder.layers.", "encoder.layers.", config.encoder_layers)
    if config.encoder_final_layer_norm:
        mapper.rename_prefix("encoder.norm.", "encoder.layer_norm.")
    mapper.rename_prefix("box_head.0.", "bbox_predictor.layers.0.")
    mapper.rename_prefix("box_head.2.", "bbox_predictor.layers.1.")
    return mapper.finish(expected_shapes(LapvqaGroundingModel(config)))


def original_from_state_dict(state_dict: dict[str, torch.Tensor], config: LapvqaGroundingConfig) -> VisualGroundingHead:
    """The faithful upstream module, loaded strictly from the same state dict."""
    head = VisualGroundingHead(
        vis_dim=config.vis_dim,
        txt_dim=config.txt_dim,
        d_model=config.d_model,
        nhead=config.num_attention_heads,
        num_layers=config.encoder_layers,
        dim_feedforward=config.encoder_ffn_dim,
        activation=config.activation_function,
        layer_norm_eps=config.layer_norm_eps,
        final_norm=config.encoder_final_layer_norm,
        max_len=config.max_position_embeddings,
    )
    head.load_state_dict(state_dict, strict=True)
    return head.eval()


class GroundingProbe(Probe):
    """Random patch tokens and phrase features (unit vectors where the head takes normalised ones), one batch per
    token count within the learned positions: boxes and the box head's output before the sigmoid, which a saturated
    sigmoid would hide."""

    def __init__(
        self, config: LapvqaGroundingConfig, num_patches: tuple[int, ...] = (49, 37), batch_size: int = 3, seed: int = 0
    ):
        generator = torch.Generator().manual_seed(seed)
        limit = config.max_position_embeddings
        self.inputs = []
        for length in num_patches:
            length = min(length, limit - 2) if limit is not None else length
            vis = torch.randn((batch_size, length, config.vis_dim), generator=generator, dtype=torch.float64)
            txt = torch.randn((batch_size, config.txt_dim), generator=generator, dtype=torch.float64)
            self.inputs.append((vis, torch.nn.functional.normalize(txt, dim=-1) if config.text_normalize else txt))

    def run_original(self, original: VisualGroundingHead, with_answers: bool) -> Outputs:
        dtype, logits = dtype_of(original), []
        hook = original.box_head.register_forward_hook(lambda module, args, output: logits.append(output))
        try:
            boxes = [original(vis.to(dtype), txt.to(dtype)) for vis, txt in self.inputs]
        finally:
            hook.remove()
        return Outputs({"box": torch.cat(boxes), "box_logit": torch.cat(logits)})

    def run_converted(self, model: LapvqaGroundingModel, with_answers: bool) -> Outputs:
        outputs = [
            model(image_features=vis.to(model.dtype), text_features=txt.to(model.dtype)) for vis, txt in self.inputs
        ]
        return Outputs(
            {
                "box": torch.cat([o.pred_boxes for o in outputs]),
                "box_logit": torch.cat([o.pred_box_logits for o in outputs]),
            }
        )


def image_processor_for(encoder: str, resize_mode: str = "stretch") -> LapvqaImageProcessor:
    """The folder's image processor: the encoder recipe's input size and normalisation, and `resize_mode`, through
    which `boxes_to_original` maps boxes back to the original image."""
    return detection_image_processor(RECIPES[encoder], resize_mode)


def convert_grounding(
    checkpoint: str | Path,
    output: str | Path,
    encoder: str | None = None,
    text_recipe: str | None = None,
    text_checkpoint: str | None = None,
    text_revision: str | None = None,
    text_normalize: bool = True,
    num_attention_heads: int = 8,
    activation_function: str = "relu",
    layer_norm_eps: float = 1e-5,
    resize_mode: str = "stretch",
    run_verify: bool = True,
    overwrite: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
    log=print,
    encoder_checkpoint: str | None = None,
    encoder_revision: str | None = None,
    float32_budget: float = DEFAULT_FLOAT32_BUDGET,
) -> Path:
    """Converts, verifies and writes the model folder atomically; returns its path.

    `encoder` is required for a plain state dict and, for a checkpoint with metadata, must match it if given;
    `text_recipe` names the text tower (default: the one pinned for the encoder), `text_checkpoint` where its weights
    are read from."""
    checkpoint = local_checkpoint(checkpoint)
    state_dict, metadata = load_untrusted_checkpoint(checkpoint)
    encoder = resolve_encoder(metadata, encoder)
    text = text_record(encoder, text_recipe, text_checkpoint, text_revision)
    config = infer_config(state_dict, encoder, text, num_attention_heads, activation_function, layer_norm_eps)
    check_metadata(metadata, config)
    config.text_normalize = text_normalize
    config.feature_recipe = encoder_record(encoder, encoder_checkpoint, encoder_revision)
    training_results = {key: metadata[key] for key in TRAINING_METADATA if key in metadata}
    config.training_results = training_results or None
    assumed = dict(
        num_attention_heads=num_attention_heads,
        activation_function=activation_function,
        layer_norm_eps=layer_norm_eps,
        text_recipe=text.name,
        text_normalize=text_normalize,
    )
    config.conversion_info = conversion_record(checkpoint, ASSUMPTIONS, **assumed, resize_mode=resize_mode)
    training = ", ".join(f"{key} {value}" for key, value in training_results.items()) or "no training record"
    positions = config.max_position_embeddings
    log(
        f"{checkpoint.name}: encoder {encoder}, vis_dim {config.vis_dim}, txt_dim {config.txt_dim} (text tower "
        f"{text.name}), d_model {config.d_model}, {counted(config.encoder_layers, 'layer')}, FFN "
        f"{config.encoder_ffn_dim}, {f'{positions} positions' if positions else 'no positions'}, final norm "
        f"{'yes' if config.encoder_final_layer_norm else 'no'}; {training}"
    )
    model = LapvqaGroundingModel(config)
    model.load_state_dict(convert_state_dict(state_dict, config), strict=True)
    image_processor = image_processor_for(encoder, resize_mode)

    verify = folder_verifier(
        lambda: original_from_state_dict(state_dict, config),
        LapvqaGroundingModel,
        GroundingProbe(config),
        tolerance,
        float32_budget,
        assumed,
    )
    return write_verified(
        model, output, verify if run_verify else None, checkpoint, overwrite, image_processor.save_pretrained, log
    )


def convert_entry(entry, source: Path, output: Path, log) -> Path:
    """`lapvqa push`'s conversion of a collection entry (its encoder named by the manifest)."""
    return convert_grounding(source, output, encoder=entry.encoder, overwrite=True, log=log)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(
        parser, "upstream VisualGroundingHead checkpoint", "dmusingu/lapvqa-pg/siglip.pt", default_heads=8
    )
    add_encoder_arguments(
        parser, required=False, help_suffix=" (required for a plain state dict; otherwise read from the checkpoint)"
    )
    parser.add_argument(
        "--text-recipe",
        choices=sorted(TEXT_RECIPES),
        help="the text tower that embeds the phrases (not in the weights; default: siglip's for siglip, owlv2's for "
        "owlv2, clip-vit-l14's for every other encoder)",
    )
    parser.add_argument(
        "--text-checkpoint",
        help="Hub id or local folder of the text tower's weights, recorded in config.json (default: the recipe's)",
    )
    parser.add_argument("--text-revision", help="revision of --text-checkpoint on the Hub (default: main)")
    parser.add_argument(
        "--no-text-normalize",
        dest="text_normalize",
        action="store_false",
        help="the phrase feature is the raw text embedding (not in the weights; default: L2-normalised)",
    )
    parser.add_argument(
        "--layer-norm-eps", type=float, default=1e-5, help="LayerNorm epsilon (not in the weights; default 1e-5)"
    )
    parser.add_argument(
        "--resize-mode",
        choices=RESIZE_MODES,
        default="stretch",
        help="how images were resized for the encoder, used to map boxes back (default stretch)",
    )


def run(args: argparse.Namespace) -> int:
    return run_reporting_errors(
        lambda: convert_grounding(
            args.checkpoint,
            args.output,
            encoder=args.encoder,
            text_recipe=args.text_recipe,
            text_checkpoint=args.text_checkpoint,
            text_revision=args.text_revision,
            text_normalize=args.text_normalize,
            num_attention_heads=args.num_heads,
            activation_function=args.activation,
            layer_norm_eps=args.layer_norm_eps,
            resize_mode=args.resize_mode,
            **verify_and_write_options(args),
            **encoder_options(args),
        )
    )


main = command_line("lapvqa_hf.convert.grounding", __doc__, add_arguments, run)


if __name__ == "__main__":
    sys.exit(main())
