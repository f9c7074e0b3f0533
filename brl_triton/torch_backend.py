"""Torch backend: the losses of ``docs/losses.md`` at bucketed cost, in plain torch ops.

It runs on every device torch runs on and is the fallback wherever Triton is not used.

Data flow (M logits, p positives, E bin edges, E <= 2p):

forward
    1. positives: compact (``nonzero``) and sort only their p logits.
    2. edges: the sorted positive logits (bucketed, with ``min - delta`` in front), or the 2p
       breakpoints ``s_i -/+ delta`` (exact), or the positives alone when ``delta == 0``, where
       bucketed and exact are the same computation (Theorem 4.1).
    3. one pass over M: each logit's bin ``key = #{edges <= s}`` (``BinLookup``: a uniform grid
       over the edges, exact by construction; ``torch.searchsorted`` when edges cluster), 0 for
       anything but a relevant negative; ``bincount`` of count and of the offset from the bin's
       lower edge (offsets, not raw logits, so that large logits do not cancel).
    4. positives x occupied bins, and positives x positives, in row tiles of at most
       ``PAIR_BLOCK`` float64 elements: FP, rank+, errors, and per bin the gradient
       ``grad[j] = const[bin] + slope[bin] * (s_j - lower_edge[bin])`` (slope only for the exact
       losses, from prefix sums over the positives). Only O(p + E) tables are kept.

backward
    5. one pass over M: the bins again (recomputed, not saved) and one gather, scaled by the
       upstream gradients; positives are written from their table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import Settings, fixed_point_scale
from ._distributed import all_reduce_bins, gather_positives
from ._positive_terms import PositiveSums, own_positive_gradients, positive_gradient, sorting_gradient

# Elements (float64) of one positives x columns tile: 8 MiB, a few of them alive at once.
PAIR_BLOCK = 1 << 20


@dataclass
class _Bins:
    """Occupied bins: count, sum of offsets from the lower edge, lower edge (all float64)."""

    count: torch.Tensor
    offset_sum: torch.Tensor
    lower: torch.Tensor


@dataclass
class _Tables:
    """What forward keeps for backward: O(p + E) tensors."""

    lookup: BinLookup  # the distinct edges (E,) and their grid
    lower_of_key: torch.Tensor  # (E + 1,), lower edge of bin key (key 0 is the "no bin" key)
    bin_const: torch.Tensor  # (E + 1,), gradient of the ranking output, constant part
    bin_slope: torch.Tensor | None  # (E + 1,), slope part (exact RS/AP with delta > 0)
    pos_index: torch.Tensor  # (p,), flat positions of the positives
    pos_rank_grad: torch.Tensor  # (p,)
    pos_sort_grad: torch.Tensor | None  # (p,)


def _row_blocks(rows: int, cols: int):
    size = max(1, PAIR_BLOCK // max(cols, 1))
    for start in range(0, rows, size):
        yield slice(start, min(start + size, rows))


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


def bin_edges(s_pos: torch.Tensor, delta: float, kind) -> torch.Tensor:
    """Sorted bin edges for ascending positives ``s_pos``; bins lie between consecutive edges."""
    if delta == 0:
        return s_pos
    if kind.bucketed:
        return torch.cat([rounded_up_sum(s_pos[:1], -delta), s_pos])
    return torch.sort(torch.cat(breakpoints(s_pos, delta))).values


class BinLookup:
    """``key(s) = #{edges <= s}`` for many logits against a few sorted edges.

    ``torch.searchsorted`` costs about as much per element on CPU whatever the number of edges
    (it dominated the whole loss). This uses a uniform grid over the edges instead: the cell of a
    value, the number of edges in earlier cells, then one compare for each edge that shares the
    cell (at most ``MAX_LEVELS``). All of it is elementwise ops and ``index_select``. ``_cell`` is
    monotone and computed by the same float ops for edges and logits, so an edge in an earlier
    (later) cell is below (above) the value and the count is exact, ties included. When the edges
    cluster (many in one cell) it falls back to ``torch.searchsorted``.
    """

    CELLS_PER_EDGE = 32
    MAX_CELLS = 1 << 21
    MAX_LEVELS = 4

    def __init__(self, edges: torch.Tensor):
        self.edges = torch.unique_consecutive(edges)  # bins between equal edges would be empty
        self.levels = None
        d = self.edges.numel()
        if d < 2:
            return
        cells = min(self.CELLS_PER_EDGE * d, self.MAX_CELLS)
        # the span in Python floats: edges[-1] - edges[0] may overflow the dtype
        scale = torch.tensor(cells / (float(self.edges[-1]) - float(self.edges[0])), dtype=edges.dtype)
        if not bool(torch.isfinite(scale) & (scale > 0)):
            return
        self.cells, self.scale, self.origin = cells, scale.to(edges.device), self.edges[0]
        per_cell = torch.bincount(self._cell(self.edges), minlength=cells)
        levels = int(per_cell.max())
        if levels > self.MAX_LEVELS:
            return
        first = torch.cumsum(per_cell, 0) - per_cell
        self.base = first.to(torch.int32)
        # the t-th edge of each cell; for cells with fewer, an edge of a later cell or +inf
        padded = torch.cat([self.edges, self.edges.new_full((levels,), float("inf"))])
        self.levels = [padded.index_select(0, first + t) for t in range(levels)]

    def _cell(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sub(x, self.origin).mul_(self.scale).clamp_(0, self.cells - 1).to(torch.int32)

    def keys(self, s: torch.Tensor) -> torch.Tensor:
        """int32 ``#{edges <= s}`` for every element of the flat tensor ``s``."""
        if self.levels is None:
            if self.edges.numel() == 1:
                return (s >= self.edges[0]).to(torch.int32)
            return torch.searchsorted(self.edges, s, right=True, out_int32=True)
        cell = self._cell(s)
        key = self.base.index_select(0, cell)
        for level in self.levels:
            key += level.index_select(0, cell) <= s
        return key


