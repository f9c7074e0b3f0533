"""One command for the day a GPU is available: Triton tests, parity, determinism and timings.

    python -m benchmarks.gpu_check            # on a CUDA machine: the whole check (minutes)
    python -m benchmarks.gpu_check --quick    # a shorter timing and parity sweep
    python -m benchmarks.gpu_check --dry-run  # anywhere: the same code paths at N <= 5000

What it does, in this order (a failing step never stops the later ones; the exit status is
non-zero if any step failed):

1. **Triton tests**: ``python -m pytest -q -m triton tests`` in a subprocess, with
   ``TRITON_INTERPRET`` removed from its environment so the tests run the kernels on CUDA; the
   pass/fail counts are reported and the log kept in ``--out``/pytest.log.
2. **Timings**: forward+backward of every loss (``benchmarks.losses.LOSSES``, float32 logits and
   targets, detector-like data) with the Triton backend, ``triton.testing.do_bench`` median and
   20/80 % quantiles after a warm-up call, next to the torch backend on the same GPU,
   ``torch.sort`` of the same logits, and the bandwidth floor: bytes one call streams
   (``brl_triton.triton_backend.streamed_bytes_per_element``, 24 B/element if the backend does
   not say) over the copy bandwidth measured in the same run (the theoretical one is printed
   too when the device properties allow it). The wall time of each loss's first call on each
   problem is reported apart; the timings run before the parity checks and Triton compiles into
   an empty temporary cache, so the first problem's first call is the cold compile a user pays.
   GPU kernels per call are counted with torch.profiler.
3. **Parity**: each loss at a few sizes, Triton against the torch backend on the same GPU
   (upstream gradients 0.7 and -1.3 for the two Rank & Sort outputs, so that a swapped or
   dropped output shows): losses within rtol 1e-5, gradients within 1e-5 x max|grad|.
4. **Determinism**: ``deterministic=True`` three times, bit-identical losses and gradients.
5. **Crossover**: one loss of each family of step-3 terms (``CROSSOVER_LOSSES``: Rank & Sort,
   AP, interpolated AP, aLRP) at N = 10^6 for P from 4,096 to 65,536, the Triton backend with its
   register tiles against the same backend handing step 3 to the torch sweeps
   (``triton_backend.TRITON_SWEEP_FROM``, an estimate until this runs): per family, the P from
   which the sweeps win, to put into ``TRITON_SWEEP_FROM``. Written to ``crossover.csv`` and
   ``results.md``.
6. **Pre-aggregation**: the bin reduction alone (``streaming.reduce``) at N = 10^6 over 4 to
   16,384 bin edges, one atomic per element against each block sorted by bin with one atomic
   per bin (``streaming.REDUCE``'s never- and always-pre-aggregating configs): the most edges at
   which pre-aggregating wins, to put into ``streaming.PREAGGREGATE_BINS`` (an estimate until
   this runs). Written to ``preaggregation.csv`` and ``results.md``.

Writes ``results.csv`` (timings), ``parity.csv``, ``results.md`` (the timing table for
benchmarks/README.md, then the parity table and the step results) and ``gpu_time_vs_n.png`` to ``--out``
(default ``benchmarks/results/gpu_check/``, git-ignored).

Without CUDA it stops at once with a one-line message, unless ``--dry-run``: then it runs on the
CPU at N <= 5000, skips the test subprocess, runs the Triton backend through the interpreter
(``TRITON_INTERPRET=1``) for parity and determinism, and times the torch backend in the Triton
column as a stand-in, so that the plumbing can be tested without a GPU. On a CUDA machine
``--dry-run`` is a quick smoke test of the same tiny sweep on the GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "gpu_check"
NO_CUDA_MESSAGE = (
    "no CUDA device: torch.cuda.is_available() is False; run this on a GPU machine "
    "(or pass --dry-run to exercise the script on the CPU)"
)

UPSTREAM = (0.7, -1.3)  # upstream gradients of the (ranking, sorting) outputs in the parity runs
LOSS_RTOL = 1e-5
LOSS_ATOL = 1e-7  # only matters for a loss that is (nearly) zero
GRAD_TOL = 1e-5  # times max |gradient|
DETERMINISM_REPEATS = 3
FALLBACK_BYTES_PER_ELEMENT = 24  # float32 logits and targets, as triton_backend's docstring counts them


@dataclass(frozen=True)
class Sweep:
    parity: list  # (N, P) of the parity and determinism checks
    n_sweep: list  # N of the timed "N sweep" problems
    n_sweep_p: int  # their P
    detectors: list  # names from benchmarks.losses.DETECTORS, also timed
    min_time: float  # seconds per CPU measurement (dry run); do_bench chooses its own on CUDA
    copy_mib: int  # size of the bandwidth-measuring copy
    crossover_n: int = 1_000_000  # N of the tiles-vs-sweeps timings
    crossover_p: tuple = (4_096, 8_192, 16_384, 32_768, 65_536)  # their P
    preaggregation_n: int = 1_000_000  # N of the bin-reduction timings
    preaggregation_edges: tuple = (4, 16, 64, 256, 1_024, 4_096, 16_384)  # their edge counts


SWEEPS = {
    "full": Sweep([(100_000, 100), (1_000_000, 1_000), (4_000_000, 4_000)],
                  [10_000, 100_000, 1_000_000, 10_000_000, 50_000_000], 1_000,
                  ["faster_rcnn_rpn", "faster_rcnn_roi_head", "atss_one_stage", "detr_like"], 0.5, 2048),
    "quick": Sweep([(100_000, 100), (1_000_000, 1_000)], [100_000, 1_000_000, 10_000_000], 1_000,
                   ["faster_rcnn_rpn"], 0.1, 1024),
    # the interpreter sorts a block in seconds: one block, two edge counts
    "dry": Sweep([(1_000, 10)], [1_000, 2_000, 5_000], 20, [], 0.01, 32, 2_000, (16, 64), 1_000, (4, 64)),
}


@dataclass
class Step:
    """Outcome of one of the checks, for the summary and the exit status."""

    name: str
    status: str  # "passed", "FAILED" or "skipped"
    detail: str = ""

    def line(self) -> str:
        return f"{self.name}: {self.status}" + (f" ({self.detail})" if self.detail else "")


# ---------------------------------------------------------------------------------------------
# environment


def describe_environment(device: str, dry_run: bool) -> str:
    """What the numbers were measured on, so that a pasted table says where it came from."""
    import triton

    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        where = (f"GPU: {props.name} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
                 f"{props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}")
    else:
        where = "no GPU: CPU, Triton through its interpreter"
    mode = "DRY RUN, " if dry_run else ""
    return (f"{mode}{where}; torch {torch.__version__}, triton {triton.__version__}, "
            f"python {platform.python_version()}, brl_triton at {git_revision()}")


def git_revision() -> str:
    """Short commit of the checkout, with '+dirty' when the tree has changes."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown revision"
    return rev + ("+dirty" if dirty else "")


