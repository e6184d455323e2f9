"""Convert the upstream `CaptioningModel` (`model_best.pt`: ViT-L/14 + report decoder) into a Transformers folder.

    lapvqa convert captioning model_best.pt --output lapvqa-pretrain-captioning
    python -m lapvqa_hf.convert.captioning model_best.pt --output lapvqa-pretrain-captioning

The folder holds the model, the GPT-2 tokenizer, the image processor and `LapvqaProcessor`, so
`AutoProcessor.from_pretrained(DIR)` and `AutoModel.from_pretrained(DIR)` are all a user needs.
"""

import argparse
import sys
from pathlib import Path

import torch

from lapvqa_hf.messages import counted, run_reporting_errors
from lapvqa_hf.models.configuration_lapvqa_captioning import LapvqaCaptioningConfig
from lapvqa_hf.models.image_processing_lapvqa import LapvqaImageProcessor
from lapvqa_hf.models.modeling_lapvqa_captioning import LapvqaCaptioningModel
from lapvqa_hf.models.processing_lapvqa import LapvqaProcessor
from lapvqa_hf.tokenization import build_gpt2_tokenizer

from .checkpoint import ConversionError, StateDictMapper, conversion_record, load_untrusted_state_dict, local_checkpoint
from .common import (
    DECODER_ASSUMPTIONS,
    add_common_arguments,
    check_special_tokens,
    command_line,
    default_generation_config,
    expected_shapes,
    folder_verifier,
    map_text_decoder,
    original_decoder_arguments,
    read_text_decoder_fields,
    strip_answer,
    tensor_shape,
    verify_and_write_options,
    write_verified,
)
from .original import CaptioningModel
from .verify import DEFAULT_FLOAT32_BUDGET, DEFAULT_TOLERANCE, Outputs, Probe, dtype_of
from .vision_encoder import VISION_ASSUMPTIONS, infer_vision_config, map_vision_encoder, random_images

ASSUMPTIONS = (
    *VISION_ASSUMPTIONS,
    *DECODER_ASSUMPTIONS,
    "report layout: [bos] + report_ids + [eos]; memory = vis_proj(encoder patch tokens)",
)
WHAT = "CaptioningModel"


def infer_config(
    state_dict: dict[str, torch.Tensor],
    num_attention_heads: int = 8,
    hidden_act: str = "relu",
    vision_num_attention_heads: int = 16,
) -> LapvqaCaptioningConfig:
    vision_config = infer_vision_config(state_dict, "vision_encoder.", vision_num_attention_heads)
    decoder_fields = read_text_decoder_fields(state_dict, num_attention_heads, hidden_act, WHAT)
    projection = tensor_shape(state_dict, "vis_proj.weight", 2, WHAT)
    if tuple(projection) != (decoder_fields["hidden_size"], vision_config.hidden_size):
        raise ConversionError(
            f"vis_proj.weight is {list(projection)}, expected [{decoder_fields['hidden_size']}, "
            f"{vision_config.hidden_size}] (decoder width x encoder width)."
        )
    return LapvqaCaptioningConfig(vision_config=vision_config, **decoder_fields)


def convert_state_dict(state_dict: dict[str, torch.Tensor], config: LapvqaCaptioningConfig) -> dict[str, torch.Tensor]:
    mapper = StateDictMapper(state_dict)
    map_vision_encoder(mapper, config.vision_config, source="vision_encoder.", target="vision_model.")
    mapper.rename_prefix("vis_proj.", "visual_projection.")
    map_text_decoder(mapper, config)
    return mapper.finish(expected_shapes(LapvqaCaptioningModel(config)))


def original_from_state_dict(state_dict: dict[str, torch.Tensor], config: LapvqaCaptioningConfig) -> CaptioningModel:
    vision = config.vision_config
    original = CaptioningModel(
        img_size=vision.image_size,
        patch_size=vision.patch_size,
        vision_width=vision.hidden_size,
        vision_depth=vision.num_hidden_layers,
        vision_heads=vision.num_attention_heads,
        **original_decoder_arguments(config),
    )
    original.load_state_dict(state_dict, strict=True)
    return original.eval()


