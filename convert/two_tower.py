"""Convert the two-tower pretraining models (`ContrastiveModel`: `model_best.pt`, or the sigmoid model's periodic
`model_epochXXX.pt`) into a `LapvqaTwoTowerModel` folder.

    lapvqa convert two-tower model_best.pt --output lapvqa-pretrain-contrastive
    python -m lapvqa_hf.convert.two_tower model_best.pt --output lapvqa-pretrain-sigmoid

Every size is read from the weights; `logit_bias` present selects the sigmoid model. What the weights cannot reveal
(attention heads, the text FFN activation, how each tower pools) are options recorded in `config.json`. The image
encoder alone (`encoder_final.pt`) converts with `lapvqa convert vision-encoder`. The folder holds the model, the
image processor, the text tokenizer (which appends `<|endoftext|>`) and `LapvqaTwoTowerProcessor`.
"""

import argparse
import sys
from pathlib import Path

import torch

from lapvqa_hf.messages import counted, run_reporting_errors
from lapvqa_hf.models.configuration_lapvqa_two_tower import (
    POOLINGS,
    LapvqaTwoTowerConfig,
    LapvqaTwoTowerTextConfig,
)
from lapvqa_hf.models.image_processing_lapvqa import LapvqaImageProcessor
from lapvqa_hf.models.modeling_lapvqa_two_tower import LapvqaTwoTowerModel
from lapvqa_hf.models.processing_lapvqa import LapvqaTwoTowerProcessor
from lapvqa_hf.tokenization import build_gpt2_tokenizer

from .checkpoint import (
    ConversionError,
    StateDictMapper,
    _check_state_dict,
    conversion_record,
    load_untrusted,
    local_checkpoint,
)
from .common import (
    add_common_arguments,
    command_line,
    expected_shapes,
    folder_verifier,
    map_torch_encoder_layers,
    numbered_blocks,
    tensor_shape,
    verify_and_write_options,
    write_verified,
)
from .original import ContrastiveModel
from .verify import DEFAULT_FLOAT32_BUDGET, DEFAULT_TOLERANCE, Outputs, Probe, dtype_of
from .vision_encoder import VISION_ASSUMPTIONS, infer_vision_config, map_vision_encoder, random_images

ASSUMPTIONS = (
    *VISION_ASSUMPTIONS,
    "text encoder: tok_emb + pos_emb (positions 0..T-1) into torch.nn.TransformerEncoder(norm_first=True, "
    "batch_first=True), bidirectional, padding masked; final norm where encoder.norm.* is present",
    "a text is its GPT-2 ids + [eot] (50256), right-padded",
    "image_proj / text_proj: bias-free Linear into the shared space; both embeddings L2-normalised",
    "logits = exp(logit_scale) * cosine (+ logit_bias where present); logit_bias present = the pairwise sigmoid "
    "loss, absent = the symmetric cross-entropy",
)
WHAT = "ContrastiveModel"
# Where a training checkpoint (`model_epochXXX.pt`) keeps the model's weights beside optimizer state.
WEIGHTS_ENTRIES = ("state_dict", "model_state_dict", "model")


def load_two_tower_weights(path: Path, log=print) -> dict[str, torch.Tensor]:
    """The model's weights from a plain state dict, or from a training checkpoint that keeps them under one of
    `WEIGHTS_ENTRIES` (its other entries, e.g. optimizer state, are left out and named)."""
    loaded = load_untrusted(path)
    if isinstance(loaded, dict):
        entry = next((name for name in WEIGHTS_ENTRIES if isinstance(loaded.get(name), dict)), None)
        if entry is not None:
            others = sorted(str(key) for key in loaded if key != entry)
            if others:
                log(f"{path.name}: converting ['{entry}']; left out: {', '.join(others)}")
            return _check_state_dict(loaded[entry], f"{path} ['{entry}']")
    return _check_state_dict(loaded, str(path))


