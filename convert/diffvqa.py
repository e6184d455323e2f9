"""Convert an upstream `DiffVQAHead` state dict (`{encoder}_best.pt`) into a Transformers model folder.

    lapvqa convert diffvqa coca_best.pt --encoder coca --output lapvqa-diffvqa-coca
    python -m lapvqa_hf.convert.diffvqa coca_best.pt --encoder coca --output lapvqa-diffvqa-coca

Everything the weights reveal (vis_dim, layers, FFN width, positions, final norm, weight tying) is read from
them; what they cannot reveal (heads, activation) is an option recorded in `config.json`. The converted model
is verified against the faithful original before anything is written.
"""

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig

from lapvqa_hf.configuration_lapvqa_diffvqa import KNOWN_ENCODERS, LapvqaDiffVQAConfig
from lapvqa_hf.modeling_lapvqa_diffvqa import LapvqaDiffVQAModel
from lapvqa_hf.original import DiffVQAHead
from lapvqa_hf.tokenization import build_gpt2_tokenizer

from .checkpoint import ConversionError, StateDictMapper, atomic_output_dir, load_untrusted_state_dict, sha256_of

ASSUMPTIONS = (
    "decoder is torch.nn.TransformerDecoder(norm_first=True, batch_first=True) with PyTorch's state-dict keys",
    "token embeddings are not scaled; positions are 0..T-1 over the text",
    "prompt layout: question_ids + [bos] + answer_ids + [eos]; bos = eos = pad = 50256 (GPT-2 <|endoftext|>)",
    "memory = [vis_proj(ref) + frame_emb(0) ; vis_proj(curr) + frame_emb(1)]",
)

DEFAULT_MAX_NEW_TOKENS = 128

LAYER_RENAMES = {
    "self_attn.out_proj.": "self_attn.out_proj.",
    "multihead_attn.out_proj.": "encoder_attn.out_proj.",
    "linear1.": "fc1.",
    "linear2.": "fc2.",
    "norm1.": "self_attn_layer_norm.",
    "norm2.": "encoder_attn_layer_norm.",
    "norm3.": "final_layer_norm.",
}


def _shape(state_dict: dict[str, torch.Tensor], key: str, ndim: int) -> torch.Size:
    if key not in state_dict:
        raise ConversionError(f"not a DiffVQAHead state dict: missing {key!r}.")
    shape = state_dict[key].shape
    if len(shape) != ndim:
        raise ConversionError(f"{key!r} should have {ndim} dimensions, found shape {list(shape)}.")
    return shape


def infer_config(
    state_dict: dict[str, torch.Tensor],
    encoder: str,
    num_attention_heads: int = 8,
    hidden_act: str = "relu",
) -> LapvqaDiffVQAConfig:
    """Reads the architecture from the weights; heads and activation are the pinned (or given) assumptions."""
    if encoder not in KNOWN_ENCODERS:
        raise ConversionError(f"unknown encoder {encoder!r}; expected one of {sorted(KNOWN_ENCODERS)}.")
    hidden_size, vis_dim = _shape(state_dict, "vis_proj.weight", 2)
    vocab_size, token_width = _shape(state_dict, "tok_emb.weight", 2)
    num_positions, position_width = _shape(state_dict, "pos_emb.weight", 2)
    num_frames, frame_width = _shape(state_dict, "frame_emb.weight", 2)
    if {token_width, position_width, frame_width} != {hidden_size} or num_frames != 2:
        raise ConversionError(
            f"inconsistent widths: vis_proj {hidden_size}, tok_emb {token_width}, pos_emb {position_width}, "
            f"frame_emb {num_frames}x{frame_width} (expected 2x{hidden_size})."
        )
    if KNOWN_ENCODERS[encoder] != vis_dim:
        raise ConversionError(
            f"--encoder {encoder} gives {KNOWN_ENCODERS[encoder]}-dim features, but the checkpoint's vis_proj "
            f"takes {vis_dim}; pick the encoder this head was trained on."
        )
    layer_ids = sorted({int(m.group(1)) for k in state_dict if (m := re.match(r"decoder\.layers\.(\d+)\.", k))})
    if not layer_ids or layer_ids != list(range(len(layer_ids))):
        raise ConversionError(f"decoder layers must be numbered 0..L-1, found {layer_ids}.")
    intermediate_size = _shape(state_dict, "decoder.layers.0.linear1.weight", 2)[0]
    if hidden_size % num_attention_heads:
        raise ConversionError(f"--num-heads {num_attention_heads} does not divide the width {hidden_size}.")
    tied = "lm_head.weight" in state_dict and torch.equal(state_dict["lm_head.weight"], state_dict["tok_emb.weight"])
    return LapvqaDiffVQAConfig(
        vis_dim=vis_dim,
        hidden_size=hidden_size,
        num_hidden_layers=len(layer_ids),
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        hidden_act=hidden_act,
        max_position_embeddings=num_positions,
        vocab_size=vocab_size,
        use_final_layer_norm="decoder.norm.weight" in state_dict,
        tie_word_embeddings=tied,
        encoder_name=encoder,
    )


