"""The loss core's speed and memory targets (issue 2), measured in one run on this machine.

    python benchmarks/core_targets.py [--repeats 5] [--csv benchmarks/results/core_targets.csv]

1. ``bucketed_rank_sort_loss`` forward+backward at N = 4,000,000, P = 2,000 against
   ``torch.sort`` of the same logits (target: ratio <= 1.0).
2. Extra peak memory of the same at N = 1,000,000, P = 20,000 (target: < 256 MiB). Measured as
   the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) above its
   resident set before the call, in a fresh subprocess.
3. ``rank_sort_loss`` (exact) against ``bucketed_rank_sort_loss`` at N = 1,000,000, P = 1,000
   (target: ratio <= 1.5).

Logits are standard normal for negatives and positives alike (every negative is relevant:
the most work for the loss); positives get IoU targets in (0, 1].
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

import torch
from torch.utils import benchmark

import brl_triton


def random_case(n: int, p: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, generator=g)
    targets = torch.zeros(n)
    targets[torch.randperm(n, generator=g)[:p]] = torch.rand(p, generator=g).clamp_min(1e-3)
    return logits, targets


def loss_step(fn, logits, targets, delta=0.5):
    x = logits.clone().requires_grad_(True)

    def run():
        ranking, sorting = fn(x, targets, delta, backend="torch")
        (ranking + sorting).backward()
        x.grad = None

    return run


def seconds(stmt, repeats: int) -> float:
    """Median time of one call (torch.utils.benchmark), after a warm-up call."""
    stmt()
    timer = benchmark.Timer(stmt="stmt()", globals={"stmt": stmt}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=0.2 * repeats).median


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_child(n: int, p: int) -> None:
    """Runs in a fresh process: prints the extra peak RSS (bytes) of one forward+backward."""
    logits, targets = random_case(n, p)
    x = logits.clone().requires_grad_(True)
    brl_triton.bucketed_rank_sort_loss(x[:1000], targets[:1000])  # import-time and lazy init
    before = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
    ranking, sorting = brl_triton.bucketed_rank_sort_loss(x, targets, 0.5, backend="torch")
    (ranking + sorting).backward()
    peak = _rss_kib("VmHWM")
    print(json.dumps({"extra_peak_bytes": (peak - before) * 1024, "grad_bytes": x.grad.numel() * 4}))


def extra_peak_bytes(n: int, p: int) -> int:
    out = subprocess.run(
        [sys.executable, __file__, "--peak-memory-child", str(n), str(p)],
        check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])["extra_peak_bytes"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="time budget per measurement, in 0.2 s units")
    parser.add_argument("--csv", type=Path, default=Path(__file__).parent / "results" / "core_targets.csv")
    parser.add_argument("--peak-memory-child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_memory_child:
        peak_memory_child(*args.peak_memory_child)
        return

    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    logits, targets = random_case(4_000_000, 2_000)
    sort_s = seconds(lambda: torch.sort(logits), args.repeats)
    brs_s = seconds(loss_step(brl_triton.bucketed_rank_sort_loss, logits, targets), args.repeats)
    rows.append(("brs fwd+bwd / torch.sort, N=4M P=2k", brs_s / sort_s, 1.0, f"{brs_s*1e3:.0f} ms vs {sort_s*1e3:.0f} ms"))

    peak = extra_peak_bytes(1_000_000, 20_000)
    rows.append(("brs extra peak MiB, N=1M P=20k", peak / 2**20, 256.0, "fwd+bwd, incl. the 4 MB gradient"))

    logits, targets = random_case(1_000_000, 1_000)
    brs_s = seconds(loss_step(brl_triton.bucketed_rank_sort_loss, logits, targets), args.repeats)
    rs_s = seconds(loss_step(brl_triton.rank_sort_loss, logits, targets), args.repeats)
    rows.append(("exact rs / brs, N=1M P=1k", rs_s / brs_s, 1.5, f"{rs_s*1e3:.0f} ms vs {brs_s*1e3:.0f} ms"))

    print(f"{'measure':<40}{'value':>10}{'target':>10}  ok   detail")
    for name, value, target, detail in rows:
        print(f"{name:<40}{value:>10.3f}{target:>10.2f}  {'yes' if value <= target else 'NO ':<4} {detail}")
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with args.csv.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["measure", "value", "target", "detail"])
        writer.writerows(rows)
    print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
