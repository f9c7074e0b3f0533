"""The two streaming passes over all N elements: bucket reduction (forward) and gradient
distribution (backward).

Each element finds its bin by a binary search in registers among the E sorted edges (the
positive logits with ``min - delta`` in front for the bucketed losses, the 2P breakpoints
``s_i -/+ delta`` for the exact ones): ``key = #{edges <= s}``, bin ``key`` being
``[edges[key - 1], edges[key])``. Only relevant negatives (``y == 0`` and ``s >= edges[0]``)
take part. Offsets use int64, so N > 2^31 is safe.

- reduction: per bin, count (int64) and the sum of ``s - lower edge`` (offsets, so that large
  logits do not cancel), added with atomics, either one per element or, pre-aggregated, one
  per distinct bin of the block (the block sorted by bin, then a segmented sum); float atomics
  make the sums' round-off depend on the order. Reads 4 + 4 bytes per element (float32 logits and targets); the binary search reads
  edges that stay in cache.
- distribution: ``grad = const[key] + slope[key] * (s - lower edge)`` for relevant negatives,
  0 for everything else (positives are written afterwards from their O(P) table). Reads
  4 + 4 bytes and writes the gradient (4 bytes for float32) per element.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import fixed_point_scale
from ._config import configs, launch_chunks, size_class

_BLOCKS = configs({"BLOCK": 1024}, {"BLOCK": 2048}, {"BLOCK": 4096}, num_warps=(4, 8))


@triton.jit
def _count_edges_at_or_below(edges_ptr, num_edges, x, steps):
    """``#{edges <= x}`` for every element of x (upper bound), in ``steps = ceil(log2(E + 1))``."""
    low = tl.zeros(x.shape, dtype=tl.int32)
    high = tl.full(x.shape, num_edges, dtype=tl.int32)
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


@triton.jit
def _reduce_bins_kernel(
    s_ptr, y_ptr, edges_ptr, num_edges, steps, count_ptr, offset_sum_ptr, non_finite_ptr, start, stop, n_class,
    edges_class, fixed_scale,
    PREAGGREGATE: tl.constexpr, FIXED_POINT: tl.constexpr, BLOCK: tl.constexpr,
):
    """FIXED_POINT: offset_sum is int64 and gets round(offset * fixed_scale): exact, order-free sums.
    non_finite: set to 1 if any logit is NaN/Inf (this pass reads every logit anyway)."""
    lane = tl.arange(0, BLOCK)
    offs = start + tl.program_id(0).to(tl.int64) * BLOCK + lane
    inside = offs < stop
    s = tl.load(s_ptr + offs, mask=inside, other=0.0)
    y = tl.load(y_ptr + offs, mask=inside, other=1)
    non_finite = inside & ((s != s) | (tl.abs(s) == float("inf")))
    tl.atomic_max(non_finite_ptr, tl.max(non_finite.to(tl.int64), axis=0))
    relevant = inside & (y == 0) & (s >= tl.load(edges_ptr))
    key = _count_edges_at_or_below(edges_ptr, num_edges, s, steps)
    lower = tl.load(edges_ptr + key - 1, mask=relevant, other=0.0)
    if FIXED_POINT:
        offset = ((s - lower).to(tl.float64) * fixed_scale + 0.5).to(tl.int64)
    else:
        offset = (s - lower).to(offset_sum_ptr.dtype.element_ty)
    count = tl.full([BLOCK], 1, tl.int64)
    if PREAGGREGATE:
        # sort the block by bin and sum each run of equal bins: one atomic per bin of the block
        key = tl.where(relevant, key, num_edges + 1)
        packed = tl.sort((key.to(tl.int64) << 32) | lane.to(tl.int64), 0)
        key = (packed >> 32).to(tl.int32)
        offset = tl.gather(offset, (packed & 0xFFFFFFFF).to(tl.int32), 0)
        _, offset, count = tl.associative_scan((key, offset, count), 0, _same_bin_sum)
        next_key = tl.gather(key, tl.minimum(lane + 1, BLOCK - 1), 0)
        relevant = ((key != next_key) | (lane == BLOCK - 1)) & (key <= num_edges)
    tl.atomic_add(count_ptr + key, count, mask=relevant)
    tl.atomic_add(offset_sum_ptr + key, offset, mask=relevant)


