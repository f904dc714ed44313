"""The CPU we run on: its model and the instruction sets that decide which engine is fastest.

Engines pick their kernels from these flags (AVX-512 VNNI for int8, AVX512_BF16 or AMX for
bf16), so the same net ranks differently on two machines. `runtime: auto` keys its cached
choice on them, and every benchmark table states them, so no sentence about "this CPU" is
written by hand.
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

# The flags that change which kernels engines use, in the order a reader expects them.
FLAGS_THAT_MATTER = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo ({} where there is none: not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def model() -> str:
    """The CPU's model name ("AMD EPYC 9454P 48-Core Processor")."""
    return _cpuinfo().get("model name") or platform.processor() or "unknown CPU"


def flags() -> list[str]:
    """Those of FLAGS_THAT_MATTER this CPU has."""
    have = set(_cpuinfo().get("flags", "").split())
    return [flag for flag in FLAGS_THAT_MATTER if flag in have]


def has(*wanted: str) -> bool:
    """Whether the CPU has any of `wanted` (flag names as /proc/cpuinfo spells them)."""
    return any(flag in set(_cpuinfo().get("flags", "").split()) for flag in wanted)


def has_bf16() -> bool:
    """bf16 arithmetic in hardware (AVX512_BF16 or AMX); without it bf16 is emulated and slow."""
    return has("avx512_bf16", "amx_bf16")


def has_vnni() -> bool:
    """Fast, non-saturating int8 dot products (AVX-512 VNNI or AVX-VNNI)."""
    return has("avx512_vnni", "avx_vnni")


def cores() -> int:
    """The cores this process may run on (its affinity, which a container may narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def describe() -> str:
    """One line for a benchmark table or a log: model, cores we may use, the flags that matter."""
    return f"{model()} ({cores()} cores; {' '.join(flags()) or 'none of ' + ', '.join(FLAGS_THAT_MATTER)})"
