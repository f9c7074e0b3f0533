"""Triton backend: the same computation as ``torch_backend``, with its N-sized and P x bins
steps as Triton kernels (``brl_triton.kernels``).

Data flow (N elements, p positives, E <= 2p edges):

forward
    1. ``positives``: one pass over the N targets compacts the positives' positions and checks
       that the targets are finite; the p positive logits are argsorted (one program, ``tl.sort``,
       for p <= 4096; ``torch.sort`` of the p positives beyond).
    2. edges (torch, O(p)): as the torch backend.
    3. ``bins.reduce_bins``: one pass over N: binary search, count and offset sum per bin, and
       the check that every logit is finite.
    4. ``tiles``: FP, rank+ and sorting sums per positive, the sorting gradient, and per bin the
       gradient constant (and slope, exact losses), tiled in registers. O(p) host formulas
       (``_positive_terms``) in between.
backward
    5. ``bins.distribute``: one pass over N writes every gradient; the p positives are then
       written from their table.

Streaming passes over N, for float32 logits and targets: the logits are read twice, once by
the forward reduction and once by the backward distribution; the targets three times
(compaction, reduction, distribution). Per element: compaction 4 B, reduction 8 B,
distribution 8 B read + 4 B gradient written: 24 B in all (the binary search reads edges from
cache). Everything else is O(p^2) work on O(p + E) data.

Memory beyond inputs and the gradient: O(p + E) tables, plus room for N/64 positive positions
(a second compaction pass runs only when there are more positives than that).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import LossKind, Settings, check_finite
from ._distributed import all_reduce_bins, gather_positives
from ._positive_terms import (
    PositiveSums,
    own_positive_gradients,
    positive_gradient,
    positive_terms,
    sorting_gradient,
)
from .kernels import bins, positives, tiles
from .torch_backend import bin_edges, breakpoints


@dataclass
class _Tables:
    edges: torch.Tensor  # (E,), s.dtype, ascending (not deduplicated: bins between equal edges stay empty)
    bin_const: torch.Tensor  # (E + 1,) float64, key 0 = no bin
    bin_slope: torch.Tensor | None
    pos_index: torch.Tensor
    pos_rank_grad: torch.Tensor
    pos_sort_grad: torch.Tensor | None


def triton_forward(s: torch.Tensor, y: torch.Tensor, delta: float, kind: LossKind, settings: Settings = Settings()):
    pos_index = positives.sorted_positives(s, y)
    group, mine = settings.process_group, None
    if group is not None:
        s_pos, y_pos, mine, pos_index = gather_positives(s[pos_index], y[pos_index], pos_index, group)
    else:
        s_pos, y_pos = s[pos_index], y[pos_index].double()
    if s_pos.numel() == 0:
        check_finite(s, y[:0])  # the reduction pass, which checks the logits, does not run
        return None
    edges = bin_edges(s_pos, delta, kind)
    count, offset_sum = bins.reduce_bins(s, y, edges, deterministic=settings.deterministic)
    if group is not None:
        count, offset_sum = all_reduce_bins(count, offset_sum, group)
        offset_sum = offset_sum.to(s.dtype)
    count, offset_sum = count[1:], offset_sum[1:]  # bin b = key b + 1 = [edges[b], edges[b + 1])

    sums = tiles.positive_sums(s_pos, y_pos, edges, count, offset_sum, delta, kind.sorting)
    terms = positive_terms(kind, PositiveSums(*sums) if kind.sorting else PositiveSums(*sums[:2]))
    pos_sort_grad = None
    if kind.sorting:
        received = tiles.sorting_received(s_pos, y_pos, terms.sorting_share, delta)
        pos_sort_grad = sorting_gradient(terms, received)

    windows = breakpoints(s_pos, delta) if delta > 0 and not kind.bucketed else None
    const, slope = tiles.bin_gradient(s_pos, terms.weight, edges, count, offset_sum, delta, windows)
    no_bin = const.new_zeros(1)
    tables = _Tables(
        edges,
        torch.cat([no_bin, const]),
        None if slope is None else torch.cat([no_bin, slope]),
        pos_index,
        *own_positive_gradients(terms, pos_sort_grad, mine),
    )
    return terms.losses, tables


def triton_backward(tables: _Tables, s: torch.Tensor, y: torch.Tensor, grad_outputs) -> torch.Tensor:
    g_rank = grad_outputs[0].double()
    const = (tables.bin_const * g_rank).to(s.dtype)
    slope = None if tables.bin_slope is None else (tables.bin_slope * g_rank).to(s.dtype)
    grad = bins.distribute(s, y, tables.edges, const, slope, s.dtype)
    pos_grad = positive_gradient(tables.pos_rank_grad, tables.pos_sort_grad, grad_outputs)
    grad.index_copy_(0, tables.pos_index, pos_grad.to(s.dtype))
    return grad


class TritonBackend:
    """Triton kernels; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``."""

    name = "triton"
    checks_finite = True  # the positive-compaction pass checks logits and targets
    forward = staticmethod(triton_forward)
    backward = staticmethod(triton_backward)
