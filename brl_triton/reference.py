"""The test oracle: the losses of ``docs/losses.md`` as O(P*N) loops, one positive at a time.

Nothing here is clever on purpose. Every quantity is computed in float64 straight from its
definition, so that the fast backends can be checked against it. It is also reachable as
``backend="reference"``; it keeps N-sized gradient vectors and is far too slow for training.
"""

from __future__ import annotations

import torch


def step(x: torch.Tensor, delta: float) -> torch.Tensor:
    """The smoothed step function H of the spec."""
    if delta > 0:
        return (x / (2 * delta) + 0.5).clamp(0, 1)
    return (x >= 0).to(x.dtype)


def _buckets(pos_logits, neg_logits, delta):
    """Bucket id of each relevant negative, and per bucket (count, prototype), non-empty buckets only.

    The prototype is the mean, from offsets to the smallest member as the backends do. With
    delta == 0 every member of a bucket has the same step H(s_j - s_i) for every positive, which
    the rounded mean need not keep: a bucket tied with a positive can average to just below it.
    Any member is exact there; the largest is taken."""
    bucket = torch.zeros(neg_logits.numel(), dtype=torch.long)
    for s_i in pos_logits:
        bucket += (s_i > neg_logits).long()
    ids, member_of, counts = torch.unique(bucket, return_inverse=True, return_counts=True)
    counts = counts.double()
    if delta == 0:
        prototypes = torch.full((ids.numel(),), -torch.inf, dtype=torch.float64)
        prototypes.scatter_reduce_(0, member_of, neg_logits, reduce="amax")
    else:
        # the mean as the smallest member plus the mean offset from it: the mean of equal values is
        # that value (a plain sum / count of three 1e30 lands one ulp above it, past a tied positive)
        low = torch.full((ids.numel(),), torch.inf, dtype=torch.float64)
        low.scatter_reduce_(0, member_of, neg_logits, reduce="amin")
        offsets = torch.zeros(ids.numel(), dtype=torch.float64).index_add_(0, member_of, neg_logits - low[member_of])
        prototypes = low + offsets / counts
    return member_of, counts, prototypes


def _sets(s, y, delta):
    """Flat float64 logits and targets on the CPU, the positives P and the relevant negatives N
    (``s_j >= min_i s_i - delta``) as flat positions."""
    s = s.detach().reshape(-1).double().cpu()
    y = y.detach().reshape(-1).double().cpu()
    pos_index = (y > 0).nonzero().squeeze(1)
    if pos_index.numel() == 0:
        return s, y, pos_index, pos_index
    neg_index = ((y == 0) & (s >= s[pos_index].min() - delta)).nonzero().squeeze(1)
    return s, y, pos_index, neg_index


def ranking_reference(s: torch.Tensor, y: torch.Tensor, delta: float, spec, regression=None):
    """Losses and, per output, the gradient d(output)/d(logits) of the identity update.

    Args:
        s: flat logits, any float dtype. y: flat targets (>0 positive, 0 negative, <0 ignored).
        spec: the ``registry.LossSpec`` (its ``bucketed``, ``sorting``, ``interpolated`` flags).
    Returns:
        ``(losses, grads)``: tuples with one float64 0-d tensor / one float64 (M,) tensor per
        output (ranking and sorting for Rank & Sort, one for AP), or ``None`` when there is no
        positive (all losses and gradients are zero).
    """
    s, y, pos_index, neg_index = _sets(s, y, delta)
    p = pos_index.numel()
    if p == 0:
        return None
    s_pos, y_pos, s_neg = s[pos_index], y[pos_index], s[neg_index]
    if spec.bucketed:
        member_of, counts, means = _buckets(s_pos, s_neg, delta)

    def false_positives(i):
        """FP(i) and the factor H(s_j - s_i) (or H(m_b - s_i)) of every relevant negative."""
        if spec.bucketed:
            h = step(means - s_pos[i], delta)
            return (counts * h).sum(), h[member_of]
        h = step(s_neg - s_pos[i], delta)
        return h.sum(), h

    rank_plus = torch.zeros(p, dtype=torch.float64)
    fp = torch.zeros(p, dtype=torch.float64)
    for i in range(p):
        h_pos = step(s_pos - s_pos[i], delta)
        rank_plus[i] = h_pos.sum() if not spec.interpolated else 1 + h_pos.sum() - h_pos[i]
        fp[i] = false_positives(i)[0]

    grad_rank = torch.zeros_like(s)
    neg_grad = torch.zeros_like(s_neg)
    if spec.interpolated:
        precision = rank_plus / (rank_plus + fp)
        best = 0.0
        best_after = torch.zeros(p, dtype=torch.float64)
        for i in torch.argsort(s_pos, stable=True).tolist():
            if best <= precision[i]:
                best, factor = float(precision[i]), 1.0
            else:
                factor = (1 - best) / (1 - float(precision[i]))
            best_after[i] = best
            neg_grad += factor * false_positives(i)[1] / (rank_plus[i] + fp[i]) / p
        grad_rank[pos_index] = -(1 - best_after) / p
        grad_rank[neg_index] = neg_grad
        return (1 - best_after.mean(),), (grad_rank,)

    ranking_error = fp / (rank_plus + fp)
    for i in range(p):
        if fp[i] > 0:
            neg_grad += ranking_error[i] * false_positives(i)[1] / fp[i] / p
    grad_rank[pos_index] = -ranking_error / p
    grad_rank[neg_index] = neg_grad
    if not spec.sorting:
        return (ranking_error.mean(),), (grad_rank,)

    sorting_error = torch.zeros(p, dtype=torch.float64)
    lower_quality = torch.zeros(p, dtype=torch.float64)  # D(i)
    for i in range(p):
        h_pos = step(s_pos - s_pos[i], delta)
        not_worse = (y_pos >= y_pos[i]).double()
        current = (h_pos * (1 - y_pos)).sum() / rank_plus[i]
        target = (h_pos * not_worse * (1 - y_pos)).sum() / (h_pos * not_worse).sum()
        sorting_error[i] = current - target
        lower_quality[i] = (h_pos * (y_pos < y_pos[i]).double()).sum()
    pos_sort_grad = torch.zeros(p, dtype=torch.float64)
    for k in range(p):
        if lower_quality[k] > 0:
            pos_sort_grad[k] -= sorting_error[k]
            h = step(s_pos - s_pos[k], delta) * (y_pos < y_pos[k]).double()
            pos_sort_grad += sorting_error[k] * h / lower_quality[k]
    grad_sort = torch.zeros_like(s)
    grad_sort[pos_index] = pos_sort_grad / p
    return (ranking_error.mean(), sorting_error.mean()), (grad_rank, grad_sort)


