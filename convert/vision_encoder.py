"""Convert the captioning-pretrained ViT-L/14 (`encoder_final.pt`, timm layout) into a `LapvqaVisionModel` folder.

    lapvqa convert vision-encoder encoder_final.pt --output lapvqa-pretrain-captioning-encoder
    python -m lapvqa_hf.convert.vision_encoder encoder_final.pt --output lapvqa-pretrain-captioning-encoder

The image size is read from `pos_embed` (grid x patch), not from the card. The folder also gets the
`LapvqaImageProcessor` sized for it, so `AutoProcessor` / `AutoImageProcessor` work on it.
"""

import argparse
import math
import sys
from pathlib import Path

import torch

from lapvqa_hf.messages import counted, run_reporting_errors
from lapvqa_hf.models.configuration_lapvqa_vision import LapvqaVisionConfig
from lapvqa_hf.models.image_processing_lapvqa import LapvqaImageProcessor
from lapvqa_hf.models.modeling_lapvqa_vision import LapvqaVisionModel

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
from .original import VisionTransformer
from .verify import DEFAULT_FLOAT32_BUDGET, DEFAULT_TOLERANCE, Outputs, Probe, dtype_of

VISION_ASSUMPTIONS = (
    "timm VisionTransformer key layout (cls_token, pos_embed, patch_embed.proj, blocks.i.*, norm)",
    "pre-norm blocks, exact GELU MLP, LayerNorm eps 1e-6, scaled dot-product attention",
    "output = patch tokens after the final norm, CLS dropped; image size = sqrt(pos_embed rows - 1) x patch size",
)

_BLOCK_RENAMES = {
    "norm1.": "layer_norm1.",
    "attn.proj.": "self_attn.out_proj.",
    "norm2.": "layer_norm2.",
    "mlp.fc1.": "mlp.fc1.",
    "mlp.fc2.": "mlp.fc2.",
}
WHAT = "ViT encoder"


def infer_vision_config(
    state_dict: dict[str, torch.Tensor], prefix: str = "", num_attention_heads: int = 16
) -> LapvqaVisionConfig:
    """Reads width, depth, MLP width, patch size, channels and the image size (from `pos_embed`)."""
    _, positions, hidden_size = tensor_shape(state_dict, f"{prefix}pos_embed", 3, WHAT)
    hidden_out, channels, patch, patch_width = tensor_shape(state_dict, f"{prefix}patch_embed.proj.weight", 4, WHAT)
    grid = math.isqrt(positions - 1)
    if grid * grid != positions - 1:
        raise ConversionError(
            f"{prefix}pos_embed has {positions} rows: expected 1 (CLS) + a square grid of patches, found "
            f"{positions - 1} patch positions."
        )
    if hidden_out != hidden_size or patch != patch_width:
        raise ConversionError(
            f"inconsistent patch embedding: weight {[hidden_out, channels, patch, patch_width]} for width {hidden_size}."
        )
    if hidden_size % num_attention_heads:
        raise ConversionError(f"--vision-num-heads {num_attention_heads} does not divide the width {hidden_size}.")
    return LapvqaVisionConfig(
        hidden_size=hidden_size,
        num_hidden_layers=numbered_blocks(state_dict, f"{prefix}blocks."),
        num_attention_heads=num_attention_heads,
        intermediate_size=tensor_shape(state_dict, f"{prefix}blocks.0.mlp.fc1.weight", 2, WHAT)[0],
        patch_size=patch,
        image_size=grid * patch,
        num_channels=channels,
        qkv_bias=f"{prefix}blocks.0.attn.qkv.bias" in state_dict,
    )


def map_vision_encoder(mapper: StateDictMapper, config: LapvqaVisionConfig, source: str, target: str) -> None:
    """timm names under `source` -> `LapvqaVisionModel` names under `target`; fused qkv split into q/k/v."""
    mapper.rename(f"{source}cls_token", f"{target}embeddings.cls_token")
    mapper.rename(f"{source}pos_embed", f"{target}embeddings.position_embedding")
    mapper.rename_prefix(f"{source}patch_embed.proj.", f"{target}embeddings.patch_embedding.")
    mapper.rename_prefix(f"{source}norm.", f"{target}post_layernorm.")
    kinds = ("weight", "bias") if config.qkv_bias else ("weight",)
    for i in range(config.num_hidden_layers):
        block, layer = f"{source}blocks.{i}.", f"{target}layers.{i}."
        for kind in kinds:
            mapper.split(f"{block}attn.qkv.{kind}", [f"{layer}self_attn.{p}_proj.{kind}" for p in ("q", "k", "v")])
        for old, new in _BLOCK_RENAMES.items():
            mapper.rename_prefix(block + old, layer + new)


