"""Host-side helpers shared by every backend: settings, dtypes, sorting, flattening."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Settings:
    """How a loss is run, beyond what it computes.

    ``process_group``: rank the union of all ranks' elements (see ``_distributed``).
    ``deterministic``: bit-identical results across runs (no order-dependent float atomics).
    ``allow_targets_above_one``: accept quality targets > 1 (refused by default: class indices
    passed by mistake look like them).
    ``validate``: raise for bad values (NaN/Inf, targets above one, logits too far apart), which
    the Triton backend finds on the device and the host reads once per call. ``False``: no host
    sync at all; a call with bad values returns NaN losses and gradients instead.
    """

    process_group: object = None
    deterministic: bool = False
    allow_targets_above_one: bool = False
    validate: bool = True


# Devices without float64 tensors (Apple MPS): the torch backend keeps its O(P + E) tables in
# float32 there, with float32 round-off, instead of refusing to run.
NO_FLOAT64_DEVICES = {"mps"}


def wide_dtype(device) -> torch.dtype:
    """The dtype of the loss's small tables (per positive, per bin): float64 where the device has it."""
    return torch.float32 if torch.device(device).type in NO_FLOAT64_DEVICES else torch.float64


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16/bfloat16 are upcast; float32 and float64 are kept."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# From this many values on, a CPU sort of floats is faster as a sort of their bit patterns: torch
# sorts integers by radix and floats by merging (2x faster for float64 at 10^5 values, 6x for float32).
RADIX_SORT_FROM = 1 << 14
_SIGNED_BITS = {torch.float32: (torch.int32, 31), torch.float64: (torch.int64, 63)}


def stable_sort(x: torch.Tensor, descending: bool = False):
    """``torch.sort(x, stable=True, descending=descending)`` of a 1-D tensor of finite values:
    ``(values, indices)``, ties in their order in ``x``."""
    if x.device.type != "cpu" or x.dtype not in _SIGNED_BITS or x.numel() < RADIX_SORT_FROM:
        return torch.sort(x, stable=True, descending=descending)
    int_dtype, sign = _SIGNED_BITS[x.dtype]
    # + 0.0 turns -0.0 into +0.0, which it ties with; flipping the magnitude bits of negatives then
    # orders the bit patterns, read as signed integers, like the floats
    bits = ((-x if descending else x) + 0.0).view(int_dtype)
    key = bits ^ ((bits >> sign) & torch.iinfo(int_dtype).max)
    order = torch.sort(key, stable=True).indices
    return x.index_select(0, order), order


def flat_inputs(logits: torch.Tensor, targets: torch.Tensor):
    """Flatten to 1-D: logits in the compute dtype, targets as they are (any real dtype)."""
    s = logits.detach().reshape(-1).to(compute_dtype(logits.dtype))
    y = targets.detach().reshape(-1)
    if y.dtype == torch.bool:
        y = y.to(torch.uint8)
    return s, y


def read_host(tensor: torch.Tensor) -> list:
    """``tensor.tolist()``: the host waits for the device. Counted as the host read it is when the
    kernels' launch recorder is loaded (``kernels._config.read_host``; without Triton nothing
    records)."""
    config = sys.modules.get("brl_triton.kernels._config")
    return tensor.tolist() if config is None else config.read_host(tensor)
