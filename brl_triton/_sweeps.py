"""Sums of the step function over sorted values in O((n + q) log n): no pairwise tiles.

Every positive term and per-bin gradient of the losses is a sum ``sum_k w_k H(u_k - q)`` (or
``H(q - u_k)``) over sorted values ``u`` (positives or bins) for many queries ``q``, sometimes
restricted to the ``k`` whose target beats the query's. In the scaled logits ``u = s / (2 delta)``
the step is ``H(x) = clamp(x + 1/2, 0, 1)``: 1 above the window ``[q - 1/2, q + 1/2)``, 0 below
it, and affine inside. So each sum is a few range sums over the sorted values, read off
prefix sums after one ``searchsorted`` per window edge. With ``delta == 0`` the step is
``[x >= 0]``, the tiles' convention.

Range sums of ``w_k u_k`` would cancel catastrophically (logits of 1e30 next to ones of 1, or
just a long prefix next to a narrow window). The window is therefore split at the integer ``m``
it contains, and each member enters as ``w_k frac(u_k)`` plus ``w_k`` times a per-part
constant: everything summed is bounded by the weights, so the error is a few ulps of the
weights' total, whatever the logits.

The target restriction makes it two-dimensional: ``sum over k with pi_k < A`` (``pi``: a
position in target order). :func:`dominance_sums` answers those for all queries at once with
a wavelet matrix over ``pi``, built and queried level by level: O((n + q) log n) time,
O((n + q) c) memory, about 15 tensor ops per level and no Python loop over elements.
"""

from __future__ import annotations

import torch

from ._common import read_host
from ._edges import rounded_up_sum

# Rows of prefix sums gathered at once in the wavelet walk: 8 MiB at four float64 columns
WALK_BLOCK = 1 << 18


class Windows:
    """Where the window of each query ``q`` lies among ascending ``u``.

    ``delta > 0`` (``smooth``): ranks ``lo <= mid <= hi`` (``#{u_k < edge}``) of the exact edges
    ``q - 1/2``, ``m`` and ``q + 1/2`` (``m``: the integer in ``(q - 1/2, q + 1/2]``), and
    ``H(u_k - q) = frac(u_k) + left`` on ``[lo, mid)``, ``frac(u_k) + right`` on ``[mid, hi)``.
    Members at exactly ``q - 1/2`` have H = 0 and those at ``q + 1/2`` have H = 1, so which side
    the edges fall on does not matter; ties (``u_k == q``) are inside even where ``q`` is too
    large for ``q + 1/2`` to be a different float, and get H = 1/2.

    ``delta == 0``: ``lo`` = ``#{u_k < q}`` and ``hi`` = ``#{u_k <= q}``.
    """

    def __init__(self, u: torch.Tensor, q: torch.Tensor, smooth: bool):
        self.smooth = smooth
        if not smooth:
            self.lo = torch.searchsorted(u, q)
            self.hi = torch.searchsorted(u, q, right=True)
            return
        whole = torch.floor(q)
        m = whole + (q - whole >= 0.5).to(q.dtype)
        self.lo = torch.searchsorted(u, rounded_up_sum(q, -0.5))
        self.mid = torch.searchsorted(u, m)
        self.hi = torch.searchsorted(u, rounded_up_sum(q, 0.5))
        offset = m - q
        self.left, self.right = offset - 0.5, offset + 0.5

    def ranges(self, upward: bool) -> list:
        """The rank ranges ``(start, end)`` (``None``: the first / past the last) whose sums
        :meth:`combine` needs: the window's two parts, then everything above it (``upward``,
        for ``H(u_k - q)``) or everything up to its top (for ``H(q - u_k)``)."""
        if not self.smooth:
            return [(self.lo, None)] if upward else [(None, self.hi)]
        return [(self.lo, self.mid), (self.mid, self.hi), (self.hi, None) if upward else (None, self.hi)]

    def combine(self, sums: list, c: int, upward: bool) -> torch.Tensor:
        """From the (q, 2c) sums of ``[w, w * frac(u)]`` over :meth:`ranges`: per query
        ``sum_k w_k H(u_k - q)`` (``upward``) or ``sum_k w_k H(q - u_k)`` (inside the window
        ``1 - H(u_k - q)``), (q, c)."""
        if not self.smooth:
            return sums[0][:, :c]
        left, right, rest = sums
        inside = left[:, c:] + right[:, c:] + left[:, :c] * self.left[:, None] + right[:, :c] * self.right[:, None]
        return rest[:, :c] + inside if upward else rest[:, :c] - inside


