"""Torch backend: the losses of ``docs/losses.md`` at bucketed cost, in plain torch ops.

It runs on every device torch runs on and is the fallback wherever Triton is not used.

It supplies the steps of ``pipeline`` (M logits, p positives, E bin edges, E <= 2p):

forward
    1. ``find_positives``: compact (``nonzero``) and sort only their p logits.
    2. ``reduce_bins``: the edges of ``_edges.bin_edges``, then one pass over M: each logit's
       bin ``key = #{edges <= s}`` (``BinLookup``: a uniform grid over the edges, exact by
       construction; ``torch.searchsorted`` when edges cluster), 0 for anything but a relevant
       negative; ``bincount`` of count and of the offset from the bin's lower edge (offsets, not
       raw logits, so that large logits do not cancel).
    3. ``gradient_tables``: ``_tables.gradient_tables`` (shared with the Triton backend's many-
       positives path): FP, rank+, the sorting sums, the errors, and per bin the gradient
       ``grad[j] = const[bin] + slope[bin] * (s_j - lower_edge[bin])`` (slope only for the exact
       losses), by tiles or by sweeps. Only O(p + E) tables are kept.

backward
    4. ``distribute``: one pass over M: the bins again (recomputed, not saved) and one gather, scaled by the
       upstream gradients; positives are written from their table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import pipeline
from ._common import flat_inputs, stable_sort, wide_dtype
from ._distributed import all_reduce_bins, gather_positives
from ._edges import NO_BIN, bin_edges, fixed_point_scale
from ._tables import ReducedBins, gradient_tables

class BinLookup:
    """``key(s) = #{edges <= s}`` for many logits against a few sorted edges.

    ``torch.searchsorted`` costs about as much per element on CPU whatever the number of edges
    (it dominated the whole loss). This uses a uniform grid over the edges instead (8 cells per
    edge, 4 for many edges, or 32 where that would put more than ``MAX_LEVELS`` edges in a cell;
    at most twice as many cells as ``lookups``, the values it will look up, when given): the cell of a
    value, the number of edges in earlier cells, then a branch-free binary search among the edges
    that share the cell (at most ``MAX_LEVELS``, so at most 4 steps). All of it is elementwise ops
    and ``index_select``. ``_cell`` is monotone and computed by the same float ops for edges and
    logits, so an edge in an earlier (later) cell is below (above) the value and the count is
    exact, ties included. When the edges cluster (many in one cell) it falls back to
    ``torch.searchsorted``.
    """

    # a coarse grid first: cheap to build, and its tables stay in cache (8 cells per edge, or 4
    # beyond 2^18 cells: at 10^5 edges the lookups ran faster on 4 than on 8); a finer one if
    # edges cluster
    FIRST_CELLS_PER_EDGE = 8
    FIRST_CELLS = 1 << 18
    FEWEST_CELLS_PER_EDGE = 4
    CELLS_PER_EDGE = 32
    MAX_CELLS = 1 << 21
    MAX_LEVELS = 8

    def __init__(self, edges: torch.Tensor, lookups: int | None = None):
        self.edges = torch.unique_consecutive(edges)  # bins between equal edges would be empty
        self.steps = None  # binary search steps within a cell; None: no grid, torch.searchsorted
        d = self.edges.numel()
        if d < 2:
            return
        # the span in Python floats: edges[-1] - edges[0] may overflow the dtype
        span = float(self.edges[-1]) - float(self.edges[0])
        first_cells = min(self.FIRST_CELLS_PER_EDGE * d, max(self.FEWEST_CELLS_PER_EDGE * d, self.FIRST_CELLS))
        candidates = []
        for cells in (first_cells, self.CELLS_PER_EDGE * d):
            cells = min(cells, self.MAX_CELLS)
            if lookups is not None:  # building the grid costs O(cells): no more of them than values to look up
                cells = min(cells, max(2 * lookups, 4096))
            if not candidates or cells > candidates[-1]:  # a capped finer grid would repeat the coarse one
                candidates.append(cells)
        for cells in candidates:
            scale = torch.tensor(cells / span, dtype=edges.dtype)
            if not bool(torch.isfinite(scale) & (scale > 0)):
                return
            self.cells, self.scale, self.origin = cells, scale.to(edges.device), self.edges[0]
            per_cell = torch.bincount(self._cell(self.edges), minlength=cells)
            levels = int(per_cell.max())
            if levels <= self.MAX_LEVELS:
                break
        else:
            return
        self.base = (torch.cumsum(per_cell, 0) - per_cell).to(torch.int32)
        # a search window of 2^steps edges from a cell's first: past the cell's own edges it reads
        # edges of later cells (all above the value) or the +inf padding. One table of the edges,
        # where a table per level (levels x cells) fell out of cache at 10^5 edges
        self.steps = max(1, levels.bit_length())  # 2^steps > levels: every count 0..levels
        self.padded = torch.cat([self.edges, self.edges.new_full((1 << self.steps,), float("inf"))])

    def _cell(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sub(x, self.origin).mul_(self.scale).clamp_(0, self.cells - 1).to(torch.int32)

    def keys(self, s: torch.Tensor) -> torch.Tensor:
        """int32 ``#{edges <= s}`` for every element of the flat tensor ``s``."""
        if self.steps is None:
            if self.edges.numel() == 1:
                return (s >= self.edges[0]).to(torch.int32)
            return torch.searchsorted(self.edges, s, right=True, out_int32=True)
        key = self.base.index_select(0, self._cell(s))
        for step in reversed(range(self.steps)):
            half = 1 << step  # is the window's (half)-th edge from key still <= s?
            probe = self.padded.index_select(0, key + (half - 1) if half > 1 else key)
            key.add_((probe <= s).to(torch.int32), alpha=half)
        return key


