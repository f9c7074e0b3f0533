"""The per-positive formulas, where they live: the torch ones of ``_formulas`` and the Triton ones
of ``kernels/tiles.py`` (the same names) get the same per-positive sums and must agree to
round-off. The end-to-end tests would find a discrepancy too, but not where it is."""

import pytest
import torch

from brl_triton import _formulas, _tables, registry
from brl_triton.torch_backend import TORCH
from brl_triton._common import Settings
from conftest import accepts, make_case, regression_losses_for

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
pytestmark = pytest.mark.triton

from brl_triton.kernels import _math, tiles  # noqa: E402  (after TRITON_INTERPRET is set by conftest)

FAMILIES = {"ranking": registry.AP, "rank_sort": registry.RANK_SORT, "interpolated": registry.INTERPOLATED_AP,
            "alrp": registry.ALRP}
BLOCK = 256  # one program holds every positive of a case


@triton.jit
def _sum(sums_ptr, rounded_ptr, r, p, i, ok, scale, DETERMINISTIC: tl.constexpr):
    """Row r of the sums; DETERMINISTIC: through the kernels' int64 fixed point first (written back
    to ``rounded``, so that the torch side gets the same values)."""
    value = tl.load(sums_ptr + r * p + i, mask=ok, other=1.0)
    if DETERMINISTIC:
        fixed = _math.fixed_sum(_math.zero_sums(value.shape[0], True), value[:, None], scale, True)
        value = _math.fixed_value(fixed, scale, True)
    tl.store(rounded_ptr + r * p + i, value, mask=ok)
    return value


@triton.jit
def _formulas_kernel(sums_ptr, rounded_ptr, out_ptr, p, SORTING: tl.constexpr, INTERPOLATED: tl.constexpr,
                     REGRESSION: tl.constexpr, DETERMINISTIC: tl.constexpr, BLOCK: tl.constexpr):
    """Rows of ``sums`` (8, p): fp, rank+, sort_current, sort_target, sort_target_count,
    lower_quality, weighted_rank, regression. Rows of ``out`` (7, p): error (precision for the
    interpolated AP), rank_grad, weight, sorting_error, share, rank, and the interpolated AP's
    running maximum of precision."""
    i = tl.arange(0, BLOCK)
    ok = i < p
    count_p = p.to(tl.float64)
    scale = _math.power_of_two_scale(count_p * 0.0 + 1e6)
    fp = _sum(sums_ptr, rounded_ptr, 0, p, i, ok, scale, DETERMINISTIC)
    rank_plus = _sum(sums_ptr, rounded_ptr, 1, p, i, ok, scale, DETERMINISTIC)
    if REGRESSION:
        weighted = _sum(sums_ptr, rounded_ptr, 6, p, i, ok, scale, DETERMINISTIC)
        regression = _sum(sums_ptr, rounded_ptr, 7, p, i, ok, scale, DETERMINISTIC)
        error, rank, rank_grad, weight = tiles.alrp_formulas(fp, rank_plus, weighted, regression, count_p)
        tl.store(out_ptr + 5 * p + i, rank, mask=ok)
    elif INTERPOLATED:
        error, rank = tiles.interpolated_precision(fp, rank_plus)
        tl.store(out_ptr + i, error, mask=ok)
        best = tl.associative_scan(tl.load(out_ptr + i, mask=ok, other=0.0), 0, tiles._maximum)
        rank_grad, weight = tiles.interpolated_formulas(error, best, rank, count_p)
        tl.store(out_ptr + 5 * p + i, rank, mask=ok)
        tl.store(out_ptr + 6 * p + i, best, mask=ok)
    else:
        error, rank_grad, weight = tiles.ranking_formulas(fp, rank_plus, count_p)
    tl.store(out_ptr + i, error, mask=ok)
    tl.store(out_ptr + p + i, rank_grad, mask=ok)
    tl.store(out_ptr + 2 * p + i, weight, mask=ok)
    if SORTING:
        current = _sum(sums_ptr, rounded_ptr, 2, p, i, ok, scale, DETERMINISTIC)
        target = _sum(sums_ptr, rounded_ptr, 3, p, i, ok, scale, DETERMINISTIC)
        target_count = _sum(sums_ptr, rounded_ptr, 4, p, i, ok, scale, DETERMINISTIC)
        lower_quality = _sum(sums_ptr, rounded_ptr, 5, p, i, ok, scale, DETERMINISTIC)
        sorting_error, share = tiles.sorting_formulas(rank_plus, current, target, target_count, lower_quality)
        tl.store(out_ptr + 3 * p + i, sorting_error, mask=ok)
        tl.store(out_ptr + 4 * p + i, share, mask=ok)


def _pair_sums(spec, delta: float) -> _formulas.PairSums:
    """The sums of a real case: the torch backend's positives and bins, summed by its tiles."""
    logits, targets = make_case(3000, 90, seed=23, grid=0.125)
    s, y = TORCH.inputs(logits, targets)
    regression = regression_losses_for(targets) if spec.regression else None
    positives = TORCH.find_positives(s, y, delta, spec, Settings(), regression)
    bins = TORCH.reduce_bins(s, y, positives, delta, spec, Settings())
    return _tables._TiledSums(positives, bins, delta).positive_sums(spec.sorting)


def _as_rows(sums: _formulas.PairSums) -> torch.Tensor:
    ones = torch.ones_like(sums.fp)
    return torch.stack([sums.fp, sums.rank_plus] + [ones if v is None else v for v in (
        sums.sort_current, sums.sort_target, sums.sort_target_count, sums.lower_quality, sums.weighted_rank,
        sums.regression)]).contiguous()


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("family,delta", [(family, delta) for family, spec in FAMILIES.items() for delta in (0.0, 0.5)
                                          if accepts(spec.name, delta)])
def test_torch_and_triton_formulas_agree_on_the_same_sums(family, delta, deterministic):
    spec = FAMILIES[family]
    sums = _pair_sums(spec, delta)
    p = sums.fp.numel()
    assert 0 < p <= BLOCK
    rows = _as_rows(sums)
    rounded = rows.clone()  # what the kernel summed: the fixed-point values in deterministic mode
    out = torch.zeros(7, p, dtype=torch.float64)
    _formulas_kernel[(1,)](rows, rounded, out, p, SORTING=spec.sorting, INTERPOLATED=spec.interpolated,
                           REGRESSION=spec.regression, DETERMINISTIC=deterministic, BLOCK=BLOCK)
    if deterministic:
        assert delta == 0 or not torch.equal(rounded, rows)  # smoothed sums do change (integers do not)
        fields = ("fp", "rank_plus", "sort_current", "sort_target", "sort_target_count", "lower_quality",
                  "weighted_rank", "regression")
        sums = _formulas.PairSums(**{name: (rounded[k] if getattr(sums, name) is not None else None)
                                     for k, name in enumerate(fields)})
    terms = _formulas.formulas_for(spec)(sums)

    def close(got, want, what):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15, msg=f"{family}: {what}")

    close(out[1], terms.pos_rank_grad, "the positive's gradient")
    close(out[2], terms.weight, "the negatives' weight w_i")
    if spec.interpolated:
        precision, rank = _formulas.interpolated_precision(sums)
        close(out[0], precision, "precision")
        close(out[5], rank, "rank")
        close(1 - out[6].mean(), terms.losses[0], "loss")
    else:
        close(out[0].mean(), terms.losses[0], "loss")
    if spec.regression:
        close(out[5], terms.rank, "rank")
    if spec.sorting:
        close(out[3], terms.sorting_error, "sorting error")
        close(out[4], terms.sorting_share, "sorting share")
