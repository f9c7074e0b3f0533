"""Loss benchmarks: every backend side by side with the hardware floors, in one run.

    python -m benchmarks.losses --quick                 # under a minute on a 2-core CPU
    python -m benchmarks.losses --preset full --out DIR  # the whole sweep (long on a CPU)

Backends: ``triton`` (CUDA only; the first call, which compiles and with BRL_AUTOTUNE=1 autotunes,
is not timed, and the configs used are printed), ``torch``, ``torch_tiles`` (the torch backend
with its O(P^2) pairwise tiles instead of the O(P log P) sweeps, from ``SWEEP_FROM`` to 20k
positives), ``sort_based`` (the paper's pipeline: full sort, buckets from contiguous
runs, dense bucket x positive matrices; bucketed losses only, see ``sort_based.py``) and
``official_loop`` (aLRP the way the official code computes it: a Python loop over positives,
vectorised over negatives; ``sort_based.official_alrp_loop``) and ``reference`` (the O(P*N)
loops, only where they finish in about a second). ``--preset alrp`` times aLRP against BAP and
the official loop at N = 1M, P = 1k; ``--preset positives`` times BRS from 1k to 200k positives
at N = 1M (and N = 10M with 1M positives) against the tiles and the paper's pipeline.

Every row is forward+backward of the loss on the same logits (median and the 20/80 % quantiles;
``triton.testing.do_bench`` on CUDA, ``torch.utils.benchmark`` on CPU), next to two floors
measured in the same run: ``torch.sort`` of the logits and one read of logits and targets. Peak
extra memory is CUDA's max allocated, or on CPU the peak resident set above the one before the
call. Writes ``results.csv``, ``results.md`` and ``time_vs_n.png`` / ``time_vs_p.png`` to --out.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import gc
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils import benchmark
from tqdm import tqdm

import brl_triton
from brl_triton import _tables, registry

from .sort_based import official_alrp_loop, sort_based_bucketed_loss


@dataclass(frozen=True)
class Loss:
    """A benchmark row's loss: ``fn(logits, targets, delta, **kwargs)`` with aLRP's regression
    losses filled in (``stand_in_regression_losses``)."""

    spec: registry.LossSpec
    kwargs: dict = field(default_factory=dict)

    @property
    def delta(self) -> float:
        return self.spec.delta

    @property
    def sort_based(self) -> bool | None:
        """None: no baseline of the paper's pipeline; else whether it has the sorting term."""
        return SORT_BASED.get(self.spec.short)

    def fn(self, logits, targets, delta, regression_losses=None, **kwargs):
        """``regression_losses``: aLRP's, computed once outside a timed step (None: made here)."""
        owner = registry.BY_NAME[self.spec.variant_of] if self.spec.variant_of else self.spec
        extra = ()
        if self.spec.regression:
            extra = (stand_in_regression_losses(targets) if regression_losses is None else regression_losses,)
        return getattr(brl_triton, owner.function_name)(logits, targets, *extra, delta, **kwargs)


def stand_in_regression_losses(targets: torch.Tensor) -> torch.Tensor:
    """aLRP's regression losses for a benchmark: 1 - IoU target of each positive, in [0, 1]."""
    flat = targets.reshape(-1)
    return (1 - flat[flat > 0]).clamp(0, 1).float()


# baselines of the paper's pipeline (sort_based.py), by short name: whether it has the sorting term
SORT_BASED = {"brs": True, "bap": False}
# every loss of the registry, a row each, by its short name
LOSSES = {spec.short: Loss(spec, {spec.option: True} if spec.option else {}) for spec in registry.LOSSES}

# Detector-shaped problems: (name, number of scores, number of positives)
DETECTORS = [
    ("faster_rcnn_rpn", 1_000_000, 500),  # ~1M anchors x 1 class
    ("faster_rcnn_roi_head", 8_000 * 80, 1_000),  # ~8k RoIs x 80 classes
    ("atss_one_stage", 5_000_000, 2_000),  # ~5M anchor-class pairs
    ("detr_like", 6 * 16 * 300 * 80, 5_000),  # 6 decoder heads x 16 images x 300 queries x 80 classes
]