def convert_state_dict(state_dict: dict[str, torch.Tensor], config: LapvqaDiffVQAConfig) -> dict[str, torch.Tensor]:
    """Upstream names -> `LapvqaDiffVQAModel` names; fused attention projections are split into q/k/v."""
    mapper = StateDictMapper(state_dict)
    mapper.rename_prefix("vis_proj.", "visual_projection.")
    mapper.rename("frame_emb.weight", "frame_embeddings.weight")
    mapper.rename("tok_emb.weight", "decoder.embed_tokens.weight")
    mapper.rename("pos_emb.weight", "decoder.embed_positions.weight")
    if config.tie_word_embeddings:
        mapper.consume("lm_head.weight")  # the same tensor as tok_emb.weight: tied in the converted model
    else:
        mapper.rename("lm_head.weight", "lm_head.weight")
    if config.use_final_layer_norm:
        mapper.rename_prefix("decoder.norm.", "decoder.norm.")
    for i in range(config.num_hidden_layers):
        source, target = f"decoder.layers.{i}.", f"decoder.layers.{i}."
        for attention, renamed in (("self_attn", "self_attn"), ("multihead_attn", "encoder_attn")):
            for kind in ("weight", "bias"):
                mapper.split(
                    f"{source}{attention}.in_proj_{kind}",
                    [f"{target}{renamed}.{p}_proj.{kind}" for p in ("q", "k", "v")],
                )
        for old, new in LAYER_RENAMES.items():
            mapper.rename_prefix(source + old, target + new)
    expected = {k: v.shape for k, v in LapvqaDiffVQAModel(config).state_dict().items() if k != "lm_head.weight"}
    if not config.tie_word_embeddings:
        expected["lm_head.weight"] = torch.Size([config.vocab_size, config.hidden_size])
    return mapper.finish(expected)


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


@dataclass
class VerifyReport:
    max_abs_logit_diff: float
    greedy_identical: int
    greedy_total: int
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_abs_logit_diff <= self.tolerance and self.greedy_identical == self.greedy_total

    def __str__(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (
            f"verify {verdict}: max |Δlogit| = {self.max_abs_logit_diff:.2e} (tolerance {self.tolerance:.0e}); "
            f"greedy answers identical for {self.greedy_identical}/{self.greedy_total} samples"
        )


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
    converted_answers = [strip_answer(row, config.eos_token_id) for row in generated[:, prompt_length + 1 :].tolist()]
    identical = sum(a == b for a, b in zip(original_answers, converted_answers, strict=True))
    return VerifyReport(max_diff, identical, batch_size, tolerance)


def strip_answer(token_ids: list[int], eos_token_id: int) -> list[int]:
    """The answer ids up to (not including) the first eos."""
    return token_ids[: token_ids.index(eos_token_id)] if eos_token_id in token_ids else token_ids


def default_generation_config(config: LapvqaDiffVQAConfig) -> GenerationConfig:
    # The upstream card generates up to 128 new tokens; question + answer must still fit the learned positions.
    return GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        max_new_tokens=DEFAULT_MAX_NEW_TOKENS,
        do_sample=False,
    )


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
    converted = convert_state_dict(state_dict, config)
    output = Path(output)
    with atomic_output_dir(output, overwrite=overwrite) as staging:
        model = LapvqaDiffVQAModel(config)
        model.load_state_dict(converted, strict=not config.tie_word_embeddings)
        model.tie_weights()
        model.generation_config = default_generation_config(config)
        model.save_pretrained(staging)
        build_gpt2_tokenizer(config.max_position_embeddings).save_pretrained(staging)
        if run_verify:
            reloaded = LapvqaDiffVQAModel.from_pretrained(staging)
            report = verify(original_from_state_dict(state_dict, config), reloaded, tolerance=tolerance)
            log(str(report))
            if not report.passed:
                raise ConversionError(f"{report}; nothing was written to {output}.")
    log(f"wrote {output}")
    return output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="upstream DiffVQAHead state dict, e.g. coca_best.pt")
    parser.add_argument("--encoder", required=True, choices=sorted(KNOWN_ENCODERS), help="frozen encoder of the head")
    parser.add_argument("--output", required=True, type=Path, help="model folder to write (atomically)")
    parser.add_argument("--num-heads", type=int, default=8, help="attention heads (not in the weights; default 8)")
    parser.add_argument("--activation", default="relu", choices=["relu", "gelu"], help="FFN activation (default relu)")
    parser.add_argument("--no-verify", dest="verify", action="store_false", help="skip the parity check")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max |Δlogit| the verify step accepts")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def run(args: argparse.Namespace) -> int:
    try:
        convert_diffvqa(
            args.checkpoint,
            args.encoder,
            args.output,
            num_attention_heads=args.num_heads,
            hidden_act=args.activation,
            run_verify=args.verify,
            overwrite=args.overwrite,
            tolerance=args.tolerance,
        )
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lapvqa_hf.convert.diffvqa", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
