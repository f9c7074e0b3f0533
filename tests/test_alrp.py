"""aLRP, exact and bucketed: the official outputs (tests/data/official_alrp_cases.pt) for every
backend, the localisation part against its one-positive-at-a-time oracle, Theorem 4.1's limit,
and the self-balancing weight."""

import os
from pathlib import Path

import pytest
import torch

import brl_triton
from brl_triton import registry
from brl_triton.reference import alrp_localisation_reference, reference_for
from conftest import assert_close, make_case, triton_case_marks

GOLDEN_ALRP = Path(__file__).resolve().parent / "data" / "official_alrp_cases.pt"  # provenance: tests/data/README.md
NUM_CASES = 14
INTERPRETED_MAX_N = 20_000  # the Triton interpreter takes minutes on the N = 50,000 cases


@pytest.fixture(scope="module")
def alrp_cases():
    return torch.load(GOLDEN_ALRP, weights_only=False)["cases"]


def _run(fn, case, backend, **kwargs):
    logits = case["logits"].clone().requires_grad_(True)
    regression = case["regression_losses"].clone().requires_grad_(True)
    classification, localisation = fn(logits, case["targets"], regression, case["delta"], backend=backend, **kwargs)
    (classification + localisation).backward()
    return classification, localisation, logits.grad, regression.grad


def test_golden_file_has_all_cases(alrp_cases):
    assert len(alrp_cases) == NUM_CASES
    assert {"classification", "localisation", "logits_grad", "regression_grad", "rank"} <= set(alrp_cases[0])


def _official_cases() -> list:
    """(index, backend, deterministic) of every official case: the reference has no deterministic
    mode of its own; the Triton interpreter takes minutes on the N = 50,000 cases (a GPU runs
    them), and the reference seconds (the slow tier)."""
    sizes = [case["logits"].numel() for case in torch.load(GOLDEN_ALRP, weights_only=False)["cases"]]
    cases = []
    for index, n in enumerate(sizes):
        large = n > INTERPRETED_MAX_N
        cases.append(pytest.param(index, "reference", False, id=f"{index}-reference",
                                  marks=[pytest.mark.slow] if large else []))
        for deterministic in (False, True):
            cases.append(pytest.param(index, "torch", deterministic, id=f"{index}-torch-{deterministic}"))
            if not large or torch.cuda.is_available():
                cases.append(pytest.param(index, "triton", deterministic, id=f"{index}-triton-{deterministic}",
                                          marks=triton_case_marks(n)))
    return cases


@pytest.mark.parametrize("index,backend,deterministic", _official_cases())
def test_matches_official(alrp_cases, index, backend, deterministic):
    case = alrp_cases[index]
    classification, localisation, logits_grad, regression_grad = _run(
        brl_triton.alrp_loss, case, backend, deterministic=deterministic)
    assert_close(classification, torch.tensor(case["classification"]), atol=1e-7, rtol=1e-6, what="classification")
    assert_close(localisation, torch.tensor(case["localisation"]), atol=1e-7, rtol=1e-6, what="localisation")
    assert_close(logits_grad, case["logits_grad"], atol=1e-7, rtol=1e-5, what="logits grad")
    assert_close(regression_grad, case["regression_grad"], atol=1e-7, rtol=1e-5, what="regression grad")


