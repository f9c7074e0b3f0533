"""Property tests (hypothesis): odd shapes, dtypes, target mixes, ties, duplicates, huge and
subnormal logits. For finite input: no exception, no NaN/Inf, losses in their ranges, and the
torch backend agrees with the reference loops."""

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import brl_triton

from conftest import LOSSES, accepts, expected, hypothesis_examples, run_loss

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
MAGNITUDES = [1.0, 1e3, 1e30, 1e-40]  # 1e-40 is subnormal in float32


@st.composite
def problems(draw):
    dtype = draw(st.sampled_from(DTYPES))
    magnitude = draw(st.sampled_from([m for m in MAGNITUDES if m < torch.finfo(dtype).max / 10]))
    shape = draw(st.sampled_from([(0,), (1,), (7,), (3, 5), (2, 3, 11), (257,)]))
    n = math.prod(shape)
    # a small pool of values, so that logits repeat and positives tie with negatives
    pool = draw(st.lists(st.floats(-1, 1, allow_subnormal=False), min_size=1, max_size=12))
    logits = torch.tensor(draw(st.lists(st.sampled_from(pool), min_size=n, max_size=n)), dtype=torch.float64)
    logits = (logits * magnitude).to(dtype)
    target_values = st.sampled_from([-1.0, 0.0, 0.0, 0.0, 1.0, 0.5, 0.25, 1.5, 0.999])
    targets = torch.tensor(draw(st.lists(target_values, min_size=n, max_size=n)), dtype=torch.float64)
    delta = draw(st.sampled_from([0.0, 0.25, 0.5, 1.0]))
    return logits.reshape(shape), targets.reshape(shape), delta


RANGES = {0: (0.0, 1.0), 1: (-1.0, 1.0)}  # ranking (or AP) loss, sorting loss


@settings(max_examples=hypothesis_examples(120), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems(), name=st.sampled_from(list(LOSSES)))
def test_finite_input_gives_finite_in_range_results_that_match_the_reference(problem, name):
    logits, targets, delta = problem
    assume(accepts(name, delta))
    losses, grad = run_loss(name, logits, targets, delta, "torch")
    assert grad.shape == logits.shape and grad.dtype == logits.dtype
    assert bool(torch.isfinite(grad).all())
    for index, loss in enumerate(losses):
        assert bool(torch.isfinite(loss))
        low, high = RANGES[index]
        assert low - 1e-6 <= loss.item() <= high + 1e-6, f"output {index} = {loss.item()}"
    want_losses, want_grad = expected(name, logits.double(), targets, delta)
    for got, want in zip(losses, want_losses):
        assert got.item() == pytest.approx(want.item(), abs=1e-5, rel=1e-4)
    tolerance = 2e-2 if logits.dtype in (torch.float16, torch.bfloat16) else 1e-4
    if grad.numel():
        scale = max(want_grad.abs().max().item(), 1e-12)
        assert (grad.double() - want_grad).abs().max().item() <= tolerance * scale


@settings(max_examples=hypothesis_examples(60), deadline=None)
@given(bad=st.sampled_from(["nan_logit", "inf_logit", "nan_target", "shape", "int_logits", "negative_delta"]),
       name=st.sampled_from(list(LOSSES)))
def test_bad_input_raises_only_the_documented_errors(bad, name):
    fn, extra, _ = LOSSES[name]
    logits, targets, delta = torch.randn(20), torch.zeros(20), 0.5
    targets[3] = 0.7
    if bad == "nan_logit":
        logits[5] = float("nan")
    elif bad == "inf_logit":
        logits[5] = float("-inf")
    elif bad == "nan_target":
        targets[5] = float("nan")
    elif bad == "shape":
        targets = torch.zeros(21)
    elif bad == "int_logits":
        logits = torch.arange(20)
    elif bad == "negative_delta":
        delta = -1.0
    with pytest.raises((ValueError, TypeError)):
        fn(logits, targets, delta, backend="torch", **extra)


@pytest.mark.triton
@settings(max_examples=hypothesis_examples(12), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems(), name=st.sampled_from(list(LOSSES)))
def test_triton_backend_agrees_with_torch_backend(problem, name):
    pytest.importorskip("triton")
    logits, targets, delta = problem
    assume(accepts(name, delta))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    want_losses, want_grad = run_loss(name, logits, targets, delta, "torch")
    losses, grad = run_loss(name, logits.to(device), targets.to(device), delta, "triton")
    assert bool(torch.isfinite(grad).all())
    for got, want in zip(losses, want_losses):
        assert got.item() == pytest.approx(want.item(), abs=1e-5, rel=1e-4)
    if grad.numel():
        tolerance = 2e-2 if logits.dtype in (torch.float16, torch.bfloat16) else 1e-4
        scale = max(want_grad.abs().max().item(), 1e-12)
        assert (grad.cpu().double() - want_grad.double()).abs().max().item() <= tolerance * scale


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_equal_huge_logits_tie_exactly(backend):
    """Found by the property test above: one positive and three negatives, all at 1e30. Every
    negative ties with the positive, so FP = 3 H(0) = 1.5, rank+ = H(0) = 0.5 and the ranking
    error is 1.5 / 2 = 0.75. The oracle once averaged the bucket as 3e30 / 3, one ulp above 1e30,
    and counted every negative whole (6/7)."""
    logits = torch.full((5,), 1e30, dtype=torch.float64)
    targets = torch.tensor([-1.0, 0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    ranking, sorting = brl_triton.bucketed_rank_sort_loss(logits, targets, 0.25, backend=backend)
    assert float(ranking) == 0.75 and float(sorting) == 0.0
