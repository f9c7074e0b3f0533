"""Shared helpers: random cases, the loss table, and running a loss with upstream gradients."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Without a GPU the Triton kernels run through the interpreter; triton reads this when the
# kernels are defined, i.e. on their first use, so it must be set before any test runs.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (-n auto) the workers share the cores instead of each taking all of them
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

import brl_triton
from brl_triton import registry
from brl_triton.reference import alrp_localisation_reference, reference_for

GOLDEN = Path(__file__).resolve().parent / "data" / "official_cases.pt"  # provenance: tests/data/README.md
# loss name -> (golden key, logits key, targets key, delta key) in each case of GOLDEN
GOLDEN_KEYS = {
    "bucketed_rank_sort": ("brs", "logits", "targets", "delta_rs"),
    "rank_sort": ("rs", "logits", "targets", "delta_rs"),
    "bucketed_ap": ("bap", "logits_bin", "targets_bin", "delta_ap"),
    "interpolated_ap": ("ap_interp", "logits_bin", "targets_bin", "delta_ap"),
}



def regression_losses_for(targets: torch.Tensor) -> torch.Tensor:
    """Stand-in regression losses for aLRP: one value in [0, 1] per positive (flat order), a fixed
    function of its target, so that a batch split over ranks gets the same values."""
    if not isinstance(targets, torch.Tensor) or targets.is_complex() or targets.is_meta:  # bad input to refuse
        return torch.zeros(0)
    flat = targets.reshape(-1)
    return (flat[flat > 0].double() * 12.9898).sin().abs().float().to(targets.device)


def _with_regression_losses(fn):
    def loss(logits, targets, *args, **kwargs):
        return fn(logits, targets, regression_losses_for(targets).requires_grad_(), *args, **kwargs)

    return loss


def _table_entry(spec):
    if spec.variant_of is not None:
        return getattr(brl_triton, registry.BY_NAME[spec.variant_of].function_name), {spec.option: True}, spec
    fn = getattr(brl_triton, spec.function_name)
    return (_with_regression_losses(fn) if spec.regression else fn), {}, spec


# name -> (function of (logits, targets, delta, **options), extra keyword arguments, registry.LossSpec),
# every loss of the registry; aLRP gets regression_losses_for(targets)
LOSSES = {spec.name: _table_entry(spec) for spec in registry.LOSSES}


class OpOutputs(TorchDispatchMode):
    """Records ``(op, numel, dtype)`` of every tensor each torch op returns."""

    def __init__(self):
        super().__init__()
        self.outputs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.outputs.append((str(func), t.numel(), t.dtype))
        return out


# The Triton interpreter runs cases up to this many logits in the fast tier (seconds each above it)
FAST_INTERPRETED_N = 2000


def triton_case_marks(n: int) -> list:
    """Marks of a Triton-backend case of ``n`` logits: ``triton``, plus ``slow`` where the
    interpreter would take seconds (on a GPU every case is fast)."""
    slow = n > FAST_INTERPRETED_N and not torch.cuda.is_available()
    return [pytest.mark.triton, pytest.mark.slow] if slow else [pytest.mark.triton]


def hypothesis_examples(thorough: int) -> int:
    """A property test's example budget: all of ``thorough`` with HYPOTHESIS_PROFILE=thorough, a
    quarter of it in the default run (the edit-test loop)."""
    return thorough if os.environ.get("HYPOTHESIS_PROFILE") == "thorough" else max(4, thorough // 4)


def needs_smoothing(name: str) -> bool:
    return LOSSES[name][2].needs_smoothing


def accepts(name: str, delta: float) -> bool:
    """The one rule by which a test leaves out a loss and delta: aLRP and the interpolated AP
    need delta > 0 (the others take the hard step, delta == 0, too)."""
    return delta > 0 or not needs_smoothing(name)


def loss_delta_cases(deltas, names=None) -> list:
    """``(name, delta)`` parameters: every loss (or ``names``) with every delta it accepts."""
    return [pytest.param(name, delta, id=f"{name}-{delta:g}") for name in (names or LOSSES) for delta in deltas
            if accepts(name, delta)]

# upstream gradients other than 1, and different for the two Rank & Sort outputs
UPSTREAM = (0.7, -1.3)


def make_case(n, p, seed, *, ignored=0.1, heavy=False, grid=None, shape=None, dtype=torch.float64):
    """Random logits/targets with exactly p positives (IoU-like targets), some ignored entries.

    heavy: Cauchy logits (huge outliers). grid: round logits to multiples of ``grid`` so that
    positives tie with each other, negatives tie with positives and sit on the breakpoints.
    """
    g = torch.Generator().manual_seed(seed)
    if heavy:
        logits = torch.empty(n, dtype=torch.float64).cauchy_(generator=g)
    else:
        logits = torch.randn(n, generator=g, dtype=torch.float64) * 2
    if grid:
        logits = torch.round(logits / grid) * grid
    targets = torch.zeros(n, dtype=torch.float64)
    perm = torch.randperm(n, generator=g)
    pos = perm[:p]
    # quality targets in (0, 1], a few repeated so that y_k == y_i ties occur
    quality = torch.rand(p, generator=g, dtype=torch.float64).clamp_min(0.05)
    quality[: p // 4] = torch.round(quality[: p // 4] * 4) / 4 + 0.25
    targets[pos] = quality.clamp(max=1)
    rest = perm[p:]
    n_ignored = int(ignored * rest.numel())
    targets[rest[:n_ignored]] = -1
    # positives a bit higher on average, like a trained detector
    logits[pos] += 1.0
    if grid:
        logits = torch.round(logits / grid) * grid
    if shape is not None:
        logits, targets = logits.reshape(shape), targets.reshape(shape)
    return logits.to(dtype), targets


def run_loss(name, logits, targets, delta, backend="torch", upstream=UPSTREAM, **options):
    """Losses (tuple) and the gradient w.r.t. logits for the given upstream gradients; ``options``
    go to the loss function (``deterministic``, ``validate``)."""
    fn, kwargs, spec = LOSSES[name]
    x = logits.detach().clone().requires_grad_(True)
    # quality targets above one are part of the tested input space; their refusal is tested on its own
    out = fn(x, targets, delta, backend=backend, allow_targets_above_one=True, **kwargs, **options)
    out = out if isinstance(out, tuple) else (out,)
    grads = [torch.tensor(g, dtype=o.dtype) for g, o in zip(upstream, out)]
    torch.autograd.backward(out, grads)
    return out, x.grad


def expected(name, logits, targets, delta, upstream=UPSTREAM):
    """The oracle: reference losses and the upstream-weighted reference gradient (float64)."""
    spec = LOSSES[name][2]
    regression = regression_losses_for(targets) if spec.regression else None
    result = reference_for(spec)(logits, targets, delta, spec, regression)
    if result is None:
        zeros = torch.zeros(logits.numel(), dtype=torch.float64)
        return (torch.zeros((), dtype=torch.float64),) * len(spec.outputs), zeros.view(logits.shape)
    losses, grads = result
    if spec.regression:  # (classification, rank) -> (classification, localisation)
        losses = (losses[0], alrp_localisation_reference(logits, targets, regression, losses[1])[0])
    grad = sum(g * grad_o for g, grad_o in zip(upstream, grads))
    return losses, grad.view(logits.shape)


def assert_close(actual, expected, *, atol, rtol, what=""):
    """allclose that says where and by how much it differs."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    diff = (actual - expected).abs()
    bad = diff > atol + rtol * expected.abs()
    if bool(bad.any()):
        idx = int(torch.argmax(diff - (atol + rtol * expected.abs())))
        pytest.fail(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements differ; worst at flat index {idx}: "
            f"actual {actual.reshape(-1)[idx].item():.10g} vs expected {expected.reshape(-1)[idx].item():.10g} "
            f"(max abs diff {diff.max().item():.3g}, atol {atol}, rtol {rtol})"
        )


