"""Positives: find them in one pass over the targets, then sort them and build the bin edges in
one program.

- ``scan``: reads every target (4 bytes for float32 targets), checks float targets are finite,
  reserves slots for the positives with one relaxed atomic per block and writes their flat
  positions (8 bytes per positive). Deterministic mode also reads the logits of the negatives
  for the largest one, which bounds the fixed-point offsets.
- ``prepare`` (p <= SORT_BY_RANK_MAX, float32 compute): sorts the positives by (logit,
  position) by counting ranks, writes their logits and targets in that order, the sorted bin
  edges and their number, and zeroes the bin accumulators. It reads p from the device, and so do
  the kernels after it: no launch needs the host to know p. With more positives than its
  buffers hold it leaves the edge count at 0: the host, if it reads p, takes the torch path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _math as m
from ._config import launch, launch_chunks
from ._layout import element_address, load_elements

SORT_BY_RANK_MAX = 32768
SCAN_BLOCK, SCAN_WARPS = 1024, 4
PREPARE_ROWS, PREPARE_COLS = 64, 32

EDGES_POSITIVES = 0  # delta == 0: the positive logits (bucketed and exact are one computation)
EDGES_BUCKETS = 1  # bucketed: min - delta, then the positive logits
EDGES_BREAKPOINTS = 2  # exact: the 2p kinks s_i -/+ delta, rounded up


@triton.jit(do_not_specialize=["stop", "capacity", "check_above_one"])  # start: see streaming._reduce_kernel
def _scan_kernel(
    y_ptr, y_d1, y_d2, y_st0, y_st1, y_st2, s_ptr, s_d1, s_d2, s_st0, s_st1, s_st2,
    pos_index_ptr, status_ptr, start, stop, capacity, check_above_one,
    Y_NDIM: tl.constexpr, S_NDIM: tl.constexpr, TARGETS_FLOAT: tl.constexpr, MAX_NEGATIVE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = start + tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < stop
    whole_block = start + (tl.program_id(0).to(tl.int64) + 1) * BLOCK <= stop
    y = load_elements(y_ptr, offs, y_d1, y_d2, y_st0, y_st1, y_st2, Y_NDIM, inside, whole_block, 0)
    # the worst target problem of the block: non-finite (2) over above one (1, unless allowed)
    bad = tl.max((inside & (y > 1) & (check_above_one != 0)).to(tl.int32), axis=0)
    if TARGETS_FLOAT:
        bad = tl.maximum(bad, 2 * tl.max((inside & ((y != y) | (tl.abs(y) == float("inf")))).to(tl.int32), axis=0))
    tl.atomic_max(status_ptr + m.STATUS_BAD_TARGETS, bad.to(tl.int64), mask=bad > 0, sem="relaxed")
    is_pos = inside & (y > 0)
    found = tl.sum(is_pos.to(tl.int64), axis=0)
    # slot reservation needs atomicity only; no other memory is ordered by it
    first = tl.atomic_add(status_ptr + m.STATUS_POSITIVES, found, mask=found > 0, sem="relaxed")
    slot = first + tl.cumsum(is_pos.to(tl.int64), axis=0) - 1
    tl.store(pos_index_ptr + slot, offs, mask=is_pos & (slot < capacity))
    if MAX_NEGATIVE:
        negative = inside & (y == 0)
        s = load_elements(s_ptr, offs, s_d1, s_d2, s_st0, s_st1, s_st2, S_NDIM, inside, whole_block, 0.0)
        top = tl.max(tl.where(negative, m.upcast(s, tl.float64), -float("inf")), axis=0)
        tl.atomic_max(status_ptr + m.STATUS_MAX_NEGATIVE, m.max_negative_code(top), mask=top > -float("inf"),
                      sem="relaxed")


@triton.jit
def _sort_key(index, s_ptr, s_d1, s_d2, s_st0, s_st1, s_st2, ok, S_NDIM: tl.constexpr):
    """float32 logits of the positives at ``index`` and their sort key: order-preserving bits of
    the logit, then the position (distinct keys; ties in flat order)."""
    s = tl.load(s_ptr + element_address(index, s_d1, s_d2, s_st0, s_st1, s_st2, S_NDIM), mask=ok, other=0.0)
    s = m.upcast(s, tl.float32)
    bits = tl.where(s == 0, 0.0, s).to(tl.int32, bitcast=True)  # -0.0 ties with +0.0
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return s, (ordered.to(tl.int64) << 32) | index


@triton.jit(do_not_specialize=["capacity", "accumulators", "delta_bits", "expected"])
def _prepare_kernel(
    s_ptr, s_d1, s_d2, s_st0, s_st1, s_st2, y_ptr, y_d1, y_d2, y_st0, y_st1, y_st2,
    pos_index_ptr, status_ptr, s_pos_ptr, y_pos_ptr, sorted_index_ptr, edges_ptr, count_ptr, offset_sum_ptr,
    regression_ptr, l_pos_ptr, flat_rank_ptr, capacity, accumulators, delta_bits, expected,
    S_NDIM: tl.constexpr, Y_NDIM: tl.constexpr, EDGES: tl.constexpr, REGRESSION: tl.constexpr, ROWS: tl.constexpr,
    COLS: tl.constexpr,
):
    """Sort by rank: each program counts, for its block of positives, the keys below theirs and
    writes them to that position (O(p^2) compares spread over the grid, no sorting network to
    compile). The exact losses' 2p breakpoints are merged the same way: a kink's position is the
    number of kinks of its own kind below it plus the number of the other kind below (low kinks
    go first on equal values).

    aLRP (``REGRESSION``): a positive's flat rank (the positives below it in flat order) is
    counted the same way; it places the positive's regression loss (``regression_ptr`` holds
    ``expected`` of them, in flat order) in sorted order. A count other than ``expected``, or a
    regression loss that is NaN, infinite or negative, marks the call invalid."""
    pid = tl.program_id(0)
    # 2 bins per positive; the last program also zeroes the two past the last positive. The
    # programs' slices do not overlap: on a GPU no byte of a launch has two writers.
    slice_start = pid * 2 * ROWS
    zeros = slice_start + tl.arange(0, 4 * ROWS)
    own = (zeros < slice_start + 2 * ROWS) | (pid == tl.num_programs(0) - 1)
    tl.store(count_ptr + zeros, tl.zeros([4 * ROWS], count_ptr.dtype.element_ty), mask=own & (zeros < accumulators))
    tl.store(offset_sum_ptr + zeros, tl.zeros([4 * ROWS], offset_sum_ptr.dtype.element_ty),
             mask=own & (zeros < accumulators))
    p = tl.load(status_ptr + m.STATUS_POSITIVES)
    if REGRESSION:
        tl.store(status_ptr + m.STATUS_INVALID, 1, mask=(pid == 0) & (p != expected))
    rows = pid * ROWS + tl.arange(0, ROWS)
    if (p <= capacity) & (pid * ROWS < p):
        row_ok = rows < p
        index = tl.load(pos_index_ptr + rows, mask=row_ok, other=0)
        s, key = _sort_key(index, s_ptr, s_d1, s_d2, s_st0, s_st1, s_st2, row_ok, S_NDIM)
        delta = m.bits_to_float64(delta_bits).to(tl.float32)
        low = m.rounded_up_sum(s, -delta)
        high = m.rounded_up_sum(s, delta)
        rank = tl.zeros([ROWS], dtype=tl.int32)
        low_rank = tl.zeros([ROWS], dtype=tl.int32)
        high_rank = tl.zeros([ROWS], dtype=tl.int32)
        flat_rank = tl.zeros([ROWS], dtype=tl.int32)
        for start in range(0, p, COLS):
            cols = start + tl.arange(0, COLS)
            col_ok = cols < p
            index_k = tl.load(pos_index_ptr + cols, mask=col_ok, other=0)
            s_k, key_k = _sort_key(index_k, s_ptr, s_d1, s_d2, s_st0, s_st1, s_st2, col_ok, S_NDIM)
            below = col_ok[None, :] & (key_k[None, :] < key[:, None])
            rank += tl.sum(below.to(tl.int32), axis=1)
            if REGRESSION:
                flat_rank += tl.sum((col_ok[None, :] & (index_k[None, :] < index[:, None])).to(tl.int32), axis=1)
            if EDGES == 2:
                low_k = m.rounded_up_sum(s_k, -delta)[None, :]
                high_k = m.rounded_up_sum(s_k, delta)[None, :]
                low_below = (low_k < low[:, None]) | ((low_k == low[:, None]) & below)
                high_below = (high_k < high[:, None]) | ((high_k == high[:, None]) & below)
                low_rank += tl.sum((col_ok[None, :] & low_below).to(tl.int32)
                                   + (col_ok[None, :] & (high_k < low[:, None])).to(tl.int32), axis=1)
                high_rank += tl.sum((col_ok[None, :] & high_below).to(tl.int32)
                                    + (col_ok[None, :] & (low_k <= high[:, None])).to(tl.int32), axis=1)
        y = tl.load(y_ptr + element_address(index, y_d1, y_d2, y_st0, y_st1, y_st2, Y_NDIM), mask=row_ok, other=0)
        tl.store(sorted_index_ptr + rank, index, mask=row_ok)
        tl.store(s_pos_ptr + rank, s, mask=row_ok)
        tl.store(y_pos_ptr + rank, y.to(tl.float64), mask=row_ok)
        if REGRESSION:
            placed = row_ok & (flat_rank < expected)
            loss = tl.load(regression_ptr + flat_rank, mask=placed, other=0.0).to(tl.float64)
            bad = placed & ~((loss >= 0) & (loss < float("inf")))  # NaN fails both
            tl.store(status_ptr + m.STATUS_INVALID, 1, mask=tl.max(bad.to(tl.int32), axis=0) > 0)
            tl.store(l_pos_ptr + rank, loss, mask=row_ok)
            tl.store(flat_rank_ptr + rank, flat_rank.to(tl.int64), mask=row_ok)
        if EDGES == 0:
            tl.store(edges_ptr + rank, s, mask=row_ok)
            num_edges = p
        elif EDGES == 1:
            tl.store(edges_ptr + 1 + rank, s, mask=row_ok)
            tl.store(edges_ptr + rank, low, mask=row_ok & (rank == 0))  # min - delta in front
            num_edges = p + 1
        else:
            tl.store(edges_ptr + low_rank, low, mask=row_ok)
            tl.store(edges_ptr + high_rank, high, mask=row_ok)
            num_edges = 2 * p
        tl.store(status_ptr + m.STATUS_NUM_EDGES, num_edges, mask=pid == 0)


def edges_kind(delta: float, bucketed: bool) -> int:
    if delta == 0:
        return EDGES_POSITIVES
    return EDGES_BUCKETS if bucketed else EDGES_BREAKPOINTS


def scan(s, y, status, capacity: int, max_negative: bool, check_above_one: bool = True) -> torch.Tensor:
    """Positions of the first ``capacity`` positives found (unordered); counts all of them in
    ``status``, and flags targets there: 2 for NaN/Inf, 1 for a value above one
    (``check_above_one``). ``s``, ``y``: :class:`~._layout.Layout`."""
    pos_index = torch.empty(max(capacity, 1), dtype=torch.int64, device=status.device)
    n = s.tensor.numel()
    for start, stop in launch_chunks(n):
        launch(_scan_kernel, (triton.cdiv(stop - start, SCAN_BLOCK),), y.tensor, *y.args, s.tensor, *s.args,
               pos_index, status, start, stop, capacity, int(check_above_one), num_warps=SCAN_WARPS, Y_NDIM=y.ndim, S_NDIM=s.ndim,
               TARGETS_FLOAT=y.tensor.is_floating_point(), MAX_NEGATIVE=max_negative, BLOCK=SCAN_BLOCK)
    return pos_index


def prepare(s, y, pos_index, status, delta: float, edges: int, offset_dtype, regression=None):
    """Sorted positives and bin edges for up to ``len(pos_index)`` positives.

    Returns buffers sized for that many: (s_pos, y_pos, sorted_index, edges, count, offset_sum,
    l_pos, flat_rank), of which the first p and E (the status words) are written; the host trims
    them only if it read p (``validate``). ``regression``: aLRP's regression losses, one per
    positive in flat order (contiguous, any float dtype), or None; then ``l_pos`` (float64) holds
    them in sorted order and ``flat_rank`` each sorted positive's place in flat order (else both
    None)."""
    capacity = pos_index.numel()
    device = pos_index.device
    s_pos = torch.empty(capacity, dtype=torch.float32, device=device)
    y_pos = torch.empty(capacity, dtype=torch.float64, device=device)
    sorted_index = torch.empty(capacity, dtype=torch.int64, device=device)
    edge_buffer = torch.empty(2 * capacity, dtype=torch.float32, device=device)
    count = torch.empty(2 * capacity + 2, dtype=torch.int64, device=device)
    offset_sum = torch.empty(2 * capacity + 2, dtype=offset_dtype, device=device)
    l_pos = flat_rank = None
    if regression is not None:
        l_pos = torch.empty(capacity, dtype=torch.float64, device=device)
        flat_rank = torch.empty(capacity, dtype=torch.int64, device=device)
    launch(_prepare_kernel, (triton.cdiv(capacity, PREPARE_ROWS),), s.tensor, *s.args, y.tensor, *y.args, pos_index,
           status, s_pos, y_pos, sorted_index, edge_buffer, count, offset_sum,
           y_pos if regression is None else regression, y_pos if l_pos is None else l_pos,
           sorted_index if flat_rank is None else flat_rank, capacity, count.numel(), m.float_bits(delta),
           -1 if regression is None else regression.numel(), num_warps=4, S_NDIM=s.ndim, Y_NDIM=y.ndim,
           EDGES=edges, REGRESSION=regression is not None, ROWS=PREPARE_ROWS, COLS=PREPARE_COLS)
    return s_pos, y_pos, sorted_index, edge_buffer, count, offset_sum, l_pos, flat_rank
