"""Convert an upstream `DetectionHead` checkpoint (`dmusingu/lapvqa-ad`, `{encoder}.pt`) into a Transformers folder.

    lapvqa convert detection siglip.pt --output lapvqa-ad-siglip
    python -m lapvqa_hf.convert.detection siglip.pt --output lapvqa-ad-siglip

The upstream file is `{state_dict, vis_dim, d_model, num_queries, num_enc, num_dec, encoder, epoch, val_map40,
val_map50}`: the metadata is checked against the weights and the training record kept in `config.json`. A plain
state dict is accepted too, with `--encoder`. Everything the weights reveal (widths, layers, queries, FFN widths,
final norms) is read from them; what they cannot reveal (heads, activation, decoder pre/post-norm, LayerNorm eps,
no positional encodings) is an option recorded in `config.json`. The folder also holds a `LapvqaImageProcessor`
whose `post_process_object_detection` maps the boxes back onto the original image. The converted model is verified
against the faithful original after the folder is written and before it is published.
"""

import argparse
import sys
from pathlib import Path

import torch

from lapvqa_hf.features import detection_image_processor
from lapvqa_hf.messages import counted, run_reporting_errors
from lapvqa_hf.models.configuration_lapvqa_detection import VINDR_CXR_CLASSES, LapvqaDetectionConfig
from lapvqa_hf.models.encoders import RECIPES
from lapvqa_hf.models.image_processing_lapvqa import RESIZE_MODES, LapvqaImageProcessor
from lapvqa_hf.models.modeling_lapvqa_detection import LapvqaDetectionModel

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
from .original import DetectionHead
from .verify import DEFAULT_FLOAT32_BUDGET, DEFAULT_TOLERANCE, Outputs, Probe, dtype_of

WHAT = "DetectionHead"
ARCHITECTURE_METADATA = ("vis_dim", "d_model", "num_queries", "num_enc", "num_dec", "encoder")
TRAINING_METADATA = ("epoch", "val_map40", "val_map50")

ASSUMPTIONS = (
    "encoder/decoder are torch.nn.TransformerEncoder/TransformerDecoder (batch_first) with PyTorch's state-dict keys",
    "the object queries are the decoder's input; no positional encoding of the visual tokens or the queries",
    "class_head's last output is the no-object class; classes 0..13 are VinDr-CXR's class_id order",
    "box_head = Sequential(Linear, ReLU, Linear) + sigmoid -> (cx, cy, w, h) in [0, 1] of the encoder's input image",
)

_DECODER_LAYER_RENAMES = {
    "self_attn.out_proj.": "self_attn.out_proj.",
    "multihead_attn.out_proj.": "encoder_attn.out_proj.",
    "linear1.": "mlp.fc1.",
    "linear2.": "mlp.fc2.",
    "norm1.": "self_attn_layer_norm.",
    "norm2.": "encoder_attn_layer_norm.",
    "norm3.": "final_layer_norm.",
}


def infer_config(
    state_dict: dict[str, torch.Tensor],
    encoder: str,
    num_attention_heads: int = 8,
    activation_function: str = "relu",
    decoder_norm_first: bool = True,
    layer_norm_eps: float = 1e-5,
) -> LapvqaDetectionConfig:
    """Reads the architecture from the weights; the pinned (or given) conventions fill in the rest."""
    d_model, vis_dim = tensor_shape(state_dict, "vis_proj.weight", 2, WHAT)
    query_shape = tensor_shape(state_dict, "object_queries", 3, WHAT)
    if query_shape[0] != 1 or query_shape[2] != d_model:
        raise ConversionError(f"object_queries should be [1, num_queries, {d_model}], found {list(query_shape)}.")
    num_outputs, class_width = tensor_shape(state_dict, "class_head.weight", 2, WHAT)
    if num_outputs != len(VINDR_CXR_CLASSES) + 1 or class_width != d_model:
        raise ConversionError(
            f"class_head.weight should be [{len(VINDR_CXR_CLASSES) + 1}, {d_model}] (14 VinDr-CXR classes + "
            f"no-object), found {[num_outputs, class_width]}."
        )
    if d_model % num_attention_heads:
        raise ConversionError(f"--num-heads {num_attention_heads} does not divide the width {d_model}.")
    check_encoder_width(encoder, vis_dim)
    return LapvqaDetectionConfig(
        vis_dim=vis_dim,
        d_model=d_model,
        encoder_layers=numbered_blocks(state_dict, "encoder.layers."),
        decoder_layers=numbered_blocks(state_dict, "decoder.layers."),
        num_attention_heads=num_attention_heads,
        encoder_ffn_dim=tensor_shape(state_dict, "encoder.layers.0.linear1.weight", 2, WHAT)[0],
        decoder_ffn_dim=tensor_shape(state_dict, "decoder.layers.0.linear1.weight", 2, WHAT)[0],
        num_queries=query_shape[1],
        activation_function=activation_function,
        decoder_norm_first=decoder_norm_first,
        encoder_final_layer_norm="encoder.norm.weight" in state_dict,
        decoder_final_layer_norm="decoder.norm.weight" in state_dict,
        layer_norm_eps=layer_norm_eps,
        encoder_name=encoder,
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
    """The training record goes into `config.json` and the model card: a whole epoch count and mAPs in [0, 1]."""
    epoch = metadata.get("epoch")
    if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0):
        raise ConversionError(f"checkpoint metadata: epoch must be a whole number of at least 0, found {epoch!r}.")
    for key in ("val_map40", "val_map50"):
        value = metadata.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ConversionError(f"checkpoint metadata: {key} must be a number in [0, 1], found {value!r}.")


