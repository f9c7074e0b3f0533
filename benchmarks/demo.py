"""Quick demo on built-in random data: every loss on a detector-sized batch, checked and timed.

    python benchmarks/demo.py [--anchors 20000] [--classes 80] [--batch 2]

Prints the four losses (torch backend), their agreement with the O(P*N) reference on a
subsample, and the forward+backward time of each next to ``torch.sort`` of the same logits.
"""

from __future__ import annotations

import argparse
import time

import torch

import brl_triton
from brl_triton import _common as kinds
from brl_triton.reference import reference_forward


def detector_batch(batch: int, anchors: int, classes: int, positives: int, seed: int = 0):
    """Logits (B, A, C) and IoU targets: a few positives with IoU in (0.5, 1], 1% ignored."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, anchors, classes, generator=g) * 1.5 - 3.0
    targets = torch.zeros(batch, anchors, classes)
    flat = targets.view(-1)
    perm = torch.randperm(flat.numel(), generator=g)
    pos = perm[:positives]
    flat[pos] = 0.5 + 0.5 * torch.rand(positives, generator=g)
    logits.view(-1)[pos] += 2.0 + 2.0 * flat[pos]
    flat[perm[positives : positives + flat.numel() // 100]] = -1
    return logits, targets


def median_time(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--anchors", type=int, default=20000)
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--positives", type=int, default=1500)
    args = parser.parse_args()

    logits, targets = detector_batch(args.batch, args.anchors, args.classes, args.positives)
    n = logits.numel()
    print(f"logits {tuple(logits.shape)} = {n:,} scores, {int((targets > 0).sum())} positives")
    sort_time = median_time(lambda: torch.sort(logits.view(-1)))
    print(f"torch.sort of the logits: {sort_time * 1e3:.1f} ms\n")

    # a subsample small enough for the O(P*N) reference loops
    sub_logits, sub_targets = logits.view(-1)[:200_000], targets.view(-1)[:200_000]
    losses = [
        ("bucketed_rank_sort_loss", brl_triton.bucketed_rank_sort_loss, {}, kinds.BUCKETED_RANK_SORT, 0.5),
        ("rank_sort_loss", brl_triton.rank_sort_loss, {}, kinds.RANK_SORT, 0.5),
        ("bucketed_ap_loss", brl_triton.bucketed_ap_loss, {}, kinds.BUCKETED_AP, 1.0),
        ("ap_loss(interpolated)", brl_triton.ap_loss, {"interpolated": True}, kinds.INTERPOLATED_AP, 1.0),
    ]
    print(f"{'loss':<26}{'value(s)':<22}{'|diff| vs reference':>20}{'fwd+bwd ms':>12}{'/ sort':>8}")
    for label, fn, extra, kind, delta in losses:
        x = logits.clone().requires_grad_(True)

        def step():
            out = fn(x, targets, delta, backend="torch", **extra)
            out = out if isinstance(out, tuple) else (out,)
            sum(out).backward()
            return out

        out = step()
        elapsed = median_time(step)
        sub = fn(sub_logits, sub_targets, delta, backend="torch", **extra)
        sub = sub if isinstance(sub, tuple) else (sub,)
        ref = reference_forward(sub_logits, sub_targets, delta, kind)[0]
        diff = max(abs(a.item() - b.item()) for a, b in zip(sub, ref))
        values = ", ".join(f"{v.item():.4f}" for v in out)
        print(f"{label:<26}{values:<22}{diff:>20.2e}{elapsed * 1e3:>12.1f}{elapsed / sort_time:>8.2f}")


if __name__ == "__main__":
    main()
