"""Step 3 of ``pipeline`` in torch ops, for the torch backend and for the Triton backend from
``triton_backend.TRITON_SWEEP_FROM`` positives on: from the sorted positives and the reduced
bins to the losses, the positives' gradients and the per-bin gradient tables.

Below ``SWEEP_FROM`` positives by tiles (positives x occupied bins and positives x positives, in
row tiles of at most ``PAIR_BLOCK`` float64 elements, O(p (p + E))); from there on by the sweeps of
``_sweeps`` (prefix sums and a wavelet matrix, O((p + E) log p)). Only O(p + E) tables are kept.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from . import pipeline
from ._common import stable_sort
from ._distributed import rank_slice, share_slices
from ._edges import bin_values, breakpoints
from ._formulas import PairSums, formulas_for, sorting_gradient
from ._sweeps import DominanceSums, SortedSums, Windows

# Elements (float64) of one positives x columns tile: 8 MiB, a few of them alive at once.
PAIR_BLOCK = 1 << 20
# From this many positives on, their terms are summed by sweeps (O(p log p)) instead of tiles
# (O(p^2)). On the CPU at N = 10^6 (BRS, RS and BAP timed with each path forced; CHANGELOG.md) the
# tiles are up to 10 % faster at 512 positives, the two are level at about 1,000 and the sweeps
# are well ahead at 2,000: from 512 on, the sweeps lose little and their memory stays O(p).
SWEEP_FROM = 512


@dataclass
class ReducedBins:
    """The bins of one call after the reduction: the lower edge of every key (E + 1, key 0 = no
    bin), and the occupied keys with their count, offset sum and lower edge (float64, or
    float32 where the device has no float64)."""

    lower_of_key: torch.Tensor
    occupied: torch.Tensor
    count: torch.Tensor
    offset_sum: torch.Tensor
    lower: torch.Tensor

    @staticmethod
    def occupied_of(lower_of_key, count, offset_sum, dtype) -> dict:
        """From per-key counts and offset sums (E + 1, key 0 = no bin): the occupied keys' fields."""
        occupied = count[1:].nonzero().squeeze(1) + 1
        return dict(lower_of_key=lower_of_key, occupied=occupied, count=count[occupied].to(dtype),
                    offset_sum=offset_sum[occupied].to(dtype), lower=lower_of_key[occupied].to(dtype))


