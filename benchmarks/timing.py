"""Wall-clock timing shared by the benchmark scripts."""

import statistics
import time

import torch


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_calls(fn, device: str, repeats: int, warm_up: bool = True) -> list[float]:
    """Seconds of each of `repeats` calls of `fn`, after one untimed warm-up call (which also compiles)."""
    if warm_up:
        fn()
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def time_call(fn, device: str, repeats: int) -> float:
    """Mean seconds of `repeats` calls of `fn`, after one untimed warm-up call (which also compiles)."""
    return statistics.mean(time_calls(fn, device, repeats))
