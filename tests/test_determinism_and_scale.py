"""Deterministic mode, and the launch chunking that keeps kernel index math far from 2^31."""

import pytest
import torch

import brl_triton
from brl_triton import _backends, torch_backend
from conftest import LOSSES, assert_close, expected, make_case, run_loss

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _run(name, logits, targets, backend, **options):
    fn, extra, _ = LOSSES[name]
    x = logits.clone().requires_grad_(True)
    out = fn(x, targets, 0.5, backend=backend, **extra, **options)
    out = out if isinstance(out, tuple) else (out,)
    sum(out).backward()
    return torch.stack([o.detach() for o in out]), x.grad


@pytest.mark.parametrize("name", ["bucketed_rank_sort", "rank_sort"])
def test_torch_backend_is_bit_identical_across_runs(name):
    logits, targets = make_case(20_000, 300, seed=5, dtype=torch.float32)
    first, second = _run(name, logits, targets, "torch", deterministic=True), _run(name, logits, targets, "torch",
                                                                                   deterministic=True)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_fixed_point_offset_sums_are_exact_and_order_free():
    """The path deterministic mode takes where bincount would use float atomics (CUDA)."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(50_000, generator=g)
    edges = torch.sort(torch.randn(300, generator=g)).values
    key = torch.searchsorted(edges, s, right=True).to(torch.int32)
    offsets = s - torch.cat([edges[:1], edges])[key]
    want = torch.bincount(key, weights=offsets.double(), minlength=301)
    got = torch_backend._offset_sums(key, offsets, 301, s, edges, fixed_point=True)
    assert_close(got, want, atol=1e-6, rtol=1e-6, what="offset sums")
    perm = torch.randperm(50_000, generator=g)
    shuffled = torch_backend._offset_sums(key[perm], offsets[perm], 301, s, edges, fixed_point=True)
    assert torch.equal(got, shuffled)


def test_use_deterministic_algorithms_is_honoured(monkeypatch):
    seen = []
    original = _backends.TORCH.forward

    def spy(s, y, delta, spec, settings, regression=None):
        seen.append(settings.deterministic)
        return original(s, y, delta, spec, settings, regression)

    monkeypatch.setattr(_backends.TORCH, "forward", spy)
    logits, targets = make_case(500, 10, seed=1)
    brl_triton.rank_sort_loss(logits, targets, backend="torch")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        brl_triton.rank_sort_loss(logits, targets, backend="torch")
    finally:
        torch.use_deterministic_algorithms(previous)
    brl_triton.rank_sort_loss(logits, targets, backend="torch", deterministic=True)
    assert seen == [False, True, True]


@pytest.mark.triton
@pytest.mark.parametrize("name", ["bucketed_rank_sort", "rank_sort", "bucketed_ap"])
def test_triton_deterministic_mode_matches_reference_and_repeats_bit_for_bit(name):
    pytest.importorskip("triton")
    logits, targets = make_case(4003, 50, seed=9, dtype=torch.float32, grid=0.125)
    want_losses, want_grad = expected(name, logits, targets, 0.5, upstream=(1.0, 1.0))
    first = _run(name, logits.to(DEVICE), targets.to(DEVICE), "triton", deterministic=True)
    second = _run(name, logits.to(DEVICE), targets.to(DEVICE), "triton", deterministic=True)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert_close(first[0], torch.stack(list(want_losses)), atol=1e-6, rtol=1e-5, what="losses")
    assert_close(first[1], want_grad, atol=1e-6, rtol=1e-4, what="grad")


@pytest.mark.triton
@pytest.mark.parametrize("name", ["rank_sort", "interpolated_ap"])
def test_triton_launches_in_chunks_give_the_same_result(name, monkeypatch):
    """Streaming kernels take [start, stop) ranges with int64 offsets; a tensor longer than
    MAX_ELEMENTS_PER_LAUNCH (2^30) is launched in chunks. A small mocked limit runs that path."""
    pytest.importorskip("triton")
    from brl_triton.kernels import _config

    logits, targets = make_case(5003, 70, seed=13, dtype=torch.float32)
    whole = run_loss(name, logits.to(DEVICE), targets.to(DEVICE), 0.5, "triton")
    monkeypatch.setattr(_config, "MAX_ELEMENTS_PER_LAUNCH", 1000)
    assert len(_config.launch_chunks(5003)) == 6
    chunked = run_loss(name, logits.to(DEVICE), targets.to(DEVICE), 0.5, "triton")
    for a, b in zip(whole[0], chunked[0]):
        assert_close(a, b, atol=1e-7, rtol=1e-6, what="loss")
    assert_close(chunked[1], whole[1], atol=1e-8, rtol=1e-6, what="grad")
    want_losses, _ = expected(name, logits, targets, 0.5)
    assert_close(chunked[0][0], want_losses[0], atol=1e-6, rtol=1e-5, what="loss vs reference")


def test_launch_chunks_cover_lengths_beyond_2_to_the_31():
    pytest.importorskip("triton")
    from brl_triton.kernels import _config

    n = 5 * 2**31 + 17  # no tensor is allocated: only the launch plan
    chunks = _config.launch_chunks(n)
    assert chunks[0][0] == 0 and chunks[-1][1] == n
    assert all(b - a <= _config.MAX_ELEMENTS_PER_LAUNCH for a, b in chunks)
    assert all(chunks[i][1] == chunks[i + 1][0] for i in range(len(chunks) - 1))


# Inputs at the edges of what the API accepts, for the fixed-point scales of deterministic mode:
# (n, positives, target scale, logit scale, heavy-tailed logits)
RANGE_CASES = {
    "targets x10": (1500, 40, 10.0, 1.0, False),
    "targets x1000": (1500, 40, 1000.0, 1.0, False),
    "huge logits": (1500, 40, 1.0, 1e6, True),
    "many positives": (2500, 1000, 1.0, 1.0, False),
}


@pytest.mark.triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="reorders the interpreter's programs")
@pytest.mark.parametrize("case", [pytest.param(case, marks=pytest.mark.slow) if case == "many positives" else case
                                  for case in RANGE_CASES])  # many positives: ~1 min each interpreted
@pytest.mark.parametrize("name", ["rank_sort", "bucketed_rank_sort", "bucketed_ap", "alrp"])
def test_triton_deterministic_mode_holds_over_the_accepted_range(name, case):
    """The fixed-point scales come from the real bounds of each sum: targets above 1 (terms
    h * (1 - y) exceed the bound for targets <= 1; an int64 scale sized for that bound once gave a
    sorting loss of 21.5 for 237.9 at targets x 1000), Cauchy logits of size 1e6, many positives.
    Equal to the torch backend, and bit-identical with the programs in shuffled order."""
    from conftest import program_order

    n, p, target_scale, logit_scale, heavy = RANGE_CASES[case]
    logits, targets = make_case(n, p, seed=9, heavy=heavy, dtype=torch.float32)
    logits = logits * logit_scale
    targets = torch.where(targets > 0, targets * target_scale, targets)
    options = dict(allow_targets_above_one=target_scale > 1)
    want_losses, want_grad = _run(name, logits.double(), targets, "torch", **options)
    first = _run(name, logits, targets, "triton", deterministic=True, **options)
    with program_order("shuffled", seed=3):
        second = _run(name, logits, targets, "triton", deterministic=True, **options)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert_close(first[0].double(), want_losses, atol=1e-6 * target_scale, rtol=1e-5, what="losses")
    assert_close(first[1].double(), want_grad, atol=1e-6 * want_grad.abs().max().item(), rtol=1e-4, what="grad")