# Pre-aggregation pays when a block's elements share few bins; the autotuner decides on the GPU.
# The interpreter runs the scan element by element, so its single config is the plain one.
_reduce_bins_tuned = triton.autotune(
    configs=configs(
        {"BLOCK": 1024, "PREAGGREGATE": False, "FIXED_POINT": False},
        {"BLOCK": 1024, "PREAGGREGATE": True, "FIXED_POINT": False},
        {"BLOCK": 2048, "PREAGGREGATE": True, "FIXED_POINT": False},
        {"BLOCK": 4096, "PREAGGREGATE": False, "FIXED_POINT": False}, num_warps=(4, 8),
    ),
    key=["n_class", "edges_class"],
    reset_to_zero=["count_ptr", "offset_sum_ptr", "non_finite_ptr"],
)(_reduce_bins_kernel)


@triton.autotune(configs=_BLOCKS, key=["n_class", "edges_class"])
@triton.jit
def _distribute_kernel(
    s_ptr, y_ptr, edges_ptr, num_edges, steps, const_ptr, slope_ptr, grad_ptr, start, stop, n_class, edges_class,
    HAS_SLOPE: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = start + tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < stop
    s = tl.load(s_ptr + offs, mask=inside, other=0.0)
    y = tl.load(y_ptr + offs, mask=inside, other=1)
    relevant = inside & (y == 0) & (s >= tl.load(edges_ptr))
    key = _count_edges_at_or_below(edges_ptr, num_edges, s, steps)
    grad = tl.load(const_ptr + key, mask=relevant, other=0.0)
    if HAS_SLOPE:
        lower = tl.load(edges_ptr + key - 1, mask=relevant, other=0.0)
        grad += tl.load(slope_ptr + key, mask=relevant, other=0.0) * (s - lower)
    tl.store(grad_ptr + offs, grad.to(grad_ptr.dtype.element_ty), mask=inside)


def _steps(num_edges: int) -> int:
    return max(1, int(num_edges).bit_length())  # ceil(log2(E + 1))


def reduce_bins(s, y, edges, preaggregate: bool | None = None, block: int = 1024, deterministic: bool = False):
    """Per key 0..E: count (int64) and sum of offsets from the bin's lower edge (s.dtype).
    Key 0 (below every edge) stays 0. ``preaggregate``: force that variant with ``block``
    elements per program (default: autotuned). ``deterministic``: int64 fixed-point offset sums,
    bit-identical across runs (costs a max over the logits). Raises ValueError for NaN/Inf logits."""
    num_edges = edges.numel()
    count = torch.zeros(num_edges + 1, dtype=torch.int64, device=s.device)
    scale = fixed_point_scale(s, edges) if deterministic else 1.0
    offset_sum = torch.zeros(num_edges + 1, dtype=torch.int64 if deterministic else s.dtype, device=s.device)
    non_finite = torch.zeros(1, dtype=torch.int64, device=s.device)
    for start, stop in launch_chunks(s.numel()):
        args = (s, y, edges, num_edges, _steps(num_edges), count, offset_sum, non_finite, start, stop,
                size_class(stop - start), size_class(num_edges), scale)
        if deterministic:
            _reduce_bins_kernel[(triton.cdiv(stop - start, block),)](
                *args, PREAGGREGATE=False, FIXED_POINT=True, BLOCK=block
            )
        elif preaggregate is None:
            _reduce_bins_tuned[lambda meta, n=stop - start: (triton.cdiv(n, meta["BLOCK"]),)](*args)
        else:
            _reduce_bins_kernel[(triton.cdiv(stop - start, block),)](
                *args, PREAGGREGATE=preaggregate, FIXED_POINT=False, BLOCK=block
            )
    if int(non_finite):
        raise ValueError("logits contain NaN or Inf; ranking losses need finite logits")
    if deterministic:
        return count, (offset_sum.double() / scale).to(s.dtype)
    return count, offset_sum


def distribute(s, y, edges, const, slope, out_dtype):
    """The gradient of every element from the per-key tables (``const``/``slope`` in s.dtype)."""
    grad = torch.empty(s.numel(), dtype=out_dtype, device=s.device)
    for start, stop in launch_chunks(s.numel()):
        grid = lambda meta, n=stop - start: (triton.cdiv(n, meta["BLOCK"]),)  # noqa: E731
        _distribute_kernel[grid](
            s, y, edges, edges.numel(), _steps(edges.numel()), const, const if slope is None else slope,
            grad, start, stop, size_class(stop - start), size_class(edges.numel()), HAS_SLOPE=slope is not None,
        )
    return grad
