"""What a GPU would do, checked without one: tensor layouts read in place, the launch and sync
budget of one training step, autotuning's repeated benchmark launches, and deterministic mode
that does not depend on the tile shape."""

import os
import subprocess
import sys
import textwrap
from contextlib import contextmanager

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import brl_triton
from conftest import LOSSES, UPSTREAM, assert_close, expected, make_case, regression_losses_for

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.triton)]


def _losses_and_grad(name, logits, targets, backend, delta=0.5, **options):
    fn, extra, _ = LOSSES[name]
    x = logits.detach().clone().requires_grad_(True)  # clone keeps the layout
    out = fn(x, targets, delta, backend=backend, **extra, **options)
    out = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(out, [torch.tensor(g, dtype=o.dtype, device=o.device) for g, o in zip(UPSTREAM, out)])
    return torch.stack([o.detach() for o in out]), x.grad


def _layouts():
    """(id, logits view, targets view) with the same values as make_case's contiguous tensors."""
    logits, targets = make_case(2 * 3 * 5 * 41, 30, seed=3, dtype=torch.float32)
    wide_l, wide_t = logits.view(410, 3), targets.view(410, 3)
    nchw_l = logits.view(2, 3, 5, 41).contiguous(memory_format=torch.channels_last)
    nchw_t = targets.view(2, 3, 5, 41).contiguous(memory_format=torch.channels_last)
    padded_l = torch.zeros(3, 4, 7, 45)
    padded_l[:2, :3, 1:6, 2:43] = logits.view(2, 3, 5, 41)
    padded_t = torch.zeros(3, 4, 7, 45)
    padded_t[:2, :3, 1:6, 2:43] = targets.view(2, 3, 5, 41)
    row_t = targets[:410].clone()
    row_t[row_t > 0] = 0.5
    return [
        ("column", wide_l[:, 1], wide_t[:, 1]),  # one stride: scores[:, k]
        ("every_other", logits[::2], targets[::2]),
        ("transposed", wide_l.t(), wide_t.t()),  # two dims, not mergeable
        ("expanded_targets", logits[:1230].view(3, 410), row_t.expand(3, 410)),  # stride 0
        ("channels_last", nchw_l, nchw_t),
        ("sliced_3d", padded_l[:1, :3, 1:6, 2:43], padded_t[:1, :3, 1:6, 2:43]),  # size-1 dim dropped
        ("sliced_4d", padded_l[:2, :3, 1:6, 2:43], padded_t[:2, :3, 1:6, 2:43]),  # four strided dims: copied
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("case", _layouts(), ids=lambda c: c[0])
def test_any_layout_equals_its_contiguous_copy(case, name, backend):
    """Bit for bit in deterministic mode: without it, float atomics on a GPU may sum in another
    order for another layout (the reference comparison below holds either way)."""
    _, logits, targets = case
    assert not (logits.is_contiguous() and targets.is_contiguous())
    logits, targets = logits.to(DEVICE), targets.to(DEVICE)
    got = _losses_and_grad(name, logits, targets, backend, deterministic=True)
    want = _losses_and_grad(name, logits.contiguous(), targets.contiguous(), backend, deterministic=True)
    assert torch.equal(got[0], want[0]), (got[0], want[0])
    assert got[1].shape == logits.shape
    assert_close(got[1], want[1], atol=0, rtol=0, what="gradient")
    want_losses, _ = expected(name, logits.cpu().contiguous(), targets.cpu().contiguous(), 0.5)
    assert_close(got[0], torch.stack(list(want_losses)), atol=1e-6, rtol=1e-5, what="losses vs reference")


# torch ops that wait for the device (data-dependent results read on the host)
SYNCING_OPS = ("_local_scalar_dense", "item", "is_nonzero", "nonzero", "masked_select", "equal", "unique",
               "_unique", "_unique2", "unique_consecutive", "unique_dim", "allclose", "repeat_interleave")
# torch ops that launch no kernel: allocation without initialisation, and views
FREE_OPS = ("empty", "empty_strided", "empty_like", "detach", "lift_fresh", "alias")


class _LaunchCounter(TorchDispatchMode):
    """Counts the torch ops that would launch a GPU kernel or sync, outside Triton launches (the
    interpreter copies arguments to and from the host around each launch: not a GPU op)."""

    def __init__(self):
        super().__init__()
        self.ops, self.syncs = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from brl_triton.kernels._config import inside_host_read, inside_launch

        name = func.overloadpacket.__name__
        if not (inside_launch() or inside_host_read()):  # a host read is counted as one, by the backend
            if name in SYNCING_OPS:
                self.syncs.append(name)
            elif not func.is_view and name not in FREE_OPS:
                self.ops.append(name)
        return func(*args, **(kwargs or {}))


@contextmanager
def _count():
    from brl_triton.kernels._config import record_launches

    with record_launches() as kernels, _LaunchCounter() as ops:
        yield kernels, ops


# scan, prepare, reduce, gradient_tables, finish, distribute, and the zeroed gradient buffer; interpolated
# AP adds its running-maximum kernel
LAUNCHES = 7
# validation (the default) reads the status words once to raise on bad values; validate=False reads
# nothing: the kernels take p and the edge count from device memory
SYNCS = {True: 1, False: 0}
# aLRP: the same 7, plus its localisation kernel and, in backward, the multiply of the regression
# losses' gradient. With validation its regression losses are checked by torch ops and a second
# host read before the loss runs
ALRP_LAUNCHES = LAUNCHES + 2
ALRP_VALIDATION_LAUNCHES, ALRP_VALIDATION_SYNCS = 10, 1


def _counted_step(name, logits, targets, **options):
    """One forward+backward of the loss on the Triton backend, counted: (outputs, logits' gradient,
    launches, syncs, what was launched)."""
    fn, extra, spec = LOSSES[name]
    x = logits.to(DEVICE).requires_grad_(True)
    targets = targets.to(DEVICE)
    upstream = [torch.tensor(g, device=DEVICE) for g in UPSTREAM]
    args = ()
    if spec.regression:  # the stand-in regression losses are the caller's work, not the loss's
        fn, args = getattr(brl_triton, spec.function_name), (regression_losses_for(targets).requires_grad_(),)
    with _count() as (kernels, ops):
        out = fn(x, targets, *args, 0.5, backend="triton", **options, **extra)
        out = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(out, upstream[:len(out)])
    launches = len(kernels.launches) + len(ops.ops)
    syncs = kernels.host_reads + len(ops.syncs)
    detail = f"kernels {[k.kernel.__name__ for k in kernels.launches]}, torch ops {ops.ops}, syncs {ops.syncs}"
    return out, x.grad, launches, syncs, detail


@pytest.mark.triton
@pytest.mark.parametrize("validate", [True, False])
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("name", list(LOSSES))
def test_one_step_launches_7_kernels_and_syncs_at_most_once(name, deterministic, validate):
    spec = LOSSES[name][2]
    logits, targets = make_case(3001, 40, seed=2, dtype=torch.float32)
    out, grad, launches, syncs, detail = _counted_step(name, logits, targets, deterministic=deterministic,
                                                       validate=validate)
    if spec.regression:
        want = (ALRP_LAUNCHES + validate * ALRP_VALIDATION_LAUNCHES, SYNCS[validate] + validate * ALRP_VALIDATION_SYNCS)
    else:
        want = (LAUNCHES + spec.interpolated, SYNCS[validate])
    assert (launches, syncs) == want, detail
    if not validate:  # the budget for a CUDA-graph-capturable call
        assert launches <= 10 and syncs == 0, detail
    want_losses, want_grad = expected(name, logits, targets, 0.5)
    assert_close(torch.stack([o.detach().cpu() for o in out]), torch.stack(list(want_losses)), atol=1e-6,
                 rtol=1e-5, what="losses")
    assert_close(grad.cpu(), want_grad, atol=1e-6 * want_grad.abs().max().item(), rtol=1e-4, what="grad")


# From TRITON_SWEEP_FROM positives on, step 3 is the torch sweeps: the host reads the status words,
# the occupied bins (nonzero) and the span of the wavelet walks (one read per dominance query), and in
# deterministic mode the fixed-point scale: at most 6 syncs, whatever p
SWEEP_SYNCS = 6
# Rank & Sort's target-restricted sums walk a wavelet matrix, one level per bit of p: about 70
# launches per doubling; the other losses' sweeps have no walk and launch the same for any p
SWEEP_LAUNCHES_PER_DOUBLING, SWEEP_LAUNCHES_AT_600 = 75, 1150


@pytest.mark.triton
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("name", list(LOSSES))
def test_above_the_sweep_threshold_syncs_stay_constant_and_launches_grow_with_log_p(name, deterministic,
                                                                                     monkeypatch):
    """The sweeps path (threshold lowered so the interpreter runs it quickly) at p and 4p."""
    from brl_triton import triton_backend

    monkeypatch.setattr(triton_backend, "TRITON_SWEEP_FROM", 32)
    counts = {}
    for p in (600, 2400):
        logits, targets = make_case(4 * p, p, seed=p, dtype=torch.float32)
        out, _, launches, syncs, _ = _counted_step(name, logits, targets, deterministic=deterministic)
        counts[p] = launches, syncs
        if p == 600:  # the instrument ran the sweeps: the reference agrees
            want_losses, _ = expected(name, logits, targets, 0.5)
            assert_close(torch.stack([o.detach().cpu() for o in out]), torch.stack(list(want_losses)), atol=1e-6,
                         rtol=1e-5, what="losses")
    (small_launches, small_syncs), (large_launches, large_syncs) = counts[600], counts[2400]
    assert small_syncs == large_syncs <= SWEEP_SYNCS, counts
    assert small_launches <= SWEEP_LAUNCHES_AT_600, counts
    assert 0 <= large_launches - small_launches <= 2 * SWEEP_LAUNCHES_PER_DOUBLING, counts


def test_the_counter_counts_a_host_reads_copy_as_the_host_read():
    """A CUDA tensor's .tolist() dispatches a copy to the host: one host read, not a launch. A
    tensor whose tolist dispatches an op stands in for it here."""
    from brl_triton.kernels._config import read_host

    class DeviceLike(torch.Tensor):
        def tolist(self):
            return torch.Tensor.tolist(torch.Tensor.mul(self.as_subclass(torch.Tensor), 1))

    values, other = torch.tensor([3.0, 4.0]).as_subclass(DeviceLike), torch.ones(2)
    with _count() as (kernels, ops):
        assert read_host(values) == [3.0, 4.0]
        torch.Tensor.mul(other, 2)  # outside a host read: counted
    assert kernels.host_reads == 1 and ops.ops == ["mul"], ops.ops


def test_the_counter_sees_torch_launches_and_syncs():
    """The budget test's instrument: it must see what it is meant to count."""
    x = torch.randn(100)
    with _count() as (kernels, ops):
        y = (x * 2).sum()
        bool(y > 0)
        x.view(10, 10).t()
        torch.empty(5)
    assert ops.ops == ["mul", "sum", "gt"] and ops.syncs == ["_local_scalar_dense"]


@pytest.mark.slow
@pytest.mark.triton
def test_autotuning_benchmark_launches_do_not_change_results():
    """On a GPU, autotuning launches every config several times on the real arguments, at every
    new key. Emulated here (BRL_AUTOTUNE=emulate: every config three times, with the autotuner's
    own hooks, on each new key, then the winner once), every loss still equals the reference."""
    code = textwrap.dedent("""
        import sys, torch
        sys.path.insert(0, "tests")
        from conftest import LOSSES, assert_close, expected, make_case, run_loss
        from brl_triton.kernels import _config
        # a first size, then launches in chunks of 2048 (accumulating across launches; the last,
        # shorter chunk is a new key, benchmarked on top of what the first chunk added)
        for n, p, chunk in [(3000, 40, 1 << 30), (2500, 30, 2048)]:
            _config.MAX_ELEMENTS_PER_LAUNCH = chunk
            logits, targets = make_case(n, p, seed=n, dtype=torch.float32)
            for name in LOSSES:
                fn, extra, _ = LOSSES[name]
                x = logits.clone().requires_grad_(True)
                out = fn(x, targets, 0.5, backend="triton", **extra)
                out = out if isinstance(out, tuple) else (out,)
                torch.autograd.backward(out, [torch.tensor(g) for g in (0.7, -1.3)][:len(out)])
                want_losses, want_grad = expected(name, logits, targets, 0.5)
                for got, want in zip(out, want_losses):
                    assert_close(got, want, atol=1e-6, rtol=1e-5, what=f"{name} {n} loss")
                assert_close(x.grad, want_grad, atol=1e-6 * want_grad.abs().max().item(), rtol=1e-4,
                             what=f"{name} {n} grad")
        print("benchmarks", _config._emulated_benchmark.calls)
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", BRL_AUTOTUNE="emulate")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0, result.stdout + result.stderr
    benchmarks = int(result.stdout.split("benchmarks")[-1])
    # three tuned kernels with three or four configs each, at two new keys at least
    assert benchmarks >= 3 * 2 * 3, result.stdout


@pytest.mark.slow
@pytest.mark.triton
@pytest.mark.parametrize("name", ["bucketed_rank_sort", "rank_sort", "interpolated_ap"])
def test_deterministic_mode_is_bit_identical_for_every_tile_config(name, monkeypatch):
    """Deterministic mode adds the tile sums as int64 fixed point, so the tile shape (which
    autotuning could pick) does not change a single bit; the float path does depend on it."""
    from brl_triton.kernels import streaming, tiles

    logits, targets = make_case(3001, 130, seed=21, dtype=torch.float32)  # several tiles of every config
    logits, targets = logits.to(DEVICE), targets.to(DEVICE)
    results = {True: [], False: []}
    for index, config in enumerate(tiles.PER_POSITIVE.configs):
        monkeypatch.setattr(tiles.PER_POSITIVE, "default", config)
        monkeypatch.setattr(tiles.FINISH, "default", config)
        monkeypatch.setattr(streaming.REDUCE, "default", streaming.REDUCE.configs[index])
        for deterministic in (True, False):
            results[deterministic].append(
                _losses_and_grad(name, logits, targets, "triton", deterministic=deterministic))
    first = results[True][0]
    for other in results[True][1:]:
        assert torch.equal(first[0], other[0]) and torch.equal(first[1], other[1])
    # the instrument: without fixed point, a wider tile sums in another order
    plain = results[False][0]
    assert any(not torch.equal(plain[1], other[1]) for other in results[False][1:])
    want_losses, want_grad = expected(name, logits.cpu(), targets.cpu(), 0.5)
    assert_close(first[0], torch.stack(list(want_losses)), atol=1e-6, rtol=1e-5, what="losses")
    assert_close(first[1], want_grad, atol=1e-6 * want_grad.abs().max().item(), rtol=1e-4, what="grad")


@pytest.mark.triton
@pytest.mark.parametrize("name", ["rank_sort", "bucketed_rank_sort"])
def test_float64_delta_reaches_the_kernels_unrounded(name):
    """delta = 0.3 is not a float32 value: passed as a float argument it would be rounded on a GPU."""
    logits, targets = make_case(3001, 40, seed=4, dtype=torch.float64)
    got = _losses_and_grad(name, logits.to(DEVICE), targets.to(DEVICE), "triton", delta=0.3)
    want_losses, want_grad = expected(name, logits, targets, 0.3)
    assert_close(got[0], torch.stack(list(want_losses)), atol=1e-14, rtol=1e-12, what="losses")
    assert_close(got[1], want_grad, atol=1e-15, rtol=1e-10, what="grad")


FIRST_CALL_VARIANTS = 8


@pytest.mark.triton
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, marks=pytest.mark.slow),
                                   pytest.param(torch.bfloat16, marks=pytest.mark.slow), torch.float32,
                                   pytest.param(torch.float64, marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", list(LOSSES))
def test_first_call_compiles_at_most_8_kernel_variants(name, dtype, deterministic):
    """Each distinct (kernel, signature, constexprs, specialization) of a call is one compile on a
    GPU; sizes are not specialized on, so they do not add variants."""
    from benchmarks.kernel_resources import variant_of
    from brl_triton.kernels._config import record_launches

    variants = set()
    for n, p in [(3001, 40), (2000, 17)]:  # a second size must not add any
        logits, targets = make_case(n, p, seed=n, dtype=dtype)
        with record_launches() as recorded:
            _losses_and_grad(name, logits.to(DEVICE), targets.to(DEVICE), "triton", deterministic=deterministic)
        variants |= {variant_of(launch) for launch in recorded.launches}
        if n == 3001:
            first = set(variants)
    assert len(first) <= FIRST_CALL_VARIANTS, sorted(v.name for v in first)
    assert variants == first, sorted(v.name for v in variants - first)


@pytest.mark.triton
@pytest.mark.parametrize("p", [40, pytest.param(700, id="sweeps", marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", list(LOSSES))
def test_every_launch_runs_under_the_tensors_device(name, p, monkeypatch):
    """Triton launches on the current CUDA device, not the tensors': every launch of a forward
    and backward must happen inside the backend's guard for the logits' device."""
    from brl_triton import triton_backend
    from brl_triton.kernels._config import record_launches

    if p > 40:  # the sweeps path for many positives, at a size the interpreter runs quickly
        monkeypatch.setattr(triton_backend, "TRITON_SWEEP_FROM", 512)
    fn, extra, spec = LOSSES[name]
    logits, targets = make_case(3001, p, seed=3, dtype=torch.float32)
    x = logits.to(DEVICE).requires_grad_(True)
    args = ()
    if spec.regression:
        fn, args = getattr(brl_triton, spec.function_name), (regression_losses_for(targets.to(DEVICE)),)
    with record_launches() as recorded:
        out = fn(x, targets.to(DEVICE), *args, 0.5, backend="triton", **extra)
        sum(o.sum() for o in (out if isinstance(out, tuple) else (out,))).backward()
    assert recorded.launches
    assert {launch.device for launch in recorded.launches} == {x.device}, \
        [(launch.kernel.__name__, launch.device) for launch in recorded.launches if launch.device != x.device]


def test_the_device_guard_enters_the_cuda_device_of_the_tensors(monkeypatch):
    """For CUDA tensors the guard makes their device the current one (checked with
    torch.cuda.device replaced, so that it runs without a GPU)."""
    from brl_triton.kernels import _config

    entered = []

    @contextmanager
    def current(device):
        entered.append(torch.device(device))
        yield

    monkeypatch.setattr(torch.cuda, "device", current)
    with _config.on_device(torch.device("cuda", 1)):
        assert entered == [torch.device("cuda", 1)] and _config._guarded == [torch.device("cuda", 1)]
    with _config.on_device(torch.device("cpu")):
        assert entered == [torch.device("cuda", 1)]  # no CUDA device for CPU tensors
    assert _config._guarded == []


def test_autotuning_keys_hold_every_variant_flag():
    """A tuned config is cached per key: a key without a variant flag (SORTING, DETERMINISTIC, ...)
    would reuse one variant's best config for another."""
    import inspect

    import triton.language as tl

    from brl_triton.kernels import streaming, tiles

    for tunable in (streaming.REDUCE, tiles.PER_POSITIVE, tiles.FINISH):
        function = inspect.unwrap(tunable.kernel.fn)
        flags = {name for name, parameter in inspect.signature(function).parameters.items()
                 if parameter.annotation in (tl.constexpr, "tl.constexpr")}
        config_names = {name for config in tunable.configs for name in config.kwargs}
        assert flags - config_names, function.__name__  # the kernel has flags besides its config
        assert flags - config_names <= set(tunable.key), (function.__name__, flags - config_names - set(tunable.key))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the interpreter's default")
def test_the_interpreter_reduces_per_element_and_the_gate_compiles_the_gpu_default():
    """Sorting a block takes the interpreter seconds, so under it the reduction's default is the
    per-element config; the resource table and the AOT gate compile what a GPU launches, the
    default that pre-aggregates calls with few bins."""
    from benchmarks import kernel_resources as kr
    from brl_triton.kernels import _config, streaming

    gpu_default = streaming.REDUCE.gpu_default
    assert gpu_default.kwargs["PREAGGREGATE_UP_TO"] == streaming.PREAGGREGATE_BINS > 0
    assert streaming.REDUCE.default.kwargs["PREAGGREGATE_UP_TO"] == 0
    logits, targets = make_case(500, 7, seed=2, dtype=torch.float64)  # float64: a reduction of its own
    with _config.record_launches() as recorder:
        _losses_and_grad("bucketed_rank_sort", logits.to(DEVICE), targets.to(DEVICE), "triton")
    reductions = [launch for launch in recorder.launches if launch.kernel.__name__ == "_reduce_kernel"]
    assert reductions and all(launch.constexprs["PREAGGREGATE_UP_TO"] == 0 for launch in reductions)
    compiled = [v for v, default in kr.variant_matrix(reductions).items() if default]
    assert compiled and all(f"PREAGGREGATE_UP_TO={streaming.PREAGGREGATE_BINS} " in v.config
                            and v.num_warps == gpu_default.num_warps for v in compiled)


def test_autotuning_results_are_kept_per_kind_of_device(monkeypatch):
    """A tuned config holds for the GPU it was measured on: two GPU models get two autotuners,
    two of the same model share one."""
    from brl_triton.kernels import _config, streaming

    names = {0: "NVIDIA H100 80GB HBM3", 1: "NVIDIA L4", 2: "NVIDIA L4"}
    capabilities = {0: (9, 0), 1: (8, 9), 2: (8, 9)}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: names[torch.device(device).index])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capabilities[torch.device(device).index])
    monkeypatch.setattr(_config, "AUTOTUNE", "emulate")
    tunable = _config.Tunable(streaming.REDUCE.kernel, streaming.REDUCE.default, streaming.REDUCE.configs[1:],
                              key=streaming.REDUCE.key, restore=streaming.REDUCE.restore)
    h100, l4, other_l4 = (tunable.autotuner_for(torch.device("cuda", i)) for i in range(3))
    assert h100 is not l4 and l4 is other_l4
    assert tunable.autotuner_for(torch.device("cpu")) not in (h100, l4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="reorders the interpreter's programs")
