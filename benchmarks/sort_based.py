"""The paper's own pipeline, written from its description, as a baseline for the benchmarks.

Bucketed Rank & Sort / bucketed AP the way the official implementation organises the work:
a full descending sort of all relevant logits, the contiguous runs of negatives between
consecutive positives as buckets (sizes and means by segment sums over the sorted order), and
dense buckets x positives and positives x positives relation matrices. Returns the losses and
the identity-update gradient of their sum (unit upstream gradients), like the official code.

Not part of the library: it exists so that the sort-free design is timed against the paper's
pipeline in the same run. Ties between a negative and a positive fall wherever the sort puts
them, so it matches the spec exactly only for distinct logits.
"""

from __future__ import annotations

import torch


def _step(x: torch.Tensor, delta: float) -> torch.Tensor:
    if delta > 0:
        return (x / (2 * delta) + 0.5).clamp_(0, 1)
    return (x >= 0).to(x.dtype)


def sort_based_bucketed_loss(logits: torch.Tensor, targets: torch.Tensor, delta: float, sorting: bool = True):
    """``(losses, grad)``: losses ``(ranking, sorting)`` for BRS or ``(ranking,)`` for BAP."""
    s, y = logits.detach().reshape(-1).float(), targets.reshape(-1).float()
    grad = torch.zeros_like(s)
    positive = y > 0
    p = int(positive.sum())
    if p == 0:
        zero = s.new_zeros(())
        return ((zero, zero) if sorting else (zero,)), grad
    threshold = s[positive].min() - delta
    kept = (positive | ((y == 0) & (s >= threshold))).nonzero().squeeze(1)
    order = torch.argsort(s[kept], descending=True)  # the full sort of the paper's pipeline
    s_sorted, y_sorted = s[kept][order], y[kept][order]
    is_pos = y_sorted > 0
    # bucket of a negative = number of positives before it in descending order
    bucket = torch.cumsum(is_pos.to(torch.int64), 0)
    neg_bucket = bucket[~is_pos]
    size = torch.bincount(neg_bucket, minlength=p + 1).to(s.dtype)
    total = torch.bincount(neg_bucket, weights=s_sorted[~is_pos], minlength=p + 1)
    occupied = size > 0
    mean = total[occupied] / size[occupied]

    s_pos, y_pos = s_sorted[is_pos], y_sorted[is_pos]
    bucket_vs_pos = _step(mean[:, None] - s_pos[None, :], delta)  # B x P, H(m_b - s_i)
    fp = size[occupied] @ bucket_vs_pos
    pos_vs_pos = _step(s_pos[None, :] - s_pos[:, None], delta)  # P x P, [i, k] = H(s_k - s_i)
    rank_plus = pos_vs_pos.sum(1)
    ranking_error = fp / (rank_plus + fp)
    weight = torch.where(fp > 0, ranking_error / fp.clamp(min=1e-30), 0.0) / p
    bucket_grad = torch.zeros(p + 1, dtype=s.dtype, device=s.device)
    bucket_grad[occupied] = bucket_vs_pos @ weight
    grad_sorted = torch.empty_like(s_sorted)
    grad_sorted[~is_pos] = bucket_grad[neg_bucket]
    pos_grad = -ranking_error / p
    losses = (ranking_error.mean(),)

    if sorting:
        not_worse = (y_pos[None, :] >= y_pos[:, None]).to(s.dtype)
        current = (pos_vs_pos @ (1 - y_pos)) / rank_plus
        target = ((pos_vs_pos * not_worse) @ (1 - y_pos)) / (pos_vs_pos * not_worse).sum(1)
        sorting_error = current - target
        lower = (pos_vs_pos * (1 - not_worse)).sum(1)
        share = torch.where(lower > 0, sorting_error / lower.clamp(min=1e-30), 0.0)
        # received[i] = sum_k share_k H(s_i - s_k) [y_i < y_k]: row k of pos_vs_pos holds H(s_i - s_k)
        receives = pos_vs_pos * (y_pos[None, :] < y_pos[:, None]).to(s.dtype)
        received = share @ receives
        pos_grad = pos_grad + (received - torch.where(lower > 0, sorting_error, 0.0)) / p
        losses = losses + (sorting_error.mean(),)

    grad_sorted[is_pos] = pos_grad
    grad_kept = torch.empty_like(grad_sorted)
    grad_kept[order] = grad_sorted
    grad[kept] = grad_kept
    return losses, grad.view(logits.shape)


def official_alrp_loop(logits: torch.Tensor, targets: torch.Tensor, regression_losses: torch.Tensor,
                       delta: float = 1.0, eps: float = 1e-5):
    """aLRP the way the official code organises it: a Python loop over the positives, each step
    relating one positive to every positive and every relevant negative (O(P * N) work, O(N)
    memory). Returns ``((classification, localisation), logits_grad, regression_grad)`` for unit
    upstream gradients."""
    s, y = logits.detach().reshape(-1).float(), targets.reshape(-1).float()
    l = regression_losses.detach().reshape(-1).float()
    grad = torch.zeros_like(s)
    positive = y > 0
    fg = s[positive]
    p = fg.numel()
    if p == 0:
        zero = s.new_zeros(())
        return (zero, zero), grad, torch.zeros_like(l)
    relevant = (y == 0) & (s >= fg.min() - delta)
    bg = s[relevant]
    fg_grad = torch.zeros_like(fg)
    bg_grad = torch.zeros_like(bg)
    rank = torch.zeros_like(fg)
    precision = torch.zeros_like(fg)
    for i in range(p):
        fg_h = _step(fg - fg[i], delta)
        fg_h[i] = 0
        bg_h = _step(bg - fg[i], delta)
        rank_plus = 1 + fg_h.sum()
        fp = bg_h.sum()
        rank[i] = rank_plus + fp
        precision[i] = rank_plus / rank[i]
        if fp > eps:
            fg_grad[i] = -((fg_h * l).sum() + fp) / rank[i]
            bg_grad += bg_h * (-fg_grad[i] / fp)
    grad[positive] = fg_grad / p
    grad[relevant] = bg_grad / p
    order = torch.sort(fg, descending=True, stable=True).indices
    localisation = (torch.cumsum(l[order], 0) / rank[order]).mean()
    regression_grad = torch.zeros_like(l)
    regression_grad[order] = torch.flip(torch.cumsum(torch.flip(1 / rank[order], [0]), 0), [0]) / p
    return (1 - precision.mean(), localisation), grad.view(logits.shape), regression_grad