def check_metadata(metadata: dict[str, object], config: LapvqaDetectionConfig) -> None:
    """The checkpoint's own architecture record must match what its weights say."""
    found_in_weights = {
        "vis_dim": (config.vis_dim, "vis_proj.weight"),
        "d_model": (config.d_model, "vis_proj.weight"),
        "num_queries": (config.num_queries, "object_queries"),
        "num_enc": (config.encoder_layers, "encoder.layers.*"),
        "num_dec": (config.decoder_layers, "decoder.layers.*"),
    }
    for key, (from_weights, source) in found_in_weights.items():
        if key in metadata and metadata[key] != from_weights:
            raise ConversionError(
                f"checkpoint metadata says {key}={metadata[key]!r}, but the weights ({source}) give {from_weights}."
            )


def convert_state_dict(state_dict: dict[str, torch.Tensor], config: LapvqaDetectionConfig) -> dict[str, torch.Tensor]:
    """Upstream names -> `LapvqaDetectionModel` names; fused attention projections are split into q/k/v."""
    mapper = StateDictMapper(state_dict)
    mapper.rename_prefix("vis_proj.", "visual_projection.")
    mapper.rename("object_queries", "object_queries")
    map_torch_encoder_layers(mapper, "encoder.layers.", "encoder.layers.", config.encoder_layers)
    if config.encoder_final_layer_norm:
        mapper.rename_prefix("encoder.norm.", "encoder.layer_norm.")
    for i in range(config.decoder_layers):
        layer = f"decoder.layers.{i}."
        for attention, renamed in (("self_attn", "self_attn"), ("multihead_attn", "encoder_attn")):
            for kind in ("weight", "bias"):
                mapper.split(f"{layer}{attention}.in_proj_{kind}", [f"{layer}{renamed}.{p}_proj.{kind}" for p in "qkv"])
        for old, new in _DECODER_LAYER_RENAMES.items():
            mapper.rename_prefix(layer + old, layer + new)
    if config.decoder_final_layer_norm:
        mapper.rename_prefix("decoder.norm.", "decoder.layer_norm.")
    mapper.rename_prefix("class_head.", "class_labels_classifier.")
    mapper.rename_prefix("box_head.0.", "bbox_predictor.layers.0.")
    mapper.rename_prefix("box_head.2.", "bbox_predictor.layers.1.")
    return mapper.finish(expected_shapes(LapvqaDetectionModel(config)))


def original_from_state_dict(state_dict: dict[str, torch.Tensor], config: LapvqaDetectionConfig) -> DetectionHead:
    """The faithful upstream module, loaded strictly from the same state dict."""
    head = DetectionHead(
        vis_dim=config.vis_dim,
        d_model=config.d_model,
        nhead=config.num_attention_heads,
        num_enc=config.encoder_layers,
        num_dec=config.decoder_layers,
        num_queries=config.num_queries,
        num_classes=config.num_labels,
        dim_feedforward=config.encoder_ffn_dim,
        decoder_dim_feedforward=config.decoder_ffn_dim,
        activation=config.activation_function,
        layer_norm_eps=config.layer_norm_eps,
        decoder_norm_first=config.decoder_norm_first,
        encoder_final_norm=config.encoder_final_layer_norm,
        decoder_final_norm=config.decoder_final_layer_norm,
    )
    head.load_state_dict(state_dict, strict=True)
    return head.eval()


