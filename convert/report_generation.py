"""Convert an upstream `ReportGenerationHead` checkpoint (`dmusingu/lapvqa-rrg`, `dmusingu/lapvqa-rrg-native`,
`{encoder}.pt`) into a Transformers model folder.

    lapvqa convert report-generation siglip.pt --output lapvqa-rrg-siglip
    lapvqa convert report-generation mae-vit-l16.pt --native --encoder-checkpoint FINE_TUNED_MAE --output DIR
    python -m lapvqa_hf.convert.report_generation siglip.pt --output lapvqa-rrg-siglip

The upstream file is `{state_dict, vis_dim, d_model, num_layers, nhead, encoder, epoch, val_bleu4}`: the metadata
is checked against the weights, `nhead` and `encoder` are taken from it and the training record is kept in
`config.json`. A plain state dict is accepted too, with `--encoder` (and `--num-heads`, default 8). Every other size
(FFN width, positions, final norm, tied `lm_head`) is read from the weights; the activation is an option.

`--native` (`--encoder-finetuned`) records that the encoder was trained with the head (`lapvqa-rrg-native`): a
file that holds the head alone gives a folder that reports from images only once the fine-tuned encoder is named
(`--encoder-checkpoint`, or `encoder=` to the pipeline). A file that holds the fine-tuned encoder too (under
`encoder.`, in the layout of its recipe's model class) has it converted into the folder, which then reports from
images as it is; the encoder's architecture and image processor come from the recipe's checkpoint
(`--encoder-checkpoint` to name another). The written folder is verified against the faithful
original before it is published.
"""

import argparse
import sys
from pathlib import Path

import torch

from lapvqa_hf.messages import counted, run_reporting_errors
from lapvqa_hf.models.configuration_lapvqa_report_generation import LapvqaReportGenerationConfig
from lapvqa_hf.models.encoders import RECIPES
from lapvqa_hf.models.modeling_lapvqa_report_generation import LapvqaReportGenerationModel

from . import vqa
from .checkpoint import ConversionError, StateDictMapper, conversion_record, load_untrusted_checkpoint, local_checkpoint
from .common import (
    DECODER_ASSUMPTIONS,
    OriginalWithEncoder,
    add_common_arguments,
    add_encoder_arguments,
    add_native_argument,
    check_special_tokens,
    command_line,
    default_generation_config,
    encoder_options,
    encoder_record,
    expected_shapes,
    folder_verifier,
    head_folder_files,
    held_encoder_pixels,
    hold_encoder,
    load_held_encoder,
    map_text_decoder,
    native_encoder_note,
    original_decoder_arguments,
    split_held_encoder,
    strip_answer,
    verify_and_write_options,
    write_verified,
)
from .original import ReportGenerationHead
from .verify import DEFAULT_FLOAT32_BUDGET, DEFAULT_TOLERANCE, Outputs, Probe, dtype_of

WHAT = "ReportGenerationHead"
ARCHITECTURE_METADATA = ("vis_dim", "d_model", "num_layers", "nhead", "encoder")
TRAINING_METADATA = ("epoch", "val_bleu4")
DEFAULT_HEADS = 8  # of a plain state dict, whose file does not say

ASSUMPTIONS = (
    *DECODER_ASSUMPTIONS,
    "report layout: [bos] + report_ids + [eos]; generation starts from [bos]",
    "memory = vis_proj(image patch tokens), no frame embedding",
)


def resolve_metadata(
    metadata: dict[str, object], encoder: str | None, num_attention_heads: int | None
) -> tuple[str, int]:
    """The encoder and heads: the checkpoint's record (which `--encoder` / `--num-heads`, if given, must match), or
    for a plain state dict the options (`--encoder` required, heads default 8)."""
    if not metadata:
        if encoder is None:
            raise ConversionError("a plain state dict carries no encoder name; pass --encoder.")
        return encoder, num_attention_heads or DEFAULT_HEADS
    unknown = sorted(set(metadata) - set(ARCHITECTURE_METADATA) - set(TRAINING_METADATA))
    missing = [key for key in ARCHITECTURE_METADATA if key not in metadata]
    if unknown or missing:
        raise ConversionError(
            f"checkpoint metadata should hold {list(ARCHITECTURE_METADATA + TRAINING_METADATA)}; "
            f"found unknown keys {unknown} and missing keys {missing}."
        )
    for key in ("vis_dim", "d_model", "num_layers", "nhead"):
        value = metadata[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConversionError(f"checkpoint metadata: {key} must be a whole number of at least 1, found {value!r}.")
    if metadata["d_model"] % metadata["nhead"]:
        raise ConversionError(
            f"checkpoint metadata: nhead {metadata['nhead']} does not divide d_model {metadata['d_model']}."
        )
    check_training_record(metadata)
    named = metadata["encoder"]
    if not isinstance(named, str) or named not in RECIPES:
        raise ConversionError(f"the checkpoint names an unknown encoder {named!r}; expected one of {sorted(RECIPES)}.")
    if encoder is not None and encoder != named:
        raise ConversionError(f"--encoder {encoder} contradicts the checkpoint's encoder {named!r}.")
    if num_attention_heads is not None and num_attention_heads != metadata["nhead"]:
        raise ConversionError(
            f"--num-heads {num_attention_heads} contradicts the checkpoint's nhead {metadata['nhead']}."
        )
    return named, metadata["nhead"]


def check_training_record(metadata: dict[str, object]) -> None:
    """The training record goes into `config.json` and the model card: a whole epoch count and a BLEU-4 in [0, 1]."""
    epoch = metadata.get("epoch")
    if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0):
        raise ConversionError(f"checkpoint metadata: epoch must be a whole number of at least 0, found {epoch!r}.")
    bleu4 = metadata.get("val_bleu4")
    if bleu4 is not None and (isinstance(bleu4, bool) or not isinstance(bleu4, (int, float)) or not 0 <= bleu4 <= 1):
        raise ConversionError(f"checkpoint metadata: val_bleu4 must be a number in [0, 1], found {bleu4!r}.")


