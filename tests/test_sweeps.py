"""The O(p log p) sweeps: their sums against brute-force pairwise sums, the losses they give
against the reference oracle and the tiles, and the absence of any p x p or p x bins tensor."""

import pytest
import torch

from brl_triton import _tables, rank_sort_loss, torch_backend
from brl_triton._sweeps import DominanceSums, SortedSums, dominance_sums
from conftest import LOSSES, OpOutputs, UPSTREAM, assert_close, expected, loss_delta_cases, make_case, run_loss


def _step(x: torch.Tensor, smooth: bool) -> torch.Tensor:
    """H on scaled differences, straight from the definition (delta = 1/2 in these units)."""
    return (x + 0.5).clamp(0, 1) if smooth else (x >= 0).double()


def _values(n: int, g: torch.Generator, magnitude: float) -> torch.Tensor:
    """Sorted values on a 1/8 grid (ties, and members exactly on window edges), times magnitude."""
    return torch.sort(torch.round(torch.randn(n, generator=g, dtype=torch.float64) * 32) / 8).values * magnitude


@pytest.mark.parametrize("smooth", [True, False], ids=["smooth", "step"])
@pytest.mark.parametrize("magnitude", [1.0, 1e20, 1e300])
@pytest.mark.parametrize("n", [0, 1, 2, 7, 64, 257])
def test_sorted_and_dominance_sums_equal_pairwise_sums(n, magnitude, smooth):
    g = torch.Generator().manual_seed(n)
    u = _values(n, g, magnitude)
    queries = torch.cat([_values(40, g, magnitude), u[:10], u[:10] + 0.5, u[:10] - 0.5])
    weights = torch.randn(n, 3, generator=g, dtype=torch.float64)
    pi = torch.randperm(n, generator=g)
    bound = torch.randint(0, n + 1, (queries.numel(),), generator=g)
    allowed = (pi[None, :] < bound[:, None]).double()
    up = _step(u[None, :] - queries[:, None], smooth)
    down = _step(queries[:, None] - u[None, :], smooth)
    scale = 1 + weights.abs().sum()  # round-off is relative to the weights' total
    sorted_sums = SortedSums(u, weights, smooth)
    assert_close(sorted_sums.above(queries), up @ weights, atol=1e-13 * scale, rtol=0, what="above")
    assert_close(sorted_sums.below(queries), down @ weights, atol=1e-13 * scale, rtol=0, what="below")
    dominance = DominanceSums(u, weights, pi, smooth)
    assert_close(dominance.above(queries, bound), (up * allowed) @ weights, atol=1e-13 * scale, rtol=0,
                 what="dominance above")
    assert_close(dominance.below(queries, bound), (down * allowed) @ weights, atol=1e-13 * scale, rtol=0,
                 what="dominance below")


def test_ties_at_huge_values_get_one_half():
    """Where q + 1/2 rounds to q, a tie still sits inside the window, with H(0) = 1/2."""
    u = torch.tensor([1e30, 1e30, 2e30], dtype=torch.float64)
    got = SortedSums(u, torch.ones(3, 1, dtype=torch.float64), True).above(torch.tensor([1e30], dtype=torch.float64))
    assert float(got) == 2.0  # 1/2 + 1/2 + 1


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8, 16, 100])
def test_dominance_sums_at_every_bound_and_range(n):
    """Every (bound, start, end) against a mask, at sizes around powers of two."""
    g = torch.Generator().manual_seed(n)
    pi = torch.randperm(n, generator=g)
    table = torch.randint(-3, 4, (n, 2), generator=g).double()  # small integers: sums are exact
    bound, start, end = torch.meshgrid(torch.arange(n + 1), torch.arange(n + 1), torch.arange(n + 1), indexing="ij")
    bound, start, end = bound.reshape(-1), start.reshape(-1), end.reshape(-1)
    keep = start <= end
    bound, start, end = bound[keep], start[keep], end[keep]
    k = torch.arange(n)
    below = pi[None, :] < bound[:, None]
    # both ends given (a difference of walks), and open below or above (a walk against the anchor)
    got = dominance_sums(pi, table, bound, [start, None, start], [end, end, None])
    for found, first, stop in zip(got, (start, torch.zeros_like(start), start), (end, end, torch.full_like(end, n))):
        mask = below & (k[None, :] >= first[:, None]) & (k[None, :] < stop[:, None])
        assert torch.equal(found, mask.double() @ table)


