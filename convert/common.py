"""Pieces every LAPVQA converter shares: the pinned text decoder's key mapping, the question-answering verify probe,
generation defaults, the write-verify-publish flow and the command-line options."""

import argparse
import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig, PreTrainedConfig, PreTrainedModel

from lapvqa_hf.compatibility import untested_release_note
from lapvqa_hf.files import atomic_output_dir
from lapvqa_hf.kinds import save_pretrained_with_pipeline
from lapvqa_hf.messages import counted, run_reporting_errors, summary
from lapvqa_hf.model_folders import looks_like_a_local_path
from lapvqa_hf.models.encoders import (
    ENCODER_WIDTHS,
    RECIPES,
    EncoderError,
    EncoderRecipe,
    build_encoder,
    load_encoder_config,
    load_encoder_image_processor,
    patch_tokens,
)
from lapvqa_hf.tokenization import build_gpt2_tokenizer

from .checkpoint import (
    ConversionError,
    StateDictMapper,
    conversion_record,
    load_untrusted_state_dict,
    local_checkpoint,
    written_by_a_conversion,
)
from .verify import (
    DEFAULT_FLOAT32_BUDGET,
    DEFAULT_TOLERANCE,
    Outputs,
    Probe,
    VerifyReport,
    dtype_of,
    verify_conversion,
)

DEFAULT_MAX_NEW_TOKENS = 128
GPT2_END_OF_TEXT = 50256  # bos = eos = pad
# What `--overwrite` may replace: an earlier conversion's output folder.
CONVERSION_OUTPUT = (
    written_by_a_conversion,
    "the output of an earlier `lapvqa convert` (no config.json with conversion_info)",
)

DECODER_ASSUMPTIONS = (
    "decoder is torch.nn.TransformerDecoder(norm_first=True, batch_first=True) with PyTorch's state-dict keys",
    "token embeddings are not scaled; positions are 0..T-1 over the text",
    "bos = eos = pad = 50256 (GPT-2 <|endoftext|>)",
)

_LAYER_RENAMES = {
    "self_attn.out_proj.": "self_attn.out_proj.",
    "multihead_attn.out_proj.": "encoder_attn.out_proj.",
    "linear1.": "fc1.",
    "linear2.": "fc2.",
    "norm1.": "self_attn_layer_norm.",
    "norm2.": "encoder_attn_layer_norm.",
    "norm3.": "final_layer_norm.",
}


def tensor_shape(state_dict: dict[str, torch.Tensor], key: str, ndim: int, what: str) -> torch.Size:
    if key not in state_dict:
        raise ConversionError(f"not a {what} state dict: missing {key!r}.")
    shape = state_dict[key].shape
    if len(shape) != ndim:
        raise ConversionError(f"{key!r} should have {ndim} dimensions, found shape {list(shape)}.")
    if 0 in shape:
        raise ConversionError(f"{key!r} is {list(shape)}: every dimension must be at least 1.")
    return shape


def numbered_blocks(state_dict: dict[str, torch.Tensor], prefix: str) -> int:
    """How many `{prefix}{i}.` blocks there are; they must be numbered 0..L-1."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    ids = sorted({int(m.group(1)) for key in state_dict if (m := pattern.match(key))})
    if not ids or ids != list(range(len(ids))):
        raise ConversionError(f"{prefix}* blocks must be numbered 0..L-1, found {ids}.")
    return len(ids)


def read_text_decoder_fields(
    state_dict: dict[str, torch.Tensor], num_attention_heads: int, hidden_act: str, what: str
) -> dict:
    """The decoder's config fields read from the weights (`tok_emb`, `pos_emb`, `decoder.*`, `lm_head`)."""
    vocab_size, hidden_size = tensor_shape(state_dict, "tok_emb.weight", 2, what)
    if "pos_emb.weight" in state_dict and state_dict["pos_emb.weight"].ndim == 2:
        rows = state_dict["pos_emb.weight"].shape[0]
        if rows < 2:
            raise ConversionError(
                f"pos_emb.weight has {rows} rows: the prompt needs at least 2 positions (a token and the bos that "
                "starts the answer)."
            )
    num_positions, position_width = tensor_shape(state_dict, "pos_emb.weight", 2, what)
    if position_width != hidden_size:
        raise ConversionError(f"inconsistent widths: tok_emb {hidden_size}, pos_emb {position_width}.")
    if hidden_size % num_attention_heads:
        raise ConversionError(f"--num-heads {num_attention_heads} does not divide the width {hidden_size}.")
    tied = "lm_head.weight" in state_dict and torch.equal(state_dict["lm_head.weight"], state_dict["tok_emb.weight"])
    return dict(
        hidden_size=hidden_size,
        num_hidden_layers=numbered_blocks(state_dict, "decoder.layers."),
        num_attention_heads=num_attention_heads,
        intermediate_size=tensor_shape(state_dict, "decoder.layers.0.linear1.weight", 2, what)[0],
        hidden_act=hidden_act,
        max_position_embeddings=num_positions,
        vocab_size=vocab_size,
        use_final_layer_norm="decoder.norm.weight" in state_dict,
        tie_word_embeddings=tied,
    )