@dataclass
class LookedUpBins(ReducedBins):
    """The reduced bins and the lookup that found them, which ``distribute`` uses again."""

    lookup: BinLookup


def _offset_sums(key, offsets, nkeys, s, edges, fixed_point: bool) -> torch.Tensor:
    """Per key, the sum of offsets: ``bincount``, or exact int64 fixed-point sums."""
    if not fixed_point:
        return torch.bincount(key, weights=offsets, minlength=nkeys)
    scale = fixed_point_scale(s, edges)
    wide = wide_dtype(s.device)
    fixed = torch.round(offsets.to(wide) * scale).long()
    total = torch.zeros(nkeys, dtype=torch.int64, device=s.device).index_put_((key.long(),), fixed, accumulate=True)
    return (total.to(wide) / scale).to(s.dtype)


def _negative_keys(lookup: BinLookup, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Bin of every logit: ``#{edges <= s}`` for negatives, 0 for positives and ignored.

    Key 0 also holds negatives below ``edges[0] = min positive - delta``: the irrelevant ones.
    """
    return lookup.keys(s).masked_fill_(y != 0, NO_BIN)


class TorchBackend(pipeline.PipelineBackend):
    """Sort-free bucketed/breakpoint computation in plain torch ops; runs on any device."""

    name = "torch"
    checks_finite = False
    inputs = staticmethod(flat_inputs)

    @staticmethod
    def find_positives(s, y, delta, spec, settings, regression=None):
        """``s``: flat logits in the compute dtype; ``y``: flat targets, any real dtype."""
        pos_index = (y > 0).nonzero().squeeze(1)
        group = settings.process_group
        if group is not None:
            s_pos, y_pos, mine, pos_index, l_pos = gather_positives(s[pos_index], y[pos_index], pos_index, group,
                                                                    regression)
        else:
            s_pos, order = stable_sort(s[pos_index])  # ties in flat order (aLRP's localisation)
            pos_index = pos_index[order]
            wide = wide_dtype(s.device)
            y_pos, mine = y[pos_index].to(wide), None
            l_pos = None if regression is None else regression.detach().reshape(-1).to(wide)[order]
        if s_pos.numel() == 0:
            return None
        return pipeline.Positives(s_pos, y_pos, pos_index, mine, l_pos)

    @staticmethod
    def reduce_bins(s, y, positives, delta, spec, settings) -> LookedUpBins:
        lookup = BinLookup(bin_edges(positives.s, delta, spec), lookups=s.numel())
        edges = lookup.edges
        nkeys = edges.numel() + 1
        key = _negative_keys(lookup, s, y)
        lower_of_key = torch.cat([edges[:1], edges])
        count = torch.bincount(key, minlength=nkeys)
        # CPU bincount adds in a fixed order; elsewhere (CUDA float atomics) deterministic mode needs fixed point
        fixed_point = settings.deterministic and s.device.type != "cpu"
        offset_sum = _offset_sums(key, s - lower_of_key.index_select(0, key), nkeys, s, edges, fixed_point)
        del key
        if settings.process_group is not None:
            count, offset_sum = all_reduce_bins(count, offset_sum, settings.process_group)
        return LookedUpBins(**ReducedBins.occupied_of(lower_of_key, count, offset_sum, wide_dtype(s.device)),
                            lookup=lookup)

    @staticmethod
    def gradient_tables(positives, bins: ReducedBins, delta, spec, settings) -> pipeline.GradientTables:
        return gradient_tables(positives, bins, delta, spec, settings)

    @staticmethod
    def distribute(tables: pipeline.SavedTables, s, y, grad_outputs) -> torch.Tensor:
        """Flat gradient (compute dtype) for upstream gradients ``grad_outputs`` (one per output)."""
        bins = tables.bins
        g_rank = grad_outputs[0].to(tables.const.dtype)
        key = _negative_keys(bins.lookup, s, y)
        grad = (tables.const * g_rank).to(s.dtype).index_select(0, key)
        if tables.slope is not None:
            slope = (tables.slope * g_rank).to(s.dtype)
            grad.addcmul_(slope.index_select(0, key), s - bins.lower_of_key.index_select(0, key))
        pos_grad = pipeline.positive_gradient(tables.pos_rank_grad, tables.pos_sort_grad, grad_outputs)
        grad[tables.pos_index] = pos_grad.to(s.dtype)
        return grad


TORCH = TorchBackend()