PRESETS = {
    "tiny": dict(n_sweep=[2_000, 20_000], n_sweep_p=20, p_sweep=[5, 50], p_sweep_n=20_000, detectors=[],
                 losses=["brs", "rs"], min_time=0.01),
    "quick": dict(n_sweep=[10_000, 100_000, 1_000_000], n_sweep_p=1_000, p_sweep=[10, 100, 1_000, 4_000],
                  p_sweep_n=100_000, detectors=["faster_rcnn_rpn"], losses=["brs", "rs"], min_time=0.1),
    # aLRP against BAP and against the official aLRP loop (issue 11's acceptance), N = 1M, P = 1k
    "alrp": dict(n_sweep=[1_000_000], n_sweep_p=1_000, p_sweep=[], p_sweep_n=0, detectors=[],
                 losses=["bap", "alrp", "balrp"], min_time=0.5),
    # issue 13: the positive terms in O(P log P) against the O(P^2) tiles and the paper's pipeline, N = 1M;
    # and N = 10M, P = 1M for memory
    "positives": dict(n_sweep=[10_000_000], n_sweep_p=1_000_000, p_sweep=[1_000, 2_000, 5_000, 10_000, 20_000, 50_000,
                      100_000, 200_000], p_sweep_n=1_000_000, detectors=[], losses=["brs"], min_time=0.5,
                      sort_based_max_p=20_000),
    "full": dict(n_sweep=[10_000, 100_000, 1_000_000, 10_000_000], n_sweep_p=1_000,
                 p_sweep=[10, 100, 1_000, 5_000, 20_000], p_sweep_n=1_000_000,
                 detectors=[d[0] for d in DETECTORS], losses=list(LOSSES), min_time=0.5),
}

REFERENCE_MAX_WORK = 3_000_000  # N * P above which the O(P*N) loops are not timed
BACKEND_ORDER = ("triton", "torch", "torch_tiles", "sort_based", "official_loop", "reference")
TILES_MAX_P = 20_000  # the torch backend's pairwise tiles (O(P^2)), timed where they take a second or two
OFFICIAL_LOOP_MAX_WORK = 2_000_000_000  # the official aLRP loop: vectorised over N, so it gets further
SORT_BASED_MAX_P = 10_000  # its dense P x P and B x P matrices


def detector_like_case(n: int, p: int, seed: int, device: str):
    """Logits of a half-trained detector: negatives ~ N(-2, 1.5), positives shifted up by their
    IoU target in (0.5, 1]; 1% of the rest ignored."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, generator=g) * 1.5 - 2.0
    targets = torch.zeros(n)
    perm = torch.randperm(n, generator=g)
    pos = perm[:p]
    targets[pos] = 0.5 + 0.5 * torch.rand(p, generator=g)
    logits[pos] += 1.0 + 2.0 * targets[pos]
    targets[perm[p : p + n // 100]] = -1
    return logits.to(device), targets.to(device)


def _release_free_heap() -> None:
    """glibc keeps freed heap memory resident and reuses it; give it back to the OS so that the
    next call's allocations show up in the peak resident set."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_kib(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_extra_mib(step, device: str) -> float | None:
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    _release_free_heap()
    before = _status_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak to the current RSS
    except OSError:
        return None
    step()
    peak = _status_kib("VmHWM")
    return None if before is None or peak is None else max(peak - before, 0) / 1024


def time_ms(step, device: str, min_time: float):
    """(median, 20 %, 80 %) milliseconds of one call, after a warm-up call."""
    step()
    if device == "cuda":
        import triton.testing

        return tuple(triton.testing.do_bench(step, quantiles=[0.5, 0.2, 0.8]))
    # Timer runs on one thread unless told: time with all of them, as the loss would run
    measurement = benchmark.Timer(stmt="step()", globals={"step": step}, num_threads=torch.get_num_threads())
    measurement = measurement.blocked_autorange(min_run_time=min_time)
    times = sorted(t * 1e3 for t in measurement.times)
    q = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
    return measurement.median * 1e3, q[0], q[3]