@pytest.fixture(scope="session")
def golden_cases():
    if not GOLDEN.exists():
        pytest.fail(f"golden data not found at {GOLDEN}: it is part of the repository (git LFS is not used)")
    return torch.load(GOLDEN, weights_only=False)["cases"]


class CrossProgramAccesses:
    """Every interpreted Triton launch inside the block, with the bytes that one program loaded or
    stored and another program of the same launch stored (``launches``: kernel name and a
    description of each such race). On a GPU a launch's programs run in any order, so such a load
    reads either value; atomics of several programs on one address are fine, a plain load of it is
    not."""

    def __init__(self):
        self.launches: list[tuple[str, list[str]]] = []
        self._accesses: dict[str, list] | None = None

    def races(self) -> list[str]:
        return [f"{kernel}: {race}" for kernel, races in self.launches for race in races]

    def record(self, kind: str, builder, ptrs, mask) -> None:
        import numpy as np

        if self._accesses is None:
            return
        addresses = np.atleast_1d(np.asarray(ptrs.data, dtype=np.uint64))
        if mask is not None:
            addresses = addresses[np.broadcast_to(np.asarray(mask.data, dtype=bool), addresses.shape)]
        width = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
        byte_addresses = (addresses.reshape(-1, 1) + np.arange(width, dtype=np.uint64)).reshape(-1)
        x, y, z = builder.grid_idx
        _, ny, nz = builder.grid_dim
        self._accesses[kind].append((byte_addresses, (x * ny + y) * nz + z))

    def start(self) -> None:
        self._accesses = {"load": [], "store": [], "atomic": []}

    def finish(self, kernel: str) -> None:
        import numpy as np

        def pairs(kind):  # distinct (byte, program) pairs
            chunks = self._accesses[kind]
            if not chunks:
                return np.zeros((0, 2), dtype=np.uint64)
            return np.unique(np.concatenate([np.stack([b, np.full(b.size, prog, dtype=np.uint64)], 1)
                                             for b, prog in chunks]), axis=0)

        def shared_bytes(*sets):  # bytes that more than one program touches in these sets
            union = np.unique(np.concatenate(sets), axis=0)
            byte, programs = np.unique(union[:, 0], return_counts=True)
            return byte[programs > 1]

        loads, stores, atomics = pairs("load"), pairs("store"), pairs("atomic")
        writes = np.concatenate([stores, atomics])
        self._accesses = None
        races = []
        read_after_write = np.intersect1d(shared_bytes(loads, writes), np.intersect1d(loads[:, 0], writes[:, 0]))
        if read_after_write.size:
            races.append(f"{read_after_write.size} bytes loaded by one program and stored by another")
        write_write = np.intersect1d(shared_bytes(writes), stores[:, 0])
        if write_write.size:
            races.append(f"{write_write.size} bytes stored by two programs")
        self.launches.append((kernel, races))