def check_special_tokens(config: PreTrainedConfig) -> None:
    """The upstream text heads use GPT-2's `<|endoftext|>` (id 50256) as bos, eos and pad: the token embedding must
    hold it."""
    if config.vocab_size <= config.bos_token_id:
        raise ConversionError(
            f"tok_emb.weight has {config.vocab_size} rows, but the GPT-2 vocabulary's <|endoftext|> (bos, eos, pad) "
            f"is id {config.bos_token_id}: expected {GPT2_END_OF_TEXT + 1} rows."
        )


def check_encoder_width(encoder: str, vis_dim: int) -> None:
    """The named encoder must be known and give the features the checkpoint's `vis_proj` takes."""
    if encoder not in ENCODER_WIDTHS:
        raise ConversionError(f"unknown encoder {encoder!r}; expected one of {sorted(ENCODER_WIDTHS)}.")
    if ENCODER_WIDTHS[encoder] != vis_dim:
        raise ConversionError(
            f"encoder {encoder} gives {ENCODER_WIDTHS[encoder]}-dim features, but the checkpoint's vis_proj "
            f"takes {vis_dim}; pick the encoder this head was trained on."
        )


def encoder_record(encoder: str, checkpoint: str | None = None, revision: str | None = None) -> dict:
    """The head's `feature_recipe`: the encoder's recipe, loaded from `checkpoint` (a Hub id or a local folder,
    default the recipe's Hub id) at `revision`. The encoder stays in its own repo; the head only names it."""
    if checkpoint is not None:
        if Path(checkpoint).is_dir():
            checkpoint = str(Path(checkpoint).resolve())
        elif Path(checkpoint).exists():
            raise ConversionError(f"--encoder-checkpoint {checkpoint}: a file; name the encoder's folder or Hub id.")
        elif looks_like_a_local_path(checkpoint):
            raise ConversionError(f"--encoder-checkpoint {checkpoint}: no such folder (and no Hub id).")
    recipe = RECIPES[encoder]
    return dataclasses.asdict(
        dataclasses.replace(recipe, checkpoint=checkpoint or recipe.checkpoint, revision=revision or recipe.revision)
    )


def native_encoder_note(encoder: str) -> str:
    """What a converted `*-native` head without its fine-tuned encoder can do, said once at conversion."""
    return (
        f"note: the fine-tuned {encoder} encoder is not in this file; the folder runs from that encoder's features, "
        "and from images only once it is named (--encoder-checkpoint, or encoder= to the pipeline)."
    )


# Where a native file holds its fine-tuned encoder beside the head (pinned; the cards call the files the head alone):
# the encoder's own state dict, in the layout of its recipe's model class, under this prefix.
HELD_ENCODER_PREFIX = "encoder."


