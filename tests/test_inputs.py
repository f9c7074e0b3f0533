"""Input handling: errors for bad input, dtypes, empty and no-positive batches."""

import functools
import math

import pytest
import torch

import brl_triton
from conftest import LOSSES, OpOutputs, assert_close, expected, make_case, regression_losses_for, run_loss

BACKENDS = ["torch", "reference", "auto"]


def _call(name, logits, targets, delta=0.5, **kwargs):
    fn, extra, _ = LOSSES[name]
    return fn(logits, targets, delta, **extra, **kwargs)


@pytest.mark.parametrize("name", list(LOSSES))
class TestBadInput:
    def test_shape_mismatch(self, name):
        with pytest.raises(ValueError, match="same shape"):
            _call(name, torch.randn(4, 5), torch.zeros(20))

    def test_integer_logits(self, name):
        with pytest.raises(TypeError, match="logits must be a floating-point"):
            _call(name, torch.arange(5), torch.ones(5))

    def test_not_a_tensor(self, name):
        with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
            _call(name, [0.1, 0.2], torch.ones(2))

    def test_complex_targets(self, name):
        with pytest.raises(TypeError, match="targets must be a real"):
            _call(name, torch.randn(3), torch.ones(3, dtype=torch.complex64))

    @pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
    def test_non_finite_logits(self, name, bad):
        logits = torch.randn(10)
        logits[3] = bad
        with pytest.raises(brl_triton.NonFiniteError, match="logits contain NaN or Inf"):
            _call(name, logits, torch.ones(10))

    def test_nan_targets(self, name):
        targets = torch.zeros(10)
        targets[2] = math.nan
        with pytest.raises(brl_triton.NonFiniteError, match="targets contain NaN or Inf"):
            _call(name, torch.randn(10), targets)

    @pytest.mark.parametrize("delta", [-0.1, math.nan, math.inf])
    def test_bad_delta(self, name, delta):
        with pytest.raises(ValueError, match="delta must be a finite number >= 0"):
            _call(name, torch.randn(5), torch.ones(5), delta)

    def test_delta_not_a_number(self, name):
        with pytest.raises(TypeError, match="delta must be a real number"):
            _call(name, torch.randn(5), torch.ones(5), "0.5")

    @pytest.mark.parametrize("backend", ["triton_typo", "cuda", None])
    def test_unknown_backend(self, name, backend):
        with pytest.raises(ValueError, match="backend must be one of"):
            _call(name, torch.randn(5), torch.ones(5), backend=backend)

    def test_device_mismatch(self, name):
        with pytest.raises(ValueError, match="same device"):
            _call(name, torch.randn(5), torch.ones(5, device="meta"))


def test_interpolated_ap_needs_positive_delta():
    with pytest.raises(ValueError, match="delta must be > 0 for the interpolated AP loss"):
        brl_triton.ap_loss(torch.randn(5), torch.ones(5), 0.0, interpolated=True)
    brl_triton.ap_loss(torch.randn(5), torch.ones(5), 0.0)  # the exact AP loss accepts 0


def _zero_case(kind_of_input):
    if kind_of_input == "empty":
        return torch.randn(0, 4), torch.zeros(0, 4)
    if kind_of_input == "no_positive":
        return torch.randn(3, 50), torch.zeros(3, 50)
    if kind_of_input == "all_ignored":
        return torch.randn(60), -torch.ones(60)
    if kind_of_input == "only_negatives_and_ignored":
        targets = torch.zeros(60)
        targets[::2] = -1
        return torch.randn(60), targets
    raise AssertionError(kind_of_input)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("kind_of_input", ["empty", "no_positive", "all_ignored", "only_negatives_and_ignored"])
