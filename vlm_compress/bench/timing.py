"""Wall-clock and memory measurement shared by the benchmarks."""

from __future__ import annotations

import gc
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch


def timed(fn: Callable[[], object], device: torch.device, repeats: int = 1) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` (CUDA-synchronised)."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def decode_ms_per_token(generate: Callable[[int], object], device: torch.device, new_tokens: int, repeats: int = 1) -> float:
    """Milliseconds per decode step: ``(t(2 + n) - t(2)) / n`` over ``generate(max_new_tokens)`` calls.

    The difference of two generation lengths cancels the prefill and generate's set-up.
    """
    long = timed(lambda: generate(2 + new_tokens), device, repeats)
    short = timed(lambda: generate(2), device, repeats)
    return (long - short) / new_tokens * 1e3


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _proc_status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


class PeakMemory:
    """Peak bytes allocated above the starting point inside the block.

    CUDA: the allocator's peak. CPU (Linux): the resident high-water mark, reset through
    ``/proc/self/clear_refs`` after ``malloc_trim`` returns freed heap to the OS (so reuse of cached blocks cannot
    hide the peak). Elsewhere ``peak`` stays 0.
    """

    def __init__(self, device: torch.device):
        self.device, self.peak, self.start = device, 0, 0

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        elif Path("/proc/self/clear_refs").exists():
            _malloc_trim()
            Path("/proc/self/clear_refs").write_text("5")
            self.start = _proc_status("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.start
        elif self.start:
            self.peak = _proc_status("VmHWM") - self.start


def machine_description(device: torch.device) -> dict[str, object]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
