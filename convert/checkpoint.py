"""Safe loading of untrusted upstream `.pt` (and `.safetensors`) files, strict key mapping and atomic output folders."""

import json
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from lapvqa_hf.compatibility import transformers_record
from lapvqa_hf.files import sha256_of
from lapvqa_hf.messages import first_line
from lapvqa_hf.model_folders import hub_unreachable_reason


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message says what was expected and what was found."""


# `OWNER/REPO/PATH/IN/REPO`: a file of a Hub repo, e.g. dmusingu/lapvqa-diffvqa/coca_best.pt
HUB_FILE = re.compile(r"^(?P<repo_id>[\w.-]+/[\w.-]+)/(?P<filename>[^\s]+)$")


def local_checkpoint(source: str | os.PathLike) -> Path:
    """The checkpoint file to convert: `source` when it is a local file; else, when it reads `OWNER/REPO/FILE`, that
    file of the Hub repo, downloaded once into the Hugging Face cache (and read from there offline)."""
    path = Path(source)
    match = HUB_FILE.match(str(source))
    if path.exists() or match is None:
        return path
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError

    def unavailable(reason: str) -> ConversionError:
        return ConversionError(
            f"{source} is no local file, and {match['filename']} of the Hub repo {match['repo_id']} could not be "
            f"fetched ({reason}); it needs the Hub once (then the Hugging Face cache serves it offline), or pass a "
            "local .pt file."
        )

    cached = try_to_load_from_cache(match["repo_id"], match["filename"])
    if isinstance(cached, str):
        return Path(cached)
    unreachable = hub_unreachable_reason()
    if unreachable is not None:
        raise unavailable(f"it is not in the Hugging Face cache, and {unreachable}")
    try:
        return Path(hf_hub_download(match["repo_id"], match["filename"]))
    except (HfHubHTTPError, OSError, ValueError) as error:  # no such repo or file, or the connection broke
        raise unavailable(first_line(error)) from None


def load_untrusted(path: str | os.PathLike) -> object:
    """`torch.load(weights_only=True)` with one-line `ConversionError`s.

    Pickles that would run code and corrupt or truncated files are refused; what was loaded is not checked further.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file.")
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    try:  # torch.save's zip format: its records carry CRC-32s, which torch.load does not check
        damaged = zipfile.ZipFile(path).testzip() if zipfile.is_zipfile(path) else None
    except Exception as error:  # whatever a damaged archive makes zipfile raise, the file is corrupt
        raise ConversionError(
            f"{path}: not a readable PyTorch checkpoint (corrupt archive: {_first_sentence(error)})."
        ) from None
    if damaged is not None:
        raise ConversionError(
            f"{path}: corrupted tensor data (checksum mismatch in {damaged}); download or copy the file again."
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refused = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", str(error))
        if refused:
            raise ConversionError(
                f"{path}: refused to load a pickle that could run code (it imports {refused.group(1)}); "
                "only tensors and plain values are accepted."
            ) from None
        raise ConversionError(
            f"{path}: not a readable PyTorch checkpoint (corrupt, or pickled objects other than tensors)."
        ) from None
    except Exception as error:  # whatever a truncated or damaged file makes the unpickler raise, it is corrupt
        raise ConversionError(
            f"{path}: not a readable PyTorch checkpoint (truncated or corrupt: {_first_sentence(error)})."
        ) from None


def _first_sentence(error: BaseException) -> str:
    return first_line(error).split(". ")[0].rstrip(".") or type(error).__name__


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file holds tensors only, so it cannot run code; a damaged one is still refused in one line."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise ConversionError(
            f"{path}: not a readable safetensors file (truncated or corrupt: {first_line(error)})."
        ) from None


