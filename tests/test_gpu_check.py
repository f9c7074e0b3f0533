"""benchmarks.gpu_check: its plumbing in a dry run, and the clear refusal without a GPU.

The dry run is the whole script at N <= 5000 on the CPU (Triton through the interpreter, the
torch backend timed in its place); it catches a broken table, CSV or plot before a GPU session
is spent on it. It does not judge the Triton backend: test_triton_backend does.
"""

import csv

import pytest
import torch

from benchmarks import gpu_check
from benchmarks.losses import LOSSES

pytestmark = pytest.mark.slow  # the dry run is the whole script through the interpreter


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    status = gpu_check.main(["--dry-run", "--out", out])
    return status, out


def test_dry_run_writes_timings_for_every_loss_and_size(dry_run):
    status, out = dry_run
    assert status in (0, 1)  # 1: the Triton backend failed parity, reported in the parity table
    rows = list(csv.DictReader((out / "results.csv").open()))
    sizes = gpu_check.SWEEPS["dry"].n_sweep
    assert {(r["loss"], int(r["N"])) for r in rows} == {(name, n) for name in LOSSES for n in sizes}
    assert max(sizes) <= 5000
    for r in rows:
        assert float(r["torch_ms"]) > 0 and float(r["sort_ms"]) > 0 and float(r["floor_ms"]) > 0
        assert float(r["triton_ms"]) > 0 and float(r["first_call_s"]) > 0  # the torch stand-in on the CPU
        assert float(r["x_floor"]) == pytest.approx(float(r["triton_ms"]) / float(r["floor_ms"]))
        assert int(r["bytes_per_element"]) > 0 and r["error"] == ""


def test_dry_run_checks_parity_and_determinism_of_every_loss(dry_run):
    _, out = dry_run
    rows = list(csv.DictReader((out / "parity.csv").open()))
    assert [r["loss"] for r in rows] == list(LOSSES) * len(gpu_check.SWEEPS["dry"].parity)
    for r in rows:
        # either a comparison was made, or the Triton failure is recorded in the row
        assert r["parity_error"] or (r["parity_ok"] in ("True", "False") and float(r["loss_max_abs"]) >= 0)
        assert r["determinism_error"] or r["bit_identical"] in ("True", "False")


def test_dry_run_markdown_and_plot(dry_run):
    status, out = dry_run
    table = (out / "results.md").read_text()
    header = ("| problem | N | P | loss | triton ms | torch-backend ms | torch.sort ms | × sort | floor ms | "
              "× floor | first-call s |")
    assert header in table and "Dry run on the CPU" in table
    timing_lines = [line for line in table.splitlines() if line.startswith("| N=")]
    assert len(timing_lines) == len(LOSSES) * len(gpu_check.SWEEPS["dry"].n_sweep)
    assert len({line.count("|") for line in timing_lines}) == 1  # no cell breaks the table
    assert "- triton tests: skipped" in table and "- timing: passed" in table
    assert ("FAILED" in table.split("Checks:")[1]) == (status != 0)
    assert (out / "gpu_time_vs_n.png").read_bytes()[:4] == b"\x89PNG"


def test_test_suite_step_runs_without_the_interpreter_and_keeps_the_log(tmp_path, monkeypatch, capsys):
    """The subprocess plumbing, with a stand-in for pytest that fails like it would."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(gpu_check, "TEST_ARGS", [
        "-c", "import os; print('interpret', os.environ.get('TRITON_INTERPRET')); "
              "print('== 2 failed, 40 passed, 1 skipped in 3.0s =='); raise SystemExit(1)"])
    step = gpu_check.run_test_suite(tmp_path)
    assert step.status == "FAILED" and "2 failed, 40 passed, 1 skipped" in step.detail
    assert "interpret None" in (tmp_path / "pytest.log").read_text()
    assert "interpret None" in capsys.readouterr().out  # streamed as it runs


def test_pytest_summary_counts():
    output = "....F\n=== 1 failed, 120 passed, 3 skipped, 2 errors in 4.50s ==="
    assert gpu_check.pytest_counts(output) == {"failed": 1, "passed": 120, "skipped": 3, "errors": 2}
    assert gpu_check.pytest_counts("no tests ran") == {}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_it_stops_at_once_with_a_clear_message(tmp_path):
    with pytest.raises(SystemExit) as stop:
        gpu_check.main(["--out", tmp_path])
    message = str(stop.value.code)
    assert message.startswith("no CUDA device:") and "run this on a GPU machine" in message
    assert "\n" not in message and not any(tmp_path.iterdir())


def test_a_step_that_crashes_still_leaves_the_other_steps_and_the_outputs(tmp_path, monkeypatch):
    """E.g. a CUDA context broken by a failed kernel: reported as FAILED, the rest still written."""
    def crash(*args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore text")

    monkeypatch.setattr(gpu_check, "run_timings", crash)
    monkeypatch.setattr(gpu_check, "run_parity", crash)
    assert gpu_check.main(["--dry-run", "--out", tmp_path]) == 1
    table = (tmp_path / "results.md").read_text()
    assert "- timing: FAILED (RuntimeError: CUDA error: an illegal memory access was encountered)" in table
    assert "- parity: FAILED" in table and "- determinism: FAILED" in table
    assert (tmp_path / "results.csv").exists() and (tmp_path / "gpu_time_vs_n.png").exists()


def test_dry_run_times_the_triton_tiles_against_the_sweeps(dry_run):
    status, out = dry_run
    rows = list(csv.DictReader((out / "crossover.csv").open()))
    assert [(r["loss"], int(r["P"])) for r in rows] == [(name, p) for name in gpu_check.CROSSOVER_LOSSES
                                                         for p in gpu_check.SWEEPS["dry"].crossover_p]
    assert all(float(r["tiles_ms"]) > 0 and float(r["sweeps_ms"]) > 0 for r in rows)
    table = (out / "results.md").read_text()
    assert "- crossover: passed (sweeps win: brs " in table and "| loss | N | P | Triton tiles ms |" in table


def test_dry_run_times_the_bin_reduction_with_and_without_pre_aggregation(dry_run):
    status, out = dry_run
    rows = list(csv.DictReader((out / "preaggregation.csv").open()))
    assert [int(r["edges"]) for r in rows] == list(gpu_check.SWEEPS["dry"].preaggregation_edges)
    assert all(float(r["per_element_ms"]) > 0 and float(r["preaggregated_ms"]) > 0 for r in rows)
    table = (out / "results.md").read_text()
    assert "- pre-aggregation: passed (pre-aggregating wins " in table
    assert "| N | edges | one atomic per element ms | pre-aggregated ms |" in table
