"""From per-positive sums to losses and gradient tables: the formulas every backend shares.

A backend computes, for the p positives in ascending logit order (float64):

- ``fp``: FP(i) (exact, or bucketed with the bucket prototypes),
- ``rank_plus``: sum_k H(s_k - s_i) over positives, k = i included,
- for Rank & Sort: ``sort_current`` = sum_k H(s_k - s_i) (1 - y_k),
  ``sort_target`` = sum_k H(s_k - s_i) [y_k >= y_i] (1 - y_k),
  ``sort_target_count`` = sum_k H(s_k - s_i) [y_k >= y_i] and
  ``lower_quality`` = D(i) = sum_k H(s_k - s_i) [y_k < y_i],
- for aLRP: ``regression`` = l_i and ``weighted_rank`` = sum_k H(s_k - s_i) l_k (k = i included).

Everything after that is O(p) and lives here once, one function per family of losses
(:func:`formulas_for` picks a ``registry.LossSpec``'s). The Triton kernel of ``kernels/tiles.py``
has the same formulas, under the same names, for its fused tiles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch



@dataclass
class PairSums:
    fp: torch.Tensor
    rank_plus: torch.Tensor
    sort_current: torch.Tensor | None = None
    sort_target: torch.Tensor | None = None
    sort_target_count: torch.Tensor | None = None
    lower_quality: torch.Tensor | None = None
    regression: torch.Tensor | None = None
    weighted_rank: torch.Tensor | None = None


@dataclass
class PerPositive:
    losses: tuple  # float64 0-d tensors, one per output
    pos_rank_grad: torch.Tensor  # (p,) gradient of the ranking output on the positives
    weight: torch.Tensor  # (p,) w_i: negatives get sum_i w_i H(s_j - s_i)
    sorting_error: torch.Tensor | None = None  # (p,) eS(i)
    sorting_share: torch.Tensor | None = None  # (p,) eS(k) / D(k), 0 where D(k) == 0
    rank: torch.Tensor | None = None  # (p,) rank(i) = rank+(i) + FP(i), aLRP


ALRP_EPS = 1e-5  # aLRP: a positive with FP(i) <= this has no error and sends no gradient


def ranking_formulas(sums: PairSums) -> PerPositive:
    """AP and bucketed AP: the mean ranking error FP(i) / (rank+(i) + FP(i))."""
    fp, rank_plus = sums.fp, sums.rank_plus
    p = fp.numel()
    ranking_error = fp / (rank_plus + fp)
    return PerPositive(
        (ranking_error.mean(),),
        -ranking_error / p,
        torch.where(fp > 0, ranking_error / fp.clamp(min=1e-300), 0.0) / p,
    )


def sorting_formulas(sums: PairSums) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank & Sort's sorting error eS(i) and its share eS(i) / D(i) (0 where D(i) == 0)."""
    sorting_error = sums.sort_current / sums.rank_plus - sums.sort_target / sums.sort_target_count
    lower = sums.lower_quality
    return sorting_error, torch.where(lower > 0, sorting_error / lower.clamp(min=1e-300), 0.0)


def rank_sort_formulas(sums: PairSums) -> PerPositive:
    """Rank & Sort and BRS: the ranking terms, and the sorting error with its share eS / D."""
    terms = ranking_formulas(sums)
    terms.sorting_error, terms.sorting_share = sorting_formulas(sums)
    terms.losses = terms.losses + (terms.sorting_error.mean(),)
    return terms


def interpolated_precision(sums: PairSums) -> tuple[torch.Tensor, torch.Tensor]:
    """The interpolated AP's precision(i) and rank(i) (rank+ = 1 + sum over k != i, H(0) = 1/2)."""
    rank_plus = sums.rank_plus + 0.5
    return rank_plus / (rank_plus + sums.fp), rank_plus + sums.fp


def interpolated_formulas(sums: PairSums) -> PerPositive:
    """The interpolated AP loss: precision's running maximum in ascending logit order."""
    p = sums.fp.numel()
    precision, rank = interpolated_precision(sums)
    best = torch.cummax(precision, 0).values
    factor = torch.where(best <= precision, 1.0, (1 - best) / (1 - precision))
    return PerPositive((1 - best.mean(),), -(1 - best) / p, factor / rank / p)


def alrp_formulas(sums: PairSums) -> PerPositive:
    """aLRP's classification part: error FP(i) / rank(i), and the gradient
    g(i) = -(sum_{k != i} H(s_k - s_i) l_k + FP(i)) / rank(i) where FP(i) > eps."""
    fp = sums.fp
    p = fp.numel()
    rank = sums.rank_plus + 0.5 + fp  # rank+(i) = 1 + sum over k != i, and H(0) = 1/2
    others = sums.weighted_rank - 0.5 * sums.regression  # k = i was counted with H(0) = 1/2
    wrong = fp > ALRP_EPS
    g = torch.where(wrong, -(others + fp) / rank, 0.0)
    terms = PerPositive((fp.div(rank).mean(),), g / p, torch.where(wrong, -g / fp.clamp(min=1e-300), 0.0) / p)
    terms.rank = rank
    return terms


def sorting_gradient(terms: PerPositive, received: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient of the sorting output on the positives ``index`` (None: all), given their
    ``received[i] = sum_k share_k H(s_i - s_k) [y_i < y_k]``."""
    gives = torch.where(terms.sorting_share != 0, terms.sorting_error, 0.0)
    if index is not None:
        gives = gives.index_select(0, index)
    return (received - gives) / terms.sorting_error.numel()


def formulas_for(spec) -> Callable[[PairSums], PerPositive]:
    """The formulas of a ``registry.LossSpec``, by its flags."""
    if spec.regression:
        return alrp_formulas
    if spec.interpolated:
        return interpolated_formulas
    return rank_sort_formulas if spec.sorting else ranking_formulas
