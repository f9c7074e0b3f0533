"""The bin rules every backend shares: where the edges are, how kinks are rounded, where H is
evaluated for a bin, and the fixed-point scale of deterministic offset sums.

Bins lie between consecutive sorted edges; a logit's key is ``#{edges <= s}``, and key 0 is
"no bin": positives, ignored elements and negatives below the first edge (irrelevant ones).
The Triton kernels (``kernels/positives.py``, ``kernels/_math.py``) build the same edges with
the same rounding on the device.
"""

from __future__ import annotations

import math

import torch

from ._common import stable_sort

NO_BIN = 0  # the key of everything that is not a relevant negative


def rounded_up_sum(a: torch.Tensor, b: float) -> torch.Tensor:
    """The smallest value of a's dtype that is >= the exact sum a + b (TwoSum gives the exact
    rounding error of ``a + b``)."""
    total = a + b
    b_part = total - a
    error = (a - (total - b_part)) + (b - b_part)
    return torch.where(error > 0, torch.nextafter(total, torch.full_like(total, float("inf"))), total)


def breakpoints(s_pos: torch.Tensor, delta: float):
    """The kinks ``s_i - delta`` and ``s_i + delta`` of H(. - s_i), each rounded up to a
    representable value, so that no bin holds values on both sides of a kink. When delta is
    below the spacing of the logits, ``[s_i, next float)`` is the bin of the ties, where H = 1/2."""
    return rounded_up_sum(s_pos, -delta), rounded_up_sum(s_pos, delta)


def bin_edges(s_pos: torch.Tensor, delta: float, spec) -> torch.Tensor:
    """Sorted bin edges for ascending positives ``s_pos``: the positives with ``min - delta`` in
    front (bucketed), the 2p breakpoints (exact), or the positives alone when ``delta == 0``,
    where bucketed and exact are the same computation (Theorem 4.1)."""
    if delta == 0:
        return s_pos
    if spec.bucketed:
        return torch.cat([rounded_up_sum(s_pos[:1], -delta), s_pos])
    return stable_sort(torch.cat(breakpoints(s_pos, delta)))[0]


def bin_values(lower: torch.Tensor, offset_sum: torch.Tensor, count: torch.Tensor, delta: float) -> torch.Tensor:
    """Where H is evaluated for a bin, so that ``count * H(value - s_i)`` is the bin's share of FP(i).

    delta > 0: the mean. For a bucket that is the paper's prototype; for a breakpoint bin H is
    affine on the whole bin, so H at the mean times the count is the exact sum over its members.
    delta == 0: the lower edge, so that a bin tied with a positive counts as above it, exactly.
    """
    return lower + offset_sum / count if delta > 0 else lower


def fixed_point_scale(s: torch.Tensor, edges: torch.Tensor) -> float:
    """Power of two that turns offsets from a bin's lower edge into int64 such that the sum of all
    ``s.numel()`` of them cannot overflow: integer sums are exact whatever their order, which is
    how deterministic mode sums offsets without order-dependent float atomics."""
    widths = edges[1:] - edges[:-1] if edges.numel() > 1 else edges.new_zeros(1)
    top = (s.max() - edges[-1]).clamp(min=0)  # the bin above every edge is open-ended
    largest = max(float(widths.max()), float(top), 1e-30)
    if not math.isfinite(largest):
        return 1.0  # non-finite logits: the reduction pass reports them
    exponent = 62 - math.ceil(math.log2(max(s.numel(), 1) * largest))
    return 2.0 ** max(min(exponent, 1000), -1000)