def split_held_encoder(state_dict: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """The head's weights, and the fine-tuned encoder's (`encoder.*`, the prefix taken off) where the file holds it."""
    head = {key: value for key, value in state_dict.items() if not key.startswith(HELD_ENCODER_PREFIX)}
    encoder = {
        key[len(HELD_ENCODER_PREFIX) :]: value
        for key, value in state_dict.items()
        if key.startswith(HELD_ENCODER_PREFIX)
    }
    return head, encoder


def hold_encoder(config: PreTrainedConfig, encoder_state: dict[str, torch.Tensor], log: Callable[[str], None]) -> None:
    """Makes `config` (whose `feature_recipe` is set) describe a head that holds its fine-tuned encoder: the
    architecture read from the recipe's checkpoint (config only; the weights are the file's), `encoder_finetuned`."""
    recipe = EncoderRecipe(**config.feature_recipe)
    try:
        config.encoder_config = load_encoder_config(recipe, recipe.checkpoint)
    except EncoderError as error:
        raise ConversionError(f"{error} (its config.json gives the architecture of the file's encoder.*)") from None
    config.encoder_finetuned = True
    log(
        f"the file holds the fine-tuned {recipe.name} encoder too ({counted(len(encoder_state), 'tensor')}): "
        f"converted into the folder (architecture from {recipe.checkpoint}), which runs from images as it is"
    )


def load_held_encoder(model: PreTrainedModel, encoder_state: dict[str, torch.Tensor]) -> None:
    """The file's `encoder.*` weights into `model.vision_model`, every tensor by name and shape; a missing,
    unexpected or misshapen tensor is refused in one line."""
    encoder = model.vision_model
    expected = encoder.state_dict()
    missing = sorted(set(expected) - set(encoder_state))
    unexpected = sorted(set(encoder_state) - set(expected))
    misshapen = sorted(
        key for key in set(expected) & set(encoder_state) if expected[key].shape != encoder_state[key].shape
    )
    problems = [
        f"{counted(len(keys), label)} (e.g. {HELD_ENCODER_PREFIX}{keys[0]})"
        for keys, label in (
            (missing, "missing tensor"),
            (unexpected, "unexpected tensor"),
            (misshapen, "misshapen tensor"),
        )
        if keys
    ]
    if problems:
        raise ConversionError(
            f"the file's {HELD_ENCODER_PREFIX}* weights do not fit a {type(encoder).__name__} of the recipe's architecture: {'; '.join(problems)}; "
            "name the encoder they were trained from with --encoder and --encoder-checkpoint."
        )
    encoder.load_state_dict(encoder_state, strict=True)


def held_encoder_pixels(
    config: PreTrainedConfig, generator: torch.Generator, batch_size: int, names: tuple[str, ...]
) -> dict:
    """Random prepared images (`[batch, channels, size, size]`, float64) under each of `names`: the verify inputs of a
    head that holds its encoder."""
    recipe, encoder_config = EncoderRecipe(**config.feature_recipe), config.encoder_config
    size = encoder_config.get("image_size") or recipe.image_size
    shape = (batch_size, encoder_config.get("num_channels", 3), size, size)
    return {name: torch.randn(shape, generator=generator, dtype=torch.float64) for name in names}


class OriginalWithEncoder(torch.nn.Module):
    """The faithful original of a head converted with its fine-tuned encoder: the recipe's encoder class (the layout
    of the file's `encoder.*` weights) loaded strictly from the file, then the upstream head on its patch tokens.
    Takes the head's arguments with prepared images in place of its `num_images` leading feature arguments."""

    def __init__(
        self, head: torch.nn.Module, encoder_state: dict[str, torch.Tensor], config: PreTrainedConfig, num_images: int
    ):
        super().__init__()
        self.recipe = EncoderRecipe(**config.feature_recipe)
        self.encoder = build_encoder(self.recipe, config.encoder_config)
        self.encoder.load_state_dict(encoder_state, strict=True)
        self.head = head
        self.num_images = num_images

    def _with_features(self, args: tuple) -> tuple:
        images, rest = args[: self.num_images], args[self.num_images :]
        return (*(patch_tokens(self.recipe, self.encoder, pixels) for pixels in images), *rest)

    def forward(self, *args) -> torch.Tensor:
        return self.head(*self._with_features(args))

    def generate(self, *args) -> list[list[int]]:
        return self.head.generate(*self._with_features(args))


def add_native_argument(parser: argparse.ArgumentParser, repo: str) -> None:
    """`--native` (`--encoder-finetuned`): the head was trained with its encoder (`repo`'s files)."""
    parser.add_argument(
        "--native",
        "--encoder-finetuned",
        dest="encoder_finetuned",
        action="store_true",
        help=f"the encoder was fine-tuned with the head ({repo}): recorded in config.json; from images the folder "
        "then needs the fine-tuned encoder (--encoder-checkpoint)",
    )


def add_encoder_arguments(parser: argparse.ArgumentParser, required: bool = True, help_suffix: str = "") -> None:
    """`--encoder` (the frozen encoder a head was trained on) and where that encoder's weights live."""
    parser.add_argument(
        "--encoder", required=required, choices=sorted(ENCODER_WIDTHS), help=f"frozen encoder of the head{help_suffix}"
    )
    parser.add_argument(
        "--encoder-checkpoint",
        help="Hub id or local folder of the encoder's weights, recorded in config.json (default: the recipe's Hub id)",
    )
    parser.add_argument("--encoder-revision", help="revision of --encoder-checkpoint on the Hub (default: main)")


def original_decoder_arguments(config: PreTrainedConfig) -> dict:
    """The upstream modules' text-decoder arguments (`DiffVQAHead`, `VQAHead`, `CaptioningModel`) for a config."""
    return dict(
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


def map_text_decoder(mapper: StateDictMapper, config: PreTrainedConfig) -> None:
    """Upstream decoder names -> `LapvqaTextDecoder` names; fused attention projections split into q/k/v."""
    mapper.rename("tok_emb.weight", "decoder.embed_tokens.weight")
    mapper.rename("pos_emb.weight", "decoder.embed_positions.weight")
    if config.tie_word_embeddings:
        mapper.consume("lm_head.weight")  # the same tensor as tok_emb.weight: tied in the converted model
    else:
        mapper.rename("lm_head.weight", "lm_head.weight")
    if config.use_final_layer_norm:
        mapper.rename_prefix("decoder.norm.", "decoder.norm.")
    for i in range(config.num_hidden_layers):
        layer = f"decoder.layers.{i}."
        for attention, renamed in (("self_attn", "self_attn"), ("multihead_attn", "encoder_attn")):
            for kind in ("weight", "bias"):
                mapper.split(
                    f"{layer}{attention}.in_proj_{kind}", [f"{layer}{renamed}.{p}_proj.{kind}" for p in ("q", "k", "v")]
                )
        for old, new in _LAYER_RENAMES.items():
            mapper.rename_prefix(layer + old, layer + new)


_ENCODER_LAYER_RENAMES = {
    "self_attn.out_proj.": "self_attn.out_proj.",
    "linear1.": "mlp.fc1.",
    "linear2.": "mlp.fc2.",
    "norm1.": "self_attn_layer_norm.",
    "norm2.": "final_layer_norm.",
}


def map_torch_encoder_layers(mapper: StateDictMapper, source: str, target: str, num_layers: int) -> None:
    """`torch.nn.TransformerEncoderLayer`s under `source` (`{source}{i}.`) -> `LapvqaTransformerEncoderLayer`s under
    `target`; the fused attention projection split into q/k/v."""
    for i in range(num_layers):
        layer, renamed = f"{source}{i}.", f"{target}{i}."
        for kind in ("weight", "bias"):
            mapper.split(f"{layer}self_attn.in_proj_{kind}", [f"{renamed}self_attn.{p}_proj.{kind}" for p in "qkv"])
        for old, new in _ENCODER_LAYER_RENAMES.items():
            mapper.rename_prefix(layer + old, renamed + new)


def expected_shapes(model: PreTrainedModel) -> dict[str, torch.Size]:
    """Target names and shapes of `model`, leaving out a tied `lm_head.weight` (stored once, as the embedding)."""
    shapes = {key: tensor.shape for key, tensor in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)
    return shapes


def strip_answer(token_ids: list[int], eos_token_id: int) -> list[int]:
    """The answer ids up to (not including) the first eos."""
    return token_ids[: token_ids.index(eos_token_id)] if eos_token_id in token_ids else token_ids


class QuestionAnsweringProbe(Probe):
    """Random visual features and prompts for a question-answering head (DiffVQA, VQA): teacher-forced logits of
    `question + [bos] + answer`, and greedy answers to `question + [bos]` (the original's loop, `generate()` with its
    cache for the converted model).

    `visual` holds the converted model's feature arguments in the order the original takes them positionally.
    """

    agreement = ("greedy answers", "samples")

    def __init__(
        self,
        config: PreTrainedConfig,
        visual: dict[str, torch.Tensor],
        generator: torch.Generator,
        max_new_tokens: int = 24,
    ):
        self.config = config
        self.visual = visual
        batch_size = next(iter(visual.values())).shape[0]
        self.prompt_length = min(8, config.max_position_embeddings // 4)
        self.prompt = torch.randint(0, config.bos_token_id, (batch_size, self.prompt_length), generator=generator)
        answer = torch.randint(0, config.bos_token_id, (batch_size, self.prompt_length), generator=generator)
        self.bos = torch.full((batch_size, 1), config.bos_token_id)
        self.text = torch.cat([self.prompt, self.bos, answer], dim=1)
        self.max_new_tokens = min(max_new_tokens, config.max_position_embeddings - self.prompt_length)

    def run_original(self, original: torch.nn.Module, with_answers: bool) -> Outputs:
        features = tuple(tensor.to(dtype_of(original)) for tensor in self.visual.values())
        logits = original(*features, self.text)
        if not with_answers:
            return Outputs({"logit": logits})
        config = self.config
        return Outputs(
            {"logit": logits},
            original.generate(*features, self.prompt, config.bos_token_id, config.eos_token_id, self.max_new_tokens),
        )

    def run_converted(self, model: PreTrainedModel, with_answers: bool) -> Outputs:
        visual = {name: features.to(model.dtype) for name, features in self.visual.items()}
        logits = model(input_ids=self.text, **visual).logits
        if not with_answers:
            return Outputs({"logit": logits})
        batch_size = self.prompt.shape[0]
        generated = model.generate(
            input_ids=torch.cat([self.prompt, self.bos], dim=1),
            attention_mask=torch.ones(batch_size, self.prompt_length + 1, dtype=torch.long),
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            num_beams=1,
            **visual,
        )
        eos = self.config.eos_token_id
        return Outputs(
            {"logit": logits}, [strip_answer(row, eos) for row in generated[:, self.prompt_length + 1 :].tolist()]
        )


def default_generation_config(config: PreTrainedConfig) -> GenerationConfig:
    # The upstream cards generate up to 128 new tokens; text must still fit the learned positions.
    return GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        max_new_tokens=min(DEFAULT_MAX_NEW_TOKENS, config.max_position_embeddings - 1),
        do_sample=False,
    )


def write_verified(
    model: PreTrainedModel,
    output: str | Path,
    verify: Callable[[Path], VerifyReport] | None,
    source: Path,
    overwrite: bool = False,
    extra_files: Callable[[Path], None] | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Saves `model` (with its pipeline, see `save_pretrained_with_pipeline`, and `extra_files`) into a staging
    folder, verifies what was written, then publishes it (see `atomic_output_dir`: `source`, the checkpoint
    converted, is never replaced).

    A failed verification (or any error) leaves `output` untouched and removes the staging folder.
    """
    output = Path(output)
    note = untested_release_note()
    if note is not None:
        log(note)
    with atomic_output_dir(output, overwrite=overwrite, source=source, replaceable=CONVERSION_OUTPUT) as staging:
        save_pretrained_with_pipeline(model, staging)
        if extra_files is not None:
            extra_files(staging)
        if verify is not None:
            report = verify(staging)
            log(str(report))
            if not report.passed:
                raise ConversionError(f"{report}; nothing was written to {output}.")
    log(f"wrote {output}")
    return output


def folder_verifier(
    original: Callable[[], torch.nn.Module],
    model_class: type[PreTrainedModel],
    probe: Probe,
    tolerance: float = DEFAULT_TOLERANCE,
    float32_budget: float = DEFAULT_FLOAT32_BUDGET,
    assumed: dict[str, object] | None = None,
) -> Callable[[Path], VerifyReport]:
    """The verify step of `write_verified`: the written folder, loaded as `model_class` in float64 and as shipped,
    against the faithful `original()` on `probe`'s inputs (see `lapvqa_hf.convert.verify`)."""

    def load(folder: Path, dtype: torch.dtype | None) -> PreTrainedModel:
        return model_class.from_pretrained(folder, **({"dtype": dtype} if dtype is not None else {}))

    return lambda folder: verify_conversion(
        original(), lambda dtype: load(folder, dtype), probe, tolerance, float32_budget, assumed
    )


def head_folder_files(config: PreTrainedConfig) -> Callable[[Path], None]:
    """What a text head's folder holds beside the model: the GPT-2 tokenizer and, where the head holds its encoder,
    that encoder's own image processor (what the pipeline prepares images with)."""

    def save(folder: Path) -> None:
        build_gpt2_tokenizer(config.max_position_embeddings).save_pretrained(folder)
        if config.encoder_config is not None:
            recipe = EncoderRecipe(**config.feature_recipe)
            try:
                image_processor = load_encoder_image_processor(recipe)
            except EncoderError as error:
                raise ConversionError(str(error)) from None
            image_processor.save_pretrained(folder)

    return save


def add_common_arguments(
    parser: argparse.ArgumentParser,
    what: str,
    example: str,
    default_heads: int | None,
    with_activation: bool = True,
    heads_help: str | None = None,
) -> None:
    """What every converter's command line takes: the checkpoint (`what`, e.g. `example` on the Hub), the output,
    the options the weights do not record (`heads_help` says where `--num-heads` comes from when not given), and
    verify's."""
    parser.add_argument(
        "checkpoint", type=Path, help=f"{what}: a local file, or OWNER/REPO/FILE on the Hub, e.g. {example}"
    )
    parser.add_argument("--output", required=True, type=Path, help="model folder to write (atomically)")
    parser.add_argument(
        "--num-heads",
        type=int,
        default=default_heads,
        help=heads_help or f"attention heads (not in the weights; default {default_heads})",
    )
    if with_activation:
        parser.add_argument(
            "--activation", default="relu", choices=["relu", "gelu"], help="decoder FFN activation (default relu)"
        )
    parser.add_argument("--no-verify", dest="verify", action="store_false", help="skip the parity check")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help="relative tolerance of verify: max |Δ| / max |original output|, both models in float64 "
        f"(default {DEFAULT_TOLERANCE:.0e}; float64 rounding is ~1e-15)",
    )
    parser.add_argument(
        "--float32-budget",
        type=float,
        default=DEFAULT_FLOAT32_BUDGET,
        help="relative precision budget of the shipped float32 model against the float64 original "
        f"(default {DEFAULT_FLOAT32_BUDGET:.0e}; float32 rounding is ~1e-6)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


@dataclass
class AnsweringHeadConverter:
    """How one question-answering head (DiffVQA, VQA) converts: the pieces that differ between heads.

    The flow is shared: safe load, architecture read from the weights, strict key mapping, atomic write of the
    model folder + GPT-2 tokenizer, and verification of the written folder against the faithful original.
    """

    what: str  # the upstream class, e.g. "DiffVQAHead"
    example: str  # an upstream file on the Hub, e.g. "dmusingu/lapvqa-diffvqa/coca_best.pt"
    model_class: type[PreTrainedModel]
    infer_config: Callable[[dict, str, int, str], PreTrainedConfig]
    convert_state_dict: Callable[[dict, PreTrainedConfig], dict]
    original_class: type[torch.nn.Module]  # the faithful upstream head (`original.DiffVQAHead`, `VQAHead`)
    probe: Callable[[PreTrainedConfig], Probe]  # the verify inputs for a config
    assumptions: tuple[str, ...]
    num_images: int  # the images the head reads (its leading feature arguments)

    def convert(
        self,
        checkpoint: str | Path,
        encoder: str,
        output: str | Path,
        num_attention_heads: int = 8,
        hidden_act: str = "relu",
        run_verify: bool = True,
        overwrite: bool = False,
        tolerance: float = DEFAULT_TOLERANCE,
        log: Callable[[str], None] = print,
        encoder_checkpoint: str | None = None,
        encoder_revision: str | None = None,
        float32_budget: float = DEFAULT_FLOAT32_BUDGET,
        encoder_finetuned: bool = False,
    ) -> Path:
        """Converts, verifies and writes the model folder atomically; returns its path. `encoder_finetuned` marks a
        head trained with its encoder (a `*-native` file), whose fine-tuned encoder `encoder_checkpoint` names."""
        checkpoint = local_checkpoint(checkpoint)
        state_dict, encoder_state = split_held_encoder(load_untrusted_state_dict(checkpoint))
        config = self.infer_config(state_dict, encoder, num_attention_heads, hidden_act)
        check_special_tokens(config)
        config.feature_recipe = encoder_record(encoder, encoder_checkpoint, encoder_revision)
        config.encoder_finetuned = encoder_finetuned
        assumed = dict(num_attention_heads=num_attention_heads, hidden_act=hidden_act)
        config.conversion_info = conversion_record(checkpoint, self.assumptions, **assumed)
        log(
            f"{checkpoint.name}: vis_dim {config.vis_dim}, {counted(config.num_hidden_layers, 'layer')}, FFN "
            f"{config.intermediate_size}, {config.max_position_embeddings} positions, final norm "
            f"{'yes' if config.use_final_layer_norm else 'no'}, "
            f"lm_head {'tied' if config.tie_word_embeddings else 'untied'}"
        )
        head_state = self.convert_state_dict(state_dict, config)
        if encoder_state:
            hold_encoder(config, encoder_state, log)
        elif encoder_finetuned and encoder_checkpoint is None:
            log(native_encoder_note(encoder))
        model = self.model_class(config)
        model.load_state_dict(head_state, strict=False)  # complete (`convert_state_dict` checks); the encoder next
        if encoder_state:
            load_held_encoder(model, encoder_state)
        model.tie_weights()
        model.generation_config = default_generation_config(config)
        verify = folder_verifier(
            lambda: self.original(state_dict, encoder_state, config),
            self.model_class,
            self.probe(config),
            tolerance,
            float32_budget,
            assumed,
        )
        extra_files = head_folder_files(config)
        return write_verified(model, output, verify if run_verify else None, checkpoint, overwrite, extra_files, log)

    def original(
        self, state_dict: dict[str, torch.Tensor], encoder_state: dict[str, torch.Tensor], config: PreTrainedConfig
    ) -> torch.nn.Module:
        """The faithful original: the upstream head, with the file's encoder before it where the file holds one."""
        head = self.original_from_state_dict(state_dict, config)
        if not encoder_state:
            return head
        return OriginalWithEncoder(head, encoder_state, config, num_images=self.num_images)

    def original_from_state_dict(
        self, state_dict: dict[str, torch.Tensor], config: PreTrainedConfig
    ) -> torch.nn.Module:
        """The faithful upstream head, loaded strictly from the same state dict."""
        head = self.original_class(vis_dim=config.vis_dim, **original_decoder_arguments(config))
        head.load_state_dict(state_dict, strict=True)
        return head.eval()

    def module_functions(self, module: str, doc: str) -> tuple[Callable, ...]:
        """What a converter module offers (see `lapvqa_hf.convert`): `convert`, `add_arguments`, `run`,
        `convert_entry` and `main` (`python -m MODULE`, described by the module's `doc`)."""
        main = command_line(module, doc, self.add_arguments, self.run)
        return self.convert, self.add_arguments, self.run, self.convert_entry, main

    def convert_entry(self, entry, source: Path, output: Path, log: Callable[[str], None]) -> Path:
        """`lapvqa push`'s conversion of a collection entry (`lapvqa_hf.collection.CollectionModel`)."""
        return self.convert(
            source, entry.encoder, output, overwrite=True, log=log, encoder_finetuned=entry.encoder_finetuned
        )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_common_arguments(parser, f"upstream {self.what} state dict", self.example, default_heads=8)
        add_encoder_arguments(parser)
        add_native_argument(parser, f"the *-native repos' {self.what} files")

    def run(self, args: argparse.Namespace) -> int:
        return run_reporting_errors(
            lambda: self.convert(
                args.checkpoint,
                args.encoder,
                args.output,
                num_attention_heads=args.num_heads,
                hidden_act=args.activation,
                encoder_finetuned=args.encoder_finetuned,
                **encoder_options(args),
                **verify_and_write_options(args),
            )
        )


def verify_and_write_options(args: argparse.Namespace) -> dict:
    """What every converter's command line passes on (`add_common_arguments`): verify or not, the tolerances,
    overwrite."""
    return {
        "run_verify": args.verify,
        "tolerance": args.tolerance,
        "float32_budget": args.float32_budget,
        "overwrite": args.overwrite,
    }


def encoder_options(args: argparse.Namespace) -> dict:
    """Where the frozen encoder of a head comes from (`add_encoder_arguments`)."""
    return {"encoder_checkpoint": args.encoder_checkpoint, "encoder_revision": args.encoder_revision}


def command_line(module: str, doc: str, add_arguments: Callable, run: Callable) -> Callable[[list[str] | None], int]:
    """The `python -m MODULE` entry point of a converter: its arguments, parsed, then `run`."""

    def main(argv: list[str] | None = None) -> int:
        parser = argparse.ArgumentParser(prog=f"python -m {module}", description=summary(doc))
        add_arguments(parser)
        return run(parser.parse_args(argv))

    return main