def test_zero_losses_attached_to_graph(name, backend, kind_of_input):
    logits, targets = _zero_case(kind_of_input)
    logits.requires_grad_(True)
    out = _call(name, logits, targets, backend=backend)
    out = out if isinstance(out, tuple) else (out,)
    assert len(out) == len(LOSSES[name][2].outputs)
    for loss in out:
        assert loss.shape == () and loss.item() == 0.0
        assert loss.requires_grad and loss.grad_fn is not None
    sum(out).backward()
    assert logits.grad is not None and logits.grad.shape == logits.shape
    assert not bool(logits.grad.any())


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2), (torch.float32, 1e-5)])
@pytest.mark.parametrize("name", list(LOSSES))
def test_low_precision_logits(name, dtype, tol):
    logits, targets = make_case(1500, 30, seed=5, dtype=dtype)
    # the oracle sees exactly the rounded logits the loss sees
    want_losses, want_grad = expected(name, logits.double(), targets, 0.5)
    losses, grad = run_loss(name, logits, targets, 0.5, "torch")
    assert grad.dtype == dtype
    for got, want in zip(losses, want_losses):
        assert got.dtype == torch.float32
        assert_close(got, want, atol=1e-6, rtol=1e-5, what="loss")
    scale = want_grad.abs().max().item()
    assert_close(grad, want_grad, atol=tol * scale, rtol=tol, what="grad")


@pytest.mark.parametrize(
    "target_dtype", [torch.int64, torch.int32, torch.int8, torch.bool, torch.float16, torch.float64]
)
@pytest.mark.parametrize("name", ["bucketed_ap", "ap", "interpolated_ap", "bucketed_rank_sort"])
def test_target_dtypes(name, target_dtype):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(400, generator=g, dtype=torch.float64)
    labels = (torch.rand(400, generator=g) > 0.9).long()
    if target_dtype not in (torch.bool,):
        labels[::7] = -1 * (target_dtype != torch.bool)
    targets = labels.to(target_dtype)
    want_losses, want_grad = expected(name, logits, labels.double(), 0.5)
    losses, grad = run_loss(name, logits, targets, 0.5, "torch")
    for got, want in zip(losses, want_losses):
        assert_close(got, want, atol=1e-10, rtol=1e-9, what="loss")
    assert_close(grad, want_grad, atol=1e-10, rtol=1e-8, what="grad")


