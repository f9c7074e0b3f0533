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
@pytest.mark.parametrize("validate", [True, False])
def test_triton_backend_compiles_whole_and_matches_eager(validate):
    torch._dynamo.reset()

    def step(x, t):
        ranking, sorting = brl_triton.rank_sort_loss(x, t, backend="triton", validate=validate)
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


def test_ops_that_may_sync_are_tagged_cudagraph_unsafe():
    """The opaque ops wait for the device when they validate, or on the torch backend: CUDA
    graphs must leave them out. The triton_op path has no sync and no tag."""
    for op in (torch.ops.brl_triton.ranking_forward.default, torch.ops.brl_triton.ranking_backward.default):
        assert torch.Tag.cudagraph_unsafe in op.tags
    for op in (torch.ops.brl_triton.triton_forward.default, torch.ops.brl_triton.triton_backward.default):
        assert torch.Tag.cudagraph_unsafe not in op.tags


# Run where Triton compiles for a GPU (no TRITON_INTERPRET; the interpreter's kernels cannot be
# traced): fake CUDA tensors need no GPU, and the traced graph names every kernel it launches
_TRACE_KERNELS = """
import json, sys
import torch
from torch._functorch.aot_autograd import aot_function
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from torch._subclasses.fake_tensor import FakeTensorMode
from brl_triton import _ops, registry

spec = registry.BY_NAME[sys.argv[1]]
mode = FakeTensorMode()


def traced(fn, *inputs):
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm

    with mode:
        try:
            aot_function(fn, fw_compiler=keep)(*inputs)
        except Exception:  # running the graph on fake tensors; tracing it is what is checked
            pass
    nodes = [n for n in graphs[0].graph.nodes if n.op == "call_function"]
    return {"kernels": [kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__ for n in nodes
                        if "triton_kernel_wrapper" in str(n.target)],
            "ops": sorted({str(n.target) for n in nodes if "triton_kernel_wrapper" not in str(n.target)})}


with mode:
    logits, targets = torch.empty(3000, device="cuda"), torch.empty(3000, device="cuda")
    regression = torch.empty(40, device="cuda") if spec.regression else None
    grad_losses = torch.ones(spec.ranking_outputs, device="cuda")
    state = _ops.triton_forward(logits, targets, regression, 0.5, spec.name, False, False)[2:]
forward = traced(lambda x, t, *r: _ops.triton_forward(x, t, r[0] if r else None, 0.5, spec.name, False, False),
                 logits, targets, *([] if regression is None else [regression]))
backward = traced(lambda x, t, g, *s: _ops.triton_backward(x, t, g, *s), logits, targets, grad_losses, *state)
print(json.dumps({"forward": forward, "backward": backward}))
"""


@pytest.mark.slow  # a fresh interpreter that imports torch and traces: seconds
@pytest.mark.parametrize("name", list(LOSSES))
def test_compiled_triton_path_shows_its_kernels_to_the_compiler(name):
    """Without validation the Triton backend's forward and backward are triton_ops: traced by the
    compiler (AOTAutograd, as torch.compile does), every kernel is a node of the graph, and no
    opaque brl_triton op or host read is left."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _TRACE_KERNELS, name], capture_output=True, text=True, env=env,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    graphs = json.loads(run.stdout.strip().splitlines()[-1])
    spec = LOSSES[name][2]
    want = ["_scan_kernel", "_prepare_kernel", "_reduce_kernel", "_per_positive_kernel"]
    want += ["_interpolated_kernel"] * spec.interpolated + ["_localisation_kernel"] * spec.regression
    assert graphs["forward"]["kernels"] == want + ["_finish_kernel"]
    assert graphs["backward"]["kernels"] == ["_distribute_kernel"]
    for ops in (graphs["forward"]["ops"], graphs["backward"]["ops"]):
        assert not [op for op in ops if "brl_triton" in op or "_local_scalar_dense" in op], ops


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Inductor compiles the kernels for a GPU")
@pytest.mark.parametrize("name", list(LOSSES))
def test_on_a_gpu_the_compiled_triton_path_equals_eager(name):
    """On a GPU (``benchmarks.gpu_check`` runs the suite there): fullgraph Inductor over the
    triton_op path, equal to eager, one frame."""
    torch._dynamo.reset()
    fn, extra, spec = LOSSES[name]
    fn = getattr(brl_triton, spec.function_name) if spec.regression else fn

    def step(x, t, *regression):
        out = fn(x, t, *regression, 0.5, backend="triton", validate=False, **extra)
        return sum(out) if isinstance(out, tuple) else out

    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    logits, targets = make_case(3000, 30, 1, dtype=torch.float32)
    logits, targets = logits.cuda(), targets.cuda()
    regression = (regression_losses_for(targets).requires_grad_(),) if spec.regression else ()
    x, x_eager = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    got, want = compiled(x, targets, *regression), step(x_eager, targets, *regression)
    got.backward()
    want.backward()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(x.grad, x_eager.grad, atol=1e-6, rtol=1e-5)
    assert counter.frame_count == 1
