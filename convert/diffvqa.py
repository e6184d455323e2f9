"""Convert an upstream `DiffVQAHead` state dict (`{encoder}_best.pt`) into a Transformers model folder.

    lapvqa convert diffvqa coca_best.pt --encoder coca --output lapvqa-diffvqa-coca
    python -m lapvqa_hf.convert.diffvqa coca_best.pt --encoder coca --output lapvqa-diffvqa-coca

Everything the weights reveal (vis_dim, layers, FFN width, positions, final norm, weight tying) is read from
them; what they cannot reveal (heads, activation) is an option recorded in `config.json`. The converted model
is verified against the faithful original before anything is written.
"""

import sys

import torch

from lapvqa_hf.models.configuration_lapvqa_diffvqa import LapvqaDiffVQAConfig
from lapvqa_hf.models.modeling_lapvqa_diffvqa import LapvqaDiffVQAModel

from .checkpoint import ConversionError, StateDictMapper
from .common import (
    DECODER_ASSUMPTIONS,
    AnsweringHeadConverter,
    QuestionAnsweringProbe,
    check_encoder_width,
    expected_shapes,
    held_encoder_pixels,
    map_text_decoder,
    read_text_decoder_fields,
    tensor_shape,
)
from .original import DiffVQAHead

ASSUMPTIONS = (
    *DECODER_ASSUMPTIONS,
    "prompt layout: question_ids + [bos] + answer_ids + [eos]",
    "memory = [vis_proj(ref) + frame_emb(0) ; vis_proj(curr) + frame_emb(1)]",
)

WHAT = "DiffVQAHead"


def infer_config(
    state_dict: dict[str, torch.Tensor],
    encoder: str,
    num_attention_heads: int = 8,
    hidden_act: str = "relu",
) -> LapvqaDiffVQAConfig:
    """Reads the architecture from the weights; heads and activation are the pinned (or given) assumptions."""
    decoder_fields = read_text_decoder_fields(state_dict, num_attention_heads, hidden_act, WHAT)
    hidden_size = decoder_fields["hidden_size"]
    projection_width, vis_dim = tensor_shape(state_dict, "vis_proj.weight", 2, WHAT)
    num_frames, frame_width = tensor_shape(state_dict, "frame_emb.weight", 2, WHAT)
    if projection_width != hidden_size or (num_frames, frame_width) != (2, hidden_size):
        raise ConversionError(
            f"inconsistent widths: tok_emb {hidden_size}, vis_proj {projection_width}, "
            f"frame_emb {num_frames}x{frame_width} (expected 2x{hidden_size})."
        )
    check_encoder_width(encoder, vis_dim)
    return LapvqaDiffVQAConfig(vis_dim=vis_dim, encoder_name=encoder, **decoder_fields)


def convert_state_dict(state_dict: dict[str, torch.Tensor], config: LapvqaDiffVQAConfig) -> dict[str, torch.Tensor]:
    """Upstream names -> `LapvqaDiffVQAModel` names; fused attention projections are split into q/k/v."""
    mapper = StateDictMapper(state_dict)
    mapper.rename_prefix("vis_proj.", "visual_projection.")
    mapper.rename("frame_emb.weight", "frame_embeddings.weight")
    map_text_decoder(mapper, config)
    return mapper.finish(expected_shapes(LapvqaDiffVQAModel(config)))


def probe(
    config: LapvqaDiffVQAConfig, num_patches: tuple[int, int] = (49, 37), batch_size: int = 3, seed: int = 0
) -> QuestionAnsweringProbe:
    """The verify inputs: random features of both images (their patch counts differ), or random images for a head
    that holds its encoder, and random prompts."""
    generator = torch.Generator().manual_seed(seed)
    if config.encoder_config is not None:  # the head holds its encoder: the images themselves
        images = held_encoder_pixels(config, generator, batch_size, ("current_pixel_values", "prior_pixel_values"))
        return QuestionAnsweringProbe(config, images, generator)
    current = torch.randn((batch_size, num_patches[0], config.vis_dim), generator=generator, dtype=torch.float64)
    prior = torch.randn((batch_size, num_patches[1], config.vis_dim), generator=generator, dtype=torch.float64)
    return QuestionAnsweringProbe(config, {"current_image_features": current, "prior_image_features": prior}, generator)


CONVERTER = AnsweringHeadConverter(
    what=WHAT,
    example="dmusingu/lapvqa-diffvqa/coca_best.pt",
    model_class=LapvqaDiffVQAModel,
    infer_config=infer_config,
    convert_state_dict=convert_state_dict,
    original_class=DiffVQAHead,
    probe=probe,
    assumptions=ASSUMPTIONS,
    num_images=2,
)
convert_diffvqa, add_arguments, run, convert_entry, main = CONVERTER.module_functions(
    "lapvqa_hf.convert.diffvqa", __doc__
)


if __name__ == "__main__":
    sys.exit(main())