class DetectionProbe(Probe):
    """Random features, one batch per token count: class logits, boxes and every query's argmax class."""

    agreement = ("argmax class", "queries")

    def __init__(
        self, config: LapvqaDetectionConfig, num_patches: tuple[int, ...] = (49, 37), batch_size: int = 3, seed: int = 0
    ):
        generator = torch.Generator().manual_seed(seed)
        self.features = [
            torch.randn((batch_size, length, config.vis_dim), generator=generator, dtype=torch.float64)
            for length in num_patches
        ]

    @staticmethod
    def _outputs(logits: list[torch.Tensor], boxes: list[torch.Tensor]) -> Outputs:
        logits, boxes = torch.cat(logits), torch.cat(boxes)
        return Outputs({"logit": logits, "box": boxes}, logits.argmax(-1).flatten().tolist())

    def run_original(self, original: DetectionHead, with_answers: bool) -> Outputs:
        dtype = dtype_of(original)
        logits, boxes = zip(*(original(features.to(dtype)) for features in self.features), strict=True)
        return self._outputs(list(logits), list(boxes))

    def run_converted(self, model: LapvqaDetectionModel, with_answers: bool) -> Outputs:
        outputs = [model(image_features=features.to(model.dtype)) for features in self.features]
        return self._outputs([o.logits for o in outputs], [o.pred_boxes for o in outputs])


def image_processor_for(encoder: str, resize_mode: str = "stretch") -> LapvqaImageProcessor:
    """The folder's image processor: the encoder recipe's input size and normalisation, and `resize_mode`, through
    which `post_process_object_detection` maps boxes back to the original image."""
    return detection_image_processor(RECIPES[encoder], resize_mode)


def convert_detection(
    checkpoint: str | Path,
    output: str | Path,
    encoder: str | None = None,
    num_attention_heads: int = 8,
    activation_function: str = "relu",
    decoder_norm_first: bool = True,
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

    `encoder` is required for a plain state dict and, for a checkpoint with metadata, must match it if given.
    """
    checkpoint = local_checkpoint(checkpoint)
    state_dict, metadata = load_untrusted_checkpoint(checkpoint)
    encoder = resolve_encoder(metadata, encoder)
    config = infer_config(
        state_dict, encoder, num_attention_heads, activation_function, decoder_norm_first, layer_norm_eps
    )
    check_metadata(metadata, config)
    config.feature_recipe = encoder_record(encoder, encoder_checkpoint, encoder_revision)
    training_results = {key: metadata[key] for key in TRAINING_METADATA if key in metadata}
    config.training_results = training_results or None
    assumed = dict(
        num_attention_heads=num_attention_heads,
        activation_function=activation_function,
        decoder_norm_first=decoder_norm_first,
        layer_norm_eps=layer_norm_eps,
        position_embedding_type=config.position_embedding_type,
    )
    config.conversion_info = conversion_record(checkpoint, ASSUMPTIONS, **assumed, resize_mode=resize_mode)
    training = ", ".join(f"{key} {value}" for key, value in training_results.items()) or "no training record"
    log(
        f"{checkpoint.name}: encoder {encoder}, vis_dim {config.vis_dim}, d_model {config.d_model}, "
        f"{counted(config.num_queries, 'query', 'queries')}, {config.encoder_layers} encoder + "
        f"{counted(config.decoder_layers, 'decoder layer')}, "
        f"FFN {config.encoder_ffn_dim}/{config.decoder_ffn_dim}, final norms "
        f"{'yes' if config.encoder_final_layer_norm else 'no'}/{'yes' if config.decoder_final_layer_norm else 'no'}; "
        f"{training}"
    )
    model = LapvqaDetectionModel(config)
    model.load_state_dict(convert_state_dict(state_dict, config), strict=True)
    image_processor = image_processor_for(encoder, resize_mode)

    verify = folder_verifier(
        lambda: original_from_state_dict(state_dict, config),
        LapvqaDetectionModel,
        DetectionProbe(config),
        tolerance,
        float32_budget,
        assumed,
    )
    return write_verified(
        model, output, verify if run_verify else None, checkpoint, overwrite, image_processor.save_pretrained, log
    )


def convert_entry(entry, source: Path, output: Path, log) -> Path:
    """`lapvqa push`'s conversion of a collection entry (its encoder named by the manifest)."""
    return convert_detection(source, output, encoder=entry.encoder, overwrite=True, log=log)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "upstream DetectionHead checkpoint", "dmusingu/lapvqa-ad/siglip.pt", default_heads=8)
    add_encoder_arguments(
        parser, required=False, help_suffix=" (required for a plain state dict; otherwise read from the checkpoint)"
    )
    parser.add_argument(
        "--decoder-post-norm",
        dest="decoder_norm_first",
        action="store_false",
        help="post-norm decoder layers (not in the weights; default pre-norm, like the encoder)",
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
        lambda: convert_detection(
            args.checkpoint,
            args.output,
            encoder=args.encoder,
            num_attention_heads=args.num_heads,
            activation_function=args.activation,
            decoder_norm_first=args.decoder_norm_first,
            layer_norm_eps=args.layer_norm_eps,
            resize_mode=args.resize_mode,
            **verify_and_write_options(args),
            **encoder_options(args),
        )
    )


main = command_line("lapvqa_hf.convert.detection", __doc__, add_arguments, run)


if __name__ == "__main__":
    sys.exit(main())
