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


def leave_processes(state: PartialState, exit_code: int) -> int:
    """Ends a command's part in `accelerate launch`, as `Accelerator.end_training()` ends training, and returns
    `exit_code`. After a success the process waits for the others and destroys the process group: left to interpreter
    exit, gloo's worker threads can abort it ("terminate called without an active exception", SIGABRT) and fail a
    run that succeeded. After a failure it does neither: the others may be inside a collective, where waiting or
    destroying would hang, and the launcher stops them."""
    import torch.distributed

    if exit_code == 0 and torch.distributed.is_available() and torch.distributed.is_initialized():
        state.wait_for_everyone()
        torch.distributed.destroy_process_group()
    return exit_code


__all__ = ["leave_processes", "process_state"]
