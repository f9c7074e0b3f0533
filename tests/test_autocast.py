"""Mixed precision: under torch.autocast (CPU bfloat16) the losses see half-precision logits
from the model, compute as without autocast, and return float32 losses."""

import pytest
import torch

from conftest import LOSSES, assert_close, expected


@pytest.mark.parametrize("name", list(LOSSES))
def test_losses_under_cpu_autocast_match_the_reference_on_the_same_logits(name):
    fn, extra, spec = LOSSES[name]
    g = torch.Generator().manual_seed(5)
    features = torch.randn(600, 16, generator=g)
    layer = torch.nn.Linear(16, 4)
    targets = torch.zeros(600, 4)
    targets[:12, 1] = torch.rand(12, generator=g).clamp_min(0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer(features)
        assert logits.dtype == torch.bfloat16  # the model ran in half precision
        logits.retain_grad()
        out = fn(logits, targets, spec.delta, backend="torch", **extra)
    out = out if isinstance(out, tuple) else (out,)
    assert all(o.dtype == torch.float32 for o in out)
    sum(out).backward()
    assert logits.grad.dtype == torch.bfloat16 and layer.weight.grad is not None
    want_losses, want_grad = expected(name, logits.detach(), targets, spec.delta, upstream=(1.0, 1.0))
    for got, want in zip(out, want_losses):
        assert_close(got, want, atol=1e-6, rtol=1e-5, what=f"{name} loss")
    # the gradient is rounded to bfloat16 once, at the end
    assert_close(logits.grad.float(), want_grad.to(torch.bfloat16).float(), atol=1e-6, rtol=1e-2, what="grad")