def _check_state_dict(
    state_dict: object, where: str, converted: Callable[[str], bool] = lambda key: True
) -> dict[str, torch.Tensor]:
    """A flat dict of tensors whose `converted` ones are real floating-point and finite: the weights of these
    models are nothing else, and a NaN in a rarely used row (a token embedding, a late position) would pass any
    verify step. Tensors a converter leaves out (CoCa's text side) are not its concern."""
    if not isinstance(state_dict, dict):
        raise ConversionError(f"{where}: expected a state dict (dict of tensors), found {type(state_dict).__name__}.")
    not_names = [key for key in state_dict if not isinstance(key, str)]
    if not_names:
        raise ConversionError(
            f"{where}: expected tensor names (text) as the state dict's keys, found {not_names[0]!r} "
            f"({type(not_names[0]).__name__})."
        )
    not_tensors = sorted(str(k) for k, v in state_dict.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise ConversionError(
            f"{where}: expected only tensors in the state dict, found other values under {not_tensors}."
        )
    weights = {key: tensor for key, tensor in state_dict.items() if converted(key)}
    for key, tensor in weights.items():  # an expanded or overlapping view: a crafted file; checking it could take hours
        held = tensor.untyped_storage().nbytes() // max(tensor.element_size(), 1)
        if held < tensor.numel():
            raise ConversionError(
                f"{where}: {key} claims shape {list(tensor.shape)} but holds {held} values (a crafted or broken file)."
            )
    not_float = [f"{k} ({v.dtype})" for k, v in weights.items() if not v.is_floating_point()]
    if not_float:
        raise ConversionError(f"{where}: expected floating-point weights, found {', '.join(sorted(not_float))}.")
    not_finite = sorted(k for k, v in weights.items() if not torch.isfinite(v).all())
    if not_finite:
        raise ConversionError(f"{where}: non-finite values (NaN or inf) in {not_finite}; the checkpoint is damaged.")
    return state_dict


def load_untrusted_state_dict(
    path: str | os.PathLike, converted: Callable[[str], bool] = lambda key: True
) -> dict[str, torch.Tensor]:
    """Loads a plain `{name: tensor}` state dict with `torch.load(weights_only=True)`.

    Pickles that would run code, corrupt or truncated files, anything that is not a flat dict of tensors, and
    non-float or non-finite tensors among those to be `converted` are refused with a one-line `ConversionError`.
    """
    return _check_state_dict(load_untrusted(path), str(path), converted)


def load_untrusted_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """Loads `{"state_dict": {name: tensor}, **metadata}` (or a plain state dict: empty metadata) safely.

    Metadata values must be plain numbers, strings or None; everything else is refused like in
    `load_untrusted_state_dict`.
    """
    loaded = load_untrusted(path)
    if not (isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict)):
        return _check_state_dict(loaded, str(path)), {}
    metadata = {key: value for key, value in loaded.items() if key != "state_dict"}
    not_plain = sorted(
        str(key) for key, value in metadata.items() if not isinstance(value, (int, float, str, type(None)))
    )
    if not_plain:
        raise ConversionError(
            f"{path}: checkpoint metadata must be numbers or strings, found other values under {not_plain}."
        )
    return _check_state_dict(loaded["state_dict"], f"{path} ['state_dict']"), metadata


def conversion_record(checkpoint: Path, assumptions: Iterable[str], **assumed_options) -> dict:
    """`config.conversion_info`: the source file and its hash, the options weights cannot reveal (`assumed_*`), the
    conventions assumed, and the transformers releases the model code was tested on and written with."""
    return {
        "source_file": checkpoint.name,
        "source_sha256": sha256_of(checkpoint),
        **{f"assumed_{option}": value for option, value in assumed_options.items()},
        "assumptions": list(assumptions),
        **transformers_record(),
    }


class StateDictMapper:
    """Moves tensors from a source state dict to target names, each source tensor used exactly once.

    Usage: call `rename` / `split` / `consume` for every rule, then `finish(expected)` checks that nothing
    was left over and that the result has exactly the expected names and shapes.
    """

    def __init__(self, source: dict[str, torch.Tensor]):
        self.source = source
        self.used: set[str] = set()
        self.target: dict[str, torch.Tensor] = {}

    def consume(self, key: str) -> torch.Tensor:
        if key not in self.source:
            raise ConversionError(f"missing source tensor {key!r}.")
        if key in self.used:
            raise ConversionError(f"source tensor {key!r} would be used twice.")
        self.used.add(key)
        return self.source[key]

    def rename(
        self, source_key: str, target_key: str, transform: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    ) -> None:
        self._put(target_key, transform(self.consume(source_key)))

    def split(self, source_key: str, target_keys: list[str]) -> None:
        """Splits a fused tensor (e.g. `in_proj_weight`) into equal chunks along dim 0."""
        tensor = self.consume(source_key)
        if tensor.shape[0] % len(target_keys):
            raise ConversionError(
                f"{source_key!r} has {tensor.shape[0]} rows, not divisible into {len(target_keys)} parts."
            )
        for key, chunk in zip(target_keys, tensor.chunk(len(target_keys)), strict=True):
            self._put(key, chunk.clone())

    def rename_prefix(self, source_prefix: str, target_prefix: str, rule: Callable[[str], str] = lambda s: s) -> None:
        """Renames every source key under `source_prefix`, applying `rule` to the rest of the name."""
        for key in [k for k in self.source if k.startswith(source_prefix) and k not in self.used]:
            self.rename(key, target_prefix + rule(key[len(source_prefix) :]))

    def _put(self, key: str, tensor: torch.Tensor) -> None:
        if key in self.target:
            raise ConversionError(f"target tensor {key!r} would be written twice.")
        self.target[key] = tensor.contiguous()

    def finish(self, expected: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
        unused = sorted(set(self.source) - self.used)
        if unused:
            raise ConversionError(f"unknown keys in the checkpoint (not part of the expected layout): {unused}.")
        missing = sorted(set(expected) - set(self.target))
        unexpected = sorted(set(self.target) - set(expected))
        if missing or unexpected:
            raise ConversionError(
                f"mapping left target tensors unfilled {missing} and produced unknown ones {unexpected}."
            )
        wrong = [
            f"{key}: expected {list(expected[key])}, found {list(t.shape)}"
            for key, t in self.target.items()
            if t.shape != expected[key]
        ]
        if wrong:
            raise ConversionError("shape mismatch: " + "; ".join(wrong) + ".")
        return self.target


def written_by_a_conversion(folder: Path) -> bool:
    """Whether `folder` is a `lapvqa convert` output: its `config.json` records the conversion."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and isinstance(config.get("conversion_info"), dict)