def infer_config(
    state_dict: dict[str, torch.Tensor],
    vision_num_attention_heads: int = 16,
    text_num_attention_heads: int = 8,
    text_activation: str = "gelu",
    image_pooling: str = "cls",
    text_pooling: str = "eot",
) -> LapvqaTwoTowerConfig:
    """Every size from the weights; the options the weights cannot hold as given."""
    for option, value in (("image_pooling", image_pooling), ("text_pooling", text_pooling)):
        if value not in POOLINGS[option]:
            raise ConversionError(f"{option} must be one of {POOLINGS[option]}, got {value!r}.")
    vision_config = infer_vision_config(state_dict, "vision_encoder.", vision_num_attention_heads)
    vocab_size, text_width = tensor_shape(state_dict, "text_encoder.tok_emb.weight", 2, WHAT)
    positions, position_width = tensor_shape(state_dict, "text_encoder.pos_emb.weight", 2, WHAT)
    if position_width != text_width:
        raise ConversionError(f"inconsistent text widths: tok_emb {text_width}, pos_emb {position_width}.")
    if text_width % text_num_attention_heads:
        raise ConversionError(f"--text-num-heads {text_num_attention_heads} does not divide the width {text_width}.")
    text_config = LapvqaTwoTowerTextConfig(
        vocab_size=vocab_size,
        hidden_size=text_width,
        num_hidden_layers=numbered_blocks(state_dict, "text_encoder.encoder.layers."),
        num_attention_heads=text_num_attention_heads,
        intermediate_size=tensor_shape(state_dict, "text_encoder.encoder.layers.0.linear1.weight", 2, WHAT)[0],
        max_position_embeddings=positions,
        hidden_act=text_activation,
        use_final_layer_norm="text_encoder.encoder.norm.weight" in state_dict,
        text_pooling=text_pooling,
    )
    image_proj = tensor_shape(state_dict, "image_proj.weight", 2, WHAT)
    text_proj = tensor_shape(state_dict, "text_proj.weight", 2, WHAT)
    if image_proj[1] != vision_config.hidden_size or text_proj[1] != text_width or image_proj[0] != text_proj[0]:
        raise ConversionError(
            f"image_proj.weight is {list(image_proj)} and text_proj.weight {list(text_proj)}: expected [shared, "
            f"{vision_config.hidden_size}] and [shared, {text_width}] into one shared width."
        )
    for name in ("logit_scale", "logit_bias"):
        if name in state_dict and state_dict[name].numel() != 1:
            raise ConversionError(f"{name} should be one number, found shape {list(state_dict[name].shape)}.")
    if "logit_scale" not in state_dict:
        raise ConversionError(f"not a {WHAT} state dict: missing 'logit_scale'.")
    return LapvqaTwoTowerConfig(
        vision_config=vision_config,
        text_config=text_config,
        projection_dim=image_proj[0],
        image_pooling=image_pooling,
        use_logit_bias="logit_bias" in state_dict,
    )


def convert_state_dict(state_dict: dict[str, torch.Tensor], config: LapvqaTwoTowerConfig) -> dict[str, torch.Tensor]:
    """Upstream names -> `LapvqaTwoTowerModel` names; every source tensor used once, none left unexplained."""
    text = config.text_config
    mapper = StateDictMapper(state_dict)
    map_vision_encoder(mapper, config.vision_config, source="vision_encoder.", target="vision_model.")
    mapper.rename("text_encoder.tok_emb.weight", "text_model.embeddings.token_embedding.weight")
    mapper.rename("text_encoder.pos_emb.weight", "text_model.embeddings.position_embedding.weight")
    map_torch_encoder_layers(mapper, "text_encoder.encoder.layers.", "text_model.layers.", text.num_hidden_layers)
    if text.use_final_layer_norm:
        mapper.rename_prefix("text_encoder.encoder.norm.", "text_model.final_layer_norm.")
    mapper.rename("image_proj.weight", "visual_projection.weight")
    mapper.rename("text_proj.weight", "text_projection.weight")
    for name in ("logit_scale", "logit_bias") if config.use_logit_bias else ("logit_scale",):
        mapper.rename(name, name, lambda tensor: tensor.reshape(()))
    return mapper.finish(expected_shapes(LapvqaTwoTowerModel(config)))


def original_from_state_dict(state_dict: dict[str, torch.Tensor], config: LapvqaTwoTowerConfig) -> ContrastiveModel:
    """The faithful upstream module, loaded strictly from the same state dict."""
    vision, text = config.vision_config, config.text_config
    original = ContrastiveModel(
        img_size=vision.image_size,
        patch_size=vision.patch_size,
        vision_width=vision.hidden_size,
        vision_depth=vision.num_hidden_layers,
        vision_heads=vision.num_attention_heads,
        vision_mlp_ratio=vision.intermediate_size / vision.hidden_size,
        text_width=text.hidden_size,
        text_heads=text.num_attention_heads,
        text_depth=text.num_hidden_layers,
        text_ffn=text.intermediate_size,
        text_max_len=text.max_position_embeddings,
        text_activation=text.hidden_act,
        text_final_norm=text.use_final_layer_norm,
        vocab_size=text.vocab_size,
        embed_dim=config.projection_dim,
        sigmoid=config.use_logit_bias,
        image_pooling=config.image_pooling,
        text_pooling=text.text_pooling,
    )
    original.load_state_dict(
        {key: tensor.reshape(original.state_dict()[key].shape) for key, tensor in state_dict.items()}
    )
    return original.eval()


