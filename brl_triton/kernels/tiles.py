"""The O(p * bins) and O(p^2) terms, tiled in registers, and every O(p) formula after them:
no p x bins or p x p tensor in memory, and no torch op between the kernels.

Positives are sorted ascending. H is evaluated on differences of nearby values plus the bin's
mean offset, ``H((lower_b - s_i) + mean_offset_b)``, never on raw large logits. Products are
in the compute dtype (float32 for float16/bfloat16/float32 logits, which every GPU runs at full
rate); the row sums of a span of tiles (TILE_SPAN columns) are added into float64 accumulators
(blocked accumulation: the float32 part spans at most TILE_SPAN terms, and the float64 adds come
once a span, not once a tile). Deterministic mode adds every term as int64
fixed point instead, which is exact in any order, so the sums do not depend on the tile shape.

- ``per_positive``: one program per block of positive rows; FP over the bins, rank+ and the
  sorting sums over the positives, then per positive the ranking error, its gradient and the
  weight ``w_i`` of the negatives' gradient, the sorting error and its share ``eS / D``; the
  interpolated AP keeps its precision for ``interpolated``; aLRP (``REGRESSION``) also sums the
  regression losses of the positives above, ``sum_k H(s_k - s_i) l_k``.
- ``running_maximum``: one program, the running maximum of precision in ascending logit order.
- ``localisation`` (aLRP): one program per block of positive rows; the localisation weights
  ``c_k``, written in flat order, and the terms ``c_k l_k`` the loss program of ``finish`` sums.
- ``finish``: one launch, three kinds of program: rows of the sorting gradient
  (``sum_k share_k H(s_i - s_k) [y_i < y_k]`` minus what i gives), blocks of bins (gradient
  constant and, for the exact losses, slope), and one program that writes the loss outputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _math as m
from ._config import Tunable, launch, size_class

# Columns summed in the compute dtype before each float64 add (non-deterministic float32 calls):
# 8 tiles of the default config, so that float32 rounding spans 512 terms at most
TILE_SPAN = tl.constexpr(512)

# rows of the per-positive table (float64, ROWS x p)
T_RANK_GRAD = tl.constexpr(0)  # gradient of the ranking output on the positive
T_WEIGHT = tl.constexpr(1)  # w_i: a negative at s gets sum_i w_i H(s - s_i)
T_ERROR = tl.constexpr(2)  # ranking error lR(i); precision for the interpolated AP
T_SORT_ERROR = tl.constexpr(3)  # eS(i); aLRP: p c_i l_i, its localisation term (``localisation``)
T_SHARE = tl.constexpr(4)  # eS(i) / D(i), 0 where D(i) == 0
T_SORT_GRAD = tl.constexpr(5)  # gradient of the sorting output on the positive
T_RANK = tl.constexpr(6)  # rank(i) = rank+(i) + FP(i) (interpolated AP, aLRP)
TABLE_ROWS = 7
TABLE_ALIGN = 16  # elements: 128-byte rows
LOSS_BLOCK = tl.constexpr(1024)  # the loss sums' order, whatever the tile config
ALRP_EPS = tl.constexpr(1e-5)  # aLRP: a positive with FP(i) <= this has no error (``_formulas.ALRP_EPS``)


# The per-positive formulas, as ``_formulas`` writes them for the torch backend and under the same
# names (tests/test_formulas.py feeds both the same sums): float64 per-positive sums in, the
# ranking error, the positives' gradients and the negatives' weight ``w_i`` out.


@triton.jit
def ranking_formulas(fp, rank_plus, count_p):
    """AP and bucketed AP: error FP / (rank+ + FP), its gradient on the positive, and w_i."""
    error = fp / (rank_plus + fp)
    weight = tl.where(fp > 0, error / tl.maximum(fp, 1e-300), 0.0) / count_p
    return error, -error / count_p, weight


@triton.jit
def sorting_formulas(rank_plus, sort_current, sort_target, sort_target_count, lower_quality):
    """Rank & Sort's sorting error eS and its share eS / D (0 where D == 0)."""
    sorting_error = sort_current / rank_plus - sort_target / sort_target_count
    share = tl.where(lower_quality > 0, sorting_error / tl.maximum(lower_quality, 1e-300), 0.0)
    return sorting_error, share


@triton.jit
def interpolated_precision(fp, rank_plus):
    """The interpolated AP's precision and rank(i) (rank+ = 1 + sum over k != i, H(0) = 1/2)."""
    rank_plus += 0.5
    return rank_plus / (rank_plus + fp), rank_plus + fp


@triton.jit
def interpolated_formulas(precision, best, rank, count_p):
    """Given the running maximum ``best`` of precision: the positive's gradient and w_i."""
    factor = tl.where(best <= precision, 1.0, (1 - best) / (1 - precision))
    return -(1 - best) / count_p, factor / rank / count_p


