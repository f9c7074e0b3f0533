"""The fast backends against the O(P*N) reference loops on random cases."""

import pytest
import torch

from conftest import LOSSES, assert_close, expected, loss_delta_cases, make_case, run_loss

# (id, number of logits, number of positives, make_case options)
CASES = [
    ("single", 1, 1, {}),
    ("tiny", 7, 2, {}),
    ("p1", 257, 1, {}),
    ("odd", 1001, 37, {}),
    ("p_close_to_n", 300, 290, {"ignored": 0.0}),
    ("all_positive", 50, 50, {}),
    ("heavy_tailed", 4099, 61, {"heavy": True}),
    ("ties_on_grid", 2003, 80, {"grid": 0.25}),
    ("mostly_ignored", 3001, 40, {"ignored": 0.6}),
    ("shaped", 2 * 150 * 7, 23, {"shape": (2, 150, 7)}),
]
DELTAS = [0.0, 0.25, 0.5, 1.0]



@pytest.mark.parametrize("name,delta", loss_delta_cases(DELTAS))
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_torch_backend_float64(case, name, delta):
    _, n, p, options = case
    logits, targets = make_case(n, p, seed=n + p, **options)
    want_losses, want_grad = expected(name, logits, targets, delta)
    losses, grad = run_loss(name, logits, targets, delta, "torch")
    assert len(losses) == len(want_losses)
    for got, want in zip(losses, want_losses):
        assert_close(got, want, atol=1e-10, rtol=1e-9, what=f"{name} loss")
    scale = want_grad.abs().max().item() + 1e-30
    assert_close(grad, want_grad, atol=1e-10 * scale, rtol=1e-8, what=f"{name} grad")


@pytest.mark.parametrize("name,delta", loss_delta_cases([0.0, 0.5]))
@pytest.mark.parametrize("case", CASES[3:8], ids=[c[0] for c in CASES[3:8]])
def test_torch_backend_float32(case, name, delta):
    _, n, p, options = case
    logits, targets = make_case(n, p, seed=7 * n + p, dtype=torch.float32, **options)
    want_losses, want_grad = expected(name, logits, targets, delta)
    losses, grad = run_loss(name, logits, targets, delta, "torch")
    assert grad.dtype == torch.float32
    for got, want in zip(losses, want_losses):
        assert_close(got, want, atol=1e-6, rtol=1e-5, what=f"{name} loss")
    scale = want_grad.abs().max().item()
    assert_close(grad, want_grad, atol=1e-5 * scale, rtol=1e-4, what=f"{name} grad")


@pytest.mark.parametrize("name", list(LOSSES))
def test_reference_backend_is_the_oracle(name):
    logits, targets = make_case(500, 9, seed=3)
    want_losses, want_grad = expected(name, logits, targets, 0.5)
    losses, grad = run_loss(name, logits, targets, 0.5, "reference")
    for got, want in zip(losses, want_losses):
        assert_close(got, want, atol=1e-12, rtol=0, what="loss")
    assert_close(grad, want_grad, atol=1e-12, rtol=0, what="grad")


@pytest.mark.parametrize("name", list(LOSSES))
def test_large_logits_do_not_cancel(name):
    """Shifting every logit by 1e4 changes nothing; float32 keeps the grid values exactly."""
    logits, targets = make_case(3000, 50, seed=11, grid=1 / 64)
    want_losses, want_grad = expected(name, logits, targets, 0.5)
    losses, grad = run_loss(name, (logits + 1e4).float(), targets, 0.5, "torch")
    for got, want in zip(losses, want_losses):
        assert_close(got, want, atol=1e-6, rtol=1e-5, what=f"{name} loss")
    scale = want_grad.abs().max().item()
    assert_close(grad, want_grad, atol=1e-5 * scale, rtol=1e-4, what=f"{name} grad")
