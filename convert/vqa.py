"""Convert an upstream `VQAHead` state dict (`{encoder}_best.pt` of `dmusingu/lapvqa-vqa`) into a Transformers
model folder.

    lapvqa convert vqa siglip_best.pt --encoder siglip --output lapvqa-vqa-siglip
    python -m lapvqa_hf.convert.vqa siglip_best.pt --encoder siglip --output lapvqa-vqa-siglip

Like `lapvqa convert diffvqa`: the architecture is read from the weights (vis_dim, layers, FFN width,
positions, final norm, weight tying); heads and activation are options recorded in `config.json`; the written
folder is verified against the faithful original before it is published.
"""

import sys

import torch

from lapvqa_hf.models.configuration_lapvqa_vqa import LapvqaVQAConfig
from lapvqa_hf.models.modeling_lapvqa_vqa import LapvqaVQAModel

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
from .original import VQAHead

ASSUMPTIONS = (
    *DECODER_ASSUMPTIONS,
    "prompt layout: question_ids + [bos] + answer_ids + [eos]",
    "memory = vis_proj(image patch tokens), no frame embedding",
)

WHAT = "VQAHead"


def infer_config(
    state_dict: dict[str, torch.Tensor],
    encoder: str,
    num_attention_heads: int = 8,
    hidden_act: str = "relu",
    config_class: type[LapvqaVQAConfig] = LapvqaVQAConfig,
    what: str = WHAT,
) -> LapvqaVQAConfig:
    """Reads the architecture of a single-image head (`what`: this VQAHead, or the report-generation head of the
    same layout) from the weights; heads and activation are the pinned (or given) assumptions."""
    if "frame_emb.weight" in state_dict:
        raise ConversionError(
            "this checkpoint has frame_emb.weight, so it is a two-image DiffVQAHead: use `lapvqa convert diffvqa`."
        )
    decoder_fields = read_text_decoder_fields(state_dict, num_attention_heads, hidden_act, what)
    projection_width, vis_dim = tensor_shape(state_dict, "vis_proj.weight", 2, what)
    if projection_width != decoder_fields["hidden_size"]:
        raise ConversionError(
            f"inconsistent widths: tok_emb {decoder_fields['hidden_size']}, vis_proj {projection_width}."
        )
    check_encoder_width(encoder, vis_dim)
    return config_class(vis_dim=vis_dim, encoder_name=encoder, **decoder_fields)


def convert_state_dict(state_dict: dict[str, torch.Tensor], config: LapvqaVQAConfig) -> dict[str, torch.Tensor]:
    """Upstream names -> `LapvqaVQAModel` names; fused attention projections are split into q/k/v."""
    mapper = StateDictMapper(state_dict)
    mapper.rename_prefix("vis_proj.", "visual_projection.")
    map_text_decoder(mapper, config)
    return mapper.finish(expected_shapes(LapvqaVQAModel(config)))


def probe(config: LapvqaVQAConfig, num_patches: int = 49, batch_size: int = 3, seed: int = 0) -> QuestionAnsweringProbe:
    """The verify inputs: random features of one image (or a random image, for a head that holds its encoder) and
    random prompts."""
    generator = torch.Generator().manual_seed(seed)
    if config.encoder_config is not None:  # the head holds its encoder: the image itself
        return QuestionAnsweringProbe(
            config, held_encoder_pixels(config, generator, batch_size, ("pixel_values",)), generator
        )
    features = torch.randn((batch_size, num_patches, config.vis_dim), generator=generator, dtype=torch.float64)
    return QuestionAnsweringProbe(config, {"image_features": features}, generator)


CONVERTER = AnsweringHeadConverter(
    what=WHAT,
    example="dmusingu/lapvqa-vqa/siglip_best.pt",
    model_class=LapvqaVQAModel,
    infer_config=infer_config,
    convert_state_dict=convert_state_dict,
    original_class=VQAHead,
    probe=probe,
    assumptions=ASSUMPTIONS,
    num_images=1,
)
convert_vqa, add_arguments, run, convert_entry, main = CONVERTER.module_functions("lapvqa_hf.convert.vqa", __doc__)


if __name__ == "__main__":
    sys.exit(main())
