"""The processes a command runs in: this one alone, or those `accelerate launch` started."""

from accelerate import PartialState


def process_state(device: str | None = None) -> PartialState:
    """accelerate's state of this process. Launched on CPUs (`--device cpu`, `ACCELERATE_USE_CPU=1`, or no CUDA),
    the processes must join over gloo with `cpu=True`: without it each believes itself alone, and all of them would
    do the whole work into the same files."""
    import torch
    from accelerate.utils import parse_flag_from_env

    cpu = device == "cpu" or parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    return PartialState(cpu=cpu)


__all__ = ["process_state"]