def check_metadata(metadata: dict[str, object], config: LapvqaReportGenerationConfig) -> None:
    """The checkpoint's own architecture record must match what its weights say."""
    found_in_weights = {
        "vis_dim": (config.vis_dim, "vis_proj.weight"),
        "d_model": (config.hidden_size, "tok_emb.weight"),
        "num_layers": (config.num_hidden_layers, "decoder.layers.*"),
    }
    for key, (from_weights, source) in found_in_weights.items():
        if key in metadata and metadata[key] != from_weights:
            raise ConversionError(
                f"checkpoint metadata says {key}={metadata[key]!r}, but the weights ({source}) give {from_weights}."
            )


def infer_config(
    state_dict: dict[str, torch.Tensor],
    encoder: str,
    num_attention_heads: int = DEFAULT_HEADS,
    hidden_act: str = "relu",
) -> LapvqaReportGenerationConfig:
    """Reads the architecture from the weights (the VQA head's layout without the question)."""
    return vqa.infer_config(state_dict, encoder, num_attention_heads, hidden_act, LapvqaReportGenerationConfig, WHAT)


def convert_state_dict(
    state_dict: dict[str, torch.Tensor], config: LapvqaReportGenerationConfig
) -> dict[str, torch.Tensor]:
    """Upstream names -> `LapvqaReportGenerationModel` names; fused attention projections are split into q/k/v."""
    mapper = StateDictMapper(state_dict)
    mapper.rename_prefix("vis_proj.", "visual_projection.")
    map_text_decoder(mapper, config)
    return mapper.finish(expected_shapes(LapvqaReportGenerationModel(config)))


def original_from_state_dict(
    state_dict: dict[str, torch.Tensor], config: LapvqaReportGenerationConfig
) -> ReportGenerationHead:
    """The faithful upstream head, loaded strictly from the same state dict."""
    head = ReportGenerationHead(vis_dim=config.vis_dim, **original_decoder_arguments(config))
    head.load_state_dict(state_dict, strict=True)
    return head.eval()


class ReportProbe(Probe):
    """Random features of one image (or a random image, for a head that holds its encoder): teacher-forced logits of `[bos] + report`, and greedy reports from `[bos]` (the
    original's loop, `generate()` with its cache for the converted model)."""

    agreement = ("greedy reports", "samples")

    def __init__(
        self,
        config: LapvqaReportGenerationConfig,
        num_patches: int = 49,
        batch_size: int = 3,
        report_length: int = 12,
        max_new_tokens: int = 24,
        seed: int = 0,
    ):
        self.config = config
        generator = torch.Generator().manual_seed(seed)
        if config.encoder_config is not None:  # the head holds its encoder: the image itself
            self.visual = held_encoder_pixels(config, generator, batch_size, ("pixel_values",))
        else:
            features = torch.randn((batch_size, num_patches, config.vis_dim), generator=generator, dtype=torch.float64)
            self.visual = {"image_features": features}
        length = min(report_length, config.max_position_embeddings - 1)
        report = torch.randint(0, config.bos_token_id, (batch_size, length), generator=generator)
        self.bos = torch.full((batch_size, 1), config.bos_token_id)
        self.text = torch.cat([self.bos, report], dim=1)
        self.max_new_tokens = min(max_new_tokens, config.max_position_embeddings)

    def run_original(self, original: ReportGenerationHead, with_answers: bool) -> Outputs:
        (image,), config = (tensor.to(dtype_of(original)) for tensor in self.visual.values()), self.config
        logits = original(image, self.text)
        if not with_answers:
            return Outputs({"logit": logits})
        return Outputs(
            {"logit": logits},
            original.generate(image, config.bos_token_id, config.eos_token_id, self.max_new_tokens),
        )

    def run_converted(self, model: LapvqaReportGenerationModel, with_answers: bool) -> Outputs:
        visual = {name: tensor.to(model.dtype) for name, tensor in self.visual.items()}
        logits = model(input_ids=self.text, **visual).logits
        if not with_answers:
            return Outputs({"logit": logits})
        generated = model.generate(
            input_ids=self.bos,
            attention_mask=torch.ones_like(self.bos),
            **visual,
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            num_beams=1,
        )
        eos = self.config.eos_token_id
        return Outputs({"logit": logits}, [strip_answer(row, eos) for row in generated[:, 1:].tolist()])