def _forward_backward(loss: Loss, backend: str, x, targets, regression) -> tuple:
    """One call of the loss and its backward into ``x.grad``; ``torch_tiles`` is the torch
    backend kept on its O(P^2) tiles. Returns the outputs."""
    tiles = backend == "torch_tiles"
    saved = _tables.SWEEP_FROM
    _tables.SWEEP_FROM = sys.maxsize if tiles else saved
    try:
        out = loss.fn(x, targets, loss.delta, regression, backend="torch" if tiles else backend, **loss.kwargs)
        out = out if isinstance(out, tuple) else (out,)
        sum(out).backward()
    finally:
        _tables.SWEEP_FROM = saved
    return out


def loss_step(loss: Loss, backend: str, logits, targets):
    if backend == "official_loop":
        regression = stand_in_regression_losses(targets)
        return lambda: official_alrp_loop(logits, targets, regression, loss.delta)
    if backend == "sort_based":
        return lambda: sort_based_bucketed_loss(logits, targets, loss.delta, loss.sort_based)
    x = logits.clone().requires_grad_(True)
    regression = stand_in_regression_losses(targets) if loss.spec.regression else None  # the detector's work

    def step():
        _forward_backward(loss, backend, x, targets, regression)
        x.grad = None

    return step


def sweeps_against_tiles(loss: Loss, logits, targets) -> float:
    """The largest difference between the torch backend's sweeps and its tiles on this problem,
    over the losses and the gradient, each relative to the tiles' largest magnitude."""
    regression = stand_in_regression_losses(targets) if loss.spec.regression else None
    results = []
    for backend in ("torch", "torch_tiles"):
        x = logits.clone().requires_grad_(True)
        out = _forward_backward(loss, backend, x, targets, regression)
        results.append([o.detach().double() for o in out] + [x.grad.double()])
    return max(float((a - b).abs().max() / b.abs().max().clamp(min=1e-300)) for a, b in zip(*results))


def backends_for(loss: Loss, n: int, p: int, device: str, preset: dict | None = None) -> list[str]:
    names = (["triton"] if device == "cuda" else []) + ["torch"]
    if _tables.SWEEP_FROM <= p <= TILES_MAX_P:
        names.append("torch_tiles")
    if loss.sort_based is not None and p <= (preset or {}).get("sort_based_max_p", SORT_BASED_MAX_P):
        names.append("sort_based")
    if loss.spec is registry.ALRP and n * p <= OFFICIAL_LOOP_MAX_WORK:
        names.append("official_loop")
    if n * p <= REFERENCE_MAX_WORK:
        names.append("reference")
    return names


def plan(preset: dict):
    """(group, label, N, P) of every problem of the preset."""
    problems = [("N sweep", f"N={n:,}", n, preset["n_sweep_p"]) for n in preset["n_sweep"]]
    problems += [("P sweep", f"P={p:,}", preset["p_sweep_n"], p) for p in preset["p_sweep"]]
    problems += [("detector", name, n, p) for name, n, p in DETECTORS if name in preset["detectors"]]
    return problems


def triton_configs() -> str:
    """The config each tunable kernel ran with: its heuristic default, or what BRL_AUTOTUNE=1 chose."""
    from brl_triton.kernels import streaming, tiles

    kernels = {"reduce": streaming.REDUCE, "per_positive": tiles.PER_POSITIVE, "finish": tiles.FINISH}
    return "; ".join(f"{name}: {getattr(k.tuned, 'best_config', None) or k.default}" for name, k in kernels.items())


