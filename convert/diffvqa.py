"""Convert an upstream `DiffVQAHead` state dict (`{encoder}_best.pt`) into a Transformers model folder.

    lapvqa convert diffvqa coca_best.pt --encoder coca --output lapvqa-diffvqa-coca
    python -m lapvqa_hf.convert.diffvqa coca_best.pt --encoder coca --output lapvqa-diffvqa-coca

Everything the weights reveal (vis_dim, layers, FFN width, positions, final norm, weight tying) is read from
them; what they cannot reveal (heads, activation) is an option recorded in `config.json`. The converted model
is verified against the faithful original before anything is written.
"""

import argparse
import sys
from pathlib import Path

import torch

from lapvqa_hf.configuration_lapvqa_diffvqa import KNOWN_ENCODERS, LapvqaDiffVQAConfig
from lapvqa_hf.modeling_lapvqa_diffvqa import LapvqaDiffVQAModel
from lapvqa_hf.original import DiffVQAHead

from .checkpoint import ConversionError, StateDictMapper, load_untrusted_state_dict, sha256_of
from .common import (
    DECODER_ASSUMPTIONS,
    VerifyReport,
    add_common_arguments,
    default_generation_config,
    expected_shapes,
    map_text_decoder,
    read_text_decoder_fields,
    run_reporting_errors,
    save_gpt2_tokenizer,
    strip_answer,
    tensor_shape,
    write_verified,
)

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
    if encoder not in KNOWN_ENCODERS:
        raise ConversionError(f"unknown encoder {encoder!r}; expected one of {sorted(KNOWN_ENCODERS)}.")
    decoder_fields = read_text_decoder_fields(state_dict, num_attention_heads, hidden_act, WHAT)
    hidden_size = decoder_fields["hidden_size"]
    projection_width, vis_dim = tensor_shape(state_dict, "vis_proj.weight", 2, WHAT)
    num_frames, frame_width = tensor_shape(state_dict, "frame_emb.weight", 2, WHAT)
    if projection_width != hidden_size or (num_frames, frame_width) != (2, hidden_size):
        raise ConversionError(
            f"inconsistent widths: tok_emb {hidden_size}, vis_proj {projection_width}, "
            f"frame_emb {num_frames}x{frame_width} (expected 2x{hidden_size})."
        )
    if KNOWN_ENCODERS[encoder] != vis_dim:
        raise ConversionError(
            f"--encoder {encoder} gives {KNOWN_ENCODERS[encoder]}-dim features, but the checkpoint's vis_proj "
            f"takes {vis_dim}; pick the encoder this head was trained on."
        )
    return LapvqaDiffVQAConfig(vis_dim=vis_dim, encoder_name=encoder, **decoder_fields)


def convert_state_dict(state_dict: dict[str, torch.Tensor], config: LapvqaDiffVQAConfig) -> dict[str, torch.Tensor]:
    """Upstream names -> `LapvqaDiffVQAModel` names; fused attention projections are split into q/k/v."""
    mapper = StateDictMapper(state_dict)
    mapper.rename_prefix("vis_proj.", "visual_projection.")
    mapper.rename("frame_emb.weight", "frame_embeddings.weight")
    map_text_decoder(mapper, config)
    return mapper.finish(expected_shapes(LapvqaDiffVQAModel(config)))


def original_from_state_dict(state_dict: dict[str, torch.Tensor], config: LapvqaDiffVQAConfig) -> DiffVQAHead:
    """The faithful upstream module, loaded strictly from the same state dict."""
    head = DiffVQAHead(
        vis_dim=config.vis_dim,
        d_model=config.hidden_size,
        nhead=config.num_attention_heads,
        num_layers=config.num_hidden_layers,
        dim_feedforward=config.intermediate_size,
        activation=config.hidden_act,
        vocab_size=config.vocab_size,
        max_len=config.max_position_embeddings,
        final_norm=config.use_final_layer_norm,
        tie_weights=config.tie_word_embeddings,
    )
    head.load_state_dict(state_dict, strict=True)
    return head.eval()


