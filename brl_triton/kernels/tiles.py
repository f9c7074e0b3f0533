"""The O(P * bins) and O(P^2) terms, tiled in registers: no P x bins or P x P tensor in memory.

Positives are sorted ascending. H is evaluated on differences of nearby float values plus the
bin's mean offset, ``H((lower_b - s_i) + mean_offset_b)``, never on raw large logits, and every
sum is accumulated in float64.

- ``positive_sums``: one program per block of positive rows; loops over bins (FP) and over
  positives (rank+, and the sorting sums for Rank & Sort).
- ``sorting_received``: rows i, loop over k: ``sum_k share_k H(s_i - s_k) [y_i < y_k]``.
- ``bin_gradient``: one program per block of bins; loops over positives: per bin
  ``sum_i w_i H(value_b - s_i)``, and for the exact losses the slope ``sum_i w_i / 2delta``
  over the positives whose window ``[s_i - delta, s_i + delta)`` holds the bin.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import configs, size_class

_TILES = configs({"BLOCK_ROWS": 32, "BLOCK_COLS": 64}, {"BLOCK_ROWS": 64, "BLOCK_COLS": 64},
                 {"BLOCK_ROWS": 32, "BLOCK_COLS": 128}, num_warps=(4,))


@triton.jit
def _step(x, inv_two_delta, SMOOTH: tl.constexpr):
    """H(x): clamp(x / 2delta + 1/2, 0, 1), or x >= 0 when delta == 0."""
    if SMOOTH:
        return tl.minimum(tl.maximum(x * inv_two_delta + 0.5, 0.0), 1.0)
    return (x >= 0).to(x.dtype)


@triton.jit
def _mean_offset(count, offset_sum):
    return tl.where(count > 0, offset_sum / tl.maximum(count, 1.0), 0.0)


@triton.autotune(configs=_TILES, key=["p_class", "bins_class"])
@triton.jit
def _positive_sums_kernel(
    s_ptr, y_ptr, p, lower_ptr, count_ptr, offset_sum_ptr, num_bins, out_ptr, inv_two_delta, p_class, bins_class,
    SMOOTH: tl.constexpr, SORTING: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    """out rows: fp, rank+, sort_current, sort_target, sort_target_count, lower_quality (p each)."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < p
    s_i = tl.load(s_ptr + rows, mask=row_ok, other=0.0)
    y_i = tl.load(y_ptr + rows, mask=row_ok, other=0.0)
    fp = tl.zeros([BLOCK_ROWS], dtype=tl.float64)
    for start in range(0, num_bins, BLOCK_COLS):
        cols = start + tl.arange(0, BLOCK_COLS)
        col_ok = cols < num_bins
        count = tl.load(count_ptr + cols, mask=col_ok, other=0).to(s_i.dtype)
        lower = tl.load(lower_ptr + cols, mask=col_ok, other=0.0)
        x = lower[None, :] - s_i[:, None]
        if SMOOTH:
            x += _mean_offset(count, tl.load(offset_sum_ptr + cols, mask=col_ok, other=0.0))[None, :]
        h = _step(x, inv_two_delta, SMOOTH)
        fp += tl.sum(h.to(tl.float64) * count[None, :].to(tl.float64), axis=1)

    rank_plus = tl.zeros([BLOCK_ROWS], dtype=tl.float64)
    current = tl.zeros([BLOCK_ROWS], dtype=tl.float64)
    target = tl.zeros([BLOCK_ROWS], dtype=tl.float64)
    target_count = tl.zeros([BLOCK_ROWS], dtype=tl.float64)
    lower_quality = tl.zeros([BLOCK_ROWS], dtype=tl.float64)
    for start in range(0, p, BLOCK_COLS):
        cols = start + tl.arange(0, BLOCK_COLS)
        col_ok = cols < p
        s_k = tl.load(s_ptr + cols, mask=col_ok, other=0.0)
        h = tl.where(col_ok[None, :], _step(s_k[None, :] - s_i[:, None], inv_two_delta, SMOOTH), 0.0)
        h = h.to(tl.float64)
        rank_plus += tl.sum(h, axis=1)
        if SORTING:
            y_k = tl.load(y_ptr + cols, mask=col_ok, other=0.0)
            not_worse = tl.where(y_k[None, :] >= y_i[:, None], h, 0.0)
            one_minus_y = (1.0 - y_k)[None, :]
            current += tl.sum(h * one_minus_y, axis=1)
            target += tl.sum(not_worse * one_minus_y, axis=1)
            target_count += tl.sum(not_worse, axis=1)
            lower_quality += tl.sum(h - not_worse, axis=1)
    tl.store(out_ptr + rows, fp, mask=row_ok)
    tl.store(out_ptr + p + rows, rank_plus, mask=row_ok)
    if SORTING:
        tl.store(out_ptr + 2 * p + rows, current, mask=row_ok)
        tl.store(out_ptr + 3 * p + rows, target, mask=row_ok)
        tl.store(out_ptr + 4 * p + rows, target_count, mask=row_ok)
        tl.store(out_ptr + 5 * p + rows, lower_quality, mask=row_ok)


