"""From per-positive sums to losses and gradient tables: the formulas every backend shares.

A backend computes, for the p positives in ascending logit order (float64):

- ``fp``: FP(i) (exact, or bucketed with the bucket prototypes),
- ``rank_plus``: sum_k H(s_k - s_i) over positives, k = i included,
- for Rank & Sort: ``sort_current`` = sum_k H(s_k - s_i) (1 - y_k),
  ``sort_target`` = sum_k H(s_k - s_i) [y_k >= y_i] (1 - y_k),
  ``sort_target_count`` = sum_k H(s_k - s_i) [y_k >= y_i] and
  ``lower_quality`` = D(i) = sum_k H(s_k - s_i) [y_k < y_i].

Everything after that is O(p) and lives here once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import LossKind


@dataclass
class PositiveSums:
    fp: torch.Tensor
    rank_plus: torch.Tensor
    sort_current: torch.Tensor | None = None
    sort_target: torch.Tensor | None = None
    sort_target_count: torch.Tensor | None = None
    lower_quality: torch.Tensor | None = None


@dataclass
class PositiveTerms:
    losses: tuple  # float64 0-d tensors, one per output
    pos_rank_grad: torch.Tensor  # (p,) gradient of the ranking output on the positives
    weight: torch.Tensor  # (p,) w_i: negatives get sum_i w_i H(s_j - s_i)
    sorting_error: torch.Tensor | None = None  # (p,) eS(i)
    sorting_share: torch.Tensor | None = None  # (p,) eS(k) / D(k), 0 where D(k) == 0


def positive_terms(kind: LossKind, sums: PositiveSums) -> PositiveTerms:
    fp, rank_plus = sums.fp, sums.rank_plus
    p = fp.numel()
    if kind.interpolated:
        rank_plus = rank_plus + 0.5  # 1 + sum over k != i, and H(0) = 1/2
        precision = rank_plus / (rank_plus + fp)
        best = torch.cummax(precision, 0).values  # running maximum in ascending logit order
        factor = torch.where(best <= precision, 1.0, (1 - best) / (1 - precision))
        return PositiveTerms((1 - best.mean(),), -(1 - best) / p, factor / (rank_plus + fp) / p)

    ranking_error = fp / (rank_plus + fp)
    terms = PositiveTerms(
        (ranking_error.mean(),),
        -ranking_error / p,
        torch.where(fp > 0, ranking_error / fp.clamp(min=1e-300), 0.0) / p,
    )
    if kind.sorting:
        sorting_error = sums.sort_current / rank_plus - sums.sort_target / sums.sort_target_count
        lower = sums.lower_quality
        terms.losses = terms.losses + (sorting_error.mean(),)
        terms.sorting_error = sorting_error
        terms.sorting_share = torch.where(lower > 0, sorting_error / lower.clamp(min=1e-300), 0.0)
    return terms


def own_positive_gradients(terms: PositiveTerms, pos_sort_grad, mine):
    """The positive gradient tables (ranking, sorting or None) restricted to ``mine``, this rank's
    positives in a global ranking (None: all positives are this process's)."""
    if mine is None:
        return terms.pos_rank_grad, pos_sort_grad
    return terms.pos_rank_grad[mine], None if pos_sort_grad is None else pos_sort_grad[mine]


def positive_gradient(pos_rank_grad, pos_sort_grad, grad_outputs) -> torch.Tensor:
    """The positives' gradient for the upstream gradients of the (ranking[, sorting]) outputs."""
    grad = pos_rank_grad * grad_outputs[0].double()
    if pos_sort_grad is not None:
        grad = grad + pos_sort_grad * grad_outputs[1].double()
    return grad


def sorting_gradient(terms: PositiveTerms, received: torch.Tensor) -> torch.Tensor:
    """Gradient of the sorting output on the positives, given
    ``received[i] = sum_k share_k H(s_i - s_k) [y_i < y_k]``."""
    gives = torch.where(terms.sorting_share != 0, terms.sorting_error, 0.0)
    return (received - gives) / received.numel()
