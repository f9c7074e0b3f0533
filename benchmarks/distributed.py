"""Global ranking across ranks: what a rank pays for the process group, in a simulated world.

    python -m benchmarks.distributed                       # 8 gloo ranks on this machine
    python -m benchmarks.distributed --world 4 --totals 8000,40000 --n-per-rank 100000

Every rank holds ``--n-per-rank`` logits and ``P_total / world`` positives. For each total it
times, on every rank, forward+backward of the loss with ``process_group=`` (global ranking of
all ranks' positives) and of the same loss on the rank's own batch alone (a local loss of the
same per-rank size), and reports the ratio. Times are the process's CPU time (``time.process_time``),
one thread per rank, so that the ranks sharing a few cores do not slow each other's clocks; the
median over ``--repeats`` calls, then the slowest rank. Writes ``distributed.csv``,
``distributed.md`` and ``distributed.png`` to --out.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tqdm import tqdm

import brl_triton

from .losses import detector_like_case, machine_description


def _cpu_ms(step, repeats: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.process_time()
        step()
        times.append((time.process_time() - start) * 1e3)
    return statistics.median(times)


def _worker(rank, world, init_file, out_dir, loss_name, n_per_rank, totals, repeats):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))
    fn = getattr(brl_triton, loss_name)
    rows = []
    try:
        for total in totals:
            logits, targets = detector_like_case(n_per_rank, total // world, seed=1000 * rank + total, device="cpu")
            x = logits.clone().requires_grad_(True)

            def step(group):
                out = fn(x, targets, backend="torch", process_group=group)
                sum(out if isinstance(out, tuple) else (out,)).backward()
                x.grad = None

            local = _cpu_ms(lambda: step(None), repeats)
            dist.barrier()
            global_ms = _cpu_ms(lambda: step(dist.group.WORLD), repeats)
            rows.append({"P_total": total, "P_rank": total // world, "N_rank": n_per_rank, "rank": rank,
                         "local_ms": local, "global_ms": global_ms})
        torch.save(rows, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run(world: int, loss_name: str, n_per_rank: int, totals: list[int], repeats: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.get_context("spawn")
        init_file = os.path.join(out_dir, "init")
        procs = [context.Process(target=_worker, args=(rank, world, init_file, out_dir, loss_name, n_per_rank, totals,
                                                        repeats)) for rank in range(world)]
        for proc in procs:
            proc.start()
        with tqdm(total=world, desc=f"{world} ranks, {len(totals)} totals", unit="rank") as bar:
            for proc in procs:
                proc.join()
                bar.update()
        if any(proc.exitcode != 0 for proc in procs):
            raise RuntimeError(f"a rank failed: exit codes {[proc.exitcode for proc in procs]}")
        per_rank = [row for r in range(world) for row in torch.load(os.path.join(out_dir, f"rank{r}.pt"))]
    summary = []
    for total in totals:
        rows = [r for r in per_rank if r["P_total"] == total]
        slowest = max(rows, key=lambda r: r["global_ms"])
        summary.append({"world": world, "P_total": total, "P_rank": slowest["P_rank"], "N_rank": n_per_rank,
                        "local_ms": max(r["local_ms"] for r in rows), "global_ms": slowest["global_ms"],
                        "ratio": slowest["global_ms"] / max(r["local_ms"] for r in rows)})
    return summary


def write(summary: list[dict], out: Path, loss_name: str, command: str) -> None:
    """distributed.csv (with the machine and ``command`` on every row), distributed.md, distributed.png."""
    machine = machine_description("cpu")
    summary = [{**row, "machine": machine, "command": command} for row in summary]
    out.mkdir(parents=True, exist_ok=True)
    with (out / "distributed.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)
    world = summary[0]["world"]
    lines = [f"`{loss_name}`, {world} gloo ranks on one machine, one thread each; CPU ms per call, slowest rank. "
             f"{machine}. `{command}`.", "",
             "| P total | P per rank | N per rank | local loss ms | global ranking ms | ratio |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['P_total']:,} | {r['P_rank']:,} | {r['N_rank']:,} | {r['local_ms']:.0f} | {r['global_ms']:.0f} | "
              f"{r['ratio']:.2f} |" for r in summary]
    (out / "distributed.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    totals = [r["P_total"] for r in summary]
    ax.plot(totals, [r["local_ms"] for r in summary], "o-", label="local loss, same per-rank size")
    ax.plot(totals, [r["global_ms"] for r in summary], "o-", label=f"global ranking over {world} ranks")
    ax.set(xscale="log", xlabel="positives in all ranks", ylabel="CPU ms per rank (forward+backward)",
           title=f"{loss_name}, N = {summary[0]['N_rank']:,} per rank")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "distributed.png", dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=8)
    parser.add_argument("--loss", default="bucketed_rank_sort_loss")
    parser.add_argument("--n-per-rank", type=int, default=250_000)
    parser.add_argument("--totals", default="8000,20000,50000,100000", help="comma-separated P_total values")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    totals = [int(t) for t in args.totals.split(",")]
    summary = run(args.world, args.loss, args.n_per_rank, totals, args.repeats)
    command = "python -m benchmarks.distributed " + " ".join(argv if argv is not None else sys.argv[1:])
    write(summary, args.out, args.loss, command.strip())
    print((args.out / "distributed.md").read_text())


if __name__ == "__main__":
    main()