@triton.jit
def alrp_formulas(fp, rank_plus, weighted_rank, regression, count_p):
    """aLRP's error FP / rank, rank(i), the gradient g / p on the positive and w_i."""
    rank = rank_plus + 0.5 + fp  # rank+(i) = 1 + sum over k != i, and H(0) = 1/2
    others = weighted_rank - 0.5 * regression  # k = i was counted with H(0) = 1/2
    wrong = fp > ALRP_EPS
    g = tl.where(wrong, -(others + fp) / rank, 0.0)
    return fp / rank, rank, g / count_p, tl.where(wrong, -g / tl.maximum(fp, 1e-300), 0.0) / count_p


@triton.jit
def _inverse_two_delta(delta_bits):
    delta = m.bits_to_float64(delta_bits)
    return tl.where(delta > 0, 0.5 / tl.maximum(delta, 1e-300), 0.0)  # 0: hard step, unused


@triton.jit
def _bins(edges_ptr, count_ptr, offset_sum_ptr, b, ok, offset_scale, FIXED_POINT: tl.constexpr):
    """Lower edge, count and mean offset of bins b (key b + 1), the edge and the mean in the
    compute dtype (the edges'). The float sums are divided in that dtype: no float64 in the
    tile loops of float32 calls."""
    lower = tl.load(edges_ptr + b, mask=ok, other=0.0)
    count = tl.load(count_ptr + 1 + b, mask=ok, other=0)
    total = tl.load(offset_sum_ptr + 1 + b, mask=ok, other=0)
    if FIXED_POINT:
        mean = total.to(tl.float64) / offset_scale / tl.maximum(count, 1).to(tl.float64)
    else:
        mean = total.to(lower.dtype) / tl.maximum(count, 1).to(lower.dtype)
    return lower, count, tl.where(count > 0, mean, 0.0).to(lower.dtype)


@triton.jit
def _sum_bound(ptr, p, BLOCK: tl.constexpr, FROM_ONE: tl.constexpr = False):
    """1 + sum of |v| (FROM_ONE: of |1 - v|) over the p values at ptr (float64): a bound for
    fixed-point sums of them (FROM_ONE: of h * (1 - y) with h in [0, 1], which targets above one,
    ``allow_targets_above_one``, push past p)."""
    total = p.to(tl.float64) * 0.0 + 1.0
    for start in range(0, p, BLOCK):
        k = start + tl.arange(0, BLOCK)
        v = tl.load(ptr + k, mask=k < p, other=1.0 if FROM_ONE else 0.0).to(tl.float64)
        if FROM_ONE:
            v = 1.0 - v
        total += tl.sum(tl.abs(v), axis=0)
    return total


# The tile loops' bodies. SPANS (float32 terms, not deterministic): each span of TILE_SPAN columns
# is summed in float32 and added to the float64 sums once; otherwise every tile is added directly
# (exact int64 fixed point, or float64 terms), as one flat loop.


@triton.jit
def _false_positive_tile(fp, start, s_i, inv, edges_ptr, count_ptr, offset_sum_ptr, num_edges, offset_scale, n_scale,
                         SMOOTH: tl.constexpr, FIXED_POINT: tl.constexpr, DETERMINISTIC: tl.constexpr,
                         BLOCK_COLS: tl.constexpr):
    """``fp`` plus one tile of bins: ``count_b * H(lower_b + mean_b - s_i)`` summed over the tile."""
    b = start + tl.arange(0, BLOCK_COLS)
    lower, count, mean = _bins(edges_ptr, count_ptr, offset_sum_ptr, b, b < num_edges, offset_scale, FIXED_POINT)
    x = lower[None, :] - s_i[:, None]
    if SMOOTH:
        x += mean[None, :]
    return m.fixed_sum(fp, m.step(x, inv, SMOOTH) * count.to(s_i.dtype)[None, :], n_scale, DETERMINISTIC)


@triton.jit
def _positive_pairs_tile(rank_plus, weighted, current, target, target_count, lower_quality, start, p, s_i, y_key_i,
                         inv, s_pos_ptr, y_pos_ptr, l_pos_ptr, p_scale, l_scale, y_scale, SMOOTH: tl.constexpr,
                         SORTING: tl.constexpr, REGRESSION: tl.constexpr, DETERMINISTIC: tl.constexpr,
                         BLOCK_COLS: tl.constexpr):
    """The sums over one tile of positives k: rank+ (``H(s_k - s_i)``), aLRP's ``H * l_k``, and
    Rank & Sort's sorting sums (``H (1 - y_k)``, and over the k not worse than i)."""
    k = start + tl.arange(0, BLOCK_COLS)
    k_ok = k < p
    s_k = tl.load(s_pos_ptr + k, mask=k_ok, other=0.0)
    h = tl.where(k_ok[None, :], m.step(s_k[None, :] - s_i[:, None], inv, SMOOTH), 0.0)
    rank_plus = m.fixed_sum(rank_plus, h, p_scale, DETERMINISTIC)
    if REGRESSION:
        l_k = tl.load(l_pos_ptr + k, mask=k_ok, other=0.0).to(s_i.dtype)
        weighted = m.fixed_sum(weighted, h * l_k[None, :], l_scale, DETERMINISTIC)
    if SORTING:
        y_k = tl.load(y_pos_ptr + k, mask=k_ok, other=0.0)
        not_worse = tl.where(m.positive_order_key(y_k)[None, :] >= y_key_i[:, None], h, 0.0)
        # exact for float32 targets, as the float64 difference rounded to float32 would be
        one_minus_y = (1.0 - y_k.to(s_i.dtype))[None, :]
        current = m.fixed_sum(current, h * one_minus_y, y_scale, DETERMINISTIC)
        target = m.fixed_sum(target, not_worse * one_minus_y, y_scale, DETERMINISTIC)
        target_count = m.fixed_sum(target_count, not_worse, p_scale, DETERMINISTIC)
        lower_quality = m.fixed_sum(lower_quality, h - not_worse, p_scale, DETERMINISTIC)
    return rank_plus, weighted, current, target, target_count, lower_quality