def with_fractions(u: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(n, 2c): the weights, then the weights times ``frac(u)`` (exact, in [0, 1))."""
    return torch.cat([weights, weights * (u - torch.floor(u))[:, None]], dim=1)


class SortedSums:
    """``sum_k w_k H(u_k - q)`` and ``sum_k w_k H(q - u_k)`` over ascending ``u`` (n,) with
    weights (n, c), for any queries: prefix sums and three ``searchsorted`` per query. The
    queries are a tensor, or their :class:`Windows` among the same ``u`` to reuse them."""

    def __init__(self, u: torch.Tensor, weights: torch.Tensor, smooth: bool):
        self.u, self.smooth, self.c = u, smooth, weights.shape[1]
        table = with_fractions(u, weights) if smooth else weights
        self.prefix = torch.cat([table.new_zeros(1, table.shape[1]), torch.cumsum(table, 0)])

    def _range(self, start, end):
        last = self.prefix[-1:] if end is None else self.prefix.index_select(0, end)
        return last - self.prefix[:1] if start is None else last - self.prefix.index_select(0, start)

    def _sums(self, q, upward: bool) -> torch.Tensor:
        windows = q if isinstance(q, Windows) else Windows(self.u, q, self.smooth)
        return windows.combine([self._range(*r) for r in windows.ranges(upward)], self.c, upward)

    def above(self, q: torch.Tensor) -> torch.Tensor:
        """(q, c): ``sum_k w_k H(u_k - q)``."""
        return self._sums(q, True)

    def below(self, q: torch.Tensor) -> torch.Tensor:
        """(q, c): ``sum_k w_k H(q - u_k)``."""
        return self._sums(q, False)


def _wavelet_descent(pi: torch.Tensor, table: torch.Tensor, bound: torch.Tensor, end: torch.Tensor):
    """A wavelet matrix over ``pi`` (n,) (distinct int64 values in ``[0, n)``) walked by queries
    with bounds ``bound`` (q,) and end points ``end`` (r, q): the walks (r, q, C) and the
    anchor (q, C), the walk of end point 0.

    At each bit, from the highest, the members are stably split by that bit; a query whose bound
    has the bit set adds the prefix sum of ``table`` (n, C) over the members with the bit clear
    before its end, then follows those with the bit set, and otherwise follows those with the
    bit clear. A walk minus the anchor is the sum over the members before its end with
    ``pi[k] < bound`` (what a walk adds before the bound's own members is in the anchor too), and
    the difference of two walks the sum over the members between their end points.

    The anchor's path depends on the bound's bits alone, so it is walked for every bound at once:
    after level ``l`` a table over ``bound >> l``, which doubles at each level, O(n) in all
    instead of another row of the walk. Levels are built, walked and dropped one at a time;
    positions are int32 (n < 2^31), which halves the traffic of the walk, and the walk selects
    by arithmetic, several times faster than ``torch.where`` on CPU."""
    n, width = table.shape
    rows, q = end.shape
    device = table.device
    # the walk's buffers are reused across levels: fresh ones would be page-faulted in at every level
    end = end.to(torch.int32).reshape(-1)
    end_clear, taken = torch.empty_like(end), torch.empty_like(end)
    gathered = table.new_empty(min(rows * q, WALK_BLOCK), width)
    total = table.new_zeros(rows * q, width)
    prefix = table.new_zeros(n + 1, width)
    values, position = pi, torch.arange(n, device=device, dtype=torch.int32)
    anchor_end, anchor = end.new_zeros(1), table.new_zeros(1, width)  # over bound >> level
    bound = bound.to(torch.int32)
    for level in reversed(range(max(n.bit_length(), 1))):
        bit = ((values >> level) & 1).to(torch.int32)
        clear_before = torch.cat([bit.new_zeros(1), torch.cumsum(1 - bit, 0, dtype=torch.int32)])
        clear = clear_before[-1]
        destination = torch.where(bit == 0, clear_before[:-1], clear + position - clear_before[:-1]).long()
        values = torch.empty_like(values).index_copy_(0, destination, values)
        table = torch.empty_like(table).index_copy_(0, destination, table)
        torch.cumsum(table, 0, out=prefix[1:])
        anchor_clear = clear_before.index_select(0, anchor_end)
        anchor = torch.stack([anchor, anchor + prefix.index_select(0, anchor_clear)], 1).reshape(-1, width)
        anchor_end = torch.stack([anchor_clear, anchor_end - anchor_clear + clear], 1).reshape(-1)
        take = ((bound >> level) & 1).repeat(rows)
        torch.index_select(clear_before, 0, end, out=end_clear)
        torch.mul(end_clear, take, out=taken)  # row 0 of prefix is zero
        for rows_block in range(0, total.shape[0], WALK_BLOCK):
            block = slice(rows_block, rows_block + WALK_BLOCK)
            gathered_block = gathered[: taken[block].numel()]
            total[block] += torch.index_select(prefix, 0, taken[block], out=gathered_block)
        # follow the set part (clear + ones before the end) where taken, else the clear part
        end.sub_(end_clear).add_(clear).sub_(end_clear).mul_(take).add_(end_clear)
    return total.view(rows, q, width), anchor.index_select(0, bound)


def _outside_sums(pi: torch.Tensor, table: torch.Tensor, bound: torch.Tensor, keep: slice) -> torch.Tensor:
    """(q, C): sum of ``table[k]`` over ``k`` in ``keep`` with ``pi[k] < bound``: one cumulative
    sum in ``pi`` order."""
    # row v + 1 holds the member whose pi is v (if kept); the cumulative sum leaves row b = sum below b
    by_value = table.new_zeros(table.shape[0] + 1, table.shape[1]).index_copy_(0, pi[keep] + 1, table[keep])
    return by_value.cumsum_(0).index_select(0, bound)


def dominance_sums(pi: torch.Tensor, table: torch.Tensor, bound: torch.Tensor, starts: list, ends: list) -> list:
    """Per range ``r``, (q, C): the sums of ``table[k]`` over ``k`` in ``[starts[r][j], ends[r][j])``
    with ``pi[k] < bound[j]``; a ``None`` start or end is 0 or n.

    ``pi`` (n,): distinct int64 values in ``[0, n)``; ``table`` (n, C); ``bound`` and the
    starts and ends: int64 (q,). The wavelet walks (:func:`_wavelet_descent`, one per distinct
    given end point) only span the members between the smallest and the largest given point;
    an open end is a cumulative sum in ``pi`` order. So queries about a slice of the members
    cost O(m log m) for the m members their ranges reach, plus O(n): how a rank sums its share of
    the positives. O((n + q) log n) time and O((n + q) C) memory in all.

    A range between two given points is the difference of their walks, so it is exactly 0 when
    no member of it is below the bound, whatever the sums around it.
    """
    n, width = table.shape
    given = [point for point in list(starts) + list(ends) if point is not None]
    first = last = 0
    if given and bound.numel():  # the span of the walks: one host read for all the points
        first, last = read_host(torch.stack(torch.aminmax(torch.cat(given))))
    points = []  # each walked once
    for point in given:
        if all(point is not known for known in points):
            points.append(point)
    walked = {id(point): table.new_zeros(bound.numel(), width) for point in points}
    anchor = table.new_zeros(bound.numel(), width)
    if last > first:  # otherwise every walk is empty
        span = slice(first, last)
        # the span's values renumbered 0.. in order, and its members below each bound: counting
        # over the n values, O(n) where a sort and a search of the span cost O(m log m)
        in_span = torch.zeros(n, dtype=pi.dtype, device=pi.device).index_fill_(0, pi[span], 1)
        span_below = torch.cat([in_span.new_zeros(1), torch.cumsum(in_span, 0)])  # #{span values < v}
        local_pi, local_bound = span_below.index_select(0, pi[span]), span_below.index_select(0, bound)
        found, anchor = _wavelet_descent(local_pi, table[span], local_bound,
                                         torch.stack([point - first for point in points]))
        walked = {id(point): value for point, value in zip(points, found)}
    results = []
    for start, end in zip(starts, ends):
        if start is not None and end is not None:
            results.append(walked[id(end)] - walked[id(start)])  # the anchors cancel exactly
            continue
        # from the span's first member: a walk less the anchor, or everything beyond it
        upper = walked[id(end)] - anchor if end is not None else _outside_sums(pi, table, bound, slice(first, n))
        lower = walked[id(start)] - anchor if start is not None else -_outside_sums(pi, table, bound, slice(0, first))
        results.append(upper - lower)
    return results


class DominanceSums:
    """``sum_k w_k H(u_k - q)`` and ``sum_k w_k H(q - u_k)`` over the ``k`` with ``pi_k < bound``,
    for ascending ``u`` (n,), weights (n, c) and ``pi`` a permutation of ``[0, n)``."""

    def __init__(self, u: torch.Tensor, weights: torch.Tensor, pi: torch.Tensor, smooth: bool):
        self.u, self.pi, self.smooth, self.c = u, pi, smooth, weights.shape[1]
        self.table = with_fractions(u, weights) if smooth else weights

    def _sums(self, q, bound: torch.Tensor, upward: bool) -> torch.Tensor:
        windows = q if isinstance(q, Windows) else Windows(self.u, q, self.smooth)
        ranges = windows.ranges(upward)
        sums = dominance_sums(self.pi, self.table, bound, [r[0] for r in ranges], [r[1] for r in ranges])
        return windows.combine(sums, self.c, upward)

    def above(self, q: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
        """(q, c): ``sum_k w_k H(u_k - q)`` over ``pi_k < bound``."""
        return self._sums(q, bound, True)

    def below(self, q: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
        """(q, c): ``sum_k w_k H(q - u_k)`` over ``pi_k < bound``."""
        return self._sums(q, bound, False)
