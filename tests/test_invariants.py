"""Properties the spec implies, independent of any one implementation."""

import pytest
import torch

import brl_triton
from conftest import assert_close, make_case, run_loss


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("seed", range(4))
def test_theorem_4_1_bucketed_equals_exact_at_delta_zero(seed, backend):
    logits, targets = make_case(3000, 40 + 10 * seed, seed=seed, grid=0.5 if seed % 2 else None)
    bucketed, bucketed_grad = run_loss("bucketed_rank_sort", logits, targets, 0.0, backend)
    exact, exact_grad = run_loss("rank_sort", logits, targets, 0.0, backend)
    for b, e in zip(bucketed, exact):
        assert_close(b, e, atol=1e-12, rtol=0, what="loss")
    assert_close(bucketed_grad, exact_grad, atol=1e-12, rtol=0, what="grad")
    bap, bap_grad = run_loss("bucketed_ap", logits, targets, 0.0, backend)
    ap, ap_grad = run_loss("ap", logits, targets, 0.0, backend)
    assert_close(bap[0], ap[0], atol=1e-12, rtol=0, what="AP loss")
    assert_close(bap_grad, ap_grad, atol=1e-12, rtol=0, what="AP grad")


@pytest.mark.parametrize("delta", [0.0, 0.5])
@pytest.mark.parametrize("name", ["bucketed_rank_sort", "rank_sort"])
def test_identity_update_gradients_sum_to_zero(name, delta):
    """The error each positive gives up is what the negatives (ranking) or positives (sorting) get."""
    logits, targets = make_case(5000, 70, seed=21)
    for upstream in [(1.0, 0.0), (0.0, 1.0)]:
        _, grad = run_loss(name, logits, targets, delta, "torch", upstream=upstream)
        assert grad.abs().sum() > 1e-3
        assert abs(grad.sum().item()) < 1e-12


@pytest.mark.parametrize("name", ["bucketed_rank_sort", "rank_sort", "bucketed_ap", "ap", "interpolated_ap"])
def test_upstream_gradients_are_linear_and_separate(name):
    logits, targets = make_case(2000, 33, seed=8)
    two = name.endswith("rank_sort")
    _, g_rank = run_loss(name, logits, targets, 0.5, "torch", upstream=(1.0, 0.0))
    _, g_both = run_loss(name, logits, targets, 0.5, "torch", upstream=(0.7, -1.3))
    if two:
        _, g_sort = run_loss(name, logits, targets, 0.5, "torch", upstream=(0.0, 1.0))
        assert g_sort.abs().sum() > 0
        want = 0.7 * g_rank - 1.3 * g_sort
    else:
        want = 0.7 * g_rank
    assert_close(g_both, want, atol=1e-14, rtol=1e-12, what="grad")


@pytest.mark.parametrize("seed", range(3))
def test_loss_ranges(seed):
    logits, targets = make_case(4000, 100, seed=seed, heavy=seed == 2)
    for delta in (0.0, 0.5):
        for fn in (brl_triton.bucketed_rank_sort_loss, brl_triton.rank_sort_loss):
            ranking, sorting = fn(logits, targets, delta)
            assert 0 <= ranking.item() <= 1 and -1 <= sorting.item() <= 1
        for loss in (brl_triton.bucketed_ap_loss(logits, targets, delta), brl_triton.ap_loss(logits, targets, delta)):
            assert 0 <= loss.item() <= 1
    assert 0 <= brl_triton.ap_loss(logits, targets, 0.5, interpolated=True).item() <= 1


def test_perfect_ranking_has_zero_ranking_loss():
    logits = torch.cat([torch.linspace(5, 10, 20), torch.linspace(-5, 0, 200)]).double()
    targets = torch.cat([torch.full((20,), 0.8), torch.zeros(200)]).double()
    ranking, sorting = brl_triton.rank_sort_loss(logits, targets, 0.5)
    assert ranking.item() == 0.0
    assert brl_triton.bucketed_ap_loss(logits, targets, 1.0).item() == 0.0


def test_flattening_is_the_only_use_of_shape():
    logits, targets = make_case(2 * 3 * 50, 12, seed=6)
    flat, flat_grad = run_loss("rank_sort", logits, targets, 0.5)
    shaped, shaped_grad = run_loss("rank_sort", logits.view(2, 3, 50), targets.view(2, 3, 50), 0.5)
    for a, b in zip(flat, shaped):
        assert_close(a, b, atol=0, rtol=0, what="loss")
    assert shaped_grad.shape == (2, 3, 50)
    assert_close(shaped_grad.reshape(-1), flat_grad, atol=0, rtol=0, what="grad")
