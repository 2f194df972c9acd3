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


class StepClock:
    """A ``generate`` logits processor that stamps the wall clock once per decode step.

    ``generate`` calls its logits processors once per produced token, right after that token's forward pass, so
    consecutive stamps are one decode step apart (forward + sampling + cache update); the first stamp closes the
    prefill. CUDA is synchronised before each stamp. Pass it as ``logits_processor=LogitsProcessorList([clock])``.
    """

    def __init__(self, device: torch.device):
        self.device, self.stamps = device, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stamps.append(time.perf_counter())
        return scores

    def step_ms(self) -> list[float]:
        """Milliseconds of each decode step after the first token (``len(stamps) - 1`` values)."""
        return [(b - a) * 1e3 for a, b in zip(self.stamps, self.stamps[1:])]


def decode_step_ms(generate: Callable[..., object], device: torch.device, new_tokens: int) -> list[float]:
    """Per-step decode milliseconds of one ``generate(max_new_tokens, logits_processor)`` call (``new_tokens`` values).

    Times each step directly with a :class:`StepClock` instead of differencing two whole runs, whose noise (prefill,
    allocator, set-up) does not cancel and swamped the decode figure.
    """
    from transformers import LogitsProcessorList

    clock = StepClock(device)
    generate(new_tokens + 1, LogitsProcessorList([clock]))
    steps = clock.step_ms()
    if len(steps) != new_tokens:
        raise RuntimeError(f"expected {new_tokens} decode steps, the clock saw {len(steps)}: did generation stop early? "
                           "Pass min_new_tokens equal to max_new_tokens.")
    return steps


def decode_ms_per_token(generate: Callable[..., object], device: torch.device, new_tokens: int, repeats: int = 1) -> float:
    """Median milliseconds per decode step over ``repeats`` generations of ``new_tokens`` timed steps each.

    ``generate(max_new_tokens, logits_processor)`` must produce exactly ``max_new_tokens`` tokens.
    """
    steps: list[float] = []
    for _ in range(repeats):
        steps += decode_step_ms(generate, device, new_tokens)
    return statistics.median(steps)


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
