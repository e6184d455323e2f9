"""Convert open_clip's CoCa image tower (`coca_ViT-L-14` weights) into a `LapvqaCocaVisionModel` folder.

    lapvqa convert coca-encoder laion/mscoco_finetuned_CoCa-ViT-L-14-laion2B-s13B-b90k/open_clip_pytorch_model.bin \\
        --output lapvqa-coca-vit-l14

The checkpoint is an open_clip CoCa state dict (`.bin`, `.pt` or `.safetensors`): the whole model, of which the
`visual.*` tensors are kept and the text side (`text.*`, `text_decoder.*`, `logit_scale`) is left out, or the image
tower alone. Widths, depth, patch, image size and pooler queries are read from the weights; the head counts are
not in them (`--num-heads`, `--pooler-num-heads`). The folder gets open_clip's evaluation transform as a
`CLIPImageProcessor`, so that `AutoImageProcessor` prepares images as open_clip does.
"""

import argparse
import math
import sys
from pathlib import Path

import torch
from transformers import CLIPImageProcessorPil

from lapvqa_hf.messages import counted, run_reporting_errors
from lapvqa_hf.models.configuration_lapvqa_coca import LapvqaCocaVisionConfig
from lapvqa_hf.models.encoders import CLIP_MEAN, CLIP_STD
from lapvqa_hf.models.modeling_lapvqa_coca import LapvqaCocaVisionModel

from .checkpoint import ConversionError, StateDictMapper, conversion_record, load_untrusted_state_dict, local_checkpoint
from .common import (
    add_common_arguments,
    command_line,
    expected_shapes,
    folder_verifier,
    numbered_blocks,
    tensor_shape,
    verify_and_write_options,
    write_verified,
)
from .original import CocaVisionTower
from .verify import DEFAULT_FLOAT32_BUDGET, DEFAULT_TOLERANCE, Outputs, Probe, dtype_of
from .vision_encoder import random_images

WHAT = "open_clip CoCa image tower"
EXAMPLE = "laion/mscoco_finetuned_CoCa-ViT-L-14-laion2B-s13B-b90k/open_clip_pytorch_model.bin"
COCA_ASSUMPTIONS = (
    "open_clip VisionTransformer key layout with attentional_pool=True and pool_type='tok' (coca_ViT-L-14)",
    "exact GELU, LayerNorm eps 1e-5, no patch-embedding bias; the trunk's attention has biases",
    "tokens = pooled queries after the first (open_clip's output_tokens); image embedding = first query @ proj",
    "preprocessing = open_clip's eval transform: shortest side to image_size (bicubic), centre crop, CLIP mean/std",
)
TEXT_SIDE = ("text.", "text_decoder.", "logit_scale")

_BLOCK_RENAMES = {
    "ln_1.": "layer_norm1.",
    "attn.out_proj.": "self_attn.out_proj.",
    "ln_2.": "layer_norm2.",
    "mlp.c_fc.": "mlp.fc1.",
    "mlp.c_proj.": "mlp.fc2.",
}


def image_tower_state_dict(state_dict: dict[str, torch.Tensor], log=print) -> dict[str, torch.Tensor]:
    """The `visual.*` tensors of a whole CoCa checkpoint (prefix removed), or the image tower's state dict as is."""
    if not any(key.startswith("visual.") for key in state_dict):
        return state_dict
    text_side = [key for key in state_dict if key.startswith(TEXT_SIDE)]
    unknown = sorted(key for key in state_dict if not key.startswith(("visual.", *TEXT_SIDE)))
    if unknown:
        raise ConversionError(f"unknown keys in the CoCa checkpoint (not visual.*, text.*, text_decoder.*): {unknown}.")
    log(f"kept the image tower (visual.*); left out {len(text_side)} text-side tensors")
    return {key.removeprefix("visual."): tensor for key, tensor in state_dict.items() if key.startswith("visual.")}


