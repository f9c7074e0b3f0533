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
    from brl_triton import _common, torch_backend

    monkeypatch.setattr(_common, "NO_FLOAT64_DEVICES", {"cpu"})
    monkeypatch.setattr(torch_backend, "SWEEP_FROM", 1 if sweeps else 10**9)
    logits, targets = make_case(3000, 120, seed=12, dtype=torch.float32)
    fn, extra, kind = LOSSES[name]
    if kind.regression:  # the stand-in regression losses are made in float64, outside the watch
        regression = regression_losses_for(targets).requires_grad_()
        fn = functools.partial(getattr(brl_triton, kind.function_name), regression_losses=regression)
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