@pytest.mark.parametrize("index", range(NUM_CASES))
def test_reference_ranks_match_official(alrp_cases, index):
    case = alrp_cases[index]
    (_, rank), _ = reference_for(registry.ALRP)(case["logits"], case["targets"], case["delta"], registry.ALRP,
                                           case["regression_losses"])
    assert_close(rank, case["rank"], atol=1e-4, rtol=1e-6, what="rank")


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("bucketed", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_localisation_and_ties_against_the_oracle(backend, bucketed, seed):
    """Tied logits (grid), the localisation part's stable tie order, and both upstream gradients."""
    logits, targets = make_case(1500, 30, seed, grid=0.25 if seed else None, dtype=torch.float32)
    regression = torch.rand(30, generator=torch.Generator().manual_seed(seed))
    spec = registry.BUCKETED_ALRP if bucketed else registry.ALRP
    fn = getattr(brl_triton, spec.function_name)
    x, l = logits.clone().requires_grad_(True), regression.clone().requires_grad_(True)
    classification, localisation = fn(x, targets, l, 0.5, backend=backend)
    (0.7 * classification - 1.3 * localisation).backward()

    (want_cls, rank), (want_grad,) = reference_for(spec)(logits, targets, 0.5, spec, regression)
    want_loc, want_l_grad = alrp_localisation_reference(logits, targets, regression, rank)
    assert_close(classification, want_cls, atol=1e-6, rtol=1e-6, what="classification")
    assert_close(localisation, want_loc, atol=1e-6, rtol=1e-6, what="localisation")
    assert_close(x.grad, 0.7 * want_grad, atol=1e-6, rtol=1e-5, what="logits grad")
    assert_close(l.grad, -1.3 * want_l_grad, atol=1e-6, rtol=1e-5, what="regression grad")


def test_bucketed_approaches_exact_as_delta_shrinks():
    """Theorem 4.1 of the BRS paper carried to aLRP: the buckets' error vanishes with delta."""
    logits, targets = make_case(5_000, 10, seed=1, dtype=torch.float64)  # few positives: big buckets
    regression = torch.rand(10, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    gaps = []
    for delta in (1.0, 0.1, 0.01, 0.001):
        exact = brl_triton.alrp_loss(logits, targets, regression, delta, backend="torch")
        bucketed = brl_triton.bucketed_alrp_loss(logits, targets, regression, delta, backend="torch")
        gaps.append(max(abs(float(a - b)) for a, b in zip(exact, bucketed)))
    assert gaps[0] > 1e-4  # the buckets do change the loss at delta 1
    assert all(later < earlier for earlier, later in zip(gaps, gaps[1:])), gaps
    assert gaps[-1] < 0.05 * gaps[0], gaps


@pytest.mark.parametrize("fn", [brl_triton.alrp_loss, brl_triton.bucketed_alrp_loss])
def test_no_positives_gives_zero_losses_attached_to_the_graph(fn):
    logits = torch.randn(50, requires_grad=True)
    regression = torch.zeros(0, requires_grad=True)
    classification, localisation = fn(logits, torch.zeros(50), regression, backend="torch")
    assert float(classification) == 0 and float(localisation) == 0
    (classification + localisation).backward()
    assert torch.equal(logits.grad, torch.zeros(50)) and regression.grad.shape == (0,)


def test_bad_regression_losses_are_refused():
    logits, targets = torch.randn(20), torch.zeros(20)
    targets[:3] = 0.8
    with pytest.raises(ValueError, match="one value per positive target \\(3"):
        brl_triton.alrp_loss(logits, targets, torch.rand(4))
    with pytest.raises(ValueError, match="finite and >= 0"):
        brl_triton.alrp_loss(logits, targets, torch.tensor([0.1, -0.2, 0.3]))
    for bad in (float("nan"), float("inf")):  # a diverged model's boxes: the same error as NaN logits
        with pytest.raises(brl_triton.NonFiniteError, match="regression_losses contain NaN or Inf"):
            brl_triton.alrp_loss(logits, targets, torch.tensor([0.1, bad, 0.3]))
    with pytest.raises(TypeError, match="regression_losses must be a torch.Tensor"):
        brl_triton.alrp_loss(logits, targets, [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="delta must be > 0 for the aLRP loss"):
        brl_triton.alrp_loss(logits, targets, torch.rand(3), 0.0)


def test_modules_match_functions():
    logits, targets = make_case(700, 15, seed=4, dtype=torch.float32)
    regression = torch.rand(15)
    for spec in (registry.ALRP, registry.BUCKETED_ALRP):
        criterion = getattr(brl_triton, spec.module)(delta=0.25, backend="torch")
        got = criterion(logits, targets, regression)
        want = getattr(brl_triton, spec.function_name)(logits, targets, regression, 0.25, backend="torch")
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        assert "delta=0.25" in repr(criterion)


def test_self_balancing_weight_is_the_period_mean_ratio():
    balance = brl_triton.SelfBalancingWeight(period=3, initial=50.0)
    pairs = [(0.9, 0.2), (0.7, 0.1), (0.5, 0.3)]
    totals = [float(balance(torch.tensor(c), torch.tensor(l))) for c, l in pairs]
    assert totals[0] == pytest.approx(0.9 + 50 * 0.2)  # the initial weight for the whole first period
    assert balance.weight == pytest.approx((2.1 + 0.6) / 0.6)
    restored = brl_triton.SelfBalancingWeight(period=3)
    restored.load_state_dict(balance.state_dict())
    assert restored.weight == balance.weight
    with pytest.raises(ValueError, match="period must be an int >= 1"):
        brl_triton.SelfBalancingWeight(period=0)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="needs a GPU or the Triton interpreter")
@pytest.mark.triton
def test_triton_bucketed_matches_torch():
    logits, targets = make_case(4000, 60, seed=8, dtype=torch.float32)
    regression = torch.rand(60, generator=torch.Generator().manual_seed(8))
    for deterministic in (False, True):
        got = _run(brl_triton.bucketed_alrp_loss, {"logits": logits, "targets": targets,
                                                   "regression_losses": regression, "delta": 1.0},
                   "triton", deterministic=deterministic)
        want = _run(brl_triton.bucketed_alrp_loss, {"logits": logits, "targets": targets,
                                                    "regression_losses": regression, "delta": 1.0}, "torch")
        for a, b, what in zip(got, want, ("classification", "localisation", "logits grad", "regression grad")):
            assert_close(a, b, atol=1e-6, rtol=1e-5, what=what)