def infer_coca_config(
    state_dict: dict[str, torch.Tensor], num_attention_heads: int = 16, pooler_num_attention_heads: int = 8
) -> LapvqaCocaVisionConfig:
    """Reads the trunk (width, depth, MLP width, patch, image size) and the pooler (queries, width) from the weights."""
    hidden_size, channels, patch, patch_width = tensor_shape(state_dict, "conv1.weight", 4, WHAT)
    positions, position_width = tensor_shape(state_dict, "positional_embedding", 2, WHAT)
    num_queries, projection_dim = tensor_shape(state_dict, "attn_pool.query", 2, WHAT)
    grid = math.isqrt(positions - 1)
    if grid * grid != positions - 1:
        raise ConversionError(
            f"positional_embedding has {positions} rows: expected 1 (CLS) + a square grid of patches, found "
            f"{positions - 1} patch positions."
        )
    if position_width != hidden_size or patch != patch_width:
        raise ConversionError(
            f"inconsistent patch embedding: conv1 {[hidden_size, channels, patch, patch_width]}, positional_embedding "
            f"{[positions, position_width]}."
        )
    projection = tensor_shape(state_dict, "proj", 2, WHAT)
    if list(projection) != [projection_dim, projection_dim]:
        raise ConversionError(
            f"proj should be [{projection_dim}, {projection_dim}] after a {projection_dim}-wide pooler, found "
            f"{list(projection)}."
        )
    for heads, width, option in (
        (num_attention_heads, hidden_size, "--num-heads"),
        (pooler_num_attention_heads, projection_dim, "--pooler-num-heads"),
    ):
        if width % heads:
            raise ConversionError(f"{option} {heads} does not divide the width {width}.")
    return LapvqaCocaVisionConfig(
        hidden_size=hidden_size,
        intermediate_size=tensor_shape(state_dict, "transformer.resblocks.0.mlp.c_fc.weight", 2, WHAT)[0],
        num_hidden_layers=numbered_blocks(state_dict, "transformer.resblocks."),
        num_attention_heads=num_attention_heads,
        num_channels=channels,
        image_size=grid * patch,
        patch_size=patch,
        projection_dim=projection_dim,
        num_pooler_queries=num_queries,
        pooler_num_attention_heads=pooler_num_attention_heads,
    )


def convert_coca_state_dict(
    state_dict: dict[str, torch.Tensor], config: LapvqaCocaVisionConfig
) -> dict[str, torch.Tensor]:
    """open_clip names -> `LapvqaCocaVisionModel` names; fused `in_proj` tensors split into q/k/v, `proj`
    transposed into a Linear weight."""
    mapper = StateDictMapper(state_dict)
    mapper.rename("conv1.weight", "embeddings.patch_embedding.weight")
    mapper.rename("class_embedding", "embeddings.class_embedding")
    mapper.rename("positional_embedding", "embeddings.position_embedding.weight")
    mapper.rename_prefix("ln_pre.", "pre_layrnorm.")
    for i in range(config.num_hidden_layers):
        block, layer = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for kind in ("weight", "bias"):
            mapper.split(f"{block}attn.in_proj_{kind}", [f"{layer}self_attn.{p}_proj.{kind}" for p in "qkv"])
        for old, new in _BLOCK_RENAMES.items():
            mapper.rename_prefix(block + old, layer + new)
    pooler = "attentional_pooler."
    mapper.rename("attn_pool.query", f"{pooler}query")
    for p in "qkv":
        mapper.rename(f"attn_pool.attn.{p}_proj_weight", f"{pooler}attention.{p}_proj.weight")
    mapper.split("attn_pool.attn.in_proj_bias", [f"{pooler}attention.{p}_proj.bias" for p in "qkv"])
    mapper.rename_prefix("attn_pool.attn.out_proj.", f"{pooler}attention.out_proj.")
    mapper.rename_prefix("attn_pool.ln_q.", f"{pooler}query_layernorm.")
    mapper.rename_prefix("attn_pool.ln_k.", f"{pooler}context_layernorm.")
    mapper.rename_prefix("ln_post.", "post_layernorm.")
    mapper.rename("proj", "visual_projection.weight", transform=lambda proj: proj.t())
    return mapper.finish(expected_shapes(LapvqaCocaVisionModel(config)))


def original_coca_tower(config: LapvqaCocaVisionConfig) -> CocaVisionTower:
    return CocaVisionTower(
        image_size=config.image_size,
        patch_size=config.patch_size,
        width=config.hidden_size,
        layers=config.num_hidden_layers,
        heads=config.num_attention_heads,
        mlp_ratio=config.intermediate_size / config.hidden_size,
        output_dim=config.projection_dim,
        attn_pooler_queries=config.num_pooler_queries,
        attn_pooler_heads=config.pooler_num_attention_heads,
    )


