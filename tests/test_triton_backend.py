"""The Triton backend against the reference loops and the golden data.

Without a GPU the kernels run through the Triton interpreter (conftest sets TRITON_INTERPRET=1),
about 100x slower than torch: sizes stay small (N <= 20k). Select with ``-m triton``.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import brl_triton
from conftest import LOSSES, assert_close, expected, loss_delta_cases, make_case, regression_losses_for, run_loss

pytest.importorskip("triton")
pytestmark = pytest.mark.triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (id, number of logits, number of positives, make_case options)
CASES = [
    ("p1", 1500, 1, {}),
    ("odd_multi_block", 5003, 41, {}),
    ("ties_on_grid", 2501, 70, {"grid": 0.25}),
    ("mostly_ignored_shaped", 2 * 1000 * 3, 25, {"ignored": 0.6, "shape": (2, 1000, 3)}),
]


def _on_device(logits, targets):
    return logits.to(DEVICE), targets.to(DEVICE)


def _check(name, logits, targets, delta, *, loss_tol=(1e-6, 1e-5), grad_tol=1e-5):
    want_losses, want_grad = expected(name, logits.cpu(), targets.cpu(), delta)
    losses, grad = run_loss(name, *_on_device(logits, targets), delta, "triton")
    assert grad.dtype == logits.dtype and grad.device.type == DEVICE
    for got, want in zip(losses, want_losses):
        assert_close(got, want, atol=loss_tol[0], rtol=loss_tol[1], what=f"{name} loss")
    scale = want_grad.abs().max().item()
    assert_close(grad, want_grad, atol=grad_tol * scale, rtol=grad_tol * 10, what=f"{name} grad")
    return losses, grad


@pytest.mark.parametrize("name,delta", loss_delta_cases([0.0, 0.25, 0.5, 1.0]))
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_against_reference(case, name, delta):
    _, n, p, options = case
    logits, targets = make_case(n, p, seed=n + 3 * p, dtype=torch.float32, **options)
    _check(name, logits, targets, delta)


@pytest.mark.parametrize("name", list(LOSSES))
def test_agrees_with_torch_backend(name):
    logits, targets = make_case(4001, 60, seed=12, dtype=torch.float32)
    t_losses, t_grad = run_loss(name, logits, targets, 0.5, "torch")
    losses, grad = run_loss(name, *_on_device(logits, targets), 0.5, "triton")
    for a, b in zip(losses, t_losses):
        assert_close(a, b, atol=1e-6, rtol=1e-5, what="loss")
    assert_close(grad, t_grad, atol=1e-5 * t_grad.abs().max().item(), rtol=1e-4, what="grad")


@pytest.mark.parametrize("name", ["bucketed_rank_sort", "rank_sort", "interpolated_ap"])
def test_many_positives_take_the_torch_sort_and_second_compaction_paths(name, monkeypatch):
    """More positives than the rank sort takes and than the first compaction pass has room for."""
    from brl_triton.kernels import positives

    monkeypatch.setattr(positives, "SORT_BY_RANK_MAX", 32)
    logits, targets = make_case(3001, 150, seed=5, dtype=torch.float32, grid=0.125)
    _check(name, logits, targets, 0.5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_logit_dtypes(dtype):
    logits, targets = make_case(3001, 40, seed=8, dtype=dtype)
    _check("rank_sort", logits, targets, 0.5, grad_tol=1e-2 if dtype != torch.float64 else 1e-9,
           loss_tol=(1e-6, 1e-5) if dtype != torch.float64 else (1e-10, 1e-9))


def test_theorem_4_1_at_delta_zero():
    logits, targets = make_case(4003, 50, seed=2, dtype=torch.float32, grid=0.5)
    logits, targets = _on_device(logits, targets)
    bucketed, b_grad = run_loss("bucketed_rank_sort", logits, targets, 0.0, "triton")
    exact, e_grad = run_loss("rank_sort", logits, targets, 0.0, "triton")
    for b, e in zip(bucketed, exact):
        assert_close(b, e, atol=1e-7, rtol=1e-6, what="loss")
    assert_close(b_grad, e_grad, atol=1e-8, rtol=1e-5, what="grad")


@pytest.mark.parametrize("name", list(LOSSES))
def test_no_positive_and_empty(name):
    fn, extra, spec = LOSSES[name]
    for logits, targets in [(torch.randn(0), torch.zeros(0)), (torch.randn(3000), -torch.ones(3000)),
                            (torch.randn(3000), torch.zeros(3000))]:
        x = logits.to(DEVICE).requires_grad_(True)
        out = fn(x, targets.to(DEVICE), 0.5, backend="triton", **extra)
        out = out if isinstance(out, tuple) else (out,)
        assert all(loss.item() == 0 and loss.requires_grad for loss in out)
        sum(out).backward()
        assert not bool(x.grad.any())


@pytest.mark.parametrize("bad", [float("nan"), pytest.param(float("inf"), marks=pytest.mark.slow)])
def test_non_finite_input_fails_in_the_streaming_passes(bad):
    """Targets are checked by the compaction pass, logits by the reduction pass (or, without any
    positive, by a check of their own)."""
    import brl_triton

    n = 5000  # several blocks of the streaming passes
    logits = torch.randn(n)
    logits[4321] = bad
    for targets in (torch.ones(n), (torch.arange(n) % 7 == 0).float(), torch.zeros(n)):
        for deterministic in (False, True):
            with pytest.raises(brl_triton.NonFiniteError, match="logits contain NaN or Inf"):
                brl_triton.rank_sort_loss(logits.to(DEVICE), targets.to(DEVICE), backend="triton",
                                          deterministic=deterministic)
    targets = torch.zeros(n)
    targets[17] = bad
    with pytest.raises(brl_triton.NonFiniteError, match="targets contain NaN or Inf"):
        brl_triton.bucketed_ap_loss(torch.randn(n, device=DEVICE), targets.to(DEVICE), backend="triton")


def _losses_and_grad(name, logits, targets, regression=None, **options):
    """Outputs and the gradient of every input (logits; aLRP's regression losses) of an
    unvalidated call."""
    fn, extra, spec = LOSSES[name]
    x = logits.to(DEVICE).requires_grad_(True)
    inputs = [x]
    if spec.regression:
        fn = getattr(brl_triton, spec.function_name)
        regression = regression_losses_for(targets) if regression is None else regression
        inputs.append(regression.to(DEVICE).requires_grad_())
    out = fn(x, targets.to(DEVICE), *inputs[1:], 0.5, backend="triton", validate=False, **extra, **options)
    out = out if isinstance(out, tuple) else (out,)
    sum(out).backward()
    return out, torch.cat([t.grad.reshape(-1) for t in inputs])


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("case", CASES[:3], ids=[c[0] for c in CASES[:3]])
def test_without_validation_against_reference(case, name, deterministic):
    """validate=False: the kernels read p and the edge count from device memory, and the grids
    are sized for the most positives one program sorts; the results are the reference's."""
    _, n, p, options = case
    logits, targets = make_case(n, p, seed=n + 3 * p, dtype=torch.float32, **options)
    want_losses, want_grad = expected(name, logits, targets, 0.5)
    losses, grad = run_loss(name, *_on_device(logits, targets), 0.5, "triton", deterministic=deterministic,
                            validate=False)
    for got, want in zip(losses, want_losses):
        assert_close(got, want, atol=1e-6, rtol=1e-5, what=f"{name} loss")
    assert_close(grad, want_grad, atol=1e-5 * want_grad.abs().max().item(), rtol=1e-4, what=f"{name} grad")


def _bad_inputs(n=3000):
    """(what, logits, targets): values the validation raises for."""
    logits, targets = make_case(n, 30, seed=4, dtype=torch.float32)
    nan_logit, nan_target, above_one, wide = logits.clone(), targets.clone(), targets.clone(), logits.clone()
    nan_logit[1234] = float("nan")
    nan_target[int(torch.nonzero(targets > 0)[0])] = float("nan")
    above_one[int(torch.nonzero(targets > 0)[0])] = 3.0
    wide[0], wide[1] = -3e37, 3e37
    return [("nan logit", nan_logit, targets), ("nan target", logits, nan_target),
            ("target above one", logits, above_one), ("logits too far apart", wide, targets)]


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("name", list(LOSSES))
def test_without_validation_bad_values_give_nan_outputs_and_gradient(name, deterministic):
    """Without the host read nothing can raise: every output and every gradient entry is NaN."""
    for what, logits, targets in _bad_inputs():
        if LOSSES[name][2].regression and what == "nan target":
            continue  # aLRP takes one regression loss per positive: a NaN target is no positive
        out, grad = _losses_and_grad(name, logits, targets, deterministic=deterministic)
        assert all(bool(o.isnan()) for o in out), (what, out)
        assert bool(grad.isnan().all()), what


@pytest.mark.parametrize("name", [name for name, (_, _, spec) in LOSSES.items() if spec.regression])
def test_without_validation_bad_regression_losses_give_nan(name):
    """aLRP's regression losses are checked on the device too: NaN, infinite or negative values,
    and a count other than the positives', give NaN outputs and gradients."""
    logits, targets = make_case(3000, 30, seed=4, dtype=torch.float32)
    good = regression_losses_for(targets)
    nan, inf, negative = good.clone(), good.clone(), good.clone()
    nan[3], inf[5], negative[7] = float("nan"), float("inf"), -0.25
    for what, regression in [("nan", nan), ("inf", inf), ("negative", negative), ("one too few", good[1:]),
                             ("one too many", torch.cat([good, good[:1]]))]:
        out, grad = _losses_and_grad(name, logits, targets, regression)
        assert all(bool(o.isnan()) for o in out), (what, out)
        assert bool(grad.isnan().all()), what


@pytest.mark.parametrize("name", list(LOSSES))
def test_without_validation_no_positive_gives_zero(name):
    for logits, targets in [(torch.randn(3000), -torch.ones(3000)), (torch.randn(3000), torch.zeros(3000))]:
        out, grad = _losses_and_grad(name, logits, targets)
        assert all(loss.item() == 0 and loss.requires_grad for loss in out)
        assert not bool(grad.any())


def test_without_validation_more_positives_than_one_program_sorts_give_nan(monkeypatch):
    """The grids are sized for SORT_BY_RANK_MAX positives; more cannot be seen without a host
    read, so the outputs say so with NaN (validate=True takes the other paths)."""
    from brl_triton.kernels import positives

    monkeypatch.setattr(positives, "SORT_BY_RANK_MAX", 32)
    logits, targets = make_case(3001, 150, seed=5, dtype=torch.float32)
    out, grad = _losses_and_grad("bucketed_rank_sort", logits, targets)
    assert all(bool(o.isnan()) for o in out) and bool(grad.isnan().all())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error without a GPU")
def test_cpu_without_interpreter_is_a_clear_error():
    code = textwrap.dedent("""
        import torch, brl_triton
        try:
            brl_triton.rank_sort_loss(torch.randn(10), torch.ones(10), backend="triton")
        except ValueError as e:
            print("ValueError:", e)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert "ValueError: backend='triton' runs on CUDA tensors" in out and "TRITON_INTERPRET=1" in out


def test_environment_variable_forces_the_backend(monkeypatch):
    from brl_triton._backends import resolve_backend

    logits = torch.randn(4)
    monkeypatch.setenv("BRL_BACKEND", "reference")
    assert resolve_backend("auto", logits).name == "reference"
    assert resolve_backend("torch", logits).name == "torch"  # an explicit backend wins
    monkeypatch.setenv("BRL_BACKEND", "triton")
    assert resolve_backend("auto", logits).name == "triton"
    monkeypatch.setenv("BRL_BACKEND", "fast")
    with pytest.raises(ValueError, match="BRL_BACKEND must be one of"):
        resolve_backend("auto", logits)
    monkeypatch.delenv("BRL_BACKEND")
    assert resolve_backend("auto", logits).name == ("triton" if logits.is_cuda else "torch")


# the block-sorting configs (the GPU default below PREAGGREGATE_BINS edges, and config 2) take
# seconds in the interpreter
@pytest.mark.parametrize("config", [pytest.param(0, marks=pytest.mark.slow), 1, pytest.param(2, marks=pytest.mark.slow), 3])
@pytest.mark.parametrize("num_edges", [1, 7, 300])
def test_bin_reduction_configs(config, num_edges):
    """Every reduction config (per-element atomics; block sorted by bin, one atomic per bin; the
    GPU default, which sorts the blocks of calls with few bins only) gives the counts and offset
    sums of a searchsorted/bincount oracle."""
    from brl_triton.kernels import streaming
    from brl_triton.kernels._layout import layout
    from brl_triton.kernels._math import STATUS_NUM_EDGES, STATUS_WORDS

    g = torch.Generator().manual_seed(num_edges)
    n = 5001
    s = torch.round(torch.randn(n, generator=g) * 8) / 8
    y = torch.zeros(n)
    y[::5], y[::7] = 1, -1
    edges = torch.sort(torch.round(torch.randn(num_edges, generator=g) * 8) / 8).values
    count = torch.zeros(num_edges + 1, dtype=torch.int64, device=DEVICE)
    offset_sum = torch.zeros(num_edges + 1, dtype=torch.float32, device=DEVICE)
    status = torch.zeros(STATUS_WORDS.value, dtype=torch.int64, device=DEVICE)
    status[STATUS_NUM_EDGES.value] = num_edges  # the kernel reads the edge count from device memory
    streaming.reduce(layout(s.to(DEVICE)), layout(y.to(DEVICE)), edges.to(DEVICE), status, count,
                     offset_sum, False, config=streaming.REDUCE.configs[config])
    relevant = (y == 0) & (s >= edges[0])
    key = torch.where(relevant, torch.searchsorted(edges, s, right=True), 0)
    lower = torch.cat([edges[:1], edges])[key]
    want_count = torch.bincount(key, minlength=num_edges + 1)
    want_sum = torch.bincount(key, weights=(s - lower).double(), minlength=num_edges + 1)
    want_count[0], want_sum[0] = 0, 0
    assert torch.equal(count.cpu(), want_count)
    assert_close(offset_sum, want_sum, atol=1e-4, rtol=1e-6, what="offset sums")