def _row_blocks(rows: int, cols: int):
    size = max(1, PAIR_BLOCK // max(cols, 1))
    for start in range(0, rows, size):
        yield slice(start, min(start + size, rows))


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
        return (cols[None, :] >= rows[:, None]).to(rows.dtype)


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
    lo, hi = (b.to(weight.dtype) for b in breakpoints(s_pos, delta))  # exactly as the edges were built
    first = torch.searchsorted(hi, lower, right=True)  # #{i : s_i + delta <= lower}
    end = torch.searchsorted(lo, lower, right=True)  # #{i : s_i - delta <= lower}
    cumulative = torch.cat([weight.new_zeros(1), torch.cumsum(weight, 0)])
    return (cumulative[end] - cumulative[first]) * (0.5 / delta)


def _positive_pairs(steps: _StepTiles, s_cols, s_rows, y_pos, fp, sorting: bool, regression=None) -> PairSums:
    """rank+ and, for Rank & Sort, the sorting sums of every positive (positives x positives);
    with ``regression`` (l, sorted like the positives) also the weighted rank sum_k H l_k."""
    p = s_rows.numel()
    sums = PairSums(fp, torch.empty_like(s_rows))
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


class _TiledSums:
    """The positive terms' sums by tiles: positives x bins and positives x positives, O(p (p + E))."""

    queries = bin_queries = None  # every positive and bin, on every rank

    def __init__(self, positives, bins: ReducedBins, delta: float):
        self.steps = _StepTiles(delta)
        s64 = positives.s.to(positives.y.dtype)
        self.s_cols, self.s_rows = self.steps.columns(s64), self.steps.rows(s64)
        self.bin_cols = self.steps.columns(bin_values(bins.lower, bins.offset_sum, bins.count, delta))
        self.y, self.regression, self.count = positives.y, positives.regression, bins.count

    def positive_sums(self, sorting: bool) -> PairSums:
        fp = _false_positives(self.steps, self.bin_cols, self.count, self.s_rows)
        return _positive_pairs(self.steps, self.s_cols, self.s_rows, self.y, fp, sorting, self.regression)

    def sorting_received(self, share: torch.Tensor) -> torch.Tensor:
        return _sorting_received(self.steps, self.s_cols, self.s_rows, self.y, share)

    def bin_gradient(self, weight: torch.Tensor) -> torch.Tensor:
        return _bin_gradient(self.steps, self.bin_cols, self.s_rows, weight)


class _SweptSums:
    """The same sums by sweeps over the sorted positives and bins (``_sweeps``): O((p + E) log p)
    time and O(p + E) memory. The target comparisons of Rank & Sort are dominance sums over the
    positives' order by target (ties: ``[y_k >= y_i]`` is "not below", ``[y_k < y_i]`` "below").

    With a process group each rank sums the terms of a slice of the sorted positives
    (``queries``: rank r of R takes the r-th R-th) against all of them, and ``share_slices`` gathers
    everyone's: the positive-term work is split over the ranks. A contiguous slice, rather than
    the rank's own positives, because the dominance sums then walk only the members near it.
    """

    def __init__(self, positives, bins: ReducedBins, delta: float, group=None):
        self.smooth = delta > 0
        scale = 0.5 / delta if self.smooth else 1.0
        self.u = positives.s.to(positives.y.dtype) * scale
        values = bin_values(bins.lower, bins.offset_sum, bins.count, delta) * scale
        # a bucket's mean may pass the next bin's by an ulp of round-off; the sweeps need them sorted
        self.bin_u = torch.cummax(values, 0).values if values.numel() else values
        self.y, self.regression, self.count = positives.y, positives.regression, bins.count
        self.group = group if positives.mine is not None else None
        self.queries = self.bin_queries = None
        if self.group is not None:  # this rank's slices of all positives and bins: O(1 / world) of the work
            device = self.u.device
            self.queries = torch.arange(*rank_slice(self.u.numel(), self.group), device=device)
            self.bin_queries = torch.arange(*rank_slice(self.bin_u.numel(), self.group), device=device)
        self.query_u = self.u if self.queries is None else self.u.index_select(0, self.queries)
        # every sum over the positives for the queried positives
        self.windows = Windows(self.u, self.query_u, self.smooth)

    def _queried(self, values: torch.Tensor) -> torch.Tensor:
        return values if self.queries is None else values.index_select(0, self.queries)

    def positive_sums(self, sorting: bool) -> PairSums:
        u, y = self.u, self.y
        fp = SortedSums(self.bin_u, self.count[:, None], self.smooth).above(self.query_u)[:, 0]
        ones = torch.ones_like(u)
        columns = [ones] + ([1 - y] if sorting else []) + ([self.regression] if self.regression is not None else [])
        own = SortedSums(u, torch.stack(columns, 1), self.smooth).above(self.windows)
        found = [fp, own[:, 0]]
        if sorting:
            order = stable_sort(y)[1]
            self.by_target = torch.empty_like(order).index_put_((order,), torch.arange(u.numel(), device=u.device))
            self.y_sorted = y.index_select(0, order)
            below = torch.searchsorted(self.y_sorted, self._queried(y))  # #{y_k < y_i}: pi_k < below <=> y_k < y_i
            lower = DominanceSums(u, torch.stack([ones, 1 - y], 1), self.by_target, self.smooth).above(self.windows, below)
            # sort_current; lower_quality, summed over exactly those k, so it is 0 where none is near;
            # sort_target_count; sort_target
            found += [own[:, 1], lower[:, 0], own[:, 0] - lower[:, 0], own[:, 1] - lower[:, 1]]
        if self.regression is not None:
            found.append(own[:, -1])
        found = torch.stack(found, 1)
        if self.group is not None:
            (found,) = share_slices([(found, u.numel())], self.group)
        sums = PairSums(*found[:, :2].unbind(1))
        if sorting:
            sums.sort_current, sums.lower_quality, sums.sort_target_count, sums.sort_target = found[:, 2:6].unbind(1)
        if self.regression is not None:
            sums.regression, sums.weighted_rank = self.regression, found[:, -1]
        return sums

    def sorting_received(self, share: torch.Tensor) -> torch.Tensor:
        """For the queried positives."""
        p = self.u.numel()
        better = p - torch.searchsorted(self.y_sorted, self._queried(self.y), right=True)  # #{y_k > y_i}
        descending = p - 1 - self.by_target  # pi_k < better  <=>  y_k > y_i
        return DominanceSums(self.u, share[:, None], descending, self.smooth).below(self.windows, better)[:, 0]

    def bin_gradient(self, weight: torch.Tensor) -> torch.Tensor:
        """For the queried bins."""
        bin_u = self.bin_u if self.bin_queries is None else self.bin_u.index_select(0, self.bin_queries)
        return SortedSums(self.u, weight[:, None], self.smooth).below(bin_u)[:, 0]


def _share_slices(pos_sort_grad, const, slope, p: int, e: int, group):
    """One all-gather of every rank's slices of the p positives and e bins: the positives' sorting
    gradient (or None) and the bins' gradient constant and slope (or None); all of them back."""
    start, end = rank_slice(p, group)
    pos_part = const.new_zeros(end - start) if pos_sort_grad is None else pos_sort_grad
    slope_part = torch.zeros_like(const) if slope is None else slope
    pos_rows, bin_rows = share_slices([(torch.stack([pos_part, torch.zeros_like(pos_part)], 1), p),
                                       (torch.stack([const, slope_part], 1), e)], group)
    return (None if pos_sort_grad is None else pos_rows[:, 0], bin_rows[:, 0],
            None if slope is None else bin_rows[:, 1])


def gradient_tables(positives, bins: ReducedBins, delta, spec, settings) -> pipeline.GradientTables:
    """Step 3 of ``pipeline`` in torch ops: the losses, the positives' gradients and the per-bin
    gradient tables, by tiles below ``SWEEP_FROM`` positives and by sweeps from there on.

    With ``settings.deterministic`` the sweeps run under torch's deterministic algorithms: on CUDA,
    float ``cumsum``, ``index_add_`` and ``scatter_add_`` otherwise add in an order that changes
    from run to run."""
    if settings.deterministic and positives.s.numel() >= SWEEP_FROM:
        with deterministic_algorithms():
            return _gradient_tables(positives, bins, delta, spec, settings)
    return _gradient_tables(positives, bins, delta, spec, settings)


@contextmanager
def deterministic_algorithms() -> Iterator[None]:
    """``torch.use_deterministic_algorithms(True)`` for the block, the caller's setting after it.

    The setting is process-wide, so another thread's ops in the block are deterministic too."""
    if torch.are_deterministic_algorithms_enabled() or torch.compiler.is_compiling():
        yield
        return
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False, warn_only=warn_only)


