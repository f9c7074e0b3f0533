"""The benchmark code runs (tiny preset) and its sort-based baseline computes the spec."""

import csv

import pytest
import torch

from benchmarks import losses as bench
from benchmarks.sort_based import sort_based_bucketed_loss
from conftest import assert_close, expected, make_case


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


@pytest.mark.parametrize("delta", [0.0, 0.5])
@pytest.mark.parametrize("name,sorting", [("bucketed_rank_sort", True), ("bucketed_ap", False)])
def test_sort_based_baseline_matches_reference(name, sorting, delta):
    logits, targets = make_case(3000, 45, seed=4, dtype=torch.float32)  # distinct logits: no ties
    losses, grad = sort_based_bucketed_loss(logits, targets, delta, sorting)
    want_losses, want_grad = expected(name, logits, targets, delta, upstream=(1.0, 1.0))
    for got, want in zip(losses, want_losses):
        assert_close(got, want, atol=1e-6, rtol=1e-5, what="loss")
    assert_close(grad, want_grad, atol=1e-7, rtol=1e-4, what="grad")