@pytest.mark.parametrize("smooth", [True, False], ids=["smooth", "step"])
def test_dominance_sums_for_a_slice_of_queries_walk_only_their_span(smooth):
    """Queries from the middle third (how a rank sums its slice): the walks span only the members
    near them, and the open ranges' far parts come from cumulative sums; all equal pairwise sums."""
    g = torch.Generator().manual_seed(11)
    n = 300
    u = _values(n, g, 1.0)
    weights = torch.randn(n, 2, generator=g, dtype=torch.float64)
    pi = torch.randperm(n, generator=g)
    queries = u[n // 3: 2 * n // 3]
    bound = torch.randint(0, n + 1, (queries.numel(),), generator=g)
    allowed = (pi[None, :] < bound[:, None]).double()
    dominance = DominanceSums(u, weights, pi, smooth)
    scale = 1 + weights.abs().sum()
    for upward, got in ((True, dominance.above(queries, bound)), (False, dominance.below(queries, bound))):
        steps = _step(u[None, :] - queries[:, None] if upward else queries[:, None] - u[None, :], smooth)
        assert_close(got, (steps * allowed) @ weights, atol=1e-13 * scale, rtol=0, what=f"upward={upward}")



@pytest.mark.parametrize("name,delta", loss_delta_cases([0.0, 0.5, 0.01]))
@pytest.mark.parametrize("case", ["grid", pytest.param("heavy", marks=pytest.mark.slow)])
def test_swept_losses_match_the_reference(name, delta, case, monkeypatch):
    """The reference is the O(P N) oracle of the spec; ties on a grid, or Cauchy outliers."""
    monkeypatch.setattr(_tables, "SWEEP_FROM", 1)
    options = dict(grid=0.125) if case == "grid" else dict(heavy=True)
    logits, targets = make_case(4001, 300, seed=5, **options)
    want_losses, want_grad = expected(name, logits, targets, delta)
    losses, grad = run_loss(name, logits, targets, delta, "torch")
    for got, want in zip(losses, want_losses):
        assert_close(got, want, atol=1e-10, rtol=1e-9, what=f"{name} loss")
    assert_close(grad, want_grad, atol=1e-12, rtol=1e-8, what=f"{name} grad")


@pytest.mark.parametrize("name,delta", loss_delta_cases([0.0, 0.5]))
def test_sweeps_equal_tiles_at_thousands_of_positives(name, delta, monkeypatch):
    """Both paths of the torch backend at a size where both run: equal to float64 round-off."""
    logits, targets = make_case(30_000, 3000, seed=9, grid=1 / 64)
    results = {}
    for path, sweep_from in [("tiles", 10**9), ("sweeps", 1)]:
        monkeypatch.setattr(_tables, "SWEEP_FROM", sweep_from)
        results[path] = run_loss(name, logits, targets, delta, "torch")
    (tiled, tiled_grad), (swept, swept_grad) = results["tiles"], results["sweeps"]
    for got, want in zip(swept, tiled):
        assert_close(got, want, atol=1e-12, rtol=1e-11, what=f"{name} loss")
    scale = float(tiled_grad.abs().max())
    assert_close(swept_grad, tiled_grad, atol=1e-11 * scale, rtol=1e-9, what=f"{name} grad")


@pytest.mark.parametrize("name", ["rank_sort", "bucketed_rank_sort", "ap", "interpolated_ap", "alrp"])
def test_no_tensor_grows_with_positives_squared(name, monkeypatch):
    """With p = 4000 of N = 8000: every tensor stays O(N + p)."""
    monkeypatch.setattr(_tables, "SWEEP_FROM", 1)
    logits, targets = make_case(8000, 4000, seed=2, ignored=0.0)
    fn, extra, _ = LOSSES[name]
    x = logits.clone().requires_grad_(True)
    with OpOutputs() as mode:
        out = fn(x, targets, 0.5, backend="torch", **extra)
        out = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(out, [torch.tensor(g, dtype=o.dtype) for g, o in zip(UPSTREAM, out)])
    # the widest: the bin lookup's grid (cells per edge x 2p edges); p x p would be 16M
    assert max(numel for _, numel, _ in mode.outputs) <= max(8000, torch_backend.BinLookup.CELLS_PER_EDGE * 2 * 4000)


@pytest.mark.triton
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("name", ["bucketed_rank_sort", "rank_sort", "ap", "interpolated_ap", "alrp"])
def test_triton_backend_hands_many_positives_to_the_sweeps(name, deterministic, monkeypatch):
    """Above its crossover the Triton backend runs the sweeps on its own bins (fixed-point offsets
    in deterministic mode, the kernels' keys): the reference's losses and gradient."""
    pytest.importorskip("triton")
    from brl_triton import triton_backend

    monkeypatch.setattr(triton_backend, "TRITON_SWEEP_FROM", 1)
    monkeypatch.setattr(_tables, "SWEEP_FROM", 1)
    logits, targets = make_case(3001, 200, seed=4, grid=0.125, dtype=torch.float32)
    fn, extra, _ = LOSSES[name]
    x = logits.clone().requires_grad_(True)
    out = fn(x, targets, 0.5, backend="triton", deterministic=deterministic, allow_targets_above_one=True, **extra)
    out = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(out, [torch.tensor(g, dtype=o.dtype) for g, o in zip(UPSTREAM, out)])
    want_losses, want_grad = expected(name, logits.double(), targets, 0.5)
    for got, want in zip(out, want_losses):
        assert_close(got, want, atol=1e-6, rtol=1e-5, what=f"{name} loss")
    assert_close(x.grad, want_grad, atol=1e-6 * float(want_grad.abs().max()), rtol=1e-4, what=f"{name} grad")


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("deterministic", [False, True])
def test_deterministic_sweeps_run_under_torch_deterministic_algorithms(backend, deterministic, monkeypatch):
    """CUDA's float cumsum and index_add_ add in a fixed order only under torch's deterministic
    algorithms: the sweeps switch them on for deterministic calls, and back to the caller's
    setting (warn_only included) afterwards."""
    if backend == "triton":
        pytest.importorskip("triton")
        from brl_triton import triton_backend

        monkeypatch.setattr(triton_backend, "TRITON_SWEEP_FROM", 1)
    monkeypatch.setattr(_tables, "SWEEP_FROM", 1)
    seen = []
    real = _tables._SweptSums

    def recording(*args, **kwargs):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(_tables, "_SweptSums", recording)
    logits, targets = make_case(601, 40, seed=3, dtype=torch.float32)
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(False, warn_only=True)
    try:
        x = logits.clone().requires_grad_(True)
        rank_sort_loss(x, targets, backend=backend, deterministic=deterministic)[0].backward()
        after = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    assert seen and all(flag == deterministic for flag in seen)
    assert after == (False, True)