@triton.jit
def _sorting_tile(received, start, p, s_i, y_key_i, inv, s_pos_ptr, y_pos_ptr, table_ptr, stride, share_scale,
                  SMOOTH: tl.constexpr, DETERMINISTIC: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """``received`` plus one tile of better-target positives k: ``share_k H(s_i - s_k)``."""
    k = start + tl.arange(0, BLOCK_COLS)
    k_ok = k < p
    s_k = tl.load(s_pos_ptr + k, mask=k_ok, other=0.0)
    y_key_k = m.positive_order_key(tl.load(y_pos_ptr + k, mask=k_ok, other=0.0))
    share = tl.load(table_ptr + T_SHARE * stride + k, mask=k_ok, other=0.0).to(s_i.dtype)
    h = m.step(s_i[:, None] - s_k[None, :], inv, SMOOTH)
    h = tl.where(k_ok[None, :] & (y_key_i[:, None] < y_key_k[None, :]), h, 0.0)
    return m.fixed_sum(received, h * share[None, :], share_scale, DETERMINISTIC)


@triton.jit
def _bin_gradient_tile(const, slope, start, p, lower, mean, inv, delta, s_pos_ptr, table_ptr, stride, w_scale,
                       SMOOTH: tl.constexpr, HAS_SLOPE: tl.constexpr, DETERMINISTIC: tl.constexpr,
                       BLOCK_COLS: tl.constexpr):
    """The bins' gradient sums over one tile of positives i: ``w_i H(value_b - s_i)`` and, for
    the slope, ``w_i`` where the bin lies in i's window."""
    i = start + tl.arange(0, BLOCK_COLS)
    i_ok = i < p
    s_i = tl.load(s_pos_ptr + i, mask=i_ok, other=0.0)
    w = tl.load(table_ptr + T_WEIGHT * stride + i, mask=i_ok, other=0.0).to(lower.dtype)
    x = lower[:, None] - s_i[None, :]
    if SMOOTH:
        x += mean[:, None]
    const = m.fixed_sum(const, m.step(x, inv, SMOOTH) * w[None, :], w_scale, DETERMINISTIC)
    if HAS_SLOPE:
        # the positives whose window [s_i - delta, s_i + delta) holds the bin, with the
        # breakpoints exactly as ``prepare`` built the edges
        low = m.rounded_up_sum(s_i, -delta)
        high = m.rounded_up_sum(s_i, delta)
        inside = (lower[:, None] >= low[None, :]) & (lower[:, None] < high[None, :]) & i_ok[None, :]
        slope = m.fixed_sum(slope, tl.where(inside, w[None, :], 0.0), w_scale, DETERMINISTIC)
    return const, slope


@triton.jit(do_not_specialize=["p_bound", "n_total", "fp_bound", "stride", "delta_bits", "p_class", "bins_class"])
def _per_positive_kernel(
    s_pos_ptr, y_pos_ptr, l_pos_ptr, p_bound, edges_ptr, count_ptr, offset_sum_ptr, status_ptr, n_total, fp_bound,
    table_ptr, stride, delta_bits, p_class, bins_class,
    SMOOTH: tl.constexpr, SORTING: tl.constexpr, INTERPOLATED: tl.constexpr, REGRESSION: tl.constexpr,
    FIXED_POINT: tl.constexpr, DETERMINISTIC: tl.constexpr, SPANS: tl.constexpr, BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    """The grid covers ``p_bound`` rows; p and the edge count come from the status words, and
    the programs past p do nothing. SPANS: see the tile loops' bodies above."""
    p, num_edges = m.positives_and_edges(status_ptr, p_bound)
    if tl.program_id(0) * BLOCK_ROWS < p:
        rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_ok = rows < p
        s_i = tl.load(s_pos_ptr + rows, mask=row_ok, other=0.0)
        y_key_i = m.positive_order_key(tl.load(y_pos_ptr + rows, mask=row_ok, other=0.0))
        inv = _inverse_two_delta(delta_bits).to(s_i.dtype)
        n_scale = m.power_of_two_scale(fp_bound.to(tl.float64) + 1.0)  # FP(i) <= relevant negatives
        p_scale = m.power_of_two_scale(p.to(tl.float64) + 1.0)
        offset_scale = 1.0
        if FIXED_POINT:
            offset_scale = m.offset_scale(status_ptr, edges_ptr, n_total)
        fp = m.zero_sums(BLOCK_ROWS, DETERMINISTIC)
        if SPANS:
            for span in range(0, num_edges, TILE_SPAN):
                fp_span = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
                for start in range(span, tl.minimum(span + TILE_SPAN, num_edges), BLOCK_COLS):
                    fp_span = _false_positive_tile(fp_span, start, s_i, inv, edges_ptr, count_ptr, offset_sum_ptr,
                                                   num_edges, offset_scale, n_scale, SMOOTH, FIXED_POINT,
                                                   DETERMINISTIC, BLOCK_COLS)
                fp += fp_span.to(tl.float64)
        else:
            for start in range(0, num_edges, BLOCK_COLS):
                fp = _false_positive_tile(fp, start, s_i, inv, edges_ptr, count_ptr, offset_sum_ptr, num_edges,
                                          offset_scale, n_scale, SMOOTH, FIXED_POINT, DETERMINISTIC, BLOCK_COLS)
        fp = m.fixed_value(fp, n_scale, DETERMINISTIC)

        rank_plus = m.zero_sums(BLOCK_ROWS, DETERMINISTIC)
        current = tl.zeros_like(rank_plus)
        target = tl.zeros_like(rank_plus)
        target_count = tl.zeros_like(rank_plus)
        lower_quality = tl.zeros_like(rank_plus)
        weighted = tl.zeros_like(rank_plus)
        l_scale = p_scale
        if REGRESSION and DETERMINISTIC:
            l_scale = m.power_of_two_scale(_sum_bound(l_pos_ptr, p, BLOCK_COLS))
        y_scale = p_scale
        if SORTING and DETERMINISTIC:
            y_scale = m.power_of_two_scale(_sum_bound(y_pos_ptr, p, BLOCK_COLS, FROM_ONE=True))
        if SPANS:
            for span in range(0, p, TILE_SPAN):
                spans = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
                rank_plus_span, weighted_span, current_span, target_span = spans, spans, spans, spans
                target_count_span, lower_quality_span = spans, spans
                for start in range(span, tl.minimum(span + TILE_SPAN, p), BLOCK_COLS):
                    (rank_plus_span, weighted_span, current_span, target_span, target_count_span,
                     lower_quality_span) = _positive_pairs_tile(
                        rank_plus_span, weighted_span, current_span, target_span, target_count_span,
                        lower_quality_span, start, p, s_i, y_key_i, inv, s_pos_ptr, y_pos_ptr, l_pos_ptr, p_scale,
                        l_scale, y_scale, SMOOTH, SORTING, REGRESSION, DETERMINISTIC, BLOCK_COLS)
                rank_plus += rank_plus_span.to(tl.float64)
                if REGRESSION:
                    weighted += weighted_span.to(tl.float64)
                if SORTING:
                    current += current_span.to(tl.float64)
                    target += target_span.to(tl.float64)
                    target_count += target_count_span.to(tl.float64)
                    lower_quality += lower_quality_span.to(tl.float64)
        else:
            for start in range(0, p, BLOCK_COLS):
                rank_plus, weighted, current, target, target_count, lower_quality = _positive_pairs_tile(
                    rank_plus, weighted, current, target, target_count, lower_quality, start, p, s_i, y_key_i, inv,
                    s_pos_ptr, y_pos_ptr, l_pos_ptr, p_scale, l_scale, y_scale, SMOOTH, SORTING, REGRESSION,
                    DETERMINISTIC, BLOCK_COLS)
        rank_plus = m.fixed_value(rank_plus, p_scale, DETERMINISTIC)
        count_p = p.to(tl.float64)
        if REGRESSION:
            l_i = tl.load(l_pos_ptr + rows, mask=row_ok, other=0.0).to(tl.float64)
            error, rank, rank_grad, weight = alrp_formulas(fp, rank_plus, m.fixed_value(weighted, l_scale, DETERMINISTIC),
                                                           l_i, count_p)
            tl.store(table_ptr + T_ERROR * stride + rows, error, mask=row_ok)
            tl.store(table_ptr + T_RANK * stride + rows, rank, mask=row_ok)
            tl.store(table_ptr + T_RANK_GRAD * stride + rows, rank_grad, mask=row_ok)
            tl.store(table_ptr + T_WEIGHT * stride + rows, weight, mask=row_ok)
        elif INTERPOLATED:  # the running maximum of precision follows in _interpolated_kernel
            precision, rank = interpolated_precision(fp, rank_plus)
            tl.store(table_ptr + T_ERROR * stride + rows, precision, mask=row_ok)
            tl.store(table_ptr + T_RANK * stride + rows, rank, mask=row_ok)
        else:
            error, rank_grad, weight = ranking_formulas(fp, rank_plus, count_p)
            tl.store(table_ptr + T_ERROR * stride + rows, error, mask=row_ok)
            tl.store(table_ptr + T_RANK_GRAD * stride + rows, rank_grad, mask=row_ok)
            tl.store(table_ptr + T_WEIGHT * stride + rows, weight, mask=row_ok)
        if SORTING:
            sorting_error, share = sorting_formulas(
                rank_plus, m.fixed_value(current, y_scale, DETERMINISTIC), m.fixed_value(target, y_scale, DETERMINISTIC),
                m.fixed_value(target_count, p_scale, DETERMINISTIC), m.fixed_value(lower_quality, p_scale, DETERMINISTIC))
            tl.store(table_ptr + T_SORT_ERROR * stride + rows, sorting_error, mask=row_ok)
            tl.store(table_ptr + T_SHARE * stride + rows, share, mask=row_ok)


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


@triton.jit(do_not_specialize=["stride", "p_bound"])
def _interpolated_kernel(table_ptr, stride, status_ptr, p_bound, loss_ptr, BLOCK: tl.constexpr):
    """Running maximum of precision in ascending logit order (best_i), its factor, the gradient
    tables and the loss ``1 - mean_i best_i`` (0 without positives), in one program."""
    p, _ = m.positives_and_edges(status_ptr, p_bound)
    count_p = p.to(tl.float64)
    carry = count_p * 0.0
    total = count_p * 0.0
    for start in range(0, p, BLOCK):
        rows = start + tl.arange(0, BLOCK)
        ok = rows < p
        precision = tl.load(table_ptr + T_ERROR * stride + rows, mask=ok, other=0.0)
        best = tl.maximum(tl.associative_scan(precision, 0, _maximum), carry)
        carry = tl.max(best, axis=0)
        rank = tl.load(table_ptr + T_RANK * stride + rows, mask=ok, other=1.0)
        rank_grad, weight = interpolated_formulas(precision, best, rank, count_p)
        tl.store(table_ptr + T_RANK_GRAD * stride + rows, rank_grad, mask=ok)
        tl.store(table_ptr + T_WEIGHT * stride + rows, weight, mask=ok)
        total += tl.sum(tl.where(ok, best, 0.0), axis=0)
    tl.store(loss_ptr, tl.where(p > 0, 1 - total / tl.maximum(count_p, 1.0), 0.0).to(loss_ptr.dtype.element_ty))


@triton.jit(do_not_specialize=["p_bound", "stride", "n_total", "delta_bits"])
def _localisation_kernel(s_pos_ptr, sorted_index_ptr, flat_rank_ptr, l_pos_ptr, table_ptr, stride, status_ptr, p_bound,
                         n_total, delta_bits, weights_ptr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """aLRP's localisation weights ``c_k = (1/p) sum of 1 / rank(i) over positives i ranked at or
    below k`` (descending logits, ties in flat order: i is at or below k when s_i < s_k, or
    s_i == s_k and i is not before k in flat order), as ``pipeline.localisation_terms`` defines
    them. Written to ``weights_ptr`` at each positive's flat rank, and ``p c_k l_k`` to the
    table's T_SORT_ERROR row for the loss program of ``finish``. Each program sums in a fixed
    order: deterministic in any mode. The weights are the regression losses' gradient: NaN, as
    every other output, for a call whose values are bad (float32 logits on this path)."""
    p, _ = m.positives_and_edges(status_ptr, p_bound)
    bad = m.bad_values(status_ptr, p_bound, n_total.to(tl.float64), m.bits_to_float64(delta_bits),
                       3.4028234663852886e38)
    bad |= tl.load(status_ptr + m.STATUS_INVALID) != 0
    if bad:  # every weight NaN; the positions of a bad call may be unset
        rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        tl.store(weights_ptr + rows, tl.full([BLOCK_ROWS], float("nan"), tl.float64), mask=rows < p_bound)
    elif tl.program_id(0) * BLOCK_ROWS < p:
        rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_ok = rows < p
        s_k = tl.load(s_pos_ptr + rows, mask=row_ok, other=0.0)
        position_k = tl.load(sorted_index_ptr + rows, mask=row_ok, other=0)
        share = tl.zeros([BLOCK_ROWS], dtype=tl.float64)
        for start in range(0, p, BLOCK_COLS):
            i = start + tl.arange(0, BLOCK_COLS)
            i_ok = i < p
            s_i = tl.load(s_pos_ptr + i, mask=i_ok, other=0.0)
            position_i = tl.load(sorted_index_ptr + i, mask=i_ok, other=0)
            inverse_rank = 1.0 / tl.load(table_ptr + T_RANK * stride + i, mask=i_ok, other=1.0)
            below = (s_i[None, :] < s_k[:, None]) | ((s_i[None, :] == s_k[:, None])
                                                    & (position_i[None, :] >= position_k[:, None]))
            share += tl.sum(tl.where(i_ok[None, :] & below, inverse_rank[None, :], 0.0), axis=1)
        flat_rank = tl.load(flat_rank_ptr + rows, mask=row_ok, other=0)
        tl.store(weights_ptr + flat_rank, share / p.to(tl.float64), mask=row_ok)
        l_k = tl.load(l_pos_ptr + rows, mask=row_ok, other=0.0)
        tl.store(table_ptr + T_SORT_ERROR * stride + rows, share * l_k, mask=row_ok)


@triton.jit(do_not_specialize=["p_bound", "e_bound", "n_total", "stride", "delta_bits", "p_class", "bins_class"])
def _finish_kernel(
    s_pos_ptr, y_pos_ptr, p_bound, edges_ptr, e_bound, count_ptr, offset_sum_ptr, status_ptr, n_total, table_ptr,
    stride, const_ptr, slope_ptr, rank_loss_ptr, sort_loss_ptr, delta_bits, p_class, bins_class,
    SMOOTH: tl.constexpr, SORTING: tl.constexpr, HAS_SLOPE: tl.constexpr, INTERPOLATED: tl.constexpr,
    REGRESSION: tl.constexpr, LOCALISATION: tl.constexpr, FIXED_POINT: tl.constexpr, DETERMINISTIC: tl.constexpr,
    SPANS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    """The grid is sized by the host's bounds (``p_bound`` positives, ``e_bound`` edges); p and
    the edge count come from the status words, and programs past them do nothing.
    ``LOCALISATION``: ``localisation`` ran; the second loss output is aLRP's localisation part."""
    pid = tl.program_id(0)
    p, num_edges = m.positives_and_edges(status_ptr, p_bound)
    count_p = p.to(tl.float64)
    inv64 = _inverse_two_delta(delta_bits)
    if SORTING:
        sort_programs = tl.cdiv(p_bound, BLOCK_ROWS)
    else:
        sort_programs = 0
    bin_programs = tl.cdiv(e_bound, BLOCK_ROWS)
    if pid < sort_programs:
        if pid * BLOCK_ROWS < p:
            # sorting gradient of positives i: what they receive from better-target positives k above
            rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
            row_ok = rows < p
            s_i = tl.load(s_pos_ptr + rows, mask=row_ok, other=0.0)
            y_key_i = m.positive_order_key(tl.load(y_pos_ptr + rows, mask=row_ok, other=0.0))
            inv = inv64.to(s_i.dtype)
            # shares are sorting errors (at most 1 each) unless targets exceed one: the real bound then
            share_scale = m.power_of_two_scale(count_p + 1.0)
            if DETERMINISTIC:
                share_scale = m.power_of_two_scale(_sum_bound(table_ptr + T_SHARE * stride, p, BLOCK_COLS))
            received = m.zero_sums(BLOCK_ROWS, DETERMINISTIC)
            if SPANS:
                for span in range(0, p, TILE_SPAN):
                    received_span = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
                    for start in range(span, tl.minimum(span + TILE_SPAN, p), BLOCK_COLS):
                        received_span = _sorting_tile(received_span, start, p, s_i, y_key_i, inv, s_pos_ptr, y_pos_ptr,
                                                      table_ptr, stride, share_scale, SMOOTH, DETERMINISTIC,
                                                      BLOCK_COLS)
                    received += received_span.to(tl.float64)
            else:
                for start in range(0, p, BLOCK_COLS):
                    received = _sorting_tile(received, start, p, s_i, y_key_i, inv, s_pos_ptr, y_pos_ptr, table_ptr,
                                             stride, share_scale, SMOOTH, DETERMINISTIC, BLOCK_COLS)
            received = m.fixed_value(received, share_scale, DETERMINISTIC)
            share_i = tl.load(table_ptr + T_SHARE * stride + rows, mask=row_ok, other=0.0)
            gives = tl.where(share_i != 0, tl.load(table_ptr + T_SORT_ERROR * stride + rows, mask=row_ok, other=0.0), 0.0)
            tl.store(table_ptr + T_SORT_GRAD * stride + rows, (received - gives) / count_p, mask=row_ok)
    elif pid < sort_programs + bin_programs:
        if (pid - sort_programs) * BLOCK_ROWS < num_edges:
            # per bin: the negatives' gradient sum_i w_i H(value_b - s_i), at the lower edge
            b = (pid - sort_programs) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
            b_ok = b < num_edges
            offset_scale = 1.0
            if FIXED_POINT:
                offset_scale = m.offset_scale(status_ptr, edges_ptr, n_total)
            lower, count, mean = _bins(edges_ptr, count_ptr, offset_sum_ptr, b, b_ok, offset_scale, FIXED_POINT)
            inv = inv64.to(lower.dtype)
            delta = m.bits_to_float64(delta_bits).to(lower.dtype)
            # sum_i w_i <= 2, as w_i = 1 / (rank+(i) + FP(i)) / p and rank+ >= 1/2; aLRP's are not bounded
            w_scale = m.power_of_two_scale(count_p * 0.0 + 4.0)
            if REGRESSION and DETERMINISTIC:
                w_scale = m.power_of_two_scale(_sum_bound(table_ptr + T_WEIGHT * stride, p, BLOCK_COLS))
            const = m.zero_sums(BLOCK_ROWS, DETERMINISTIC)
            slope = tl.zeros_like(const)
            if SPANS:
                for span in range(0, p, TILE_SPAN):
                    const_span = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
                    slope_span = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
                    for start in range(span, tl.minimum(span + TILE_SPAN, p), BLOCK_COLS):
                        const_span, slope_span = _bin_gradient_tile(const_span, slope_span, start, p, lower, mean, inv,
                                                                    delta, s_pos_ptr, table_ptr, stride, w_scale,
                                                                    SMOOTH, HAS_SLOPE, DETERMINISTIC, BLOCK_COLS)
                    const += const_span.to(tl.float64)
                    if HAS_SLOPE:
                        slope += slope_span.to(tl.float64)
            else:
                for start in range(0, p, BLOCK_COLS):
                    const, slope = _bin_gradient_tile(const, slope, start, p, lower, mean, inv, delta, s_pos_ptr,
                                                      table_ptr, stride, w_scale, SMOOTH, HAS_SLOPE, DETERMINISTIC,
                                                      BLOCK_COLS)
            const = m.fixed_value(const, w_scale, DETERMINISTIC)
            slope = m.fixed_value(slope, w_scale, DETERMINISTIC)
            if HAS_SLOPE:
                slope = slope * inv64
                const -= slope * mean.to(tl.float64)  # from the bin's mean to its lower edge
                tl.store(slope_ptr + 1 + b, slope, mask=b_ok)
            tl.store(const_ptr + 1 + b, const, mask=b_ok)
    else:
        # the loss outputs: means over the positives, 0 without any; NaN for a call whose values
        # the host did not check and are bad (validate=False), which also marks the status words
        # so that the distribution writes NaN gradients
        if s_pos_ptr.dtype.element_ty == tl.float64:
            limit = 1.7976931348623157e308
        else:
            limit = 3.4028234663852886e38
        bad = m.bad_values(status_ptr, p_bound, n_total.to(tl.float64), m.bits_to_float64(delta_bits), limit)
        bad |= tl.load(status_ptr + m.STATUS_INVALID) != 0  # what ``prepare`` found (aLRP's regression losses)
        tl.store(status_ptr + m.STATUS_INVALID, bad.to(tl.int64))
        tl.store(const_ptr, 0.0)  # key 0: no bin
        tl.store(slope_ptr, 0.0)
        lanes = tl.arange(0, LOSS_BLOCK)
        divisor = tl.maximum(count_p, 1.0)
        if INTERPOLATED:  # running_maximum wrote the loss
            tl.store(rank_loss_ptr, float("nan"), mask=bad)
        else:
            total = count_p * 0.0
            for start in range(0, p, LOSS_BLOCK):
                errors = tl.load(table_ptr + T_ERROR * stride + start + lanes, mask=start + lanes < p, other=0.0)
                total += tl.sum(errors, axis=0)
            total = tl.where(bad, float("nan"), total / divisor)
            tl.store(rank_loss_ptr, total.to(rank_loss_ptr.dtype.element_ty))
        if SORTING or LOCALISATION:
            total = count_p * 0.0
            for start in range(0, p, LOSS_BLOCK):
                errors = tl.load(table_ptr + T_SORT_ERROR * stride + start + lanes, mask=start + lanes < p, other=0.0)
                total += tl.sum(errors, axis=0)
            total = tl.where(bad, float("nan"), total / divisor)
            tl.store(sort_loss_ptr, total.to(sort_loss_ptr.dtype.element_ty))


_TILE_DEFAULT = triton.Config({"BLOCK_ROWS": 32, "BLOCK_COLS": 64}, num_warps=4, num_stages=2)
# twice the tile of the default: twice the warps, so that no alternative spills (kernel_resources)
_TILE_ALTERNATIVES = [triton.Config({"BLOCK_ROWS": 64, "BLOCK_COLS": 64}, num_warps=8, num_stages=2),
                      triton.Config({"BLOCK_ROWS": 32, "BLOCK_COLS": 128}, num_warps=8, num_stages=2)]
# float64 tiles need twice the registers: narrower column blocks and more warps keep them unspilled (sm_80 too)
TILE_FLOAT64 = triton.Config({"BLOCK_ROWS": 32, "BLOCK_COLS": 32}, num_warps=8, num_stages=2)
# keys: the size classes and every variant flag, so that one variant's tuning is not reused for another
_VARIANT_FLAGS = ["SMOOTH", "SORTING", "INTERPOLATED", "REGRESSION", "FIXED_POINT", "DETERMINISTIC", "SPANS"]
PER_POSITIVE = Tunable(_per_positive_kernel, _TILE_DEFAULT, _TILE_ALTERNATIVES,
                       key=["p_class", "bins_class", *_VARIANT_FLAGS])
FINISH = Tunable(_finish_kernel, _TILE_DEFAULT, _TILE_ALTERNATIVES,
                 key=["p_class", "bins_class", "HAS_SLOPE", "LOCALISATION", *_VARIANT_FLAGS])
INTERPOLATED_BLOCK = 1024
# fixed, not tuned: the localisation weights' sums keep one order whatever the tile configs
LOCALISATION_ROWS, LOCALISATION_COLS = 32, 64


def per_positive(s_pos, y_pos, edges, count, offset_sum, status, n_total: int, fp_bound: int, delta_bits: int, *,
                   sorting: bool, interpolated: bool, fixed_point: bool, deterministic: bool,
                   l_pos: torch.Tensor | None = None) -> torch.Tensor:
    """The (TABLE_ROWS, P) float64 table of per-positive terms, P = ``len(s_pos)`` rows of which
    the first p (the status words') are written (a view: rows are padded to a multiple of
    TABLE_ALIGN, so that every row starts aligned whatever P; an unaligned row would be a
    differently specialized kernel variant on a GPU). ``n_total``: the elements the reduction
    saw (its fixed-point scale); ``fp_bound``: at least the number of relevant negatives;
    ``l_pos``: aLRP's regression losses, sorted like the positives (float64), or None."""
    p_bound, e_bound = s_pos.numel(), edges.numel()
    stride = -(-p_bound // TABLE_ALIGN) * TABLE_ALIGN
    table = torch.empty(TABLE_ROWS, stride, dtype=torch.float64, device=s_pos.device)[:, :p_bound]
    PER_POSITIVE.launch(
        lambda config: (triton.cdiv(p_bound, config["BLOCK_ROWS"]),), s_pos, y_pos,
        y_pos if l_pos is None else l_pos, p_bound, edges, count, offset_sum, status, n_total, fp_bound, table,
        table.stride(0), delta_bits, size_class(p_bound), size_class(e_bound), fixed=deterministic,
        config=_float64_config(s_pos), SMOOTH=not _is_zero(delta_bits), SORTING=sorting,
        INTERPOLATED=interpolated, REGRESSION=l_pos is not None, FIXED_POINT=fixed_point,
        DETERMINISTIC=deterministic, SPANS=_spans(s_pos, deterministic),
    )
    return table


def running_maximum(table, status, loss) -> None:
    launch(_interpolated_kernel, (1,), table, table.stride(0), status, table.shape[1], loss, num_warps=4,
           BLOCK=INTERPOLATED_BLOCK)


def localisation(s_pos, sorted_index, flat_rank, l_pos, table, status, n_total: int, delta_bits: int) -> torch.Tensor:
    """aLRP's localisation weights (float64, one per positive, in flat order); the terms for the
    loss output go to the table's T_SORT_ERROR row (``finish(..., localisation=True)`` sums
    them)."""
    p_bound = s_pos.numel()
    weights = torch.empty(p_bound, dtype=torch.float64, device=s_pos.device)
    launch(_localisation_kernel, (triton.cdiv(p_bound, LOCALISATION_ROWS),), s_pos, sorted_index, flat_rank, l_pos,
           table, table.stride(0), status, p_bound, n_total, delta_bits, weights, num_warps=4, BLOCK_ROWS=LOCALISATION_ROWS,
           BLOCK_COLS=LOCALISATION_COLS)
    return weights


def finish(s_pos, y_pos, edges, count, offset_sum, status, n_total: int, delta_bits: int, table, losses, *,
           sorting: bool, has_slope: bool, interpolated: bool, fixed_point: bool, deterministic: bool,
           regression: bool = False, localisation: bool = False):
    """Sorting gradient (table row T_SORT_GRAD), per-key gradient constant and slope (float64,
    ``len(edges) + 1`` each, key 0 = no bin; the first E + 1 written) and the loss outputs, in
    one launch; it also decides whether the call's values are bad (``STATUS_INVALID``).
    ``localisation``: the table holds aLRP's localisation terms; ``losses[-1]`` gets their mean."""
    p_bound, e_bound = s_pos.numel(), edges.numel()
    const = torch.empty(e_bound + 1, dtype=torch.float64, device=s_pos.device)
    slope = torch.empty_like(const) if has_slope else None

    def grid(config):  # sorting rows, bins, and the loss program
        rows = config["BLOCK_ROWS"]
        return ((triton.cdiv(p_bound, rows) if sorting else 0) + triton.cdiv(e_bound, rows) + 1,)

    FINISH.launch(
        grid, s_pos, y_pos, p_bound, edges, e_bound, count, offset_sum, status, n_total, table, table.stride(0),
        const, const if slope is None else slope, losses[0], losses[-1], delta_bits, size_class(p_bound),
        size_class(e_bound), fixed=deterministic, config=_float64_config(s_pos),
        SMOOTH=not _is_zero(delta_bits),
        SORTING=sorting, HAS_SLOPE=has_slope, INTERPOLATED=interpolated, REGRESSION=regression,
        LOCALISATION=localisation, FIXED_POINT=fixed_point, DETERMINISTIC=deterministic,
        SPANS=_spans(s_pos, deterministic),
    )
    return const, slope


def _spans(s_pos, deterministic: bool) -> bool:
    """Sum the tiles of a span in float32 first: float32 terms, added as floats."""
    return s_pos.dtype != torch.float64 and not deterministic


def _float64_config(s_pos):
    return TILE_FLOAT64 if s_pos.dtype == torch.float64 else None


def _is_zero(delta_bits: int) -> bool:
    return delta_bits == 0