def machine_description(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"CPU: {cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    if device == "cuda":
        text += f"; GPU: {torch.cuda.get_device_name()}"
    else:
        text += "; no GPU: CPU timings (torch backend), Triton not timed"
    return text


def run(preset_name: str, out: Path, device: str, losses: list[str] | None = None, memory: bool = True,
        command: str = ""):
    """Time every problem of the preset; write results.csv (one row per problem, loss and backend,
    with the machine and ``command``), results.md and the plots to ``out``."""
    preset = PRESETS[preset_name]
    machine = machine_description(device)
    losses = losses or preset["losses"]
    rows = []
    problems = plan(preset)
    jobs = [(prob, name) for prob in problems for name in losses]
    bar = tqdm(total=sum(len(backends_for(LOSSES[n], prob[2], prob[3], device, preset)) for prob, n in jobs),
               desc=f"benchmarks ({preset_name}, {device})", unit="run")
    for group, label, n, p in problems:
        logits, targets = detector_like_case(n, p, seed=n + p, device=device)
        sort_ms = time_ms(lambda: torch.sort(logits), device, preset["min_time"])[0]
        read_ms = time_ms(lambda: (logits.sum(), targets.sum()), device, preset["min_time"])[0]
        for loss_name in losses:
            loss = LOSSES[loss_name]
            backends = backends_for(loss, n, p, device, preset)
            # where both run, the sweeps must equal the tiles to round-off
            parity = sweeps_against_tiles(loss, logits, targets) if "torch_tiles" in backends else None
            for backend in backends:
                bar.set_postfix_str(f"{label} {loss_name} {backend}")
                step = loss_step(loss, backend, logits, targets)
                median, low, high = time_ms(step, device, preset["min_time"])
                rows.append({
                    "group": group, "problem": label, "loss": loss_name, "backend": backend, "N": n, "P": p,
                    "median_ms": median, "q20_ms": low, "q80_ms": high, "sort_ms": sort_ms, "read_ms": read_ms,
                    "x_sort": median / sort_ms, "x_read": median / read_ms,
                    "peak_extra_mib": peak_extra_mib(step, device) if memory else None,
                    "sweeps_vs_tiles": parity if backend == "torch" else None,
                    "machine": machine, "command": command,
                })
                bar.update()
        del logits, targets
    bar.close()
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "results.csv")
    (out / "results.md").write_text(markdown_table(rows))
    plot(rows, out, machine)
    return rows


