"""What this machine does fast: bf16 matrix products need AMX or AVX512-BF16 on a CPU.

Without them (Ice Lake and older Xeons, most laptops) oneDNN emulates bf16 and it runs
slower than fp32, so asking for bf16 there costs speed instead of saving it.
"""
from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def fast_bf16(device: torch.device, flags: frozenset[str] | None = None) -> bool:
    flags = cpu_flags() if flags is None else flags
    # Unknown flags (no /proc/cpuinfo): give no warning rather than a wrong one.
    return device.type != "cpu" or not flags or any(f in flags for f in BF16_CPU_FLAGS)


@functools.cache
def _warn_once(what: str) -> None:
    warnings.warn(f"{what} asks for bf16, but this CPU has neither AMX nor AVX512-BF16: bf16 matrix "
                  "products run slower than fp32 here. Use fp32 (the default) on this machine.", stacklevel=3)


def check_bf16(precision: str, device: torch.device, what: str) -> None:
    """Say once per process (and per `what`) that bf16 is slow here, when it is."""
    if precision == "bf16" and not fast_bf16(device):
        _warn_once(what)