@contextlib.contextmanager
def empty_triton_cache():
    """Compile into a fresh cache, so that first-call times include compilation as a new user
    sees it, whatever earlier runs (or the test subprocess) left in ~/.triton."""
    previous = os.environ.get("TRITON_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="brl_gpu_check_triton_") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        try:
            yield cache
        finally:
            if previous is None:
                os.environ.pop("TRITON_CACHE_DIR", None)
            else:
                os.environ["TRITON_CACHE_DIR"] = previous


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def one_line(error: BaseException) -> str:
    """An exception as one short line for tables and summaries."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:200]


# ---------------------------------------------------------------------------------------------
# 1. the Triton test-suite on CUDA


TEST_ARGS = ["-m", "pytest", "-q", "-m", "triton", "tests"]  # after sys.executable, in the repository root
PYTEST_COUNT = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected)")


def pytest_counts(output: str) -> dict:
    """Counts from pytest's final summary line ('3 failed, 120 passed, 2 skipped in 4.5s')."""
    summary = [line for line in output.splitlines() if PYTEST_COUNT.search(line)]
    if not summary:
        return {}
    counts = {}
    for number, word in PYTEST_COUNT.findall(summary[-1]):
        key = "errors" if word.startswith("error") else word
        counts[key] = counts.get(key, 0) + int(number)
    return counts


def run_test_suite(out: Path) -> Step:
    """The Triton tests on the GPU: without TRITON_INTERPRET the tests pick CUDA by themselves.
    The output is streamed (the suite takes a while) and kept in pytest.log."""
    command = [sys.executable, *TEST_ARGS]
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    print("$ python", " ".join(TEST_ARGS), "(TRITON_INTERPRET unset)", flush=True)
    lines = []
    with subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as process:
        for line in process.stdout:
            sys.stdout.write(line)
            lines.append(line)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pytest.log").write_text("".join(lines))
    counts = pytest_counts("".join(lines))
    detail = ", ".join(f"{v} {k}" for k, v in counts.items()) or "no summary line"
    detail += f"; exit code {process.returncode}; log in {out / 'pytest.log'}"
    return Step("triton tests", "passed" if process.returncode == 0 else "FAILED", detail)


# ---------------------------------------------------------------------------------------------
# 2. timings


@dataclass(frozen=True)
class Bandwidth:
    measured: float  # bytes/s of a device-to-device copy, read + write counted
    theoretical: float | None  # from the memory clock and bus width, where exposed
    theoretical_note: str  # where it came from, or why there is none
    bytes_per_element: int
    bytes_source: str


def measure_bandwidth(device: str, sweep: Sweep) -> float:
    """Achievable bandwidth: a large copy_ moves its size twice (one read, one write)."""
    from .losses import time_ms

    n = sweep.copy_mib * 2**20
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    median_ms = time_ms(lambda: dst.copy_(src), device, sweep.min_time)[0]
    return 2 * n / (median_ms * 1e-3)


def theoretical_bandwidth(device: str) -> tuple[float | None, str]:
    """Double data rate x memory clock x bus width, where torch exposes them."""
    if device != "cuda":
        return None, "none on the CPU"
    props = torch.cuda.get_device_properties(0)
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    if not clock_khz or not bus_bits:
        return None, "memory clock / bus width not exposed by torch.cuda.get_device_properties"
    return 2 * clock_khz * 1e3 * bus_bits / 8, f"2 x {clock_khz / 1e3:.0f} MHz x {bus_bits} bit"


def streamed_bytes() -> tuple[int, str]:
    """Bytes per element one forward+backward streams, as the backend itself counts them."""
    fallback = f"fallback {FALLBACK_BYTES_PER_ELEMENT} B/element for float32"
    try:
        from brl_triton import triton_backend
    except Exception as error:  # a backend that does not import right now
        return FALLBACK_BYTES_PER_ELEMENT, f"{fallback}: brl_triton.triton_backend does not import ({one_line(error)})"
    count = getattr(triton_backend, "streamed_bytes_per_element", None)
    if count is None:
        return FALLBACK_BYTES_PER_ELEMENT, f"{fallback}: brl_triton.triton_backend.streamed_bytes_per_element is missing"
    try:
        return int(count(torch.float32, torch.float32, deterministic=False)), "triton_backend.streamed_bytes_per_element"
    except Exception as error:
        return FALLBACK_BYTES_PER_ELEMENT, f"{fallback}: streamed_bytes_per_element failed ({one_line(error)})"


def bandwidth_info(device: str, sweep: Sweep) -> Bandwidth:
    return Bandwidth(measure_bandwidth(device, sweep), *theoretical_bandwidth(device), *streamed_bytes())


def timing_problems(sweep: Sweep):
    """(group, label, N, P): the N sweep (plotted) and the detector-shaped problems."""
    from .losses import DETECTORS

    problems = [("N sweep", f"N={n:,}", n, sweep.n_sweep_p) for n in sweep.n_sweep]
    return problems + [("detector", name, n, p) for name, n, p in DETECTORS if name in sweep.detectors]


def first_call_seconds(step, device: str) -> float:
    """Wall time of one call, finished on the device: includes any compilation it triggers."""
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - start


def gpu_kernels_per_call(step, device: str) -> int | None:
    """Kernels one call runs on the GPU (torch.profiler; memcpy/memset not counted). Optional:
    None on the CPU or when the profiler is not available."""
    if device != "cuda":
        return None
    try:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        return sum(1 for event in prof.events() if event.device_type == DeviceType.CUDA
                   and not event.name.startswith(("Memcpy", "Memset")))
    except Exception:
        return None


def time_backend(loss, backend: str, logits, targets, device: str, min_time: float) -> dict:
    """First-call seconds, then the do_bench quantiles of forward+backward (ms)."""
    from .losses import loss_step, time_ms

    step = loss_step(loss, backend, logits, targets)
    first = first_call_seconds(step, device)
    median, low, high = time_ms(step, device, min_time)
    return {"first_call_s": first, "ms": median, "q20_ms": low, "q80_ms": high, "step": step}


def time_problem(problem, device: str, sweep: Sweep, bandwidth: Bandwidth, stand_in: bool, bar) -> list:
    """One row per loss for one problem; a Triton failure is recorded in the row, not raised."""
    from .losses import LOSSES, detector_like_case, time_ms

    group, label, n, p = problem
    logits, targets = detector_like_case(n, p, seed=n + p, device=device)
    sort_ms = time_ms(lambda: torch.sort(logits), device, sweep.min_time)[0]
    floor_bytes = bandwidth.bytes_per_element * n
    rows = []
    for name, loss in LOSSES.items():
        bar.set_postfix_str(f"{label} {name}")
        row = {"group": group, "problem": label, "N": n, "P": p, "loss": name,
               "timed_backend": "torch (stand-in)" if stand_in else "triton", "triton_ms": None,
               "triton_q20_ms": None, "triton_q80_ms": None, "first_call_s": None, "gpu_kernels": None,
               "torch_ms": None, "sort_ms": sort_ms, "floor_ms": floor_bytes / bandwidth.measured * 1e3,
               "floor_theoretical_ms": None if bandwidth.theoretical is None
               else floor_bytes / bandwidth.theoretical * 1e3,
               "x_sort": None, "x_floor": None, "bytes_per_element": bandwidth.bytes_per_element, "error": ""}
        try:
            timed = time_backend(loss, "torch" if stand_in else "triton", logits, targets, device, sweep.min_time)
            row.update(triton_ms=timed["ms"], triton_q20_ms=timed["q20_ms"], triton_q80_ms=timed["q80_ms"],
                       first_call_s=timed["first_call_s"], gpu_kernels=gpu_kernels_per_call(timed["step"], device),
                       x_sort=timed["ms"] / sort_ms, x_floor=timed["ms"] / row["floor_ms"])
        except Exception as error:
            row["error"] = one_line(error)
        try:
            row["torch_ms"] = time_backend(loss, "torch", logits, targets, device, sweep.min_time)["ms"]
        except Exception as error:  # e.g. a CUDA context that a failed Triton kernel left broken
            row["error"] = (row["error"] + "; " if row["error"] else "") + f"torch backend: {one_line(error)}"
        rows.append(row)
        bar.update()
    return rows


def run_timings(device: str, sweep: Sweep, stand_in: bool) -> tuple[Step, list, Bandwidth]:
    from tqdm import tqdm

    from .losses import LOSSES

    bandwidth = bandwidth_info(device, sweep)
    print("bandwidth:", bandwidth_text(bandwidth), flush=True)
    problems = timing_problems(sweep)
    rows = []
    with tqdm(total=len(problems) * len(LOSSES), desc="timing", unit="loss") as bar:
        for problem in problems:
            rows += time_problem(problem, device, sweep, bandwidth, stand_in, bar)
    failed = [r for r in rows if r["error"]]
    if failed:
        return Step("timing", "FAILED", f"{len(failed)} of {len(rows)} rows failed, first: "
                                        f"{failed[0]['loss']} {failed[0]['problem']}: {failed[0]['error']}"), rows, bandwidth
    detail = f"{len(rows)} rows" + ("; torch backend standing in for Triton" if stand_in else "")
    return Step("timing", "passed", detail), rows, bandwidth


def bandwidth_text(bandwidth: Bandwidth) -> str:
    theoretical = bandwidth.theoretical_note if bandwidth.theoretical is None else \
        f"{bandwidth.theoretical / 1e9:.0f} GB/s ({bandwidth.theoretical_note})"
    return (f"measured copy {bandwidth.measured / 1e9:.0f} GB/s (read + write), theoretical "
            f"{theoretical}; floor = {bandwidth.bytes_per_element} B/element ({bandwidth.bytes_source}) "
            f"/ measured bandwidth")


def first_calls_text(rows: list, stand_in: bool) -> str:
    """The cold first call of each loss: its first row (empty Triton cache, nothing compiled yet)."""
    first = {}
    for row in rows:
        if row["loss"] not in first and row["first_call_s"] is not None:
            first[row["loss"]] = (row["first_call_s"], row["problem"])
    what = "torch backend standing in, nothing compiled" if stand_in else "compile + run, empty Triton cache"
    return f"first call ({what}): " + ", ".join(
        f"{loss} {seconds:.3g} s ({problem})" for loss, (seconds, problem) in first.items())


# ---------------------------------------------------------------------------------------------
# 3. parity and 4. determinism


def forward_backward(loss, backend: str, logits, targets, deterministic: bool = False):
    """Losses and the logits' gradient for the UPSTREAM gradients of the outputs."""
    x = logits.detach().clone().requires_grad_(True)
    out = loss.fn(x, targets, loss.delta, backend=backend, deterministic=deterministic, **loss.kwargs)
    out = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(out, [torch.full_like(o, w) for o, w in zip(out, UPSTREAM)])
    return torch.stack([o.detach() for o in out]), x.grad


def differences(got, want) -> dict:
    """Max abs/rel differences, and whether they are within float32 round-off."""
    (losses, grad), (want_losses, want_grad) = got, want
    loss_diff = (losses.double() - want_losses.double()).abs()
    grad_diff = (grad.double() - want_grad.double()).abs().max().item() if grad.numel() else 0.0
    scale = want_grad.double().abs().max().item() if want_grad.numel() else 0.0
    loss_ok = bool((loss_diff <= LOSS_RTOL * want_losses.double().abs() + LOSS_ATOL).all())
    return {"loss_max_abs": loss_diff.max().item(),
            "loss_max_rel": (loss_diff / want_losses.double().abs().clamp_min(1e-30)).max().item(),
            "grad_max_abs": grad_diff, "grad_max_rel": grad_diff / scale if scale else grad_diff,
            "parity_ok": loss_ok and grad_diff <= GRAD_TOL * scale}


@contextlib.contextmanager
def triton_launch_counter():
    """Yields a function giving the Triton launches made in the block, where the backend
    records them (brl_triton.kernels._config.record_launches); else it gives None."""
    try:
        from brl_triton.kernels._config import record_launches
    except Exception:
        yield lambda: None
        return
    with record_launches() as counters:
        yield lambda: len(counters.launches)


def bit_identical(results) -> bool:
    return all(torch.equal(a, b) for r in results[1:] for a, b in zip(results[0], r))


def check_loss(name: str, loss, logits, targets) -> dict:
    """Parity and determinism of one loss on one problem; failures are recorded, not raised."""
    row = {"loss": name, "N": logits.numel(), "P": int((targets > 0).sum()), "loss_max_abs": None,
           "loss_max_rel": None, "grad_max_abs": None, "grad_max_rel": None, "parity_ok": False,
           "triton_launches": None, "bit_identical": False, "parity_error": "", "determinism_error": ""}
    try:
        want = forward_backward(loss, "torch", logits, targets)
        with triton_launch_counter() as launches:
            got = forward_backward(loss, "triton", logits, targets)
        row.update(differences(got, want), triton_launches=launches())
    except Exception as error:
        row["parity_error"] = one_line(error)
    try:
        repeats = [forward_backward(loss, "triton", logits, targets, deterministic=True)
                   for _ in range(DETERMINISM_REPEATS)]
        row["bit_identical"] = bit_identical(repeats)
    except Exception as error:
        row["determinism_error"] = one_line(error)
    return row


def run_parity(device: str, sweep: Sweep) -> tuple[Step, Step, list]:
    """Triton vs the torch backend on the same device, and determinism: two steps and the rows."""
    from tqdm import tqdm

    from .losses import LOSSES, detector_like_case

    rows = []
    with tqdm(total=len(sweep.parity) * len(LOSSES), desc="parity", unit="loss") as bar:
        for n, p in sweep.parity:
            logits, targets = detector_like_case(n, p, seed=7 * n + p, device=device)
            for name, loss in LOSSES.items():
                bar.set_postfix_str(f"N={n:,} {name}")
                rows.append(check_loss(name, loss, logits, targets))
                bar.update()
    return (summarize(rows, "parity", "parity_ok", "differences beyond tolerance"),
            summarize(rows, "determinism", "bit_identical", "results differ between runs"), rows)


def summarize(rows: list, name: str, key: str, mismatch: str) -> Step:
    bad = [r for r in rows if not r[key]]
    if not bad:
        return Step(name, "passed", f"{len(rows)} loss x size checks")
    first = bad[0]
    why = first[f"{name}_error"] or mismatch
    return Step(name, "FAILED", f"{len(bad)} of {len(rows)} failed, first: {first['loss']} N={first['N']:,}: {why}")


# One loss per family of step-3 terms, whose tiles and sweeps do different work: Rank & Sort (the
# sorting terms, P x P), AP, interpolated AP (a running maximum), aLRP (the localisation part).
CROSSOVER_LOSSES = ("brs", "bap", "ap_interp", "alrp")


def run_crossover(device: str, sweep: Sweep) -> tuple[Step, list]:
    """Each of ``CROSSOVER_LOSSES`` with the Triton backend's tiles and with its sweeps, at growing P."""
    from tqdm import tqdm

    from brl_triton import triton_backend

    from .losses import LOSSES, detector_like_case, loss_step, time_ms

    rows = []
    saved = triton_backend.TRITON_SWEEP_FROM
    try:
        with tqdm(total=2 * len(CROSSOVER_LOSSES) * len(sweep.crossover_p), desc="crossover", unit="run") as bar:
            for name in CROSSOVER_LOSSES:
                for p in sweep.crossover_p:
                    logits, targets = detector_like_case(sweep.crossover_n, p, seed=p, device=device)
                    row = {"loss": name, "N": sweep.crossover_n, "P": p}
                    for path, sweep_from in (("tiles", sys.maxsize), ("sweeps", 1)):
                        triton_backend.TRITON_SWEEP_FROM = sweep_from
                        row[f"{path}_ms"] = time_ms(loss_step(LOSSES[name], "triton", logits, targets), device,
                                                    sweep.min_time)[0]
                        bar.update()
                    rows.append(row)
    finally:
        triton_backend.TRITON_SWEEP_FROM = saved
    found = []
    for name in CROSSOVER_LOSSES:
        winning = [r["P"] for r in rows if r["loss"] == name and r["sweeps_ms"] <= r["tiles_ms"]]
        found.append(f"{name} from P = {winning[0]:,}" if winning else f"{name} never")
    return Step("crossover", "passed", f"sweeps win: {', '.join(found)}; TRITON_SWEEP_FROM is {saved:,}"), rows


def run_preaggregation(device: str, sweep: Sweep) -> tuple[Step, list]:
    """The bin reduction with one atomic per element and with pre-aggregated blocks, at growing
    edge counts: relevant negatives spread evenly over the bins."""
    from tqdm import tqdm

    from brl_triton.kernels import streaming
    from brl_triton.kernels._layout import layout
    from brl_triton.kernels._math import STATUS_NUM_EDGES, STATUS_WORDS

    from .losses import time_ms

    configs = {"per_element": streaming.REDUCE.configs[1], "preaggregated": streaming.REDUCE.configs[2]}
    assert configs["per_element"].kwargs["PREAGGREGATE_UP_TO"] == 0
    assert configs["preaggregated"].kwargs["PREAGGREGATE_UP_TO"] == streaming.ALWAYS
    generator = torch.Generator().manual_seed(0)
    logits = torch.rand(sweep.preaggregation_n, generator=generator).to(device)
    targets = torch.zeros_like(logits)
    rows = []
    with tqdm(total=2 * len(sweep.preaggregation_edges), desc="pre-aggregation", unit="run") as bar:
        for num_edges in sweep.preaggregation_edges:
            edges = torch.linspace(0, 1, num_edges, device=device)
            row = {"N": sweep.preaggregation_n, "edges": num_edges}
            for name, config in configs.items():
                def reduce_once(config=config):
                    count = torch.zeros(num_edges + 1, dtype=torch.int64, device=device)
                    offset_sum = torch.zeros(num_edges + 1, device=device)
                    status = torch.zeros(STATUS_WORDS.value, dtype=torch.int64, device=device)
                    status[STATUS_NUM_EDGES.value] = num_edges
                    streaming.reduce(layout(logits), layout(targets), edges, status, count, offset_sum, False,
                                     config=config)

                row[f"{name}_ms"] = time_ms(reduce_once, device, sweep.min_time)[0]
                bar.update()
            rows.append(row)
    winning = [r["edges"] for r in rows if r["preaggregated_ms"] < r["per_element_ms"]]
    found = f"up to {max(winning):,} edges" if winning else "never"
    return Step("pre-aggregation", "passed", f"pre-aggregating wins {found}; PREAGGREGATE_BINS is "
                                             f"{streaming.PREAGGREGATE_BINS:,}"), rows


def preaggregation_table(rows: list) -> str:
    lines = ["| N | edges | one atomic per element ms | pre-aggregated ms | pre-aggregated ÷ per element |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['N']:,} | {r['edges']:,} | {fmt(r['per_element_ms'])} | {fmt(r['preaggregated_ms'])} | "
              f"{fmt(r['preaggregated_ms'] / r['per_element_ms'], '.2f')} |" for r in rows]
    return "\n".join(lines) + "\n"


def crossover_table(rows: list) -> str:
    lines = ["| loss | N | P | Triton tiles ms | Triton + torch sweeps ms | sweeps ÷ tiles |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['loss']} | {r['N']:,} | {r['P']:,} | {fmt(r['tiles_ms'])} | {fmt(r['sweeps_ms'])} | "
              f"{fmt(r['sweeps_ms'] / r['tiles_ms'], '.2f')} |" for r in rows]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# outputs


def fmt(value, spec: str = ".3g") -> str:
    return "—" if value is None or value == "" else format(value, spec)


def write_csv(rows: list, path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["no rows: the step failed"])
        writer.writeheader()
        writer.writerows(rows)


def timing_table(rows: list, environment: str, bandwidth: Bandwidth | None, stand_in: bool) -> str:
    """The results table: Triton next to the torch backend and the two floors."""
    timer = "`torch.utils.benchmark` on the CPU" if stand_in else "`triton.testing.do_bench`"
    lines = [f"Forward+backward, float32 logits and targets, median ms ({timer}). {environment}.",
             "Bandwidth: " + (bandwidth_text(bandwidth) if bandwidth else "not measured (the timing step failed)") + ".",
             ""]
    if stand_in:
        lines[0:0] = ["**Dry run on the CPU: the 'triton ms' column is the torch backend standing in.**", ""]
    header = ["problem", "N", "P", "loss", "triton ms", "torch-backend ms", "torch.sort ms", "× sort",
              "floor ms", "× floor", "first-call s", "GPU kernels"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["problem"], f"{r['N']:,}", f"{r['P']:,}", r["loss"], "failed" if r["error"] else fmt(r["triton_ms"]),
                 fmt(r["torch_ms"]), fmt(r["sort_ms"]), fmt(r["x_sort"], ".2f"), fmt(r["floor_ms"]),
                 fmt(r["x_floor"], ".2f"), fmt(r["first_call_s"]), fmt(r["gpu_kernels"], "d")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "× sort, × floor: the 'triton ms' column over torch.sort and over the floor. first-call s: wall "
              "time of the first call on that problem (before the timed ones); " + first_calls_text(rows, stand_in) + "."]
    return "\n".join(lines) + "\n"


def parity_table(rows: list) -> str:
    header = ["N", "P", "loss", "loss max abs", "loss max rel", "grad max abs", "grad max abs ÷ max grad",
              "parity", "bit-identical ×3", "Triton launches"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [f"{r['N']:,}", f"{r['P']:,}", r["loss"], fmt(r["loss_max_abs"], ".2e"), fmt(r["loss_max_rel"], ".2e"),
                 fmt(r["grad_max_abs"], ".2e"), fmt(r["grad_max_rel"], ".2e"), "ok" if r["parity_ok"] else "FAIL",
                 "ok" if r["bit_identical"] else "FAIL", fmt(r["triton_launches"], "d")]
        lines.append("| " + " | ".join(cells) + " |")
    errors = [f"- {r['loss']} N={r['N']:,}, {step}: {r[step + '_error']}"
              for r in rows for step in ("parity", "determinism") if r[step + "_error"]]
    return "\n".join(lines + ([""] + errors if errors else [])) + "\n"


def plot(rows: list, out: Path, environment: str, stand_in: bool) -> None:
    """Time vs N (log-log), one panel per loss: Triton, torch backend and the two floors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = [r for r in rows if r["group"] == "N sweep"]
    losses = list(dict.fromkeys(r["loss"] for r in sweep)) or ["no timings"]
    cols = min(3, len(losses))
    rows_of_axes = -(-len(losses) // cols)
    fig, axes = plt.subplots(rows_of_axes, cols, figsize=(4.5 * cols, 3.8 * rows_of_axes), squeeze=False)
    axes = axes.ravel()
    for ax in axes[len(losses):]:
        ax.set_visible(False)
    series = [("triton_ms", "torch (stand-in for triton)" if stand_in else "triton", "o-", "C0"),
              ("torch_ms", "torch backend", "s-", "C1"), ("sort_ms", "torch.sort", "--", "k"),
              ("floor_ms", "bandwidth floor", ":", "0.5")]
    for ax, loss in zip(axes, losses):
        mine = sorted((r for r in sweep if r["loss"] == loss), key=lambda r: r["N"])
        if not mine:
            ax.set_title(loss)
            continue
        for key, label, style, color in series:
            points = [(r["N"], r[key]) for r in mine if r[key] is not None and not (key == "triton_ms" and r["error"])]
            if points:
                ax.plot(*zip(*points), style, color=color, label=label)
        ax.set(xscale="log", yscale="log", xlabel="N", ylabel="forward+backward ms",
               title=f"{loss}, P={mine[0]['P']:,}")
        ax.grid(True, which="both", alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=8)
    fig.suptitle(environment, fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "gpu_time_vs_n.png", dpi=110)
    plt.close(fig)


def write_outputs(out: Path, timing_rows, parity_rows, steps, environment, bandwidth, stand_in,
                  crossover_rows=(), preaggregation_rows=()) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_csv(timing_rows, out / "results.csv")
    write_csv(parity_rows, out / "parity.csv")
    write_csv(list(crossover_rows), out / "crossover.csv")
    write_csv(list(preaggregation_rows), out / "preaggregation.csv")
    text = timing_table(timing_rows, environment, bandwidth, stand_in)
    text += "\nParity (Triton vs torch backend on the same device) and determinism:\n\n" + parity_table(parity_rows)
    text += "\nForward+backward, Triton tiles against the torch sweeps for step 3, per loss family:\n\n" + crossover_table(
        list(crossover_rows))
    text += "\nThe bin reduction alone, float32:\n\n" + preaggregation_table(list(preaggregation_rows))
    text += "\nChecks:\n\n" + "\n".join(f"- {step.line()}" for step in steps) + "\n"
    (out / "results.md").write_text(text)
    plot(timing_rows, out, environment, stand_in)


# ---------------------------------------------------------------------------------------------


def attempt(names: list, run, *fallback) -> tuple:
    """``run()``, or, if it raises, FAILED steps and the fallback results: an unexpected error
    (a CUDA context broken by a failed kernel, say) still leaves the other steps and the outputs."""
    try:
        return run()
    except Exception as error:
        traceback.print_exc()
        return (*(Step(name, "FAILED", one_line(error)) for name in names), *fallback)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter timing and parity sweep")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes; runs without CUDA (see above)")
    parser.add_argument("--no-tests", action="store_true", help="skip the pytest subprocess")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    # argv may hold Path objects (main(["--out", tmp_path])); argparse wants strings
    return parser.parse_args(None if argv is None else [str(a) for a in argv])


def main(argv=None) -> int:
    """Runs every step and returns the exit status: 0 when every step passed (or was skipped)."""
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        raise SystemExit(NO_CUDA_MESSAGE)
    if not cuda:
        os.environ["TRITON_INTERPRET"] = "1"  # before brl_triton's kernels are defined
    device, stand_in = ("cuda", False) if cuda else ("cpu", True)
    sweep = SWEEPS["dry" if args.dry_run else "quick" if args.quick else "full"]
    start = time.perf_counter()
    environment = describe_environment(device, args.dry_run)
    print(environment, flush=True)

    if args.dry_run or args.no_tests:
        steps = [Step("triton tests", "skipped", "--dry-run" if args.dry_run else "--no-tests")]
    else:
        steps = list(attempt(["triton tests"], lambda: (run_test_suite(args.out),)))
    print(steps[-1].line(), flush=True)
    with empty_triton_cache():
        timing_step, timing_rows, bandwidth = attempt(["timing"], lambda: run_timings(device, sweep, stand_in), [], None)
        print(timing_step.line() + "\n" + first_calls_text(timing_rows, stand_in), flush=True)
        *parity_steps, parity_rows = attempt(["parity", "determinism"], lambda: run_parity(device, sweep), [])
        crossover_step, crossover_rows = attempt(["crossover"], lambda: run_crossover(device, sweep), [])
        print(crossover_step.line(), flush=True)
        preaggregation_step, preaggregation_rows = attempt(["pre-aggregation"],
                                                           lambda: run_preaggregation(device, sweep), [])
        print(preaggregation_step.line(), flush=True)
    steps += [timing_step, *parity_steps, crossover_step, preaggregation_step]

    write_outputs(args.out, timing_rows, parity_rows, steps, environment, bandwidth, stand_in, crossover_rows,
                  preaggregation_rows)
    print("\n" + (args.out / "results.md").read_text())
    print(f"{environment}\n" + "\n".join(step.line() for step in steps))
    failed = [step.name for step in steps if step.status == "FAILED"]
    print(f"{'FAILED: ' + ', '.join(failed) if failed else 'all steps passed'}; {time.perf_counter() - start:.0f} s; "
          f"wrote results.csv, parity.csv, crossover.csv, preaggregation.csv, results.md, gpu_time_vs_n.png to "
          f"{args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