def original_vision_encoder(config: LapvqaVisionConfig) -> VisionTransformer:
    return VisionTransformer(
        img_size=config.image_size,
        patch_size=config.patch_size,
        in_chans=config.num_channels,
        embed_dim=config.hidden_size,
        depth=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        mlp_ratio=config.intermediate_size / config.hidden_size,
    )


def random_images(config, batch_size: int, seed: int) -> torch.Tensor:
    """Seeded float64 noise of the encoder's input shape (`num_channels`, `image_size`): what verify feeds it."""
    generator = torch.Generator().manual_seed(seed)
    size = (batch_size, config.num_channels, config.image_size, config.image_size)
    return torch.randn(size, generator=generator, dtype=torch.float64)


class VisionEncoderProbe(Probe):
    """Random images: the patch tokens of both encoders."""

    def __init__(self, config: LapvqaVisionConfig, batch_size: int = 2, seed: int = 0):
        self.images = random_images(config, batch_size, seed)

    def run_original(self, original: VisionTransformer, with_answers: bool) -> Outputs:
        return Outputs({"feature": original(self.images.to(dtype_of(original)))})

    def run_converted(self, model: LapvqaVisionModel, with_answers: bool) -> Outputs:
        return Outputs({"feature": model(self.images.to(model.dtype)).last_hidden_state})


def convert_vision_encoder(
    checkpoint: str | Path,
    output: str | Path,
    num_attention_heads: int = 16,
    run_verify: bool = True,
    overwrite: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
    log=print,
    float32_budget: float = DEFAULT_FLOAT32_BUDGET,
) -> Path:
    checkpoint = local_checkpoint(checkpoint)
    state_dict = load_untrusted_state_dict(checkpoint)
    config = infer_vision_config(state_dict, num_attention_heads=num_attention_heads)
    assumed = dict(num_attention_heads=num_attention_heads)
    config.conversion_info = conversion_record(checkpoint, VISION_ASSUMPTIONS, **assumed)
    log(
        f"{checkpoint.name}: width {config.hidden_size}, {counted(config.num_hidden_layers, 'layer')}, MLP "
        f"{config.intermediate_size}, patch {config.patch_size}, {config.image_size} px ({config.num_patches} patches)"
    )
    mapper = StateDictMapper(state_dict)
    map_vision_encoder(mapper, config, source="", target="")
    model = LapvqaVisionModel(config)
    model.load_state_dict(mapper.finish(expected_shapes(model)), strict=True)

    def original() -> VisionTransformer:
        encoder = original_vision_encoder(config)
        encoder.load_state_dict(state_dict, strict=True)
        return encoder

    processor = LapvqaImageProcessor.for_encoder(config)
    verify = folder_verifier(
        original, LapvqaVisionModel, VisionEncoderProbe(config), tolerance, float32_budget, assumed
    )
    return write_verified(
        model, output, verify if run_verify else None, checkpoint, overwrite, processor.save_pretrained, log
    )


def convert_entry(entry, source: Path, output: Path, log) -> Path:
    """`lapvqa push`'s conversion of a collection entry."""
    return convert_vision_encoder(source, output, overwrite=True, log=log)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    example = "dmusingu/lapvqa-pretrain-captioning/encoder_final.pt"
    add_common_arguments(parser, "upstream encoder state dict", example, default_heads=16, with_activation=False)


def run(args: argparse.Namespace) -> int:
    return run_reporting_errors(
        lambda: convert_vision_encoder(
            args.checkpoint,
            args.output,
            num_attention_heads=args.num_heads,
            **verify_and_write_options(args),
        )
    )


main = command_line("lapvqa_hf.convert.vision_encoder", __doc__, add_arguments, run)


if __name__ == "__main__":
    sys.exit(main())