def alrp_reference(s: torch.Tensor, y: torch.Tensor, delta: float, spec, regression: torch.Tensor):
    """aLRP's classification part, straight from its definition.

    Args:
        s, y: as :func:`ranking_reference`; ``regression``: l_k, one per positive in flat order.
    Returns:
        ``((classification, rank), (grad,))``: the loss (0-d), rank(i) = rank+(i) + FP(i) of the
        positives in flat order, and d classification / d logits (float64), or ``None`` without
        positives.
    """
    s, y, pos_index, neg_index = _sets(s, y, delta)
    p = pos_index.numel()
    if p == 0:
        return None
    l = regression.detach().reshape(-1).double().cpu()
    if l.numel() != p:
        raise ValueError(f"regression_losses must hold one value per positive target ({p}, in flat order), "
                         f"got {l.numel()}")
    s_pos, s_neg = s[pos_index], s[neg_index]
    if spec.bucketed:
        member_of, counts, means = _buckets(s_pos, s_neg, delta)
    grad = torch.zeros_like(s)
    neg_grad = torch.zeros_like(s_neg)
    rank = torch.zeros(p, dtype=torch.float64)
    error = torch.zeros(p, dtype=torch.float64)
    for i in range(p):
        others = torch.arange(p) != i
        h_pos = step(s_pos[others] - s_pos[i], delta)
        if spec.bucketed:
            h_bucket = step(means - s_pos[i], delta)
            fp, h_neg = (counts * h_bucket).sum(), h_bucket[member_of]
        else:
            h_neg = step(s_neg - s_pos[i], delta)
            fp = h_neg.sum()
        rank[i] = 1 + h_pos.sum() + fp
        error[i] = fp / rank[i]
        if fp > 1e-5:
            g = -((h_pos * l[others]).sum() + fp) / rank[i]
            grad[pos_index[i]] = g / p
            neg_grad += -g * h_neg / fp / p
    grad[neg_index] = neg_grad
    return (error.mean(), rank), (grad,)


def alrp_localisation_reference(s: torch.Tensor, y: torch.Tensor, regression: torch.Tensor, rank: torch.Tensor):
    """aLRP's localisation part and its gradient in the regression losses, one positive at a time:
    ``mean_i (sum of l_k over positives k ranked at or above i) / rank(i)``, in descending logit
    order with ties in flat order. ``rank``: of the positives in flat order. Returns
    ``(localisation, d localisation / d regression)`` in float64."""
    s = s.detach().reshape(-1).double().cpu()
    pos_logits = s[(y.detach().reshape(-1) > 0).cpu()]
    l = regression.detach().reshape(-1).double().cpu()
    rank = rank.detach().double().cpu()
    p = l.numel()
    loss = torch.zeros((), dtype=torch.float64)
    grad = torch.zeros(p, dtype=torch.float64)

    def at_or_above(k, i):  # descending logit order, ties broken by flat order
        return bool(pos_logits[k] > pos_logits[i]) or (bool(pos_logits[k] == pos_logits[i]) and k <= i)

    for i in range(p):
        for k in range(p):
            if at_or_above(k, i):
                loss += l[k] / rank[i] / p
                grad[k] += 1 / rank[i] / p
    return loss, grad



def localisation_weights(s: torch.Tensor, y: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """``c_k = (1/p) sum_{i ranked at or below k} 1 / rank(i)`` for the positives in flat order:
    the localisation part is ``sum_k c_k l_k``, so ``c`` is its gradient (of the oracle above)."""
    return alrp_localisation_reference(s, y, torch.zeros(rank.numel()), rank)[1]


def reference_for(spec):
    """The O(P*N) oracle of a ``registry.LossSpec``: ``(s, y, delta, spec, regression)`` ->
    ``((losses...), (gradients...))`` or None without positives."""
    return alrp_reference if spec.regression else ranking_reference