@pytest.mark.parametrize("backend", ["torch", "reference", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("target_dtype", [torch.float32, torch.int64])
def test_targets_above_one_are_refused_unless_allowed(backend, target_dtype):
    """Class indices passed as targets by mistake: a clear error, not a sorting loss outside [-1, 1]."""
    logits = torch.randn(300, generator=torch.Generator().manual_seed(0))
    class_indices = torch.zeros(300, dtype=target_dtype)
    class_indices[:30] = torch.arange(1, 31).to(target_dtype) % 5
    for fn in (brl_triton.rank_sort_loss, brl_triton.bucketed_ap_loss):
        with pytest.raises(ValueError, match="targets must be <= 1.*allow_targets_above_one=True"):
            fn(logits, class_indices, backend=backend)
        out = fn(logits, class_indices, backend=backend, allow_targets_above_one=True)
        assert all(bool(torch.isfinite(o)) for o in (out if isinstance(out, tuple) else (out,)))
    criterion = brl_triton.RankSortLoss(backend=backend, allow_targets_above_one=True)
    criterion(logits, class_indices)
    with pytest.raises(ValueError, match="targets must be <= 1"):
        brl_triton.RankSortLoss(backend=backend)(logits, class_indices)


def test_quality_targets_above_one_are_used_as_given_when_allowed():
    logits, targets = make_case(800, 20, seed=9)
    targets = torch.where(targets > 0, targets * 1.5, targets)
    assert bool((targets > 1).any())
    want_losses, want_grad = expected("rank_sort", logits, targets, 0.5)
    losses, grad = run_loss("rank_sort", logits, targets, 0.5, "torch")
    for got, want in zip(losses, want_losses):
        assert_close(got, want, atol=1e-10, rtol=1e-9, what="loss")
    assert_close(grad, want_grad, atol=1e-10, rtol=1e-8, what="grad")


def test_targets_do_not_require_grad_and_logits_are_not_modified():
    logits, targets = make_case(500, 12, seed=1, dtype=torch.float32)
    before = logits.clone()
    x = logits.clone().requires_grad_(True)
    ranking, sorting = brl_triton.rank_sort_loss(x, targets)
    (ranking + sorting).backward()
    assert torch.equal(x.detach(), before)
    assert targets.grad is None


def test_no_grad_mode():
    logits, targets = make_case(200, 5, seed=2)
    with torch.no_grad():
        ranking, sorting = brl_triton.bucketed_rank_sort_loss(logits.requires_grad_(), targets)
    assert not ranking.requires_grad
    want, _ = expected("bucketed_rank_sort", logits, targets, 0.5)
    assert_close(ranking, want[0], atol=1e-12, rtol=0, what="loss")


@pytest.mark.parametrize(
    "module,name,kwargs",
    [
        (brl_triton.BucketedRankSortLoss, "bucketed_rank_sort", {}),
        (brl_triton.RankSortLoss, "rank_sort", {}),
        (brl_triton.BucketedAPLoss, "bucketed_ap", {}),
        (brl_triton.APLoss, "ap", {}),
        (brl_triton.APLoss, "interpolated_ap", {"interpolated": True}),
    ],
)
def test_modules_match_functions(module, name, kwargs):
    logits, targets = make_case(700, 15, seed=4)
    criterion = module(delta=0.25, backend="torch", **kwargs)
    out = criterion(logits, targets)
    out = out if isinstance(out, tuple) else (out,)
    want, _ = expected(name, logits, targets, 0.25)
    for got, w in zip(out, want):
        assert_close(got, w, atol=1e-10, rtol=1e-9, what=name)
    assert "delta=0.25" in repr(criterion)


def test_numpy_scalars_are_accepted_as_delta():
    np = pytest.importorskip("numpy")
    logits, targets = make_case(300, 5, seed=1)
    want = brl_triton.rank_sort_loss(logits, targets, 0.5, backend="torch")
    for delta in (np.float32(0.5), np.float64(0.5)):
        got = brl_triton.rank_sort_loss(logits, targets, delta, backend="torch")
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    with pytest.raises(TypeError, match="delta must be a real number"):
        brl_triton.rank_sort_loss(logits, targets, np.array([0.5, 0.5]), backend="torch")


def test_create_graph_is_a_clear_error():
    logits, targets = make_case(300, 5, seed=1)
    x = logits.clone().requires_grad_(True)
    ranking, sorting = brl_triton.bucketed_rank_sort_loss(x, targets, backend="torch")
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(ranking + sorting, x, create_graph=True)
    (ranking + sorting).backward()  # a plain backward still works
    assert x.grad is not None


@pytest.mark.parametrize("sweeps", [False, True], ids=["tiles", "sweeps"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_devices_without_float64_run_the_torch_backend_in_float32(name, sweeps, monkeypatch):
    """MPS has no float64: with the CPU marked the same way, no op makes a float64 tensor and the
    losses and gradient match the reference to float32 round-off."""
    from brl_triton import _common, _tables

    monkeypatch.setattr(_common, "NO_FLOAT64_DEVICES", {"cpu"})
    monkeypatch.setattr(_tables, "SWEEP_FROM", 1 if sweeps else 10**9)
    logits, targets = make_case(3000, 120, seed=12, dtype=torch.float32)
    fn, extra, spec = LOSSES[name]
    if spec.regression:  # the stand-in regression losses are made in float64, outside the watch
        regression = regression_losses_for(targets).requires_grad_()
        fn = functools.partial(getattr(brl_triton, spec.function_name), regression_losses=regression)
    x = logits.clone().requires_grad_(True)
    with OpOutputs() as watch:
        out = fn(x, targets.float(), delta=0.5, backend="torch", **extra)
        out = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(out, [torch.tensor(g) for g in (0.7, -1.3)[: len(out)]])
    float64_ops = sorted({op for op, _, dtype in watch.outputs if dtype == torch.float64})
    assert not float64_ops, f"float64 made by {float64_ops}"
    want_losses, want_grad = expected(name, logits.double(), targets, 0.5)
    for got, want in zip(out, want_losses):
        assert_close(got, want, atol=1e-5, rtol=1e-4, what=f"{name} loss")
    assert_close(x.grad, want_grad, atol=1e-5 * float(want_grad.abs().max()), rtol=1e-3, what=f"{name} grad")


ALL_BACKENDS = ["torch", "reference", pytest.param("triton", marks=pytest.mark.triton)]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("function", [brl_triton.alrp_loss, brl_triton.bucketed_alrp_loss])
@pytest.mark.parametrize("positives", [0, 3])
def test_a_wrong_number_of_regression_losses_is_one_clear_error(function, backend, positives):
    """Once an IndexError (torch), a shape mismatch (Triton), or, without positives, silently
    accepted (reference)."""
    logits, targets = torch.randn(40), torch.zeros(40)
    targets[:positives] = 0.8
    for count in (positives + 1, positives + 4) + ((positives - 1,) if positives else ()):
        with pytest.raises(ValueError, match=rf"regression_losses must hold one value per positive target \({positives}"):
            function(logits, targets, torch.rand(count), backend=backend)


RANGE_CASES = {  # (logits, targets, delta): finite input whose differences overflow the compute dtype
    "float32 +-1.8e38": (torch.tensor([-1.8e38, 1.8e38]), torch.tensor([1.0, 0.0]), 1.0),
    "bfloat16 +-2e38": (torch.tensor([-2e38, 2e38], dtype=torch.bfloat16), torch.tensor([1.0, 0.0]), 1.0),
    "float64 +-1e308": (torch.tensor([-1e308, 1e308], dtype=torch.float64), torch.tensor([1.0, 0.0]), 1.0),
    "two positives apart": (torch.tensor([1.8e38, -1.8e38, 0.0, 3.0]), torch.tensor([1.0, 0.7, 0.0, 0.0]), 0.5),
    "delta beyond float32": (torch.randn(30), (torch.arange(30) < 4).float(), 1e39),
    "delta times N beyond float32": (torch.randn(300), (torch.arange(300) < 20).float(), 1e37),
}


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("case", list(RANGE_CASES))
@pytest.mark.parametrize("name", list(LOSSES))
def test_logits_too_far_apart_for_the_dtype_are_refused_not_nan(name, case, backend):
    """These once gave NaN gradients (exact losses), NaN or zero losses (delta 1e39) or wrong
    ones (delta 1e37: 0.966 against the reference's 0.933); every backend refuses them alike."""
    logits, targets, delta = RANGE_CASES[case]
    if LOSSES[name][2].needs_smoothing and delta == 0:
        pytest.skip("needs delta > 0")
    with pytest.raises(ValueError, match="too wide for"):
        _call(name, logits, targets, delta, backend=backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("name", list(LOSSES))
def test_wide_but_representable_logits_still_match_the_reference(name, backend):
    """The range check refuses only what overflows: logits 1e30 apart with delta 1e20 still run."""
    logits = torch.tensor([-1e30, 1e30, 3.0, -2.0, 0.5])
    targets = torch.tensor([0.9, 0.0, 0.6, 0.0, 0.0])
    want_losses, want_grad = run_loss(name, logits, targets, 1e20, "reference")
    got_losses, got_grad = run_loss(name, logits, targets, 1e20, backend)
    for got, want in zip(got_losses, want_losses):
        assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert bool(torch.isfinite(got_grad).all())
    assert_close(got_grad, want_grad, atol=1e-6, rtol=1e-5)


def test_the_alrp_module_takes_regression_losses_by_keyword_as_the_function_does():
    logits, targets = torch.randn(30), torch.zeros(30)
    targets[:4] = 0.7
    regression = torch.rand(4)
    for module, function in ((brl_triton.ALRPLoss(), brl_triton.alrp_loss),
                             (brl_triton.BucketedALRPLoss(), brl_triton.bucketed_alrp_loss)):
        want = function(logits, targets, regression)
        for got in (module(logits, targets, regression_losses=regression),
                    module(logits=logits, targets=targets, regression_losses=regression)):
            assert [float(g) for g in got] == [float(w) for w in want]


@pytest.mark.parametrize("name", list(LOSSES))
def test_targets_that_require_grad_raise_no_warning(name, recwarn):
    import warnings

    logits, targets = make_case(50, 5, 3, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # as under python -W error
        _call(name, logits.requires_grad_(), targets.float().requires_grad_(), 0.5)


@pytest.mark.parametrize("module", brl_triton.modules.__all__)
def test_modules_refuse_a_bad_delta_or_backend_when_built(module):
    cls = getattr(brl_triton, module)
    with pytest.raises(ValueError, match="delta must be a finite number >= 0"):
        cls(delta=-1)
    with pytest.raises(ValueError, match="backend must be one of"):
        cls(backend="cuda")
    if module in ("ALRPLoss", "BucketedALRPLoss"):
        with pytest.raises(ValueError, match="delta must be > 0"):
            cls(delta=0)
    if module == "APLoss":
        with pytest.raises(ValueError, match="delta must be > 0"):
            cls(delta=0, interpolated=True)
        cls(delta=0)  # the exact AP loss takes the hard step


def test_self_balancing_weight_takes_numbers_skips_nan_steps_and_checks_period():
    import numpy as np

    balance = brl_triton.SelfBalancingWeight(period=np.int64(2))
    assert balance.period == 2
    balance(float("nan"), 0.1)  # a diverged step counts in the period but adds nothing
    balance(0.6, 0.1)  # the period's end
    assert balance.weight == pytest.approx((0.6 + 0.1) / 0.1)
    balance(torch.tensor(0.8), torch.tensor(0.2))
    balance(torch.tensor(0.4), torch.tensor(float("inf")))
    assert balance.weight == pytest.approx((0.8 + 0.2) / 0.2)
    for period in (True, 0, 2.5, "2"):
        with pytest.raises(ValueError, match="period must be an int >= 1"):
            brl_triton.SelfBalancingWeight(period)
    with pytest.raises(ValueError, match="initial must be a finite number > 0"):
        brl_triton.SelfBalancingWeight(3, initial=float("nan"))


@pytest.mark.parametrize("name", list(LOSSES))
def test_meta_tensors_give_meta_outputs_of_the_right_shapes(name):
    fn, extra, spec = LOSSES[name]
    logits = torch.empty(4, 50, device="meta", requires_grad=True)
    targets = torch.empty(4, 50, device="meta")
    arguments = (logits, targets, torch.empty(7, device="meta")) if spec.regression else (logits, targets)
    owner = (getattr(brl_triton, brl_triton.registry.BY_NAME[spec.variant_of].function_name) if spec.variant_of
             else getattr(brl_triton, spec.function_name))
    out = owner(*arguments, 0.5, **extra)
    out = out if isinstance(out, tuple) else (out,)
    assert len(out) == len(spec.outputs)
    assert all(o.device.type == "meta" and o.shape == () for o in out)
    sum(out).backward()
    assert logits.grad.device.type == "meta" and logits.grad.shape == logits.shape


@pytest.mark.parametrize("name", list(LOSSES))
def test_torch_func_grad_equals_backward(name):
    _, extra, spec = LOSSES[name]
    owner = getattr(brl_triton, (brl_triton.registry.BY_NAME[spec.variant_of] if spec.variant_of else spec).function_name)
    logits, targets = make_case(80, 6, 5, dtype=torch.float32)
    regression = (regression_losses_for(targets),) if spec.regression else ()

    def total(x):
        out = owner(x, targets, *regression, 0.5, backend="torch", **extra)
        return sum(out) if isinstance(out, tuple) else out

    x = logits.clone().requires_grad_()
    total(x).backward()
    torch.testing.assert_close(torch.func.grad(total)(logits), x.grad, rtol=0, atol=0)
