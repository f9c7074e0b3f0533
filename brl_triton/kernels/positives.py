"""Positives: one pass over the N targets compacts the positions of the positives and checks
that float targets are finite; then the p positive logits are argsorted, in one program with
``tl.sort`` when they fit a block.

Memory traffic of the pass: reads the target of every element (4 bytes for float32 targets),
writes 8 bytes per positive. The logits are not streamed here: the reduction pass checks them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import configs, launch_chunks, next_power_of_2, size_class

SORT_IN_ONE_PROGRAM_MAX = 4096
MIN_CAPACITY = 4096  # room for positive positions in the first compaction pass, at least


@triton.autotune(
    configs=configs({"BLOCK": 1024}, {"BLOCK": 2048}, {"BLOCK": 4096}, num_warps=(4, 8)), key=["n_class"]
)
@triton.jit
def _compact_positives_kernel(
    y_ptr, pos_index_ptr, status_ptr, start, stop, capacity, n_class,
    TARGETS_FLOAT: tl.constexpr, BLOCK: tl.constexpr,
):
    """status[0]: positives found (atomic slot counter); status[1]: 1 if a target is NaN/Inf."""
    offs = start + tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < stop
    y = tl.load(y_ptr + offs, mask=inside, other=0)
    if TARGETS_FLOAT:
        bad_target = inside & ((y != y) | (tl.abs(y) == float("inf")))
        tl.atomic_max(status_ptr + 1, tl.max(bad_target.to(tl.int64), axis=0))
    is_pos = inside & (y > 0)
    first = tl.atomic_add(status_ptr, tl.sum(is_pos.to(tl.int64), axis=0))
    slot = first + tl.cumsum(is_pos.to(tl.int64), axis=0) - 1
    tl.store(pos_index_ptr + slot, offs, mask=is_pos & (slot < capacity))


@triton.jit
def _argsort_positives_kernel(s_ptr, pos_index_ptr, sorted_index_ptr, p, BLOCK: tl.constexpr):
    """Sort p <= BLOCK float32 logits ascending: key = order-preserving int of the float in the
    high 32 bits, flat index in the low 32 bits (ties by index, so the order is deterministic)."""
    offs = tl.arange(0, BLOCK)
    inside = offs < p
    index = tl.load(pos_index_ptr + offs, mask=inside, other=0)
    s = tl.load(s_ptr + index, mask=inside, other=0.0)
    bits = tl.where(s == 0, 0.0, s).to(tl.int32, bitcast=True)  # -0.0 ties with +0.0
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    packed = (ordered.to(tl.int64) << 32) | index
    packed = tl.where(inside, packed, 0x7FFFFFFFFFFFFFFF)
    packed = tl.sort(packed, 0)
    tl.store(sorted_index_ptr + offs, packed & 0xFFFFFFFF, mask=inside)


def _compact(s: torch.Tensor, y: torch.Tensor, capacity: int):
    pos_index = torch.empty(capacity, dtype=torch.int64, device=s.device)
    status = torch.zeros(2, dtype=torch.int64, device=s.device)
    for start, stop in launch_chunks(s.numel()):
        grid = lambda meta, n=stop - start: (triton.cdiv(n, meta["BLOCK"]),)  # noqa: E731
        _compact_positives_kernel[grid](
            y, pos_index, status, start, stop, capacity, size_class(stop - start), TARGETS_FLOAT=y.is_floating_point()
        )
    found, flags = status.tolist()
    return pos_index, found, flags


def sorted_positives(s: torch.Tensor, y: torch.Tensor):
    """Flat positions of the positives (``y > 0``) in ascending logit order (ties by position).

    Raises ValueError for NaN/Inf in float targets (the logits are checked by the reduction).
    """
    if s.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=s.device)
    # room for 1/64 of the elements; a second pass only when there are more positives
    capacity = min(s.numel(), max(MIN_CAPACITY, s.numel() // 64))
    pos_index, found, flags = _compact(s, y, capacity)
    if flags:
        raise ValueError("targets contain NaN or Inf; use >0 (positive), 0 (negative) or <0 (ignored)")
    if found > capacity:
        pos_index, found, _ = _compact(s, y, found)
    pos_index = pos_index[:found]
    if found <= SORT_IN_ONE_PROGRAM_MAX and s.dtype == torch.float32 and s.numel() < 2**31:
        sorted_index = torch.empty_like(pos_index)
        _argsort_positives_kernel[(1,)](s, pos_index, sorted_index, found, BLOCK=next_power_of_2(found))
        return sorted_index
    pos_index = torch.sort(pos_index).values  # ties by position, as in the one-program sort
    return pos_index[torch.sort(s[pos_index], stable=True).indices]
