"""The two streaming passes over all N elements: bin reduction (forward) and gradient
distribution (backward).

Each element finds its bin by a binary search in registers among the E sorted edges:
``key = #{edges <= s}``, bin ``key`` being ``[edges[key - 1], edges[key])``. Only relevant
negatives (``y == 0`` and ``s >= edges[0]``) take part. Offsets are int64, so N > 2^31 is safe.

- reduction: reads logits and targets (4 + 4 bytes per element for float32), checks that every
  logit is finite, keeps the largest and smallest (for the host's range check), and adds per bin the count (int64) and the sum of ``s - lower edge`` (offsets,
  so that large logits do not cancel) with relaxed atomics: one per element, or, pre-aggregated,
  one per distinct bin of the block (the block sorted by bin, then a segmented sum). Float atomics
  make the sums' round-off order-dependent; deterministic mode adds int64 fixed point instead.
  The edge count comes from the device (``prepare`` wrote it), so no host sync precedes it.
- distribution: ``grad = g_rank * (const[key] + slope[key] * (s - lower edge))`` for relevant
  negatives, 0 for ignored and irrelevant elements; extra programs of the same launch write the
  positives' gradient from their O(p) table. Reads 4 + 4 bytes, writes 4 bytes per element.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _math as m
from ._config import Tunable, launch, launch_chunks, size_class
from ._layout import load_elements

DISTRIBUTE_BLOCK, DISTRIBUTE_WARPS = 1024, 4


@triton.jit
def _count_edges_at_or_below(edges_ptr, num_edges, x):
    """``#{edges <= x}`` for every element of x: binary search of floor(log2 E) + 1 steps."""
    steps = (num_edges.to(tl.float32).to(tl.int32, bitcast=True) >> 23) - 126  # 0 edges: no step
    low = tl.zeros(x.shape, dtype=tl.int32)
    high = tl.zeros(x.shape, dtype=tl.int32) + num_edges.to(tl.int32)
    for _ in range(steps):
        active = low < high
        mid = (low + high) // 2
        edge = tl.load(edges_ptr + mid, mask=active, other=0.0)
        right = active & (edge <= x)
        low = tl.where(right, mid + 1, low)
        high = tl.where(active & (edge > x), mid, high)
    return low


@triton.jit
def _same_bin_sum(key_a, offset_a, count_a, key_b, offset_b, count_b):
    """Segmented-sum combine over keys sorted within the block (associative for sorted keys)."""
    same = key_a == key_b
    return key_b, tl.where(same, offset_a + offset_b, offset_b), tl.where(same, count_a + count_b, count_b)


