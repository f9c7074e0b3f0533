"""Internals of the torch backend that the random cases may not reach on their own."""

import pytest
import torch

from brl_triton import _tables, torch_backend
from brl_triton._common import RADIX_SORT_FROM, Settings, stable_sort
from brl_triton.torch_backend import BinLookup
from conftest import LOSSES, accepts, assert_close, expected, make_case, run_loss


def _searchsorted_keys(edges, s):
    return torch.searchsorted(torch.unique_consecutive(edges), s, right=True)


EDGE_SETS = {
    "normal": lambda g: torch.randn(2001, generator=g),
    "ties": lambda g: torch.round(torch.randn(3000, generator=g) * 4) / 4,
    "outlier_clusters": lambda g: torch.cat([torch.randn(500, generator=g) * 1e-6, torch.tensor([1e6, -1e6])]),
    "two_points": lambda g: torch.tensor([0.5, 0.5, -2.0]),
    "single": lambda g: torch.tensor([0.25]),
    "all_equal": lambda g: torch.full((40,), 3.0),
    "signed_zeros": lambda g: torch.tensor([-0.0, 0.0, 1.0, -1.0]),
    "tiny_span": lambda g: torch.tensor([1.0, 1.0 + 2**-23, 1.0 + 2**-22]),
    "huge_span": lambda g: torch.tensor([-3e38, 0.0, 3e38]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("edge_set", list(EDGE_SETS))
def test_bin_lookup_counts_edges_exactly(edge_set, dtype):
    g = torch.Generator().manual_seed(0)
    edges = torch.sort(EDGE_SETS[edge_set](g).to(dtype)).values
    # values: random, the edges themselves, their float neighbours, and extremes
    s = torch.cat([
        torch.randn(20000, generator=g).to(dtype) * edges.abs().max().clamp(min=1),
        edges,
        torch.nextafter(edges, torch.full_like(edges, float("inf"))),
        torch.nextafter(edges, torch.full_like(edges, -float("inf"))),
        torch.tensor([-3.4e38, 3.4e38, 0.0, -0.0], dtype=dtype),
    ])
    keys = BinLookup(edges).keys(s)
    assert keys.dtype == torch.int32
    assert torch.equal(keys.long(), _searchsorted_keys(edges, s))


def test_bin_lookup_uses_the_grid_for_spread_edges_and_falls_back_for_clusters():
    spread = BinLookup(torch.sort(torch.randn(1000)).values)
    assert spread.steps is not None and spread.steps <= BinLookup.MAX_LEVELS.bit_length()
    clustered = BinLookup(torch.sort(torch.cat([torch.randn(100) * 1e-6, torch.tensor([1e6])])).values)
    assert clustered.steps is None


def test_bin_lookup_refines_its_grid_where_edges_crowd_a_coarse_cell():
    """Nine edges within one coarse cell (more than MAX_LEVELS) but spread over several fine ones:
    the lookup takes the finer grid instead of falling back, and counts exactly."""
    spread = torch.arange(1000, dtype=torch.float64)
    coarse_cell = 999.0 / (BinLookup.FIRST_CELLS_PER_EDGE * 1009)
    crowd = 500.25 + torch.arange(9, dtype=torch.float64) * coarse_cell / 10
    edges = torch.sort(torch.cat([spread, crowd])).values
    lookup = BinLookup(edges)
    assert lookup.steps is not None and lookup.cells == BinLookup.CELLS_PER_EDGE * 1009
    s = torch.cat([torch.rand(5000, dtype=torch.float64) * 1100 - 50, edges, crowd + coarse_cell / 20])
    assert torch.equal(lookup.keys(s).long(), _searchsorted_keys(edges, s))
    plain = BinLookup(spread)
    assert plain.steps is not None and plain.cells == BinLookup.FIRST_CELLS_PER_EDGE * 1000


@pytest.mark.parametrize("name", list(LOSSES))
def test_many_tiles(name, monkeypatch):
    """Small tiles: every positives x bins / positives x positives product takes many row blocks."""
    monkeypatch.setattr(_tables, "PAIR_BLOCK", 500)
    logits, targets = make_case(6001, 150, seed=17, grid=0.125)
    for delta in (0.0, 0.5):
        if not accepts(name, delta):
            continue
        want_losses, want_grad = expected(name, logits, targets, delta)
        losses, grad = run_loss(name, logits, targets, delta, "torch")
        for got, want in zip(losses, want_losses):
            assert_close(got, want, atol=1e-10, rtol=1e-9, what=f"{name} loss")
        assert_close(grad, want_grad, atol=1e-12, rtol=1e-8, what=f"{name} grad")


@pytest.mark.parametrize("name", ["bucketed_rank_sort", "rank_sort"])
def test_clustered_positives_take_the_searchsorted_path(name):
    """Positives packed within 1e-6 plus one far outlier: the grid would need many levels."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3000, generator=g, dtype=torch.float64)
    targets = torch.zeros(3000, dtype=torch.float64)
    targets[:60] = torch.rand(60, generator=g, dtype=torch.float64).clamp_min(0.1)
    logits[:59] = 0.3 + torch.randn(59, generator=g, dtype=torch.float64) * 1e-7
    logits[59] = 1e5
    logits[100:400] = 0.3 + torch.randn(300, generator=g, dtype=torch.float64) * 1e-7  # negatives among them
    for delta in (0.0, 0.5):
        want_losses, want_grad = expected(name, logits, targets, delta)
        losses, grad = run_loss(name, logits, targets, delta, "torch")
        for got, want in zip(losses, want_losses):
            assert_close(got, want, atol=1e-10, rtol=1e-9, what="loss")
        assert_close(grad, want_grad, atol=1e-12, rtol=1e-8, what="grad")


def test_backward_keeps_no_n_sized_tensor():
    """What forward leaves for backward is O(P + E), whatever N is."""
    logits, targets = make_case(200_000, 40, seed=1, dtype=torch.float32)
    result = torch_backend.TORCH.forward(logits, targets, 0.5, LOSSES["rank_sort"][2], Settings())
    tables = result[1]
    sizes = [v.numel() for v in vars(tables).values() if isinstance(v, torch.Tensor)]
    sizes += [v.numel() for v in vars(tables.bins).values() if isinstance(v, torch.Tensor)]
    sizes += [v.numel() for v in vars(tables.bins.lookup).values() if isinstance(v, torch.Tensor)]
    assert max(sizes) <= BinLookup.CELLS_PER_EDGE * 2 * 40


@pytest.mark.parametrize("descending", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [100, RADIX_SORT_FROM + 3])
def test_stable_sort_orders_like_torch_sort_ties_and_signed_zeros_included(n, dtype, descending):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g, dtype=torch.float64).mul_(1e3).round_().div_(8).to(dtype)  # many ties
    x[::7] = 0.0
    x[::11] = -0.0  # ties with +0.0 in float order
    x[:4] = torch.tensor([torch.finfo(dtype).max, -torch.finfo(dtype).max, torch.finfo(dtype).tiny,
                          -torch.finfo(dtype).tiny], dtype=dtype)
    values, order = stable_sort(x, descending=descending)
    want_values, want_order = torch.sort(x, stable=True, descending=descending)
    assert torch.equal(order, want_order)
    assert torch.equal(values, want_values) and torch.equal(values.signbit(), want_values.signbit())