@pytest.mark.parametrize("order", ["reversed", "shuffled"])
def test_the_program_order_harness_reorders_the_programs(order):
    """The instrument of the test below: programs take a ticket in the order they run."""
    import triton
    import triton.language as tl

    from conftest import program_order

    @triton.jit
    def ticket_kernel(counter_ptr, out_ptr):
        ticket = tl.atomic_add(counter_ptr, 1)
        tl.store(out_ptr + ticket, tl.program_id(0) * 4 + tl.program_id(1))

    counter, out = torch.zeros(1, dtype=torch.int32), torch.full((12,), -1, dtype=torch.int32)
    with program_order(order, seed=1):
        ticket_kernel[(3, 4)](counter, out)
    ran = out.tolist()
    assert sorted(ran) == list(range(12))
    assert ran == list(range(12))[::-1] if order == "reversed" else ran != list(range(12))


@pytest.mark.triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="reorders the interpreter's programs")
@pytest.mark.parametrize("order", ["reversed", pytest.param("shuffled", marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", list(LOSSES))
def test_results_do_not_depend_on_the_programs_order(name, order):
    """A GPU runs a launch's programs in any order: deterministic mode must stay bit-identical,
    and the default mode equal to round-off (its float atomics sum in another order)."""
    from conftest import program_order

    logits, targets = make_case(3001, 40, seed=4, dtype=torch.float32)
    want_deterministic = _losses_and_grad(name, logits, targets, "triton", deterministic=True)
    want = _losses_and_grad(name, logits, targets, "triton")
    with program_order(order):
        got_deterministic = _losses_and_grad(name, logits, targets, "triton", deterministic=True)
        got = _losses_and_grad(name, logits, targets, "triton")
    assert torch.equal(got_deterministic[0], want_deterministic[0])
    assert torch.equal(got_deterministic[1], want_deterministic[1])
    assert_close(got[0], want[0], atol=1e-6, rtol=1e-6, what="losses")
    assert_close(got[1], want[1], atol=1e-6 * want[1].abs().max().item(), rtol=1e-5, what="gradient")


@pytest.mark.skipif(torch.cuda.is_available(), reason="instruments the interpreter")
def test_the_access_log_sees_a_load_of_another_programs_store():
    """The instrument of the test below, on a kernel whose program 1 reads what program 0 stores
    (and on one whose programs only meet through an atomic, which is no race)."""
    import triton
    import triton.language as tl

    from conftest import cross_program_accesses

    @triton.jit
    def racy_kernel(buffer_ptr, out_ptr):
        pid = tl.program_id(0)
        tl.store(buffer_ptr + pid, pid + 1)
        tl.store(out_ptr + pid, tl.load(buffer_ptr + (pid + 1) % 2))

    @triton.jit
    def counting_kernel(counter_ptr, out_ptr):
        tl.atomic_add(counter_ptr, 1)
        tl.store(out_ptr + tl.program_id(0), 1)

    buffer, out = torch.zeros(2, dtype=torch.int32), torch.zeros(2, dtype=torch.int32)
    with cross_program_accesses() as log:
        racy_kernel[(2,)](buffer, out)
        counting_kernel[(2,)](buffer, out)
    assert [kernel for kernel, _ in log.launches] == ["racy_kernel", "counting_kernel"]
    assert log.launches[0][1] == ["8 bytes loaded by one program and stored by another"]
    assert log.launches[1][1] == []


@pytest.mark.triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="instruments the interpreter")
@pytest.mark.parametrize("validate", [True, False])
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("name", list(LOSSES))
def test_no_program_reads_what_another_program_of_its_launch_stores(name, deterministic, validate):
    """One forward+backward: within a launch, the programs share no byte that one of them stores
    with a plain load or store (atomic additions excepted), so their order cannot matter. 300
    positives: several programs per launch in the positives' kernels too."""
    from conftest import cross_program_accesses

    logits, targets = make_case(3001, 300, seed=4, dtype=torch.float32)
    with cross_program_accesses() as log:
        _losses_and_grad(name, logits, targets, "triton", deterministic=deterministic, validate=validate)
    assert len(log.launches) >= 5
    assert log.races() == []