class CaptioningProbe(Probe):
    """Random images: the encoder's patch tokens, teacher-forced logits of `[bos] + report`, and greedy reports from
    `[bos]` (the original's loop, `generate()` with its cache for the converted model)."""

    agreement = ("greedy reports", "images")

    def __init__(self, config: LapvqaCaptioningConfig, batch_size: int = 2, max_new_tokens: int = 16, seed: int = 0):
        self.config = config
        self.images = random_images(config.vision_config, batch_size, seed)
        generator = torch.Generator().manual_seed(seed)
        report = torch.randint(0, config.bos_token_id, (batch_size, 12), generator=generator)
        self.bos = torch.full((batch_size, 1), config.bos_token_id)
        self.text = torch.cat([self.bos, report], dim=1)
        self.max_new_tokens = min(max_new_tokens, config.max_position_embeddings)

    def run_original(self, original: CaptioningModel, with_answers: bool) -> Outputs:
        images, config = self.images.to(dtype_of(original)), self.config
        tensors = {"feature": original.vision_encoder(images), "logit": original(images, self.text)}
        if not with_answers:
            return Outputs(tensors)
        return Outputs(
            tensors, original.generate(images, config.bos_token_id, config.eos_token_id, self.max_new_tokens)
        )

    def run_converted(self, model: LapvqaCaptioningModel, with_answers: bool) -> Outputs:
        images = self.images.to(model.dtype)
        tensors = {
            "feature": model.vision_model(images).last_hidden_state,
            "logit": model(input_ids=self.text, pixel_values=images).logits,
        }
        if not with_answers:
            return Outputs(tensors)
        generated = model.generate(
            input_ids=self.bos,
            attention_mask=torch.ones_like(self.bos),
            pixel_values=images,
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            num_beams=1,
        )
        eos = self.config.eos_token_id
        return Outputs(tensors, [strip_answer(row, eos) for row in generated[:, 1:].tolist()])


def convert_captioning(
    checkpoint: str | Path,
    output: str | Path,
    num_attention_heads: int = 8,
    hidden_act: str = "relu",
    vision_num_attention_heads: int = 16,
    run_verify: bool = True,
    overwrite: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
    log=print,
    float32_budget: float = DEFAULT_FLOAT32_BUDGET,
) -> Path:
    checkpoint = local_checkpoint(checkpoint)
    state_dict = load_untrusted_state_dict(checkpoint)
    config = infer_config(state_dict, num_attention_heads, hidden_act, vision_num_attention_heads)
    check_special_tokens(config)
    assumed = dict(
        num_attention_heads=num_attention_heads,
        hidden_act=hidden_act,
        vision_num_attention_heads=vision_num_attention_heads,
    )
    config.conversion_info = conversion_record(checkpoint, ASSUMPTIONS, **assumed)
    vision = config.vision_config
    log(
        f"{checkpoint.name}: encoder width {vision.hidden_size}, {counted(vision.num_hidden_layers, 'layer')}, "
        f"{vision.image_size} px ({vision.num_patches} patches); decoder {counted(config.num_hidden_layers, 'layer')}, "
        f"{config.max_position_embeddings} positions, lm_head {'tied' if config.tie_word_embeddings else 'untied'}"
    )
    model = LapvqaCaptioningModel(config)
    model.load_state_dict(convert_state_dict(state_dict, config), strict=not config.tie_word_embeddings)
    model.tie_weights()
    model.generation_config = default_generation_config(config)

    def save_processor(folder: Path) -> None:
        LapvqaProcessor(
            image_processor=LapvqaImageProcessor.for_encoder(vision),
            tokenizer=build_gpt2_tokenizer(config.max_position_embeddings),
        ).save_pretrained(folder)

    verify = folder_verifier(
        lambda: original_from_state_dict(state_dict, config),
        LapvqaCaptioningModel,
        CaptioningProbe(config),
        tolerance,
        float32_budget,
        assumed,
    )
    return write_verified(model, output, verify if run_verify else None, checkpoint, overwrite, save_processor, log)


def convert_entry(entry, source: Path, output: Path, log) -> Path:
    """`lapvqa push`'s conversion of a collection entry."""
    return convert_captioning(source, output, overwrite=True, log=log)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    example = "dmusingu/lapvqa-pretrain-captioning/model_best.pt"
    add_common_arguments(parser, "upstream CaptioningModel state dict", example, default_heads=8)
    parser.add_argument(
        "--vision-num-heads", type=int, default=16, help="encoder attention heads (not in the weights; default 16)"
    )


def run(args: argparse.Namespace) -> int:
    return run_reporting_errors(
        lambda: convert_captioning(
            args.checkpoint,
            args.output,
            num_attention_heads=args.num_heads,
            hidden_act=args.activation,
            vision_num_attention_heads=args.vision_num_heads,
            **verify_and_write_options(args),
        )
    )


main = command_line("lapvqa_hf.convert.captioning", __doc__, add_arguments, run)


if __name__ == "__main__":
    sys.exit(main())
