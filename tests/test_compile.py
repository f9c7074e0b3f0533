"""torch.compile sees through every loss (the torch.library ops of brl_triton._ops): a training
step compiles with fullgraph=True, equals eager, has no graph break, and is not recompiled when
the number of positives changes between batches."""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import brl_triton
from conftest import LOSSES, make_case, regression_losses_for


def _batch(seed, p):
    logits, targets = make_case(1200, p, seed, dtype=torch.float32)
    return logits.reshape(300, 4), targets.reshape(300, 4)


def _step_for(name):
    fn, extra, spec = LOSSES[name]
    owner = getattr(brl_triton, brl_triton.registry.BY_NAME[spec.variant_of].function_name if spec.variant_of
                    else spec.function_name)

    def step(layer, features, targets, *regression):
        logits = layer(features)
        out = owner(logits, targets, *regression, spec.delta, backend="torch", **extra)
        return sum(out) if isinstance(out, tuple) else out

    return step


def _regression_losses(spec, targets):
    """aLRP's regression losses: a leaf with one value per positive (which a detector computes
    from its positives: that boolean mask is the caller's dynamic shape, marked dynamic here)."""
    if not spec.regression:
        return ()
    regression = torch.rand(int((targets > 0).sum()), generator=torch.Generator().manual_seed(7))
    if regression.numel() > 1:  # sizes 0 and 1 are always specialised
        torch._dynamo.mark_dynamic(regression, 0)
    return (regression.requires_grad_(),)


def _run(step, layer, features, targets, regression):
    layer.zero_grad(set_to_none=True)
    for r in regression:
        r.grad = None
    loss = step(layer, features, targets, *regression)
    loss.backward()
    return (loss.detach(), layer.weight.grad.clone(), layer.bias.grad.clone()) + tuple(r.grad.clone()
                                                                                      for r in regression)


@pytest.mark.slow  # Inductor builds C++ kernels: tens of seconds on a cold cache
@pytest.mark.parametrize("name", list(LOSSES))
def test_training_step_compiles_whole_and_matches_eager(name):
    torch._dynamo.reset()
    step = _step_for(name)
    layer = torch.nn.Linear(8, 4)
    g = torch.Generator().manual_seed(0)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    spec = LOSSES[name][2]
    for seed, p in ((1, 25), (2, 9), (3, 40), (4, 3), (5, 0)):  # p changes: no recompilation
        _, targets = _batch(seed, p)
        features = torch.randn(300, 8, generator=g)
        regression = _regression_losses(spec, targets)
        want = _run(step, layer, features, targets, regression)
        got = _run(compiled, layer, features, targets, regression)
        for a, b, what in zip(got, want, ("loss", "weight grad", "bias grad", "regression grad")):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=f"{name} {what}, p = {p}")
        if p:
            assert counter.frame_count == 1  # aLRP's empty regression losses (p = 0) are specialised once
    explanation = torch._dynamo.explain(step)(layer, features, targets, *regression)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_compiled_loss_still_refuses_bad_input():
    """The value checks run inside the op."""
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, t: brl_triton.rank_sort_loss(x, t, backend="torch"), fullgraph=True)
    logits = torch.randn(50)
    targets = torch.zeros(50)
    targets[:3] = torch.tensor([0.5, 2.0, 0.7])
    with pytest.raises(Exception, match="targets must be <= 1"):
        compiled(logits, targets)
    logits[7] = float("nan")
    with pytest.raises(brl_triton.NonFiniteError, match="logits contain NaN or Inf"):
        compiled(logits, torch.zeros(50))


@pytest.mark.triton
def test_triton_backend_compiles_whole_and_matches_eager():
    torch._dynamo.reset()

    def step(x, t):
        ranking, sorting = brl_triton.rank_sort_loss(x, t, backend="triton")
        return ranking + sorting

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    for seed, p in ((1, 30), (2, 7)):
        logits, targets = make_case(3000, p, seed, dtype=torch.float32)
        x, x_eager = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        compiled(x, targets).backward()
        step(x_eager, targets).backward()
        torch.testing.assert_close(x.grad, x_eager.grad, atol=0, rtol=0)
    assert counter.frame_count == 1


def _module_step(module_name):
    spec = next(s for s in brl_triton.registry.LOSSES if s.module == module_name and s.variant_of is None)
    criterion = getattr(brl_triton, module_name)(backend="torch")

    def step(x, t):
        out = criterion(x, t, regression_losses_for(t)) if spec.regression else criterion(x, t)
        return sum(out) if isinstance(out, tuple) else out

    return step


def _function_step(function_name):
    fn = getattr(brl_triton, function_name)

    def step(x, t):
        out = fn(x, t, regression_losses_for(t)) if "alrp" in function_name else fn(x, t)
        return sum(out) if isinstance(out, tuple) else out

    return step


@pytest.mark.parametrize("name", [s.function_name for s in brl_triton.registry.LOSSES if s.variant_of is None]
                         + [s.module for s in brl_triton.registry.LOSSES if s.variant_of is None])
def test_dynamic_fullgraph_compile_of_every_function_and_module(name):
    """dynamic=True makes the default delta a symbolic float, which the delta check once refused
    (a graph break, so fullgraph=True failed). One compile serves every N and P, equal to eager."""
    torch._dynamo.reset()
    step = _module_step(name) if name[0].isupper() else _function_step(name)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True, dynamic=True)
    frames = None
    for seed, (n, p) in enumerate(((200, 9), (310, 17), (450, 4))):
        logits, targets = make_case(n, p, seed, dtype=torch.float32)
        x, x_eager = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        loss = compiled(x, targets)
        loss.backward()
        want = step(x_eager, targets)
        want.backward()
        torch.testing.assert_close(loss, want, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(x.grad, x_eager.grad, atol=1e-6, rtol=1e-5)
        frames = counter.frame_count if frames is None else frames
    assert counter.frame_count == frames  # no recompilation after the first call