def convert_report_generation(
    checkpoint: str | Path,
    output: str | Path,
    encoder: str | None = None,
    num_attention_heads: int | None = None,
    hidden_act: str = "relu",
    encoder_finetuned: bool = False,
    run_verify: bool = True,
    overwrite: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
    log=print,
    encoder_checkpoint: str | None = None,
    encoder_revision: str | None = None,
    float32_budget: float = DEFAULT_FLOAT32_BUDGET,
) -> Path:
    """Converts, verifies and writes the model folder atomically; returns its path.

    `encoder` and `num_attention_heads` are required (heads default 8) for a plain state dict and, for a checkpoint
    with metadata, must match it if given. `encoder_finetuned` marks a `lapvqa-rrg-native` head.
    """
    checkpoint = local_checkpoint(checkpoint)
    state_dict, metadata = load_untrusted_checkpoint(checkpoint)
    state_dict, encoder_state = split_held_encoder(state_dict)
    encoder, num_attention_heads = resolve_metadata(metadata, encoder, num_attention_heads)
    config = infer_config(state_dict, encoder, num_attention_heads, hidden_act)
    check_metadata(metadata, config)
    check_special_tokens(config)
    config.feature_recipe = encoder_record(encoder, encoder_checkpoint, encoder_revision)
    config.encoder_finetuned = encoder_finetuned
    training_results = {key: metadata[key] for key in TRAINING_METADATA if key in metadata}
    config.training_results = training_results or None
    assumed = (
        {"hidden_act": hidden_act}
        if metadata
        else {"num_attention_heads": num_attention_heads, "hidden_act": hidden_act}
    )
    config.conversion_info = conversion_record(checkpoint, ASSUMPTIONS, **assumed)
    training = ", ".join(f"{key} {value}" for key, value in training_results.items()) or "no training record"
    log(
        f"{checkpoint.name}: encoder {encoder}{' (fine-tuned with the head)' if encoder_finetuned else ''}, vis_dim "
        f"{config.vis_dim}, d_model {config.hidden_size}, {counted(config.num_hidden_layers, 'layer')}, "
        f"{counted(num_attention_heads, 'head')}, FFN {config.intermediate_size}, {config.max_position_embeddings} "
        f"positions, final norm {'yes' if config.use_final_layer_norm else 'no'}, "
        f"lm_head {'tied' if config.tie_word_embeddings else 'untied'}; {training}"
    )
    head_state = convert_state_dict(state_dict, config)
    if encoder_state:
        hold_encoder(config, encoder_state, log)
    elif encoder_finetuned and encoder_checkpoint is None:
        log(native_encoder_note(encoder))
    model = LapvqaReportGenerationModel(config)
    model.load_state_dict(head_state, strict=False)  # complete (`convert_state_dict` checks); the encoder next
    if encoder_state:
        load_held_encoder(model, encoder_state)
    model.tie_weights()
    model.generation_config = default_generation_config(config)

    def original() -> torch.nn.Module:
        head = original_from_state_dict(state_dict, config)
        return OriginalWithEncoder(head, encoder_state, config, num_images=1) if encoder_state else head

    verify = folder_verifier(
        original,
        LapvqaReportGenerationModel,
        ReportProbe(config),
        tolerance,
        float32_budget,
        {"num_attention_heads": num_attention_heads, "hidden_act": hidden_act},
    )
    extra_files = head_folder_files(config)
    return write_verified(model, output, verify if run_verify else None, checkpoint, overwrite, extra_files, log)


def convert_entry(entry, source: Path, output: Path, log) -> Path:
    """`lapvqa push`'s conversion of a collection entry (its encoder, and whether it was fine-tuned, from the
    manifest)."""
    return convert_report_generation(
        source, output, encoder=entry.encoder, encoder_finetuned=entry.encoder_finetuned, overwrite=True, log=log
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(
        parser,
        "upstream ReportGenerationHead checkpoint",
        "dmusingu/lapvqa-rrg-native/mae-vit-l16.pt",
        default_heads=None,
        heads_help=f"attention heads (default: the checkpoint's nhead; {DEFAULT_HEADS} for a plain state dict)",
    )
    add_encoder_arguments(
        parser, required=False, help_suffix=" (required for a plain state dict; otherwise read from the checkpoint)"
    )
    add_native_argument(parser, "lapvqa-rrg-native")


def run(args: argparse.Namespace) -> int:
    return run_reporting_errors(
        lambda: convert_report_generation(
            args.checkpoint,
            args.output,
            encoder=args.encoder,
            num_attention_heads=args.num_heads,
            hidden_act=args.activation,
            encoder_finetuned=args.encoder_finetuned,
            **verify_and_write_options(args),
            **encoder_options(args),
        )
    )


main = command_line("lapvqa_hf.convert.report_generation", __doc__, add_arguments, run)


if __name__ == "__main__":
    sys.exit(main())