class TwoTowerProbe(Probe):
    """Random images and right-padded texts of different lengths (each ending in eot): both embeddings, the logits
    of every image against every text and the loss of the matching pairs."""

    def __init__(self, config: LapvqaTwoTowerConfig, batch_size: int = 3, seed: int = 0):
        self.images = random_images(config.vision_config, batch_size, seed)
        text = config.text_config
        generator = torch.Generator().manual_seed(seed)
        length = min(12, text.max_position_embeddings)
        self.input_ids = torch.randint(0, text.eos_token_id, (batch_size, length), generator=generator)
        self.attention_mask = torch.ones_like(self.input_ids)
        for row in range(batch_size):
            used = max(1, length - 3 * row)  # the first text fills the positions, the others are padded
            self.input_ids[row, used - 1] = text.eos_token_id
            self.input_ids[row, used:] = text.pad_token_id
            self.attention_mask[row, used:] = 0

    def run_original(self, original: ContrastiveModel, with_answers: bool) -> Outputs:
        images = self.images.to(dtype_of(original))
        image, text, logits, loss = original(images, self.input_ids, self.attention_mask)
        return Outputs({"image embedding": image, "text embedding": text, "logit": logits, "loss": loss})

    def run_converted(self, model: LapvqaTwoTowerModel, with_answers: bool) -> Outputs:
        outputs = model(
            input_ids=self.input_ids,
            pixel_values=self.images.to(model.dtype),
            attention_mask=self.attention_mask,
            return_loss=True,
        )
        return Outputs(
            {
                "image embedding": outputs.image_embeds,
                "text embedding": outputs.text_embeds,
                "logit": outputs.logits_per_image,
                "loss": outputs.loss,
            }
        )


def convert_two_tower(
    checkpoint: str | Path,
    output: str | Path,
    vision_num_attention_heads: int = 16,
    text_num_attention_heads: int = 8,
    text_activation: str = "gelu",
    image_pooling: str = "cls",
    text_pooling: str = "eot",
    run_verify: bool = True,
    overwrite: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
    log=print,
    float32_budget: float = DEFAULT_FLOAT32_BUDGET,
) -> Path:
    """Converts, verifies and writes the model folder atomically; returns its path."""
    checkpoint = local_checkpoint(checkpoint)
    state_dict = load_two_tower_weights(checkpoint, log)
    config = infer_config(
        state_dict, vision_num_attention_heads, text_num_attention_heads, text_activation, image_pooling, text_pooling
    )
    assumed = dict(
        vision_num_attention_heads=vision_num_attention_heads,
        text_num_attention_heads=text_num_attention_heads,
        text_activation=text_activation,
        image_pooling=image_pooling,
        text_pooling=text_pooling,
    )
    config.conversion_info = conversion_record(checkpoint, ASSUMPTIONS, **assumed)
    vision, text = config.vision_config, config.text_config
    log(
        f"{checkpoint.name}: image encoder width {vision.hidden_size}, {counted(vision.num_hidden_layers, 'layer')}, "
        f"{vision.image_size} px; text encoder width {text.hidden_size}, {counted(text.num_hidden_layers, 'layer')}, "
        f"{text.max_position_embeddings} positions; shared width {config.projection_dim}; "
        f"{'sigmoid (logit_bias)' if config.use_logit_bias else 'contrastive (softmax)'} model"
    )
    model = LapvqaTwoTowerModel(config)
    model.load_state_dict(convert_state_dict(state_dict, config), strict=True)

    def save_processor(folder: Path) -> None:
        LapvqaTwoTowerProcessor(
            image_processor=LapvqaImageProcessor.for_encoder(vision),
            tokenizer=build_gpt2_tokenizer(text.max_position_embeddings, append_eot=True),
        ).save_pretrained(folder)

    verify = folder_verifier(
        lambda: original_from_state_dict(state_dict, config),
        LapvqaTwoTowerModel,
        TwoTowerProbe(config),
        tolerance,
        float32_budget,
        assumed,
    )
    return write_verified(model, output, verify if run_verify else None, checkpoint, overwrite, save_processor, log)


def convert_entry(entry, source: Path, output: Path, log) -> Path:
    """`lapvqa push`'s conversion of a collection entry."""
    return convert_two_tower(source, output, overwrite=True, log=log)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    example = "dmusingu/lapvqa-pretrain-contrastive/model_best.pt"
    add_common_arguments(
        parser, "upstream ContrastiveModel state dict", example, default_heads=16, with_activation=False
    )
    parser.add_argument(
        "--text-num-heads", type=int, default=8, help="text encoder attention heads (not in the weights; default 8)"
    )
    parser.add_argument(
        "--text-activation", default="gelu", choices=["gelu", "relu"], help="text encoder FFN activation (default gelu)"
    )
    parser.add_argument(
        "--image-pooling",
        default="cls",
        choices=POOLINGS["image_pooling"],
        help="image embedding: the normed CLS token or the mean patch token (default cls)",
    )
    parser.add_argument(
        "--text-pooling",
        default="eot",
        choices=POOLINGS["text_pooling"],
        help="text embedding: the hidden state at the appended eot token or the mean over tokens (default eot)",
    )


def run(args: argparse.Namespace) -> int:
    return run_reporting_errors(
        lambda: convert_two_tower(
            args.checkpoint,
            args.output,
            vision_num_attention_heads=args.num_heads,
            text_num_attention_heads=args.text_num_heads,
            text_activation=args.text_activation,
            image_pooling=args.image_pooling,
            text_pooling=args.text_pooling,
            **verify_and_write_options(args),
        )
    )


main = command_line("lapvqa_hf.convert.two_tower", __doc__, add_arguments, run)


if __name__ == "__main__":
    sys.exit(main())
