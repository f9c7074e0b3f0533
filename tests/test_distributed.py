"""process_group: two gloo processes (spawned here, loopback only) give the single-process loss of
the concatenated batch, and each rank's gradient is its slice of that loss's gradient."""

import os
import tempfile
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import brl_triton
from conftest import LOSSES, accepts, assert_close, make_case, run_loss

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")]

WORLD = 2
N = 3001
SPLIT = 1200  # rank 0 gets the first 1200 elements, rank 1 the other 1801: different N and P per rank
CASES = {
    "both_ranks_have_positives": dict(p=60),
    "rank_0_has_no_positive": dict(p=40, positives_only_on_rank_1=True),
}
TIMEOUT_S = 240


def _case(name):
    options = CASES[name]
    logits, targets = make_case(N, options["p"], seed=31, dtype=torch.float32, grid=0.125)
    if options.get("positives_only_on_rank_1"):
        targets[:SPLIT] = torch.where(targets[:SPLIT] > 0, torch.zeros(()), targets[:SPLIT]).double()
    return logits, targets


def _shard(tensor, rank):
    return tensor[:SPLIT] if rank == 0 else tensor[SPLIT:]


def _worker(rank, world, init_file, out_dir, backend):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        results = {}
        for case in CASES:
            logits, targets = _case(case)
            for name, (fn, extra, _) in LOSSES.items():
                for delta, deterministic in [(0.0, False), (0.5, False), (0.5, True)]:
                    if not accepts(name, delta):
                        continue
                    x = _shard(logits, rank).clone().requires_grad_(True)
                    out = fn(x, _shard(targets, rank), delta, backend=backend, process_group=dist.group.WORLD,
                             deterministic=deterministic, **extra)
                    out = out if isinstance(out, tuple) else (out,)
                    torch.autograd.backward(out, [torch.tensor(g) for g in (0.7, -1.3)[: len(out)]])
                    results[(case, name, delta, deterministic)] = ([o.detach() for o in out], x.grad)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run_ranks(worker, world, *args):
    with tempfile.TemporaryDirectory() as out_dir:
        init_file = os.path.join(out_dir, "init")
        context = mp.get_context("spawn")
        procs = [context.Process(target=worker, args=(rank, world, init_file, out_dir, *args)) for rank in range(world)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(TIMEOUT_S)
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                pytest.fail(f"a rank did not finish within {TIMEOUT_S} s")
            assert proc.exitcode == 0, f"a rank failed with exit code {proc.exitcode}"
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_two_gloo_ranks_equal_the_concatenated_batch(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    ranks = _run_ranks(_worker, WORLD, backend)
    for key, (losses0, grad0) in ranks[0].items():
        case, name, delta, _ = key
        losses1, grad1 = ranks[1][key]
        logits, targets = _case(case)
        want_losses, want_grad = run_loss(name, logits, targets, delta, "torch")
        for a, b, w in zip(losses0, losses1, want_losses):
            assert a.item() == b.item(), f"{key}: ranks disagree on the loss"
            assert_close(a, w, atol=1e-6, rtol=1e-5, what=f"{key} loss")
        scale = want_grad.abs().max().item()
        assert_close(torch.cat([grad0, grad1]), want_grad, atol=1e-5 * scale, rtol=1e-4, what=f"{key} grad")


def test_process_group_needs_an_initialised_group_and_a_fast_backend():
    with pytest.raises(ValueError, match="not initialized"):
        brl_triton.rank_sort_loss(torch.randn(5), torch.ones(5), process_group=object())
    with pytest.raises(ValueError, match="not 'reference'"):
        brl_triton.rank_sort_loss(torch.randn(5), torch.ones(5), backend="reference", process_group=object())


# Eight ranks with 2,115 positives in all (2,400 drawn, rank 1's removed): above
# _tables.SWEEP_FROM, so each rank sums the terms of its own positives and shares them;
# uneven shares, one rank without positives.
EIGHT = 8
EIGHT_N = 12_000
EIGHT_SPLITS = [0, 900, 2400, 3000, 4700, 6500, 8000, 10_100, EIGHT_N]


def _eight_case():
    logits, targets = make_case(EIGHT_N, 2400, seed=8, dtype=torch.float32, grid=1 / 32)
    targets[900:2400] = torch.where(targets[900:2400] > 0, 0.0, targets[900:2400].double())  # rank 1: none
    return logits, targets


def _eight_worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        logits, targets = _eight_case()
        share = slice(EIGHT_SPLITS[rank], EIGHT_SPLITS[rank + 1])
        results = {}
        for name, (fn, extra, _) in LOSSES.items():
            for delta in (0.0, 0.5):
                if not accepts(name, delta):
                    continue
                x = logits[share].clone().requires_grad_(True)
                out = fn(x, targets[share], delta, process_group=dist.group.WORLD, **extra)
                out = out if isinstance(out, tuple) else (out,)
                torch.autograd.backward(out, [torch.tensor(g) for g in (0.7, -1.3)[: len(out)]])
                results[(name, delta)] = ([o.detach() for o in out], x.grad)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_eight_gloo_ranks_share_the_positive_terms_and_equal_the_concatenated_batch():
    from brl_triton import _tables

    assert (_eight_case()[1] > 0).sum() >= _tables.SWEEP_FROM  # the split path, not the tiles
    ranks = _run_ranks(_eight_worker, EIGHT)
    logits, targets = _eight_case()
    for key in ranks[0]:
        name, delta = key
        want_losses, want_grad = run_loss(name, logits, targets, delta, "torch")
        for r in range(EIGHT):
            for got, first, want in zip(ranks[r][key][0], ranks[0][key][0], want_losses):
                assert got.item() == first.item(), f"{key}: rank {r} disagrees with rank 0 on the loss"
                assert_close(got, want, atol=1e-6, rtol=1e-5, what=f"{key} loss on rank {r}")
        grad = torch.cat([ranks[r][key][1] for r in range(EIGHT)])
        scale = want_grad.abs().max().item()
        assert_close(grad, want_grad, atol=1e-5 * scale, rtol=1e-4, what=f"{key} grad")


def _compiled_worker(rank, world, init_file, out_dir):
    """Each rank's losses and gradients, eager and under torch.compile; and the error of a wrong
    number of regression losses, which every rank must raise before any collective."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        logits, targets = _case("both_ranks_have_positives")
        results = {}
        for name in ("bucketed_rank_sort", "alrp"):
            fn, extra, _ = LOSSES[name]

            def step(x, t):
                out = fn(x, t, 0.5, backend="torch", process_group=dist.group.WORLD, **extra)
                return sum(out) if isinstance(out, tuple) else out

            for mode, call in (("eager", step), ("compiled", torch.compile(step))):
                x = _shard(logits, rank).clone().requires_grad_(True)
                loss = call(x, _shard(targets, rank))
                loss.backward()
                results[(name, mode)] = (loss.detach(), x.grad)
        own = int((_shard(targets, rank) > 0).sum())
        try:
            brl_triton.alrp_loss(_shard(logits, rank), _shard(targets, rank), torch.rand(own + 1),
                                 process_group=dist.group.WORLD)
        except ValueError as error:
            results["wrong count"] = str(error)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_a_compiled_step_with_a_process_group_runs_and_equals_eager():
    """torch.compile of a step that passes process_group= once hung in the traced collectives: it
    runs the loss eagerly behind a graph break (within the ranks' timeout), with eager's values."""
    ranks = _run_ranks(_compiled_worker, WORLD)
    logits, targets = _case("both_ranks_have_positives")
    for name in ("bucketed_rank_sort", "alrp"):
        want_loss, want_grad = run_loss(name, logits, targets, 0.5, "torch", upstream=(1.0, 1.0))
        grads = []
        for rank in ranks:
            eager, compiled = rank[(name, "eager")], rank[(name, "compiled")]
            torch.testing.assert_close(compiled[0], eager[0], rtol=0, atol=0)
            torch.testing.assert_close(compiled[1], eager[1], rtol=0, atol=0)
            assert_close(eager[0], sum(want_loss), atol=1e-6, rtol=1e-5, what=f"{name} loss")
            grads.append(eager[1])
        assert_close(torch.cat(grads), want_grad, atol=1e-5 * want_grad.abs().max().item(), rtol=1e-4,
                     what=f"{name} grad")
    # every rank passed one value too many: each raises before the collectives, so none waits
    assert all("one value per positive" in rank["wrong count"] for rank in ranks)


def test_fullgraph_compile_with_a_process_group_is_refused_with_the_reason(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        torch._dynamo.reset()
        step = torch.compile(lambda x, t: brl_triton.ap_loss(x, t, process_group=dist.group.WORLD), fullgraph=True)
        with pytest.raises(Exception, match="process_group= runs eagerly"):
            step(torch.randn(10), torch.ones(10))
    finally:
        dist.destroy_process_group()