@contextmanager
def cross_program_accesses():
    """Record, for every interpreted launch in the block, the bytes that two of its programs share
    with at least one store (``CrossProgramAccesses``)."""
    from triton.runtime import interpreter

    builder = type(interpreter.interpreter_builder)
    executor = interpreter.GridExecutor
    saved = {name: getattr(builder, name) for name in
             ("create_masked_load", "create_masked_store", "create_atomic_rmw", "create_atomic_cas")}
    saved_call = executor.__call__
    log = CrossProgramAccesses()

    def masked_load(self, ptrs, mask, *args):
        log.record("load", self, ptrs, mask)
        return saved["create_masked_load"](self, ptrs, mask, *args)

    def masked_store(self, ptrs, value, mask, *args):
        log.record("store", self, ptrs, mask)
        return saved["create_masked_store"](self, ptrs, value, mask, *args)

    def atomic_rmw(self, op, ptr, val, mask, *args):
        log.record("atomic", self, ptr, mask)
        return saved["create_atomic_rmw"](self, op, ptr, val, mask, *args)

    def atomic_cas(self, ptr, cmp, val, *args):
        log.record("atomic", self, ptr, None)
        return saved["create_atomic_cas"](self, ptr, cmp, val, *args)

    def call(self, *args, **kwargs):
        log.start()
        try:
            return saved_call(self, *args, **kwargs)
        finally:
            log.finish(self.fn.__name__)

    builder.create_masked_load, builder.create_masked_store = masked_load, masked_store
    builder.create_atomic_rmw, builder.create_atomic_cas = atomic_rmw, atomic_cas
    executor.__call__ = call
    try:
        yield log
    finally:
        for name, method in saved.items():
            setattr(builder, name, method)
        executor.__call__ = saved_call


@contextmanager
def program_order(order: str, seed: int = 0):
    """Run the programs of every interpreted Triton launch in ``order``: "reversed" or "shuffled"
    (the interpreter runs them in grid order; a GPU runs them in any order, concurrently). The
    interpreter walks its grid in order and names each program with ``set_grid_idx``; this maps
    the k-th call to the k-th program of a permutation of the grid."""
    from triton.runtime.interpreter import interpreter_builder

    builder = type(interpreter_builder)
    set_dim, set_index = builder.set_grid_dim, builder.set_grid_idx
    generator = torch.Generator().manual_seed(seed)
    state = {}

    def permuted_dim(self, nx, ny, nz):
        total = nx * ny * nz
        permutation = range(total)[::-1] if order == "reversed" else torch.randperm(total, generator=generator).tolist()
        state.update(dims=(nx, ny, nz), next=0, order=list(permutation))
        set_dim(self, nx, ny, nz)

    def permuted_index(self, x, y, z):
        nx, ny, nz = state["dims"]
        k = state["order"][state["next"]]
        state["next"] += 1
        set_index(self, k // (ny * nz), (k // nz) % ny, k % nz)

    builder.set_grid_dim, builder.set_grid_idx = permuted_dim, permuted_index
    try:
        yield
    finally:
        builder.set_grid_dim, builder.set_grid_idx = set_dim, set_index