def write_csv(rows, path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


_INTEGER_COLUMNS = ("N", "P")
_TEXT_COLUMNS = ("group", "problem", "loss", "backend", "machine", "command")


def read_csv(path: Path) -> list[dict]:
    """The rows of a results.csv as :func:`run` made them (numbers as numbers, empty cells None)."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key, value in row.items():
            if key in _INTEGER_COLUMNS:
                row[key] = int(value)
            elif key not in _TEXT_COLUMNS:
                row[key] = float(value) if value else None
    return rows


TABLE_END = "<!-- end of benchmark table -->"


def table_start(csv_path: Path) -> str:
    return f"<!-- benchmark table: generated from {csv_path.as_posix()} by python -m benchmarks.losses --table, do not edit -->"


def write_table(page: Path, csv_path: Path) -> None:
    """Replace what stands between ``page``'s markers for ``csv_path`` with that run's table."""
    start = table_start(csv_path)
    text = page.read_text()
    if start not in text or TABLE_END not in text.split(start, 1)[1]:
        raise ValueError(f"{page} has no table markers for {csv_path}: {start} ... {TABLE_END}")
    before, rest = text.split(start, 1)
    page.write_text(f"{before}{start}\n{markdown_table(read_csv(csv_path))}{TABLE_END}{rest.split(TABLE_END, 1)[1]}")


def markdown_table(rows) -> str:
    """One line per problem and loss: the floors, then each backend as ms (x torch.sort); headed by
    the machine and the command that produced the rows."""
    backends = [b for b in BACKEND_ORDER if any(r["backend"] == b for r in rows)]
    command = f" `{rows[0]['command']}`." if rows[0].get("command") else ""
    lines = [f"Forward+backward, median ms (and × `torch.sort` of the same logits). {rows[0]['machine']}.{command}",
             ""]
    parity = any(r.get("sweeps_vs_tiles") is not None for r in rows)
    header = (["problem", "N", "P", "loss", "sort ms", "read ms"] + backends + ["torch peak MiB"]
              + (["torch vs tiles (max rel. diff)"] if parity else []))
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    keys = []
    for r in rows:
        key = (r["group"], r["problem"], r["loss"])
        if key not in keys:
            keys.append(key)
    for group, problem, loss in keys:
        same = {r["backend"]: r for r in rows if (r["group"], r["problem"], r["loss"]) == (group, problem, loss)}
        first = next(iter(same.values()))
        cells = [problem, f"{first['N']:,}", f"{first['P']:,}", loss, f"{first['sort_ms']:.3g}", f"{first['read_ms']:.3g}"]
        for b in backends:
            cells.append(f"{same[b]['median_ms']:.3g} ({same[b]['x_sort']:.2g}×)" if b in same else "—")
        memory = same.get("torch", {}).get("peak_extra_mib")
        cells.append("—" if memory is None else f"{memory:.1f}")
        if parity:
            difference = same.get("torch", {}).get("sweeps_vs_tiles")
            cells.append("—" if difference is None else f"{difference:.1e}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows, out: Path, machine: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"triton": "C0", "torch": "C1", "torch_tiles": "C5", "sort_based": "C2", "reference": "C3",
              "official_loop": "C4"}
    for group, axis, filename in (("N sweep", "N", "time_vs_n.png"), ("P sweep", "P", "time_vs_p.png")):
        selected = [r for r in rows if r["group"] == group]
        if not selected:
            continue
        losses = list(dict.fromkeys(r["loss"] for r in selected))
        fig, axes = plt.subplots(1, len(losses), figsize=(5 * len(losses), 4), squeeze=False)
        for ax, loss in zip(axes[0], losses):
            for backend, color in styles.items():
                pts = sorted((r[axis], r["median_ms"]) for r in selected if r["loss"] == loss and r["backend"] == backend)
                if pts:
                    ax.plot(*zip(*pts), "o-", color=color, label=backend)
            floors = sorted({(r[axis], r["sort_ms"], r["read_ms"]) for r in selected if r["loss"] == loss})
            ax.plot([f[0] for f in floors], [f[1] for f in floors], "k--", label="torch.sort (floor)")
            ax.plot([f[0] for f in floors], [f[2] for f in floors], "--", color="0.6", label="read logits+targets")
            fixed = "P" if axis == "N" else "N"
            ax.set(xscale="log", yscale="log", xlabel=axis, ylabel="forward+backward ms",
                   title=f"{loss}, {fixed}={selected[0][fixed]:,}")
            ax.grid(True, which="both", alpha=0.3)
        axes[0][0].legend(fontsize=8, loc="upper left")
        fig.suptitle(machine, fontsize=8)
        fig.tight_layout()
        fig.savefig(out / filename, dpi=110)
        plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_const", const="quick", dest="preset", help="same as --preset quick")
    parser.add_argument("--preset", choices=list(PRESETS), default="quick")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--losses", help=f"comma-separated subset of {', '.join(LOSSES)}")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--table", type=Path, metavar="PAGE",
                        help="write the table of --out/results.csv into this markdown page, between its markers")
    parser.add_argument("--no-run", action="store_true", help="time nothing: only --table, from the CSV already there")
    args = parser.parse_args(argv)
    if args.no_run:
        if args.table is None:
            parser.error("--no-run: give --table PAGE")
        write_table(args.table, args.out / "results.csv")
        return
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    losses = args.losses.split(",") if args.losses else None
    if losses and set(losses) - set(LOSSES):
        parser.error(f"--losses: unknown {sorted(set(losses) - set(LOSSES))}; choose from {list(LOSSES)}")
    start = time.perf_counter()
    print(machine_description(device))
    command = "python -m benchmarks.losses " + " ".join(argv if argv is not None else sys.argv[1:])
    rows = run(args.preset, args.out, device, losses, memory=not args.no_memory, command=command.strip())
    if args.table is not None:
        write_table(args.table, args.out / "results.csv")
    if device == "cuda":
        print("triton configs:", triton_configs())
    print((args.out / "results.md").read_text())
    print(f"{len(rows)} runs in {time.perf_counter() - start:.0f} s; wrote results.csv, results.md and plots to {args.out}")


if __name__ == "__main__":
    main()