@triton.autotune(configs=_TILES, key=["p_class"])
@triton.jit
def _sorting_received_kernel(
    s_ptr, y_ptr, share_ptr, p, out_ptr, inv_two_delta, p_class,
    SMOOTH: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < p
    s_i = tl.load(s_ptr + rows, mask=row_ok, other=0.0)
    y_i = tl.load(y_ptr + rows, mask=row_ok, other=0.0)
    received = tl.zeros([BLOCK_ROWS], dtype=tl.float64)
    for start in range(0, p, BLOCK_COLS):
        cols = start + tl.arange(0, BLOCK_COLS)
        col_ok = cols < p
        s_k = tl.load(s_ptr + cols, mask=col_ok, other=0.0)
        y_k = tl.load(y_ptr + cols, mask=col_ok, other=0.0)
        share = tl.load(share_ptr + cols, mask=col_ok, other=0.0)
        h = _step(s_i[:, None] - s_k[None, :], inv_two_delta, SMOOTH).to(tl.float64)
        h = tl.where(col_ok[None, :] & (y_i[:, None] < y_k[None, :]), h, 0.0)
        received += tl.sum(h * share[None, :], axis=1)
    tl.store(out_ptr + rows, received, mask=row_ok)


@triton.autotune(configs=_TILES, key=["p_class", "bins_class"])
@triton.jit
def _bin_gradient_kernel(
    s_ptr, weight_ptr, window_low_ptr, window_high_ptr, p, lower_ptr, count_ptr, offset_sum_ptr,
    num_bins, const_ptr, slope_ptr, inv_two_delta, p_class, bins_class,
    SMOOTH: tl.constexpr, AFFINE: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    """const[b] (and slope[b]) for bins b; const is the gradient at the bin's lower edge."""
    bins = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    bin_ok = bins < num_bins
    lower = tl.load(lower_ptr + bins, mask=bin_ok, other=0.0)
    count = tl.load(count_ptr + bins, mask=bin_ok, other=0).to(lower.dtype)
    offset = _mean_offset(count, tl.load(offset_sum_ptr + bins, mask=bin_ok, other=0.0))
    const = tl.zeros([BLOCK_ROWS], dtype=tl.float64)
    slope = tl.zeros([BLOCK_ROWS], dtype=tl.float64)
    for start in range(0, p, BLOCK_COLS):
        cols = start + tl.arange(0, BLOCK_COLS)
        col_ok = cols < p
        s_i = tl.load(s_ptr + cols, mask=col_ok, other=0.0)
        w = tl.load(weight_ptr + cols, mask=col_ok, other=0.0)
        x = lower[:, None] - s_i[None, :]
        if SMOOTH:
            x += offset[:, None]
        h = _step(x, inv_two_delta, SMOOTH).to(tl.float64)
        const += tl.sum(h * w[None, :], axis=1)
        if AFFINE:
            low = tl.load(window_low_ptr + cols, mask=col_ok, other=0.0)
            high = tl.load(window_high_ptr + cols, mask=col_ok, other=0.0)
            inside = (lower[:, None] >= low[None, :]) & (lower[:, None] < high[None, :])
            slope += tl.sum(tl.where(inside & col_ok[None, :], w[None, :], 0.0), axis=1)
    if AFFINE:
        slope = slope * inv_two_delta
        const -= slope * offset.to(tl.float64)  # from the bin's mean to its lower edge
        tl.store(slope_ptr + bins, slope, mask=bin_ok)
    tl.store(const_ptr + bins, const, mask=bin_ok)


def _inv_two_delta(delta: float) -> float:
    return 0.5 / delta if delta > 0 else 0.0


def positive_sums(s_pos, y_pos, lower, count, offset_sum, delta: float, sorting: bool) -> torch.Tensor:
    """(6, p) float64: fp, rank+, sort_current, sort_target, sort_target_count, lower_quality
    (the last four only for Rank & Sort)."""
    p, num_bins = s_pos.numel(), lower.numel()
    out = torch.zeros(6, p, dtype=torch.float64, device=s_pos.device)
    grid = lambda meta: (triton.cdiv(p, meta["BLOCK_ROWS"]),)  # noqa: E731
    _positive_sums_kernel[grid](
        s_pos, y_pos, p, lower, count, offset_sum, num_bins, out, _inv_two_delta(delta), size_class(p),
        size_class(num_bins), SMOOTH=delta > 0, SORTING=sorting,
    )
    return out


def sorting_received(s_pos, y_pos, share, delta: float) -> torch.Tensor:
    p = s_pos.numel()
    out = torch.empty(p, dtype=torch.float64, device=s_pos.device)
    grid = lambda meta: (triton.cdiv(p, meta["BLOCK_ROWS"]),)  # noqa: E731
    _sorting_received_kernel[grid](s_pos, y_pos, share, p, out, _inv_two_delta(delta), size_class(p),
                                   SMOOTH=delta > 0)
    return out


def bin_gradient(s_pos, weight, lower, count, offset_sum, delta: float, windows=None):
    """Per bin: (const, slope or None), float64. ``windows``: the breakpoints ``(s_pos - delta,
    s_pos + delta)`` exactly as the edges were built, for the exact losses (affine bins)."""
    num_bins = lower.numel()
    const = torch.empty(num_bins, dtype=torch.float64, device=s_pos.device)
    slope = torch.empty_like(const) if windows is not None else None
    low, high = windows if windows is not None else (s_pos, s_pos)
    grid = lambda meta: (triton.cdiv(num_bins, meta["BLOCK_ROWS"]),)  # noqa: E731
    _bin_gradient_kernel[grid](
        s_pos, weight, low, high, s_pos.numel(), lower, count, offset_sum, num_bins, const,
        const if slope is None else slope, _inv_two_delta(delta), size_class(s_pos.numel()), size_class(num_bins),
        SMOOTH=delta > 0, AFFINE=windows is not None,
    )
    return const, slope
