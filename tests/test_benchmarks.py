"""The benchmark code runs (tiny preset) and its sort-based baseline computes the spec."""

import csv

import pytest
import torch

from benchmarks import losses as bench
from benchmarks.sort_based import sort_based_bucketed_loss
from conftest import assert_close, expected, make_case

pytestmark = pytest.mark.slow  # the fast tier (-m 'not slow') leaves these out


def test_tiny_preset_writes_csv_table_and_plots(tmp_path):
    bench.main(["--preset", "tiny", "--out", str(tmp_path), "--device", "cpu"])
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert {r["backend"] for r in rows} >= {"torch", "sort_based", "reference"}
    assert {r["loss"] for r in rows} == {"brs", "rs"}
    assert all(float(r["median_ms"]) > 0 and float(r["sort_ms"]) > 0 for r in rows)
    table = (tmp_path / "results.md").read_text()
    assert "| problem |" in table and "torch.sort" in table
    for name in ("time_vs_n.png", "time_vs_p.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert {r["command"] for r in rows} == {f"python -m benchmarks.losses --preset tiny --out {tmp_path} --device cpu"}

    # --table --no-run: the page's table is rebuilt from the CSV alone, the rest of the page kept
    page = tmp_path / "page.md"
    start = bench.table_start(tmp_path / "results.csv")
    page.write_text(f"before\n{start}\nstale\n{bench.TABLE_END}\nafter\n")
    (tmp_path / "results.md").unlink()
    bench.main(["--out", str(tmp_path), "--table", str(page), "--no-run"])
    assert page.read_text() == f"before\n{start}\n{table}{bench.TABLE_END}\nafter\n"


@pytest.mark.parametrize("delta", [0.0, 0.5])
@pytest.mark.parametrize("name,sorting", [("bucketed_rank_sort", True), ("bucketed_ap", False)])
def test_sort_based_baseline_matches_reference(name, sorting, delta):
    logits, targets = make_case(3000, 45, seed=4, dtype=torch.float32)  # distinct logits: no ties
    losses, grad = sort_based_bucketed_loss(logits, targets, delta, sorting)
    want_losses, want_grad = expected(name, logits, targets, delta, upstream=(1.0, 1.0))
    for got, want in zip(losses, want_losses):
        assert_close(got, want, atol=1e-6, rtol=1e-5, what="loss")
    assert_close(grad, want_grad, atol=1e-7, rtol=1e-4, what="grad")


def test_the_benchmark_measures_the_sweeps_against_the_tiles(monkeypatch):
    """Where both paths of the torch backend run, the table reports their difference: round-off,
    and large if the tiles computed something else."""
    from brl_triton import _tables

    logits, targets = bench.detector_like_case(20_000, 2 * _tables.SWEEP_FROM, seed=3, device="cpu")
    assert bench.sweeps_against_tiles(bench.LOSSES["brs"], logits, targets) < 1e-6  # float32 outputs
    rows = [{"group": "P sweep", "problem": "P=1", "loss": "brs", "backend": b, "N": 1, "P": 1, "median_ms": 1.0,
             "x_sort": 1.0, "sort_ms": 1.0, "read_ms": 1.0, "peak_extra_mib": None,
             "sweeps_vs_tiles": 3e-8 if b == "torch" else None, "machine": "cpu", "command": ""}
            for b in ("torch", "torch_tiles")]
    assert "| torch vs tiles (max rel. diff) |" in bench.markdown_table(rows) and "3.0e-08" in \
        bench.markdown_table(rows)
    doubled = _tables._TiledSums.bin_gradient
    monkeypatch.setattr(_tables._TiledSums, "bin_gradient", lambda self, weight: 2 * doubled(self, weight))
    assert bench.sweeps_against_tiles(bench.LOSSES["brs"], logits, targets) > 0.1


def test_distributed_benchmark_writes_its_rows_with_machine_and_command(tmp_path):
    from benchmarks import distributed

    distributed.main(["--world", "2", "--n-per-rank", "2000", "--totals", "20,40", "--repeats", "1",
                      "--out", str(tmp_path)])
    rows = list(csv.DictReader((tmp_path / "distributed.csv").open()))
    assert [int(r["P_total"]) for r in rows] == [20, 40]
    assert all(float(r["local_ms"]) > 0 and float(r["global_ms"]) > 0 for r in rows)
    assert {r["command"] for r in rows} == {f"python -m benchmarks.distributed --world 2 --n-per-rank 2000 "
                                            f"--totals 20,40 --repeats 1 --out {tmp_path}"}
    assert rows[0]["machine"] in (tmp_path / "distributed.md").read_text()
    assert (tmp_path / "distributed.png").read_bytes()[:4] == b"\x89PNG"


def test_detr_step_counts_every_classification_term_of_the_step(tmp_path):
    """RT-DETR at its published size (at 128 px: at 64 px the encoder has fewer tokens than the
    300 queries) makes 13 classification terms a step (6 decoder layers, the
    encoder, 6 denoising layers); the profiler finds one loss call per term, for VFL and BRS."""
    pytest.importorskip("transformers")
    from benchmarks import detr_step

    rows = detr_step.main(["--losses", "vfl,brs", "--size", "128", "--batch", "1", "--objects", "2",
                           "--out", str(tmp_path)])
    assert [r["loss"] for r in rows] == ["vfl", "brs"]
    for row in rows:
        assert row["classification_terms"] == row["loss_calls"] == 2 * row["decoder_layers"] + 1 == 13
        assert row["step_s"] > 0 and 0 < row["loss_share"] < 1
    assert "| brs | 1 × 128 | 13 | 13 |" in (tmp_path / "detr_step.md").read_text()