# ``start`` is specialized (16-divisible or not; chunks start at multiples of 2^30), so that whole
# blocks of contiguous tensors compile to vector loads; the other integers vary from call to call.
@triton.jit(do_not_specialize=["stop", "n_total", "n_class"])
def _reduce_kernel(
    s_ptr, s_d1, s_d2, s_st0, s_st1, s_st2, y_ptr, y_d1, y_d2, y_st0, y_st1, y_st2,
    edges_ptr, status_ptr, count_ptr, offset_sum_ptr, start, stop, n_total, n_class,
    S_NDIM: tl.constexpr, Y_NDIM: tl.constexpr, PREAGGREGATE_UP_TO: tl.constexpr, FIXED_POINT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """FIXED_POINT: offset_sum is int64 and gets round(offset * scale), exact in any order.
    PREAGGREGATE_UP_TO: a call with at most this many edges pre-aggregates each block (0: never).
    ``n_class``: the autotuning key (power of two of the chunk length), unused here."""
    lane = tl.arange(0, BLOCK)
    offs = start + tl.program_id(0).to(tl.int64) * BLOCK + lane
    inside = offs < stop
    whole_block = start + (tl.program_id(0).to(tl.int64) + 1) * BLOCK <= stop
    s = load_elements(s_ptr, offs, s_d1, s_d2, s_st0, s_st1, s_st2, S_NDIM, inside, whole_block, 0.0)
    s = m.upcast(s, edges_ptr.dtype.element_ty)
    finite = (s == s) & (tl.abs(s) != float("inf"))
    bad = tl.max((inside & ~finite).to(tl.int32), axis=0)
    tl.atomic_max(status_ptr + m.STATUS_BAD_LOGITS, bad.to(tl.int64), mask=bad > 0, sem="relaxed")
    # the logits' range, which the host checks against the compute dtype (overflowing differences)
    largest = tl.max(tl.where(inside & finite, s, -float("inf")), axis=0)
    smallest_negated = tl.max(tl.where(inside & finite, -s, -float("inf")), axis=0)
    tl.atomic_max(status_ptr + m.STATUS_LARGEST, m.max_negative_code(largest), mask=largest > -float("inf"),
                  sem="relaxed")
    tl.atomic_max(status_ptr + m.STATUS_LARGEST_NEGATED, m.max_negative_code(smallest_negated),
                  mask=smallest_negated > -float("inf"), sem="relaxed")
    num_edges = tl.load(status_ptr + m.STATUS_NUM_EDGES)
    if num_edges > 0:
        y = load_elements(y_ptr, offs, y_d1, y_d2, y_st0, y_st1, y_st2, Y_NDIM, inside, whole_block, 1)
        relevant = inside & (y == 0) & (s >= tl.load(edges_ptr))
        key = _count_edges_at_or_below(edges_ptr, num_edges, s)
        lower = tl.load(edges_ptr + key - 1, mask=relevant, other=0.0)
        if FIXED_POINT:
            scale = m.offset_scale(status_ptr, edges_ptr, n_total)
            offset = tl.floor((s - lower).to(tl.float64) * scale + 0.5).to(tl.int64)
        else:
            offset = (s - lower).to(offset_sum_ptr.dtype.element_ty)
        count = tl.full([BLOCK], 1, tl.int64)
        if PREAGGREGATE_UP_TO > 0:
            if num_edges <= PREAGGREGATE_UP_TO:
                # few bins, so many elements of the block share one: sort the block by bin and sum
                # each run of equal bins, one atomic per bin of the block instead of per element
                key = tl.where(relevant, key, num_edges.to(tl.int32) + 1)
                packed = tl.sort((key.to(tl.int64) << 32) | lane.to(tl.int64), 0)
                key = (packed >> 32).to(tl.int32)
                offset = tl.gather(offset, (packed & 0xFFFFFFFF).to(tl.int32), 0)
                _, offset, count = tl.associative_scan((key, offset, count), 0, _same_bin_sum)
                next_key = tl.gather(key, tl.minimum(lane + 1, BLOCK - 1), 0)
                relevant = ((key != next_key) | (lane == BLOCK - 1)) & (key <= num_edges)
        tl.atomic_add(count_ptr + key, count, mask=relevant, sem="relaxed")
        tl.atomic_add(offset_sum_ptr + key, offset, mask=relevant, sem="relaxed")


# Pre-aggregation pays when a block's elements share few bins: with E bins, the elements of a
# block contend for E addresses. The default pre-aggregates calls of at most PREAGGREGATE_BINS
# edges (an estimate until a GPU measures it: gpu_check's reduction step); with BRL_AUTOTUNE=1
# the GPU decides. 8 warps: the float64 block sort of 4 warps spills on sm_86 and sm_89.
PREAGGREGATE_BINS = 256
ALWAYS = 1 << 40  # more edges than any call has
_NEVER = triton.Config({"BLOCK": 1024, "PREAGGREGATE_UP_TO": 0}, num_warps=4, num_stages=2)
REDUCE = Tunable(
    _reduce_kernel,
    triton.Config({"BLOCK": 1024, "PREAGGREGATE_UP_TO": PREAGGREGATE_BINS}, num_warps=8, num_stages=2),
    [_NEVER,
     triton.Config({"BLOCK": 2048, "PREAGGREGATE_UP_TO": ALWAYS}, num_warps=8, num_stages=2),
     triton.Config({"BLOCK": 4096, "PREAGGREGATE_UP_TO": 0}, num_warps=16, num_stages=2)],
    key=["n_class", "S_NDIM", "Y_NDIM", "FIXED_POINT"],  # the size class and every variant flag
    restore=["status_ptr", "count_ptr", "offset_sum_ptr"],
    # the interpreter sorts a block in seconds: under it the default is the per-element config
    interpreted=_NEVER,
)


@triton.jit(do_not_specialize=["p_bound", "stop", "stream_programs", "scatter_programs"])  # start: as reduce
def _distribute_kernel(
    s_ptr, s_d1, s_d2, s_st0, s_st1, s_st2, y_ptr, y_d1, y_d2, y_st0, y_st1, y_st2,
    edges_ptr, status_ptr, const_ptr, slope_ptr, grad_ptr, pos_index_ptr, pos_rank_grad_ptr, pos_sort_grad_ptr,
    p_bound, upstream_rank_ptr, upstream_sort_ptr, start, stop, stream_programs, scatter_programs,
    S_NDIM: tl.constexpr, Y_NDIM: tl.constexpr, HAS_SLOPE: tl.constexpr, SORTING: tl.constexpr, BLOCK: tl.constexpr,
):
    """p and the edge count come from the status words; a call whose values are bad
    (``STATUS_INVALID``, unchecked by the host) gets NaN gradients."""
    pid = tl.program_id(0)
    p, num_edges = m.positives_and_edges(status_ptr, p_bound)
    g_rank = tl.load(upstream_rank_ptr).to(tl.float64)
    invalid = tl.load(status_ptr + m.STATUS_INVALID) != 0
    g_rank = tl.where(invalid, float("nan"), g_rank)
    if pid < stream_programs:
        offs = start + pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < stop
        whole_block = start + (pid.to(tl.int64) + 1) * BLOCK <= stop
        y = load_elements(y_ptr, offs, y_d1, y_d2, y_st0, y_st1, y_st2, Y_NDIM, inside, whole_block, 1)
        s = load_elements(s_ptr, offs, s_d1, s_d2, s_st0, s_st1, s_st2, S_NDIM, inside, whole_block, 0.0)
        s = m.upcast(s, edges_ptr.dtype.element_ty)
        relevant = inside & (y == 0) & (num_edges > 0)
        relevant &= s >= tl.load(edges_ptr, mask=num_edges > 0, other=0.0)
        key = _count_edges_at_or_below(edges_ptr, num_edges, s)
        grad = (tl.load(const_ptr + key, mask=relevant, other=0.0) * g_rank).to(s.dtype)
        if HAS_SLOPE:
            lower = tl.load(edges_ptr + key - 1, mask=relevant, other=0.0)
            slope = (tl.load(slope_ptr + key, mask=relevant, other=0.0) * g_rank).to(s.dtype)
            grad += slope * (s - lower)
        # positives are left to the scatter programs: the two sets of writes are disjoint. In an
        # invalid call (NaN targets, more positives than the buffers hold) these programs write
        # every entry, NaN, and the scatter programs nothing: their positions may be unset
        tl.store(grad_ptr + offs, grad.to(grad_ptr.dtype.element_ty), mask=tl.where(invalid, inside, inside & ~(y > 0)))
    elif pid < stream_programs + scatter_programs:
        rows = (pid - stream_programs) * BLOCK + tl.arange(0, BLOCK)
        ok = rows < tl.where(invalid, 0, p)
        grad = tl.load(pos_rank_grad_ptr + rows, mask=ok, other=0.0) * g_rank
        if SORTING:
            g_sort = tl.load(upstream_sort_ptr).to(tl.float64)
            grad += tl.load(pos_sort_grad_ptr + rows, mask=ok, other=0.0) * g_sort
        index = tl.load(pos_index_ptr + rows, mask=ok, other=0)
        if grad_ptr.dtype.element_ty != tl.float64:  # float64 -> bfloat16 is not a conversion every target has
            grad = grad.to(tl.float32)
        tl.store(grad_ptr + index, grad.to(grad_ptr.dtype.element_ty), mask=ok)


def reduce(s, y, edges, status, count, offset_sum, deterministic: bool, config=None):
    """Adds every relevant negative to its bin: ``count[key] += 1``, ``offset_sum[key] += s - lower``
    (int64 fixed point when deterministic); flags non-finite logits in ``status``. With an edge
    count of 0 in the status words it only checks finiteness. ``s``, ``y``: layouts.
    ``config``: force one of ``REDUCE.configs`` (default: the heuristic one, or autotuned)."""
    n = s.tensor.numel()
    for start, stop in launch_chunks(n):
        REDUCE.launch(lambda config, n=stop - start: (triton.cdiv(n, config["BLOCK"]),),
                       s.tensor, *s.args, y.tensor, *y.args, edges, status, count, offset_sum,
                       start, stop, n, size_class(stop - start), fixed=deterministic, config=config, S_NDIM=s.ndim,
                       Y_NDIM=y.ndim, FIXED_POINT=deterministic)


def distribute(s, y, edges, status, const, slope, pos_index, pos_rank_grad, pos_sort_grad, upstream, out_dtype):
    """The flat gradient of every element, in one launch per chunk of 2^30 elements. The
    positives' programs cover ``len(pos_index)``, of which the first p (status words) are real."""
    n = s.tensor.numel()
    grad = torch.empty(n, dtype=out_dtype, device=edges.device)
    p_bound = pos_index.numel()
    for chunk, (start, stop) in enumerate(launch_chunks(n)):
        stream = triton.cdiv(stop - start, DISTRIBUTE_BLOCK)
        scatter = triton.cdiv(p_bound, DISTRIBUTE_BLOCK) if chunk == 0 else 0
        launch(_distribute_kernel, (stream + scatter,), s.tensor, *s.args, y.tensor, *y.args, edges, status,
               const, const if slope is None else slope, grad, pos_index, pos_rank_grad,
               pos_rank_grad if pos_sort_grad is None else pos_sort_grad, p_bound, upstream[0], upstream[-1], start,
               stop, stream, scatter, num_warps=DISTRIBUTE_WARPS, S_NDIM=s.ndim, Y_NDIM=y.ndim,
               HAS_SLOPE=slope is not None, SORTING=pos_sort_grad is not None, BLOCK=DISTRIBUTE_BLOCK)
    return grad