def coca_image_processor(config: LapvqaCocaVisionConfig) -> CLIPImageProcessorPil:
    """open_clip's evaluation transform for CoCa: shortest side resized (bicubic), centre crop, CLIP normalisation.
    Saved as a `CLIPImageProcessor` (PIL resizing, as open_clip's); `AutoImageProcessor` picks the backend."""
    side = config.image_size
    return CLIPImageProcessorPil(
        size={"shortest_edge": side},
        crop_size={"height": side, "width": side},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )


class CocaProbe(Probe):
    """Random images: the pooled tokens and the image embedding of both towers."""

    def __init__(self, config: LapvqaCocaVisionConfig, batch_size: int = 2, seed: int = 0):
        self.images = random_images(config, batch_size, seed)

    def run_original(self, original: CocaVisionTower, with_answers: bool) -> Outputs:
        embedding, tokens = original(self.images.to(dtype_of(original)))
        return Outputs({"feature": tokens, "embedding": embedding})

    def run_converted(self, model: LapvqaCocaVisionModel, with_answers: bool) -> Outputs:
        outputs = model(self.images.to(model.dtype))
        return Outputs({"feature": outputs.last_hidden_state, "embedding": outputs.image_embeds})


def convert_coca_encoder(
    checkpoint: str | Path,
    output: str | Path,
    num_attention_heads: int = 16,
    pooler_num_attention_heads: int = 8,
    run_verify: bool = True,
    overwrite: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
    log=print,
    float32_budget: float = DEFAULT_FLOAT32_BUDGET,
) -> Path:
    checkpoint = local_checkpoint(checkpoint)
    # CoCa's text side is left out, so its values are none of the conversion's concern (open_clip leaves some of
    # its parameters uninitialised).
    loaded = load_untrusted_state_dict(checkpoint, converted=lambda key: not key.startswith(TEXT_SIDE))
    state_dict = image_tower_state_dict(loaded, log=log)
    config = infer_coca_config(state_dict, num_attention_heads, pooler_num_attention_heads)
    assumed = dict(num_attention_heads=num_attention_heads, pooler_num_attention_heads=pooler_num_attention_heads)
    config.conversion_info = conversion_record(checkpoint, COCA_ASSUMPTIONS, **assumed)
    log(
        f"{checkpoint.name}: width {config.hidden_size}, {counted(config.num_hidden_layers, 'layer')}, patch {config.patch_size}, "
        f"{config.image_size} px; pooler {config.num_pooler_queries} x {config.projection_dim}"
    )
    model = LapvqaCocaVisionModel(config)
    model.load_state_dict(convert_coca_state_dict(state_dict, config), strict=True)

    def original() -> CocaVisionTower:
        tower = original_coca_tower(config)
        tower.load_state_dict(state_dict, strict=True)
        return tower

    processor = coca_image_processor(config)
    verify = folder_verifier(original, LapvqaCocaVisionModel, CocaProbe(config), tolerance, float32_budget, assumed)
    return write_verified(
        model, output, verify if run_verify else None, checkpoint, overwrite, processor.save_pretrained, log
    )


def convert_entry(entry, source: Path, output: Path, log) -> Path:
    """`lapvqa push`'s conversion of a collection entry."""
    return convert_coca_encoder(source, output, overwrite=True, log=log)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    what = "open_clip CoCa weights (.bin, .pt or .safetensors)"
    add_common_arguments(parser, what, EXAMPLE, default_heads=16, with_activation=False)
    parser.add_argument(
        "--pooler-num-heads",
        type=int,
        default=8,
        help="attention heads of the attentional pooler (not in the weights; default 8, as coca_ViT-L-14)",
    )


def run(args: argparse.Namespace) -> int:
    return run_reporting_errors(
        lambda: convert_coca_encoder(
            args.checkpoint,
            args.output,
            num_attention_heads=args.num_heads,
            pooler_num_attention_heads=args.pooler_num_heads,
            **verify_and_write_options(args),
        )
    )


main = command_line("lapvqa_hf.convert.coca_encoder", __doc__, add_arguments, run)


if __name__ == "__main__":
    sys.exit(main())