def _gradient_tables(positives, bins: ReducedBins, delta, spec, settings) -> pipeline.GradientTables:
    p = positives.s.numel()
    if p >= SWEEP_FROM:
        pairs = _SweptSums(positives, bins, delta, settings.process_group)
    else:
        pairs = _TiledSums(positives, bins, delta)
    terms = formulas_for(spec)(pairs.positive_sums(spec.sorting))
    queries, bin_queries = pairs.queries, pairs.bin_queries
    pos_sort_grad = None
    if spec.sorting:
        pos_sort_grad = sorting_gradient(terms, pairs.sorting_received(terms.sorting_share), queries)

    count, offset_sum, lower = bins.count, bins.offset_sum, bins.lower
    if bin_queries is not None:
        count, offset_sum, lower = (v.index_select(0, bin_queries) for v in (count, offset_sum, lower))
    const, slope = pairs.bin_gradient(terms.weight), None
    if spec.has_slope(delta):
        slope = _bin_slopes(positives.s, lower, terms.weight, delta)
        const = const - slope * (offset_sum / count)  # from the bin's mean to its lower edge
    if queries is not None:  # every rank's slices; the pipeline picks this rank's positives
        pos_sort_grad, const, slope = _share_slices(pos_sort_grad, const, slope, p,
                                                    bins.count.numel(), settings.process_group)

    nkeys = bins.lower_of_key.numel()
    bin_const = torch.zeros(nkeys, dtype=const.dtype, device=const.device)
    bin_const[bins.occupied] = const
    bin_slope = None
    if slope is not None:
        bin_slope = torch.zeros_like(bin_const)
        bin_slope[bins.occupied] = slope
    return pipeline.GradientTables(terms.losses, terms.pos_rank_grad, pos_sort_grad, bin_const, bin_slope, terms.rank)
