"""Model folders and Hub ids that a command reads (`answer`, `evaluate`, training's `init_from`): found, checked and
loaded, with every failure one line naming the model and what to do.

A name that can only be a path and does not exist is "no such folder", never "could not connect"; a Hub id that is
not cached while the Hub cannot be reached says so at once, without huggingface_hub's retries; weights that do not
fit `config.json` are refused, where transformers would re-initialise them at random with a warning.
"""

import os
import re
from pathlib import Path

import torch
from huggingface_hub import try_to_load_from_cache
from safetensors import SafetensorError, safe_open

from .messages import first_line

# `NAME` or `OWNER/NAME`: a Hub repo id
HUB_REPO = re.compile(r"^(?:[\w][\w.-]*/)?[\w][\w.-]*$")


def looks_like_a_local_path(name: str) -> bool:
    """Whether a model or encoder name can only mean a local path: it is no Hub repo id (`NAME` or `OWNER/NAME`),
    or it starts like a path (`./`, `../`, `/`, `~`)."""
    return name.startswith((".", "/", "~")) or os.path.isabs(name) or HUB_REPO.match(name) is None


def hub_unreachable_reason(timeout: float = 5.0) -> str | None:
    """Why the Hub cannot be reached (offline mode, or no connection to its endpoint within `timeout` seconds), or
    None. One quick probe, so that an offline machine hears it at once instead of after huggingface_hub's retries."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
    except OSError as error:
        return f"no connection to {constants.ENDPOINT}: {first_line(error)}"
    return None


# What loading a damaged, truncated, edited or absent model may raise (EncoderError is a ValueError).
LOADING_ERRORS = (OSError, ValueError, RuntimeError, KeyError, TypeError, MemoryError, SafetensorError)


class ModelFolderError(ValueError):
    """A model folder or Hub id cannot be used; the message names it and says why."""


def locate_model(name: str, revision: str | None = None) -> None:
    """Refuses, in one line, a model name that cannot be loaded: a path that does not exist, a folder without
    `config.json`, or a Hub id that is not cached while the Hub cannot be reached."""
    if Path(name).exists():
        if not (Path(name) / "config.json").is_file():
            raise ModelFolderError(f"{name}: not a model folder (no config.json).")
    elif looks_like_a_local_path(name):
        raise ModelFolderError(f"{name}: no such model folder.")
    elif not isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str):
        unreachable = hub_unreachable_reason()
        if unreachable is not None:
            raise ModelFolderError(
                f"{name} is no local folder and not in the Hugging Face cache, and the Hub cannot be reached "
                f"({unreachable}): download it once with the Hub reachable, or name a local folder."
            )


def check_weights_fit_config(name: str, config, revision: str | None = None) -> None:
    """The weights' shapes must be those `config.json` describes. transformers would re-initialise mismatched
    tensors at random, with a warning, or fail after printing a table of them; this says it in one line."""
    from transformers import AutoModel
    from transformers.utils import cached_file

    with torch.device("meta"):
        expected = {key: tuple(t.shape) for key, t in AutoModel.from_config(config).state_dict().items()}
    weights = cached_file(name, "model.safetensors", revision=revision)
    with safe_open(weights, "pt") as file:
        found = {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}  # noqa: SIM118
    wrong = [f"{key} is {list(found[key])}, not {list(shape)}" for key, shape in expected.items()
             if key in found and found[key] != shape]  # fmt: skip
    if wrong:
        raise ModelFolderError(
            f"{name}: model.safetensors does not fit config.json ({len(wrong)} tensors: {wrong[0]}); the folder is "
            "damaged or was edited: convert it again."
        )


def load_config(name: str, revision: str | None = None, trust_remote_code: bool = False):
    """The model's `config.json` (`AutoConfig`), after `locate_model`; failures in one line."""
    from transformers import AutoConfig

    locate_model(name, revision)
    try:
        return AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except LOADING_ERRORS as error:
        raise ModelFolderError(f"{name}: the model could not be loaded ({first_line(error)}).") from None


def load_model(model_class, name: str, revision: str | None = None, **options) -> torch.nn.Module:
    """`model_class.from_pretrained(name)` of one of this package's classes, after checking that the folder's
    weights fit its config; failures in one line."""
    config = load_config(name, revision)
    try:
        check_weights_fit_config(name, config, revision)
        return model_class.from_pretrained(name, revision=revision, **options)
    except ModelFolderError:
        raise
    except LOADING_ERRORS as error:
        raise ModelFolderError(f"{name}: the model could not be loaded ({first_line(error)}).") from None


__all__ = [
    "HUB_REPO",
    "LOADING_ERRORS",
    "ModelFolderError",
    "check_weights_fit_config",
    "hub_unreachable_reason",
    "load_config",
    "load_model",
    "locate_model",
    "looks_like_a_local_path",
]