@torch.no_grad()
def verify(
    original: DiffVQAHead,
    model: LapvqaDiffVQAModel,
    num_patches: tuple[int, int] = (49, 37),
    batch_size: int = 3,
    max_new_tokens: int = 24,
    tolerance: float = 1e-4,
    seed: int = 0,
) -> VerifyReport:
    """Runs both models on the same random features and prompts: teacher-forced logits and greedy answers."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    curr_vis = torch.randn(batch_size, num_patches[0], config.vis_dim, generator=generator)
    ref_vis = torch.randn(batch_size, num_patches[1], config.vis_dim, generator=generator)
    prompt_length = min(8, config.max_position_embeddings // 4)
    prompt = torch.randint(0, config.bos_token_id, (batch_size, prompt_length), generator=generator)
    answer = torch.randint(0, config.bos_token_id, (batch_size, prompt_length), generator=generator)
    bos = torch.full((batch_size, 1), config.bos_token_id)
    text = torch.cat([prompt, bos, answer], dim=1)

    model = model.eval()
    expected = original(curr_vis, ref_vis, text)
    found = model(input_ids=text, curr_vis=curr_vis, ref_vis=ref_vis).logits
    max_diff = (expected.float() - found.float()).abs().max().item()

    max_new_tokens = min(max_new_tokens, config.max_position_embeddings - prompt_length)
    original_answers = original.generate(
        curr_vis, ref_vis, prompt, config.bos_token_id, config.eos_token_id, max_new_tokens
    )
    generated = model.generate(
        input_ids=torch.cat([prompt, bos], dim=1),
        attention_mask=torch.ones(batch_size, prompt_length + 1, dtype=torch.long),
        curr_vis=curr_vis,
        ref_vis=ref_vis,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
    )
    converted = [strip_answer(row, config.eos_token_id) for row in generated[:, prompt_length + 1 :].tolist()]
    identical = sum(a == b for a, b in zip(original_answers, converted, strict=True))
    return VerifyReport(max_diff, tolerance, identical, batch_size)


def convert_diffvqa(
    checkpoint: str | Path,
    encoder: str,
    output: str | Path,
    num_attention_heads: int = 8,
    hidden_act: str = "relu",
    run_verify: bool = True,
    overwrite: bool = False,
    tolerance: float = 1e-4,
    log=print,
) -> Path:
    """Converts, verifies and writes the model folder atomically; returns its path."""
    checkpoint = Path(checkpoint)
    state_dict = load_untrusted_state_dict(checkpoint)
    config = infer_config(state_dict, encoder, num_attention_heads, hidden_act)
    config.conversion_info = {
        "source_file": checkpoint.name,
        "source_sha256": sha256_of(checkpoint),
        "assumed_num_attention_heads": num_attention_heads,
        "assumed_hidden_act": hidden_act,
        "assumptions": list(ASSUMPTIONS),
    }
    log(
        f"{checkpoint.name}: vis_dim {config.vis_dim}, {config.num_hidden_layers} layers, FFN "
        f"{config.intermediate_size}, {config.max_position_embeddings} positions, final norm "
        f"{'yes' if config.use_final_layer_norm else 'no'}, lm_head {'tied' if config.tie_word_embeddings else 'untied'}"
    )
    model = LapvqaDiffVQAModel(config)
    model.load_state_dict(convert_state_dict(state_dict, config), strict=not config.tie_word_embeddings)
    model.tie_weights()
    model.generation_config = default_generation_config(config)

    def verify_written(folder: Path) -> VerifyReport:
        reloaded = LapvqaDiffVQAModel.from_pretrained(folder)
        return verify(original_from_state_dict(state_dict, config), reloaded, tolerance=tolerance)

    return write_verified(
        model,
        output,
        verify_written if run_verify else None,
        overwrite=overwrite,
        extra_files=save_gpt2_tokenizer(config.max_position_embeddings),
        log=log,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="upstream DiffVQAHead state dict, e.g. coca_best.pt")
    parser.add_argument("--encoder", required=True, choices=sorted(KNOWN_ENCODERS), help="frozen encoder of the head")
    add_common_arguments(parser, default_heads=8)


def run(args: argparse.Namespace) -> int:
    return run_reporting_errors(
        lambda: convert_diffvqa(
            args.checkpoint,
            args.encoder,
            args.output,
            num_attention_heads=args.num_heads,
            hidden_act=args.activation,
            run_verify=args.verify,
            overwrite=args.overwrite,
            tolerance=args.tolerance,
        )
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lapvqa_hf.convert.diffvqa", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