def _offset_sums(key, offsets, nkeys, s, edges, fixed_point: bool) -> torch.Tensor:
    """Per key, the sum of offsets: ``bincount``, or exact int64 fixed-point sums."""
    if not fixed_point:
        return torch.bincount(key, weights=offsets, minlength=nkeys)
    scale = fixed_point_scale(s, edges)
    fixed = torch.round(offsets.double() * scale).long()
    total = torch.zeros(nkeys, dtype=torch.int64, device=s.device).index_put_((key.long(),), fixed, accumulate=True)
    return (total.double() / scale).to(s.dtype)


def _negative_keys(lookup: BinLookup, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Bin of every logit: ``#{edges <= s}`` for negatives, 0 for positives and ignored.

    Key 0 also holds negatives below ``edges[0] = min positive - delta``: the irrelevant ones.
    """
    return lookup.keys(s).masked_fill_(y != 0, 0)


class _StepTiles:
    """Tiles ``T[r, c] = H(col_c - row_r)`` of the step function, in float64.

    The scaling of H is applied once to the O(p) vectors; the 1/2 is added after the
    difference, where it cannot vanish next to huge logits (|s| ~ 1e30 would absorb it).
    """

    def __init__(self, delta: float):
        self.delta = delta

    def columns(self, v: torch.Tensor) -> torch.Tensor:
        return v * (0.5 / self.delta) if self.delta > 0 else v

    rows = columns

    def tile(self, cols: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``cols``/``rows`` from :meth:`columns`/:meth:`rows`."""
        if self.delta > 0:
            return (cols[None, :] - rows[:, None]).add_(0.5).clamp_(0, 1)
        return (cols[None, :] >= rows[:, None]).double()


def _bin_values(bins: _Bins, delta: float) -> torch.Tensor:
    """Where H is evaluated for a bin, so that ``count * H(value - s_i)`` is the bin's share of FP(i).

    delta > 0: the mean. For a bucket that is the paper's prototype; for a breakpoint bin H is
    affine on the whole bin, so H at the mean times the count is the exact sum over its members.
    delta == 0: the lower edge, so that a bin tied with a positive counts as above it, exactly.
    """
    return bins.lower + bins.offset_sum / bins.count if delta > 0 else bins.lower


def _false_positives(steps: _StepTiles, bin_cols, count, pos_rows) -> torch.Tensor:
    fp = torch.empty_like(pos_rows)
    for rows in _row_blocks(pos_rows.numel(), bin_cols.numel()):
        fp[rows] = steps.tile(bin_cols, pos_rows[rows]) @ count
    return fp


def _bin_gradient(steps: _StepTiles, bin_cols, pos_rows, weight) -> torch.Tensor:
    """Per bin ``sum_i weight_i H(value - s_i)``."""
    const = torch.zeros_like(bin_cols)
    for rows in _row_blocks(pos_rows.numel(), bin_cols.numel()):
        const += weight[rows] @ steps.tile(bin_cols, pos_rows[rows])
    return const


def _bin_slopes(s_pos: torch.Tensor, lower: torch.Tensor, weight: torch.Tensor, delta: float):
    """Per breakpoint bin, d grad / d s = sum of weight_i / 2delta over the positives whose
    window [s_i - delta, s_i + delta) holds the bin: a contiguous run of the sorted positives."""
    lo, hi = (b.double() for b in breakpoints(s_pos, delta))  # exactly as the edges were built
    first = torch.searchsorted(hi, lower, right=True)  # #{i : s_i + delta <= lower}
    end = torch.searchsorted(lo, lower, right=True)  # #{i : s_i - delta <= lower}
    cumulative = torch.cat([weight.new_zeros(1), torch.cumsum(weight, 0)])
    return (cumulative[end] - cumulative[first]) * (0.5 / delta)


def _positive_pairs(steps: _StepTiles, s_cols, s_rows, y_pos, fp, sorting: bool, regression=None) -> PositiveSums:
    """rank+ and, for Rank & Sort, the sorting sums of every positive (positives x positives);
    with ``regression`` (l, sorted like the positives) also the weighted rank sum_k H l_k."""
    p = s_rows.numel()
    sums = PositiveSums(fp, torch.empty_like(s_rows))
    if regression is not None:
        sums.regression, sums.weighted_rank = regression, torch.empty_like(s_rows)
    if sorting:
        sums.sort_current, sums.sort_target = torch.empty_like(s_rows), torch.empty_like(s_rows)
        sums.sort_target_count, sums.lower_quality = torch.empty_like(s_rows), torch.empty_like(s_rows)
        one_minus_y = 1 - y_pos
    for rows in _row_blocks(p, p):
        h = steps.tile(s_cols, s_rows[rows])  # H(s_k - s_i), i in rows
        sums.rank_plus[rows] = h.sum(1)
        if regression is not None:
            sums.weighted_rank[rows] = h @ regression
        if not sorting:
            continue
        h_not_worse = h * (y_pos[None, :] >= y_pos[rows, None])
        sums.sort_current[rows] = h @ one_minus_y
        sums.sort_target[rows] = h_not_worse @ one_minus_y
        sums.sort_target_count[rows] = h_not_worse.sum(1)
        sums.lower_quality[rows] = h.sub_(h_not_worse).sum(1)
    return sums


def _sorting_received(steps: _StepTiles, s_cols, s_rows, y_pos, share) -> torch.Tensor:
    """``sum_k share_k H(s_i - s_k) [y_i < y_k]`` for every positive i."""
    received = torch.zeros_like(s_rows)
    for rows in _row_blocks(s_rows.numel(), s_rows.numel()):
        h = steps.tile(s_cols, s_rows[rows])  # H(s_i - s_k), k in rows
        h.mul_(y_pos[None, :] < y_pos[rows, None])
        received += share[rows] @ h
    return received


def torch_forward(s: torch.Tensor, y: torch.Tensor, delta: float, kind, settings: Settings = Settings(),
                  regression: torch.Tensor | None = None):
    """Losses (float64 0-d tensors) and the backward tables, or ``None`` without positives.

    ``s``: flat logits in the compute dtype; ``y``: flat targets, any real dtype; ``kind``: the
    ``registry.LossSpec``; ``regression``: its regression losses (one per positive, flat order).
    For regression losses the outputs are the classification loss and the rank of this
    process's positives in flat order.
    """
    pos_index = (y > 0).nonzero().squeeze(1)
    group = settings.process_group
    l_pos = None
    if group is not None:
        s_pos, y_pos, mine, pos_index, l_pos = gather_positives(s[pos_index], y[pos_index], pos_index, group,
                                                                regression)
    else:
        s_pos, order = torch.sort(s[pos_index])
        pos_index = pos_index[order]
        y_pos, mine = y[pos_index].double(), None
        if regression is not None:
            l_pos = regression.detach().reshape(-1).double()[order]
    p = s_pos.numel()
    if p == 0:
        return None

    lookup = BinLookup(bin_edges(s_pos, delta, kind))
    edges = lookup.edges
    nkeys = edges.numel() + 1
    key = _negative_keys(lookup, s, y)
    lower_of_key = torch.cat([edges[:1], edges])
    count = torch.bincount(key, minlength=nkeys)
    # CPU bincount adds in a fixed order; elsewhere (CUDA float atomics) deterministic mode needs fixed point
    fixed_point = settings.deterministic and s.device.type != "cpu"
    offset_sum = _offset_sums(key, s - lower_of_key.index_select(0, key), nkeys, s, edges, fixed_point)
    del key
    if group is not None:
        count, offset_sum = all_reduce_bins(count, offset_sum, group)
    occupied = count[1:].nonzero().squeeze(1) + 1
    bins = _Bins(count[occupied].double(), offset_sum[occupied].double(), lower_of_key[occupied].double())

    steps = _StepTiles(delta)
    s64 = s_pos.double()
    s_cols, s_rows = steps.columns(s64), steps.rows(s64)
    bin_cols = steps.columns(_bin_values(bins, delta))
    fp = _false_positives(steps, bin_cols, bins.count, s_rows)
    terms = kind.formulas(_positive_pairs(steps, s_cols, s_rows, y_pos, fp, kind.sorting, l_pos))

    pos_sort_grad = None
    if kind.sorting:
        received = _sorting_received(steps, s_cols, s_rows, y_pos, terms.sorting_share)
        pos_sort_grad = sorting_gradient(terms, received)

    const = _bin_gradient(steps, bin_cols, s_rows, terms.weight)
    bin_const = torch.zeros(nkeys, dtype=torch.float64, device=s.device)
    bin_slope = None
    if delta > 0 and not kind.bucketed:
        slope = _bin_slopes(s_pos, bins.lower, terms.weight, delta)
        const -= slope * (bins.offset_sum / bins.count)  # from the bin's mean to its lower edge
        bin_slope = torch.zeros_like(bin_const)
        bin_slope[occupied] = slope
    bin_const[occupied] = const
    tables = _Tables(lookup, lower_of_key, bin_const, bin_slope, pos_index,
                     *own_positive_gradients(terms, pos_sort_grad, mine))
    if kind.regression:
        return terms.losses + (rank_in_flat_order(terms.rank, pos_index, mine),), tables
    return terms.losses, tables


def rank_in_flat_order(rank: torch.Tensor, pos_index: torch.Tensor, mine: torch.Tensor | None) -> torch.Tensor:
    """rank(i) of this process's positives in flat order, from the sorted order of (all) positives;
    ``pos_index``: their flat positions in that order."""
    own = rank if mine is None else rank[mine]
    return own[torch.argsort(pos_index)]


def torch_backward(tables: _Tables, s: torch.Tensor, y: torch.Tensor, grad_outputs) -> torch.Tensor:
    """Flat gradient (compute dtype) for upstream gradients ``grad_outputs`` (one per output)."""
    g_rank = grad_outputs[0].double()
    key = _negative_keys(tables.lookup, s, y)
    grad = (tables.bin_const * g_rank).to(s.dtype).index_select(0, key)
    if tables.bin_slope is not None:
        slope = (tables.bin_slope * g_rank).to(s.dtype)
        grad.addcmul_(slope.index_select(0, key), s - tables.lower_of_key.index_select(0, key))
    pos_grad = positive_gradient(tables.pos_rank_grad, tables.pos_sort_grad, grad_outputs)
    grad[tables.pos_index] = pos_grad.to(s.dtype)
    return grad
