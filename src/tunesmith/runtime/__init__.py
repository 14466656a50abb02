"""Where and how the math runs: device, bf16 autocast detection, seeding, RNG snapshots.

The package also holds what every layer uses while it works: ``threads`` (how many, and how they
wait), ``progress`` (bars or plain lines), ``stopping`` (Ctrl-C and SIGTERM as a resumable stop)
and ``commands`` (the command a hint tells the user to type). Importing it first chooses how
OpenMP's threads wait, before torch starts them (``threads.choose_wait_policy``).
"""

from __future__ import annotations

from tunesmith.runtime.threads import choose_wait_policy

choose_wait_policy()  # before torch starts OpenMP: how its threads wait when other work is running

import contextlib  # noqa: E402
import ctypes  # noqa: E402
import functools  # noqa: E402
import random  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@functools.cache
def cpu_has_bf16() -> bool:
    """True when the CPU does bf16 matrix math natively (AVX-512 BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def use_bf16(precision: str, dev: torch.device) -> bool:
    """Resolve a config's ``precision`` (auto | bf16 | fp32) for ``dev``."""
    if precision == "fp32":
        return False
    if precision == "bf16":
        return True
    if dev.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_has_bf16()


# Every answer the product gives (evaluation, the forgetting check, `generate`, `serve`, studies) is
# computed in this precision, so eval.json describes the model users get: greedy answers in bf16
# autocast differed from fp32 ones on 4 of 10 general instructions with SmolLM2-135M. Training
# keeps its own train.precision (bf16 autocast where the CPU/GPU has it).
INFERENCE_PRECISION = "fp32"
INFERENCE_BF16 = INFERENCE_PRECISION == "bf16"


@contextlib.contextmanager
def autocast(dev: torch.device, bf16: bool) -> Iterator[None]:
    """bf16 autocast for the forward pass; weights and optimizer state stay fp32."""
    with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=bf16):
        yield


@functools.cache
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    glibc keeps the memory of freed medium-sized tensors in its heap, fragmented, so a training
    process's RSS creeps up step after step. Trimming after each micro-batch cut peak RSS of
    10 LoRA steps on SmolLM2-135M from 3.79 to 3.14 GB at no measurable cost in speed.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def reset_peak_memory(dev: torch.device) -> None:
    """Start a new peak-memory window: the process's peak RSS (Linux) and the GPU's allocator peak."""
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5 = reset VmHWM to the current RSS
    except OSError:
        pass


def peak_memory_mib(dev: torch.device) -> dict[str, float]:
    """Peak process RSS since the last reset (``rss``) and, on a GPU, the allocator's peak (``gpu``)."""
    out: dict[str, float] = {}
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    out["rss"] = int(line.split()[1]) / 1024
    except OSError:
        pass
    if dev.type == "cuda":
        out["gpu"] = torch.cuda.max_memory_allocated(dev) / 2**20
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
