"""Autotuning configurations that also work under the Triton interpreter."""

from __future__ import annotations

import os

import triton

# Read when the kernels are defined, which is when triton decides to interpret them.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def configs(default: dict, *alternatives: dict, num_warps=(4,)) -> list:
    """One config under the interpreter (multi-config autotuning needs a GPU), else all of them."""
    if INTERPRET:
        return [triton.Config(default, num_warps=num_warps[0])]
    return [triton.Config(kw, num_warps=w) for kw in (default, *alternatives) for w in num_warps]


# Elements per launch of a streaming kernel: longer tensors are launched in chunks, so that grid
# sizes and per-launch counts stay far from 2^31 (offsets inside the kernels are int64 anyway).
MAX_ELEMENTS_PER_LAUNCH = 1 << 30


def launch_chunks(n: int):
    """``(start, stop)`` element ranges of at most MAX_ELEMENTS_PER_LAUNCH covering ``range(n)``."""
    step = MAX_ELEMENTS_PER_LAUNCH
    return [(start, min(start + step, n)) for start in range(0, n, step)]


def size_class(n: int) -> int:
    """Autotuning key for a size: its power of two, so that sizes that change every call (RoIs
    after NMS, say) do not trigger a new tuning run each time."""
    return max(int(n), 1).bit_length()


def next_power_of_2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))
