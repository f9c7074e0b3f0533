"""The one orchestration of a ranking loss, shared by the torch and Triton backends.

forward
    1. ``find_positives``: the positives, sorted ascending by logit (ties by position), with
       their targets, flat positions and, for aLRP, regression losses; with a process group,
       those of every rank (one all-gather). ``None`` when there is none.
    2. ``reduce_bins``: one pass over all logits: count and offset sum of the negatives per bin
       (``_edges``: buckets or breakpoint bins, key 0 = no bin); with a process group, summed over
       the ranks (one all-reduce).
    3. ``gradient_tables``: positives x bins and positives x positives sums, the per-positive
       formulas of the loss (``registry.LossSpec.formulas``), the losses, the positives' gradients
       and the per-bin gradient tables.
backward
    4. ``distribute``: one pass over all logits writes every gradient from the tables.

A backend supplies these four steps (and ``inputs``, what its steps read). A step may do the
work of later ones when that saves launches or host syncs: the Triton backend's
``find_positives`` also reduces the bins before its one host sync and hands them on in
``TritonPositives``, and its ``gradient_tables`` is two kernels for everything of step 3. What
lives here, once: the order of the steps, the restriction of a global ranking to this process's
positives, and aLRP's localisation weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import stable_sort


@dataclass
class Positives:
    """The positives in ascending logit order (of all ranks, with a process group).

    ``s``: logits (compute dtype); ``y``: targets (float64); ``index``: flat positions of this
    process's positives, in that order; ``mine``: where this process's positives sit in that
    order (None: all are this process's); ``regression``: aLRP's regression losses in that order
    (float64) or None. A backend may subclass it to hand its later steps what it computed ahead
    (``triton_backend.TritonPositives``).
    """

    s: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor
    mine: torch.Tensor | None = None
    regression: torch.Tensor | None = None


@dataclass
class GradientTables:
    """What ``gradient_tables`` gives: the losses (0-d tensors, one per ranking output), the
    positives' gradients of the ranking and sorting outputs (p,), aLRP's rank(i) (p,), and the
    per-bin gradient tables (E + 1 each, key 0 = no bin; ``slope`` only for exact losses with
    delta > 0): a negative in bin ``key`` gets ``const[key] + slope[key] * (s - lower[key])``."""

    losses: tuple
    pos_rank_grad: torch.Tensor
    pos_sort_grad: torch.Tensor | None
    const: torch.Tensor
    slope: torch.Tensor | None
    rank: torch.Tensor | None = None
    localisation: tuple | None = None  # aLRP's (value, weights) when the backend computed them


@dataclass
class SavedTables:
    """What forward keeps for backward: O(p + E) tensors and the backend's bins."""

    bins: object
    const: torch.Tensor
    slope: torch.Tensor | None
    pos_index: torch.Tensor
    pos_rank_grad: torch.Tensor
    pos_sort_grad: torch.Tensor | None


def forward(backend, s, y, delta: float, spec, settings, regression=None):
    """Losses and the backward tables, or ``None`` without positives (in the whole group).

    For a regression loss (aLRP) the outputs are the classification loss and the two parts of
    :func:`localisation_terms`."""
    positives = backend.find_positives(s, y, delta, spec, settings, regression)
    if positives is None:
        return None
    bins = backend.reduce_bins(s, y, positives, delta, spec, settings)
    terms = backend.gradient_tables(positives, bins, delta, spec, settings)
    pos_rank_grad, pos_sort_grad = terms.pos_rank_grad, terms.pos_sort_grad
    if positives.mine is not None:
        pos_rank_grad = pos_rank_grad[positives.mine]
        pos_sort_grad = None if pos_sort_grad is None else pos_sort_grad[positives.mine]
    losses = terms.losses
    if spec.regression:
        losses = losses + (terms.localisation or localisation_terms(terms.rank, positives))
    return losses, SavedTables(bins, terms.const, terms.slope, positives.index, pos_rank_grad, pos_sort_grad)


def backward(backend, tables: SavedTables, s, y, grad_outputs) -> torch.Tensor:
    """The flat gradient for the upstream gradients of the outputs."""
    return backend.distribute(tables, s, y, grad_outputs)


def localisation_terms(rank: torch.Tensor, positives: Positives):
    """aLRP's localisation part ``mean_i (sum of l_k over positives k ranked at or above i) /
    rank(i)`` (descending logits, ties in flat order) as ``sum_k c_k l_k`` with
    ``c_k = (1/p) sum_{i ranked at or below k} 1 / rank(i)``: a suffix sum after an O(p log p)
    sort of the positives, with no pass over all elements. ``c`` is the gradient in the regression
    losses. Returns (the value over all positives (0-d float64, every rank's part with a process
    group), ``c`` of this process's positives in flat order (float64))."""
    # ascending with ties in flat (rank, position) order: a stable descending sort keeps that tie order
    order = stable_sort(positives.s, descending=True)[1]
    share = rank.index_select(0, order).reciprocal().flip(0).cumsum(0).flip(0).div_(rank.numel())
    weights = torch.empty_like(share).index_put_((order,), share)
    value = torch.dot(weights, positives.regression)
    if positives.mine is not None:
        weights = weights[positives.mine]
    return value, weights[torch.argsort(positives.index)]


def positive_gradient(pos_rank_grad, pos_sort_grad, grad_outputs) -> torch.Tensor:
    """The positives' gradient for the upstream gradients of the (ranking[, sorting]) outputs."""
    grad = pos_rank_grad * grad_outputs[0].to(pos_rank_grad.dtype)
    if pos_sort_grad is not None:
        grad = grad + pos_sort_grad * grad_outputs[1].to(pos_rank_grad.dtype)
    return grad


class PipelineBackend:
    """A backend of the pipeline: subclasses supply ``inputs`` and the four steps."""

    name = ""
    checks_finite = False

    def forward(self, s, y, delta, spec, settings, regression=None):
        return forward(self, s, y, delta, spec, settings, regression)

    def backward(self, tables, s, y, grad_outputs):
        return backward(self, tables, s, y, grad_outputs)
