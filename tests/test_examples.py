"""The detector example: its offline dataset, its recipes, and short runs with evaluation."""

import csv
import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("sklearn")
pytest.importorskip("pycocotools")
pytest.importorskip("efficientnet_lite_pytorch")

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY / "examples"))
import digits_dataset  # noqa: E402
import train_detector  # noqa: E402

pytestmark = pytest.mark.slow  # the fast tier (-m 'not slow') leaves these out


def test_digits_dataset_is_deterministic_with_boxes_and_masks_inside_images(tmp_path):
    from pycocotools import mask as mask_util

    first = digits_dataset.make_digits_coco(tmp_path / "a", num_train=6, num_val=3, image_size=160, seed=3)
    second = digits_dataset.make_digits_coco(tmp_path / "b", num_train=6, num_val=3, image_size=160, seed=3)
    for split in (1, 2):
        assert first[split].read_text() == second[split].read_text()
    for image in sorted(first[0].iterdir()):
        assert image.read_bytes() == (second[0] / image.name).read_bytes()
    train = json.loads(first[1].read_text())
    assert len(train["images"]) == 6 and len(train["annotations"]) >= 6
    assert {c["id"] for c in train["categories"]} == set(range(1, 11))
    for annotation in train["annotations"] + json.loads(first[2].read_text())["annotations"]:
        x, y, w, h = annotation["bbox"]
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 160 and y + h <= 160
        mask = mask_util.decode(mask_util.frPyObjects(annotation["segmentation"], 160, 160)).astype(bool)
        rows, cols = mask.nonzero()  # the mask's extent is the box
        assert (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1) == (x, y, x + w, y + h)
    other = digits_dataset.make_digits_coco(tmp_path / "c", num_train=6, num_val=3, image_size=160, seed=4)
    assert other[1].read_text() != first[1].read_text()


def test_digits_cache_is_keyed_on_its_parameters(tmp_path):
    """Regression: a cache made with other --num-train/--num-val/--image-size was reused."""
    base = digits_dataset.make_digits_coco(tmp_path, num_train=4, num_val=2, image_size=96)
    stamp = base[1].stat().st_mtime_ns
    assert digits_dataset.make_digits_coco(tmp_path, num_train=4, num_val=2, image_size=96) == base
    assert base[1].stat().st_mtime_ns == stamp  # same parameters: reused, not regenerated
    for changed in ({"num_train": 5}, {"num_val": 3}, {"image_size": 128}):
        params = {"num_train": 4, "num_val": 2, "image_size": 96, **changed}
        _, train_json, val_json = digits_dataset.make_digits_coco(tmp_path, **params)
        train, val = json.loads(train_json.read_text()), json.loads(val_json.read_text())
        assert (len(train["images"]), len(val["images"])) == (params["num_train"], params["num_val"])
        assert {image["width"] for image in train["images"]} == {params["image_size"]}


def _args(tmp_path, *extra, out="run"):
    return ["--iters", "2", "--num-train", "4", "--num-val", "2", "--batch-size", "2", "--image-size", "96",
            "--timing-repeats", "1", "--data", str(tmp_path / "data"), "--out", str(tmp_path / out), "--device", "cpu",
            *extra]


@pytest.mark.parametrize("detector,model,loss", [
    ("fasterrcnn", "effnet_lite0", "brs"), ("maskrcnn", "effnet_lite0", "brs"), ("retinanet", "effnet_lite0", "ap"),
    ("fcos", "effnet_lite0", "rs"), ("fasterrcnn", "mobilenet_v3", "ce"),
    ("rtdetr", "effnet_lite0", "brs"), ("rtdetr", "effnet_lite0", "mal"), ("dfine", "effnet_lite0", "ce"),
])
def test_example_trains_two_iterations_and_evaluates(tmp_path, detector, model, loss):
    if detector in train_detector.DETRS:
        pytest.importorskip("transformers")
    summary = train_detector.main(_args(tmp_path, "--detector", detector, "--model", model, "--loss", loss))
    assert 0.0 <= summary["mAP"] <= 1.0 and 0.0 <= summary["mAP50"] <= 1.0 and 0.0 <= summary["mAP75"] <= 1.0
    assert summary["seconds_per_iteration"] > 0 and summary["classification_loss_ms_per_iteration"] > 0
    if detector == "maskrcnn":
        assert 0.0 <= summary["mask_mAP"] <= 1.0 and 0.0 <= summary["mask_mAP75"] <= 1.0
    if loss != "ce":  # rank-based models give detections from the first evaluation, not every candidate
        assert 0 < summary["detections_per_image"] <= 100
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written["loss"] == loss and written["iterations"] == 2
    assert (tmp_path / "run" / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_coco_ap_reports_ap_over_iou_thresholds_at_050_and_at_075():
    """One detection with IoU 0.62 to the one object: a hit at IoU thresholds 0.50, 0.55 and
    0.60 of COCO's ten (0.50:0.95), a miss at 0.75."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = {"images": [{"id": 1, "width": 200, "height": 200}], "categories": [{"id": 1, "name": "one"}],
                    "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 100, 100],
                                     "area": 10000, "iscrowd": 0}]}
    coco.createIndex()
    detection = {"image_id": 1, "category_id": 1, "bbox": [0, 0, 100, 62], "score": 0.9}
    ap, ap50, ap75 = train_detector._coco_ap(coco, [detection], "bbox")
    assert (ap, ap50, ap75) == pytest.approx((0.3, 1.0, 0.0))


def test_example_resumes_a_partial_and_a_finished_checkpoint(tmp_path):
    """Regression: resuming from a finished checkpoint raised UnboundLocalError (no batch)."""
    first = train_detector.main(_args(tmp_path, "--detector", "retinanet", "--loss", "brs"))
    checkpoint = str(tmp_path / "run" / "checkpoint.pt")
    finished = train_detector.main(_args(tmp_path, "--detector", "retinanet", "--loss", "brs",
                                              "--checkpoint", checkpoint, out="finished"))
    assert finished["iterations"] == 2 and finished["mAP"] == pytest.approx(first["mAP"])
    assert finished["mAP75"] == pytest.approx(first["mAP75"])
    assert [e["iteration"] for e in finished["evaluations"]] == [2]  # evaluated again, not listed twice
    assert finished["seconds_per_iteration"] == pytest.approx(first["seconds_per_iteration"])
    assert finished["classification_loss_ms_per_iteration"] > 0
    resumed = train_detector.main(_args(tmp_path, "--detector", "retinanet", "--loss", "brs", "--iters", "3",
                                             "--checkpoint", checkpoint, out="resumed"))
    assert resumed["iterations"] == 3
    state = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    assert len(state["grad_norms"]) == len(state["step_seconds"]) == 3


def test_an_interrupted_study_run_resumes_from_its_last_evaluation(tmp_path, monkeypatch):
    """A run checkpoints at every evaluation; the study resumes it there instead of starting over."""
    import compare_losses

    evaluate = train_detector.evaluate
    calls = []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 3:  # the process dies in the evaluation after iteration 3
            raise KeyboardInterrupt
        return evaluate(*args)

    argv = [*_args(tmp_path, "--detector", "retinanet", "--loss", "brs", "--iters", "4", "--eval-every", "1")]
    monkeypatch.setattr(train_detector, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_detector.main(argv)
    run = tmp_path / "run"
    assert torch.load(run / "checkpoint.pt", weights_only=False)["iteration"] == 2
    assert not (run / "metrics.json").exists()
    calls.clear()
    monkeypatch.setattr(train_detector, "evaluate", lambda *args: calls.append(1) or evaluate(*args))
    study = compare_losses.parse_args(["--detectors", "retinanet", "--batch-size", "2", "--image-size", "96",
                                       "--num-train", "4", "--num-val", "2", "--data", str(tmp_path / "data"),
                                       "--extra", "--timing-repeats", "0"])
    result = compare_losses.run_once(study, "retinanet", "brs", 0, 4, 0.001, 10.0, run)
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    # iterations 1-2 come from the checkpoint, 3-4 were trained after the resume: four in all, not seven
    assert state["iteration"] == 4 and len(state["grad_norms"]) == 4
    assert [e["iteration"] for e in result["evaluations"]] == [1, 2, 3, 4]
    assert len(calls) == 2  # after iteration 3 and at the end: 1 and 2 were not evaluated again


def test_one_sample_roi_align_equals_torchvisions_in_value_and_gradient():
    """The CPU RoIAlign of the example against torchvision's MultiScaleRoIAlign(sampling_ratio=1),
    in float64: boxes on every level, partly or wholly outside the image, thinner than a pixel."""
    from cpu_roi_align import OneSampleMultiScaleRoIAlign
    from torchvision.ops import MultiScaleRoIAlign

    generator = torch.Generator().manual_seed(0)
    features = {name: torch.randn(2, 5, size, size, dtype=torch.float64, generator=generator, requires_grad=True)
                for name, size in (("0", 32), ("1", 16), ("2", 8))}
    boxes = []
    for _ in range(2):
        corner = torch.rand(400, 2, dtype=torch.float64, generator=generator) * 360 - 60
        size = torch.rand(400, 2, dtype=torch.float64, generator=generator) ** 2 * 600
        boxes.append(torch.cat([corner, corner + size], 1))
    shapes = [(256, 256), (240, 256)]
    reference_pool = MultiScaleRoIAlign(["0", "1", "2"], 7, sampling_ratio=1)
    expected = reference_pool(features, boxes, shapes)
    assert set(reference_pool.map_levels(boxes).tolist()) == {0, 1, 2}
    pooled = OneSampleMultiScaleRoIAlign(["0", "1", "2"], 7)(features, boxes, shapes)
    torch.testing.assert_close(pooled, expected, rtol=0, atol=1e-12)
    upstream = torch.randn(expected.shape, dtype=torch.float64, generator=generator)
    for got, want in zip(torch.autograd.grad(pooled, list(features.values()), upstream),
                         torch.autograd.grad(expected, list(features.values()), upstream)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


class _BatchNormDetector(torch.nn.Module):
    """Stands in for a detector: train-mode forward returns a loss dict, through a BatchNorm."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.BatchNorm1d(3)
        self.linear = torch.nn.Linear(3, 1)

    def forward(self, images, targets):
        return {"loss": self.linear(self.norm(torch.stack(images))).pow(2).mean()}


def test_classification_loss_timing_leaves_batchnorm_statistics_and_gradients_alone():
    """Regression: the timing passes ran in train mode just before the final evaluation and
    moved the BatchNorm running statistics of the model that was evaluated and saved."""
    model = _BatchNormDetector().train()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    images = [torch.randn(3) * 5 + 2 for _ in range(4)]
    train_detector.classification_loss_ms(model, images, [{}] * 4, repeats=2)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, msg=name)
    assert all(p.grad is None for p in model.parameters())


def _recipe(*argv):
    return train_detector.training_recipe(train_detector.parse_args(list(argv)))


def test_each_loss_trains_with_its_own_recipe():
    """--loss brs alone picks the ranking recipe's rate (twice the official RS-R-CNN / RS-ATSS one)
    scaled to the batch, ce its own; warm-up is at most a fifth of the run."""
    assert _recipe("--loss", "brs") == {"lr": pytest.approx(0.006), "warmup": 60, "clip": 10.0}  # 300 iterations
    assert _recipe("--loss", "brs", "--iters", "5000")["warmup"] == 500
    assert _recipe("--loss", "ce") == {"lr": pytest.approx(0.08), "warmup": 60, "clip": 10.0}
    assert _recipe("--loss", "ce", "--iters", "1000")["warmup"] == 100
    assert _recipe("--loss", "ce", "--detector", "fcos")["lr"] == pytest.approx(0.01)
    assert _recipe("--loss", "ap", "--detector", "fcos")["lr"] == pytest.approx(0.004)
    assert _recipe("--loss", "brs", "--batch-size", "16")["lr"] == pytest.approx(0.024)
    assert _recipe("--lr", "0.01", "--warmup", "7", "--clip", "0") == {"lr": 0.01, "warmup": 7, "clip": None}
    assert set(train_detector.RECIPES) == {"ce", "brs", "rs", "bap", "ap", "alrp", "balrp", "mal"}
    # the DETRs: one AdamW recipe for every loss, 8e-4 per 16 images, clipping at 0.1
    for loss in ("ce", "brs", "mal"):
        assert _recipe("--detector", "rtdetr", "--loss", loss) == {"lr": pytest.approx(2e-4), "warmup": 60,
                                                                    "clip": 0.1}
    assert _recipe("--detector", "dfine", "--loss", "rs", "--iters", "2000")["warmup"] == 200


def test_the_mal_baseline_is_rt_detrs_own_loss_with_mal_in_place_of_vfl():
    """``--loss mal``: the terms of transformers' RT-DETR loss, the box terms equal to its own,
    ``loss_mal*`` for ``loss_vfl*``, and the final layer's MAL as DEIMv2's paper writes it:
    BCE towards IoU**gamma at the matched (query, class), weighted 1 there and sigmoid**gamma at
    the negatives, summed over the batch and divided by the number of objects."""
    transformers = pytest.importorskip("transformers")
    from torchvision.ops import box_convert, box_iou
    from transformers.loss.loss_rt_detr import RTDetrHungarianMatcher

    import detr_detector

    torch.manual_seed(0)
    backbone = transformers.RTDetrResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1],
                                               layer_type="basic", out_features=["stage2", "stage3", "stage4"])
    config = transformers.RTDetrConfig(
        backbone_config=backbone, encoder_in_channels=[16, 32, 64], num_labels=3, d_model=32, encoder_hidden_dim=32,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=10, decoder_layers=2, encoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, num_denoising=6, decoder_in_channels=[32, 32, 32])
    model = transformers.RTDetrForObjectDetection(config)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    labels = [{"class_labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
              {"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    torch.manual_seed(1)  # the denoising queries are random: the same draw for both calls
    own = model(pixel_values=images, labels=labels).loss_dict
    model.loss_function = detr_detector.matching_aware_loss
    torch.manual_seed(1)
    outputs = model(pixel_values=images, labels=labels)
    mal = outputs.loss_dict
    assert sorted(mal) == sorted(name.replace("loss_vfl", "loss_mal") for name in own)
    for name, value in own.items():
        if "vfl" not in name:
            torch.testing.assert_close(mal[name], value, rtol=0, atol=0, msg=name)
    assert torch.equal(outputs.loss, sum(mal.values()))
    # the final layer: the non-denoising queries, matched by transformers' matcher
    queries = slice(-config.num_queries, None)  # the denoising queries come first in training
    logits, boxes = outputs.logits[:, queries].detach(), outputs.pred_boxes[:, queries].detach()
    matched = RTDetrHungarianMatcher(config)({"logits": logits, "pred_boxes": boxes}, labels)
    targets, positive = torch.zeros_like(logits), torch.zeros_like(logits, dtype=torch.bool)
    for image, (queries, objects) in enumerate(matched):
        ious = box_iou(box_convert(boxes[image, queries], "cxcywh", "xyxy"),
                       box_convert(labels[image]["boxes"][objects], "cxcywh", "xyxy")).diagonal()
        targets[image, queries, labels[image]["class_labels"][objects]] = ious
        positive[image, queries, labels[image]["class_labels"][objects]] = True  # an IoU of 0 included
    gamma = config.focal_loss_gamma
    weight = torch.where(positive, 1.0, logits.sigmoid() ** gamma)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets**gamma, reduction="none")
    expected = (weight * bce).sum() / 3 * config.weight_loss_vfl
    torch.testing.assert_close(mal["loss_mal"].detach(), expected)


def _study_argv(tmp_path, loss: str, tune_iters: int, timing_repeats: int, timing_iters: int = 0) -> list:
    """A tiny study: Faster R-CNN, one loss, seeds 0 and 1, 2 iterations, LR x {1, 0.5}."""
    return ["--detectors", "fasterrcnn", "--losses", loss, "--seeds", "0", "1", "--iters", "2",
            "--tune-iters", str(tune_iters), "--lr-scales", "1", "0.5", "--clips", "10", "--extend-edges", "0",
            "--timing-iters", str(timing_iters), "--num-train", "4", "--num-val", "2", "--batch-size", "2",
            "--image-size", "96",
            "--data", str(tmp_path / "data"), "--out", str(tmp_path / "study"),
            "--extra", "--timing-repeats", str(timing_repeats)]


def test_compare_losses_tunes_runs_seeds_and_writes_its_tables(tmp_path):
    import compare_losses

    argv = _study_argv(tmp_path, "alrp", tune_iters=1, timing_repeats=1, timing_iters=3)
    summary = compare_losses.main(argv)
    assert [(s["detector"], s["loss"], s["seeds"]) for s in summary] == [("fasterrcnn", "alrp", 2)]
    for s in summary:
        assert 0 <= s["map"] <= 1 and s["map_spread"] >= 0 and s["seconds_per_iteration"] > 0
        assert s["lr"] in (compare_losses.recipe_lr("fasterrcnn", s["loss"], 2) * k for k in (1, 0.5))
    study = tmp_path / "study"
    runs = (study / "runs.csv").read_text().splitlines()
    assert len(runs) == 1 + 2 + 2 + 1  # header, two tuning runs, two seeds and the timing run
    # the table's times are the timing run's: 3 steps with the chosen setting, never evaluated
    (timing,) = (study / "fasterrcnn" / "alrp").glob("timing_3it_*")
    timed = json.loads((timing / "metrics.json").read_text())
    assert timed["iterations"] == 3 and timed["mAP"] is None and timed["evaluations"] == []
    assert timed["lr"] == pytest.approx(summary[0]["lr"])
    assert summary[0]["seconds_per_iteration"] == timed["seconds_per_iteration"]
    assert summary[0]["loss_ms_per_iteration"] == timed["classification_loss_ms_per_iteration"]
    # the progress table lists the finished accuracy runs (two tuning runs, two seeds), not the timing run
    table = compare_losses.progress(compare_losses.parse_args(argv)).splitlines()
    assert [line.split(" | ")[2] for line in table[2:]] == ["seed0", "seed1", "tune", "tune"]
    listed = {(line.split(" | ")[2], float(line.split(" | ")[3])): float(line.split(" | ")[7]) for line in table[2:]}
    for r in csv.DictReader((study / "runs.csv").open()):
        if r["phase"] != "timing":
            run = f"seed{r['seed']}" if r["phase"] == "study" else "tune"
            assert listed[(run, float(r["lr"]))] == pytest.approx(float(r["mAP75"]), abs=5e-4)
    assert "| fasterrcnn | alrp |" in (study / "summary.md").read_text()
    assert "| detector | loss | LR × 0.5 | LR × 1 |" in (study / "summary.md").read_text()  # the search table
    assert (study / "map_curves.png").read_bytes()[:4] == b"\x89PNG"
    # summary.csv: the means over the seeds of the runs it names, which a table is made from
    (row,) = compare_losses.read_summary(study / "summary.csv")
    assert {"detector", "loss", "iters", "seeds", "map", "map50", "map75", "runs"} <= set(row)
    named = [json.loads((study / folder / "metrics.json").read_text()) for folder in row["runs"].split(";")]
    assert [r["provenance"]["arguments"]["seed"] for r in named] == [0, 1] and row["iters"] == "2"
    for key, metric in (("map", "mAP"), ("map50", "mAP50"), ("map75", "mAP75")):
        assert float(row[key]) == pytest.approx(sum(r[metric] for r in named) / 2)
    # finished runs are reused: a second call trains nothing, and writes the table into a page
    (seed1,) = (study / "fasterrcnn" / "alrp").glob("seed1_*")
    stamp = (seed1 / "metrics.json").stat().st_mtime_ns
    page = tmp_path / "page.md"
    page.write_text(f"before\n{compare_losses.TABLE_START}\nstale\n{compare_losses.TABLE_END}\nafter\n")
    extra = argv.index("--extra")
    compare_losses.main(argv[:extra] + ["--no-train", "--table", str(page)] + argv[extra:])
    assert (seed1 / "metrics.json").stat().st_mtime_ns == stamp
    written = page.read_text()
    assert "stale" not in written and written.startswith("before\n") and written.endswith("after\n")
    assert f"| Faster R-CNN | alrp | 2 | 2 | {float(row['map']):.3f} ± " in written
    with pytest.raises(FileNotFoundError, match="has not finished"):  # --no-train never trains
        compare_losses.main(argv[:extra] + ["--no-train", "--seeds", "0", "1", "2"] + argv[extra:])
    # but not by a study with other settings: more iterations are new runs (the tuning is reused)
    longer = list(argv)
    longer[longer.index("--iters") + 1] = "3"
    compare_losses.main(longer)
    assert len(list((study / "fasterrcnn" / "alrp").glob("seed1_*"))) == 2
    assert len(list((study / "fasterrcnn" / "alrp").glob("tune_*"))) == 2


@pytest.mark.parametrize("best_scale, tried", [(4.0, [0.5, 1.0, 2.0, 4.0, 8.0]), (8.0, [0.5, 1.0, 2.0, 4.0, 8.0]),
                                               (1.0, [0.5, 1.0, 2.0]), (0.25, [0.5, 1.0, 2.0, 0.25, 0.125])])
def test_compare_losses_extends_the_learning_rate_grid_past_an_edge_winner(tmp_path, monkeypatch, best_scale, tried):
    import compare_losses

    base = compare_losses.recipe_lr("fasterrcnn", "ce", 4)
    calls = []

    def fake_run(args, detector, loss, seed, iters, lr, clip, out):
        calls.append((seed, lr / base))
        score = 1 / (1 + abs(math.log2(lr / base / best_scale)))  # peaks at best_scale
        return {"mAP": score, "mAP50": score, "mAP75": score, "lr": lr, "clip": clip, "iterations": iters, "evaluations": [],
                "seconds_per_iteration": 1.0, "classification_loss_ms_per_iteration": 1.0}

    monkeypatch.setattr(compare_losses, "run_once", fake_run)
    args = compare_losses.parse_args(["--detectors", "fasterrcnn", "--losses", "ce", "--seeds", "0", "1",
                                      "--iters", "10", "--tune-iters", "10", "--clips", "10",
                                      "--lr-scales", "0.5", "1", "2", "--extend-edges", "2", "--timing-iters", "0"])
    runs, (summary,) = compare_losses.study(args)
    assert [pytest.approx(scale) for seed, scale in calls if seed == 0] == tried
    # the chosen setting is the best one tried, and seed 0 reuses its tuning run
    expected = min(tried, key=lambda s: abs(math.log2(s / best_scale)))
    assert summary["lr"] == pytest.approx(expected * base)
    assert [scale for seed, scale in calls if seed == 1] == [pytest.approx(expected)]


def test_compare_losses_tuned_at_the_full_budget_reuses_the_chosen_run_for_seed_0(tmp_path):
    import compare_losses

    argv = _study_argv(tmp_path, "brs", tune_iters=2, timing_repeats=0)
    (summary,) = compare_losses.main(argv)
    trained = [p.name for p in (tmp_path / "study" / "fasterrcnn" / "brs").iterdir()]
    assert sorted(name.split("_")[0] for name in trained) == ["seed1", "tune", "tune"]  # no seed-0 training
    rows = list(csv.DictReader((tmp_path / "study" / "runs.csv").open()))
    best_tuning = max(float(r["mAP"]) for r in rows if r["phase"] == "tune")
    (seed0,) = [r for r in rows if r["phase"] == "study" and r["seed"] == "0"]
    assert float(seed0["mAP"]) == best_tuning and summary["seeds"] == 2


@pytest.mark.parametrize("clip", ["10", "0"])
def test_compare_losses_evaluates_again_the_seed_runs_made_before_map75(tmp_path, monkeypatch, clip):
    """A study resumed over runs whose metrics predate mAP75 gets it from their final checkpoints,
    evaluated again once: it must be what the runs reported themselves. The evaluation here is a
    function of the weights, so that only the run's final model can give the same numbers."""
    import compare_losses

    def weights_score(model, val_set, args):
        total = sum(float(p.detach().double().abs().sum()) for p in model.parameters())
        return {"mAP": total % 1, "mAP50": total % 0.5, "mAP75": total % 0.25, "detections_per_image": 1.0}

    monkeypatch.setattr(train_detector, "evaluate", weights_score)
    argv = _study_argv(tmp_path, "brs", tune_iters=2, timing_repeats=0)
    argv[argv.index("--clips") + 1] = clip  # an unclipped run's metrics say clip None
    (summary,) = compare_losses.main(argv)
    folder = tmp_path / "study" / "fasterrcnn" / "brs"
    chosen = [path for path in folder.iterdir() if path.name.startswith(("seed1_", "tune_"))
              and json.loads((path / "metrics.json").read_text())["lr"] == pytest.approx(summary["lr"])]
    reported = {}
    for run in chosen:  # the seed-0 run is the chosen tuning run, and seed 1's
        metrics = json.loads((run / "metrics.json").read_text())
        reported[run.name] = metrics.pop("mAP75")
        assert reported[run.name] > 0
        (run / "metrics.json").write_text(json.dumps(metrics))
    calls = []
    monkeypatch.setattr(train_detector, "evaluate", lambda *a: calls.append(1) or weights_score(*a))
    (again,) = compare_losses.main(argv)
    assert len(calls) == 2  # nothing trained: one evaluation per seed
    assert again["map75"] == pytest.approx(sum(reported.values()) / 2)
    for run in chosen:
        assert not (run / "evaluated_again" / "checkpoint.pt").exists()
        assert json.loads((run / "evaluated_again" / "metrics.json").read_text())["mAP75"] == reported[run.name]
    rows = list(csv.DictReader((tmp_path / "study" / "runs.csv").open()))
    assert sorted(float(r["mAP75"]) for r in rows if r["phase"] == "study") == sorted(reported.values())
    assert "| mAP75 |" in (tmp_path / "study" / "summary.md").read_text()
    # the progress table finds the evaluation too
    table = [line.split(" | ") for line in compare_losses.progress(compare_losses.parse_args(argv)).splitlines()[2:]]
    shown = {(cells[2], float(cells[3])): cells[7] for cells in table}
    for run in chosen:
        assert shown[(run.name.split("_")[0], summary["lr"])] == f"{reported[run.name]:.3f}"
    compare_losses.main(argv)
    assert len(calls) == 2  # kept: not evaluated a third time
    # a checkpoint that is not the scored model is refused
    (seed1,) = [run for run in chosen if run.name.startswith("seed1_")]
    metrics = json.loads((seed1 / "metrics.json").read_text())
    (seed1 / "metrics.json").write_text(json.dumps({**metrics, "mAP": metrics["mAP"] / 2}))
    with pytest.raises(RuntimeError, match="not the same model"):
        compare_losses.main(argv)


def test_compare_losses_search_table_reads_the_finished_runs(tmp_path):
    import compare_losses

    args = compare_losses.parse_args(["--detectors", "fcos", "--losses", "brs,rs", "--iters", "10", "--tune-iters", "10",
                                      "--clips", "10", "--batch-size", "4", "--out", str(tmp_path)])
    base = compare_losses.recipe_lr("fcos", "brs", 4)

    def finished(name, mAP):
        (tmp_path / "fcos" / "brs" / name).mkdir(parents=True)
        (tmp_path / "fcos" / "brs" / name / "metrics.json").write_text(json.dumps({"mAP": mAP}))

    for scale, mAP in [(0.5, 0.1), (1.0, 0.3), (2.0, 0.2)]:
        finished(f"tune_10it_lr{scale}_clip10.0", mAP)
    finished("tune_5it_lr4.0_clip10.0", 0.9)  # another budget: not this study's
    finished(f"seed1_10it_lr{base:.4g}_clip10.0", 0.4)
    finished(f"seed1_10it_lr{2 * base:.4g}_clip10.0", 0.8)  # at a setting that is not the best
    header, _, row = compare_losses.search_table(args).splitlines()  # rs has no finished run: no row
    assert header.split(" | ")[2:5] == ["LR × 0.5", "LR × 1", "LR × 2"]
    assert row.split(" | ")[1:] == ["brs", "0.100", "**0.300**", "0.200", "0.400 (seed 1)", "0.350 ± 0.050 (2 seeds) |"]
    # no clipping at the best rate does better: it is the best, and seed 1 has not run at it yet
    finished("tune_10it_lr1.0_clip0.0", 0.35)
    args.clips = [10.0, 0.0]
    header, _, row = compare_losses.search_table(args).splitlines()
    assert header.split(" | ")[2:6] == ["LR × 0.5", "LR × 1", "LR × 2", "no clipping at the best LR"]
    assert row.split(" | ")[2:] == ["0.100", "0.300", "0.200", "**0.350 (× 1)**", "—", "— |"]


@pytest.mark.parametrize("loss, iters", [("brs", 6), ("ce", 6), ("brs", 1)])
def test_a_diverging_run_stops_and_scores_zero(tmp_path, loss, iters):
    """A learning rate far too high turns the loss, the gradient, the logits or (after the last
    step, iters = 1) the weights NaN/Inf: the run stops there and scores mAP 0, so that a study
    ranks it last instead of crashing; resuming it from its checkpoint gives the same."""
    argv = _args(tmp_path, "--loss", loss, "--lr", "1e30", "--clip", "0", "--warmup", "1")
    argv[argv.index("--iters") + 1] = str(iters)
    summary = train_detector.main(argv)
    assert summary["diverged_at"] is not None and 1 <= summary["diverged_at"] <= iters
    assert summary["mAP"] == summary["mAP50"] == summary["mAP75"] == summary["detections_per_image"] == 0.0
    written = (tmp_path / "run" / "metrics.json").read_text()
    assert json.loads(written)["diverged_at"] == summary["diverged_at"] and "Infinity" not in written
    (tmp_path / "run" / "metrics.json").unlink()
    resumed = train_detector.main(argv + ["--checkpoint", str(tmp_path / "run" / "checkpoint.pt")])
    assert resumed["diverged_at"] == summary["diverged_at"] and resumed["mAP"] == 0.0


@pytest.mark.parametrize("unclipped_better", [True, False])
def test_compare_losses_tries_the_other_clipping_norms_at_the_best_learning_rate(monkeypatch, unclipped_better):
    import compare_losses

    base = compare_losses.recipe_lr("fcos", "brs", 4)
    calls = []

    def fake_run(args, detector, loss, seed, iters, lr, clip, out):
        calls.append((seed, round(lr / base, 6), clip))
        score = 1 / (1 + abs(math.log2(lr / base))) + (0.01 if (clip == 0) == unclipped_better else 0)
        return {"mAP": score, "mAP50": score, "mAP75": score, "lr": lr, "clip": clip or None, "iterations": iters, "evaluations": [],
                "seconds_per_iteration": 1.0, "classification_loss_ms_per_iteration": 1.0}

    monkeypatch.setattr(compare_losses, "run_once", fake_run)
    args = compare_losses.parse_args(["--detectors", "fcos", "--losses", "brs", "--seeds", "0", "1", "--iters", "10",
                                      "--tune-iters", "10", "--lr-scales", "1", "2", "0.5", "--clips", "10", "0",
                                      "--timing-iters", "0"])
    _, (summary,) = compare_losses.study(args)
    # the learning rates at clip 10 (the best, x1, is inside the grid: no extension), then no clipping at x1
    assert calls[:4] == [(0, 1.0, 10.0), (0, 2.0, 10.0), (0, 0.5, 10.0), (0, 1.0, 0.0)]
    chosen_clip = 0.0 if unclipped_better else 10.0
    assert calls[4:] == [(1, 1.0, chosen_clip)] and summary["clip"] == chosen_clip



def test_compare_losses_runs_each_detector_with_its_protocol_unless_the_command_line_sets_one():
    import compare_losses

    args = compare_losses.parse_args(["--detectors", "fasterrcnn,rtdetr,retinanet"])
    assert compare_losses.protocol(args, "rtdetr") == compare_losses.Protocol(2000, 2000, (0.5, 1.0, 2.0), (0.1,),
                                                                              extend_edges=2)
    assert compare_losses.protocol(args, "fasterrcnn").clips == (10.0, 0.0)
    assert compare_losses.protocol(args, "fasterrcnn").extend_edges == 1
    assert compare_losses.protocol(args, "retinanet") == compare_losses.DEFAULT_PROTOCOL
    given = compare_losses.parse_args(["--detectors", "rtdetr", "--iters", "7", "--clips", "3", "0",
                                       "--extend-edges", "0"])
    assert compare_losses.protocol(given, "rtdetr") == compare_losses.Protocol(7, 2000, (0.5, 1.0, 2.0), (3.0, 0.0),
                                                                               extend_edges=0)
    assert compare_losses.seed_folder(given, "rtdetr", "brs", 1, 0.0008, 3.0).name == "seed1_7it_lr0.0008_clip3.0"


def test_compare_losses_keeps_the_rows_of_the_detectors_and_losses_a_call_does_not_name(tmp_path, monkeypatch):
    """A study is made by several calls (one detector, one loss, at a time): each call's files
    hold every detector and loss studied in --out, each row from its latest call."""
    import compare_losses

    def fake_run(args, detector, loss, seed, iters, lr, clip, out):
        at_recipe = lr == pytest.approx(compare_losses.recipe_lr(detector, loss, 4))  # the best rate, inside the grid
        score = ({"fasterrcnn": 0.6, "rtdetr": 0.5}[detector] + 0.01 * seed + (0.001 if loss == "brs" else 0)
                 - (0 if at_recipe else 0.1))
        result = {"mAP": score, "mAP50": score, "mAP75": score, "lr": lr, "clip": clip, "iterations": iters,
                  "evaluations": [{"iteration": iters, "mAP": score}], "seconds_per_iteration": 1.0,
                  "classification_loss_ms_per_iteration": 1.0}
        out.mkdir(parents=True, exist_ok=True)  # the search table reads the finished runs
        (out / "metrics.json").write_text(json.dumps(result))
        return result

    monkeypatch.setattr(compare_losses, "run_once", fake_run)
    page = tmp_path / "page.md"
    page.write_text(f"{compare_losses.TABLE_START}\n{compare_losses.TABLE_END}\n")
    common = ["--seeds", "0", "1", "--timing-iters", "0", "--out", str(tmp_path / "study"), "--table", str(page)]
    compare_losses.main(["--detectors", "fasterrcnn", "--losses", "ce,brs", *common])
    compare_losses.main(["--detectors", "rtdetr", "--losses", "ce", *common, "--seeds", "0", "1", "2"])
    compare_losses.main(["--detectors", "fasterrcnn", "--losses", "brs", "--iters", "5", *common])
    rows = compare_losses.read_summary(tmp_path / "study" / "summary.csv")
    assert [(r["detector"], r["loss"], r["iters"]) for r in rows] == [
        ("fasterrcnn", "ce", "1000"), ("fasterrcnn", "brs", "5"), ("rtdetr", "ce", "2000")]
    runs = list(csv.DictReader((tmp_path / "study" / "runs.csv").open()))
    # each loss's tuning runs (three rates, then one more norm for Faster R-CNN) and its two seeds
    assert sum(r["detector"] == "fasterrcnn" and r["loss"] == "ce" for r in runs) == 4 + 2
    assert sum(r["detector"] == "rtdetr" for r in runs) == 3 + 3
    # --iters replaced the seeds' budget only: the tuning runs keep Faster R-CNN's
    assert {(r["phase"], r["iterations"]) for r in runs if r["loss"] == "brs"} == {("tune", "1000"), ("study", "5")}
    summary = (tmp_path / "study" / "summary.md").read_text()
    assert "| fasterrcnn | ce | 1000 | 2 |" in summary and "| rtdetr | ce | 2000 | 3 |" in summary
    # the search table keeps each row's seeds too, not the last call's --seeds
    assert "| 0.510 (seed 1), 0.520 (seed 2) | 0.510 ± 0.010 (3 seeds) |" in summary
    table = page.read_text()
    assert "| RT-DETR | vfl | 2000 | 3 | 0.510 ± 0.010 |" in table
    assert "- Faster R-CNN: the goal BRS ≥ ce − 1 AP is met: BRS 0.606, ce 0.605 (+0.1 AP)." in table
    assert "- RT-DETR: the goal BRS ≥ vfl − 1 AP is not measured yet (no brs row)." in table


@pytest.mark.parametrize("brs, verdict", [(0.545, "met"), (0.539, "NOT met")])
def test_the_study_table_says_whether_brs_reaches_the_detectors_own_loss_minus_1_ap(brs, verdict):
    import compare_losses

    rows = [{"detector": "rtdetr", "loss": loss, "iters": "2000", "seeds": "2", "map": str(value), "map_spread": "0",
             "map50": "0", "map75": "0", "lr": "0.0004", "clip": "0.1", "runs": "a;b"}
            for loss, value in (("ce", 0.55), ("brs", brs))]
    lines = compare_losses.study_table(rows).splitlines()
    assert lines[-1].startswith(f"- RT-DETR: the goal BRS ≥ vfl − 1 AP is {verdict}: BRS {brs:.3f}, vfl 0.550")


# the study's runs (examples/study/<detector>/<loss>/<run>); examples/study/localisation holds experiments
COMMITTED_STUDY_RUNS = sorted(path for detector in ("fasterrcnn", "fcos", "rtdetr")
                              for path in (REPOSITORY / "examples" / "study" / detector).glob("*/*/metrics.json"))


@pytest.mark.parametrize("metrics", COMMITTED_STUDY_RUNS, ids=lambda p: "/".join(p.parts[-4:-1]))
def test_a_committed_study_run_is_the_run_its_folder_names(metrics):
    """examples/study keeps the study's finished runs, which the study reuses by their folder's
    name: each run's metrics must be those of the setting its folder names."""
    import compare_losses

    detector, loss, folder = metrics.parts[-4:-1]
    run = json.loads(metrics.read_text())
    assert (run["detector"], run["loss"], run["batch_size"]) == (detector, loss, 4)
    assert f"_{run['iterations']}it_" in folder
    lr, clip = compare_losses._setting(folder)
    assert (run["clip"] or 0.0) == clip
    if folder.startswith("tune_"):  # the folder names the multiple of the recipe's rate
        assert run["lr"] == pytest.approx(lr * compare_losses.recipe_lr(detector, loss, 4), rel=1e-12)
    else:
        assert f"{run['lr']:.4g}" == f"{lr:.4g}"
    assert run["evaluations"][-1]["mAP"] == run["mAP"] and "mAP75" in run


def test_the_study_table_is_generated_from_summary_csv_whose_runs_are_committed():
    """examples/README.md's study table is what compare_losses.py --table writes from
    examples/study/summary.csv, and every row's numbers are the means of its committed runs."""
    import compare_losses

    page = (REPOSITORY / "examples" / "README.md").read_text()
    table = page.split(compare_losses.TABLE_START, 1)[1].split(compare_losses.TABLE_END, 1)[0].strip()
    summary = REPOSITORY / "examples" / "study" / "summary.csv"
    rows = compare_losses.read_summary(summary) if summary.exists() else []
    assert table == (compare_losses.study_table(rows).strip() if rows else "")
    for row in rows:
        runs = [json.loads((REPOSITORY / "examples" / "study" / folder / "metrics.json").read_text())
                for folder in row["runs"].split(";")]
        assert len(runs) == int(row["seeds"]) >= 2
        assert all((r["detector"], r["loss"], r["iterations"]) == (row["detector"], row["loss"], int(row["iters"]))
                   for r in runs)
        for key, metric in (("map", "mAP"), ("map50", "mAP50"), ("map75", "mAP75")):
            assert float(row[key]) == pytest.approx(sum(r[metric] for r in runs) / len(runs), abs=1e-12)

def test_the_localisation_table_is_generated_from_the_committed_experiments():
    """docs/localisation.md's table is what localisation_experiments.py --table writes from the
    runs under examples/study/localisation, and every run there is one of its experiments'."""
    import localisation_experiments as experiments

    page = (REPOSITORY / "docs" / "localisation.md").read_text()
    table = page.split(experiments.TABLE_START, 1)[1].split(experiments.TABLE_END, 1)[0]
    assert table.strip() == experiments.table().strip()
    by_folder = {experiments.run_folder(experiment, loss, seed): (experiment, loss, seed)
                 for experiment in experiments.EXPERIMENTS for loss, seed in experiment.runs()}
    for metrics in experiments.ROOT.glob("*/*/metrics.json"):
        assert metrics.parent in by_folder, metrics
        # the run was made with the arguments its experiment gives it now (options it predates aside)
        experiment, loss, seed = by_folder[metrics.parent]
        recorded = json.loads(metrics.read_text())["provenance"]["arguments"]
        wanted = vars(experiments.train_detector.parse_args(experiments.run_arguments(experiment, loss, seed)))
        for key in set(recorded) & set(wanted) - {"out", "data", "checkpoint", "device", *experiment.predates}:
            assert recorded[key] == wanted[key], (metrics, key)


@pytest.mark.parametrize("loss", ["ce", "brs"])
def test_classification_weight_scales_every_classification_term_of_a_detr_and_no_box_term(loss):
    """``--classification-weight 2``: the same model and batch give every classification term (VFL's
    or the ranking loss's, final, auxiliary, encoder and denoising) twice its value at the config's
    weight, and the box terms unchanged."""
    pytest.importorskip("transformers")
    images = [torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[10.0, 10.0, 50.0, 34.0], [30.0, 2.0, 60.0, 20.0]]),
                "labels": torch.tensor([2, 3])}]

    def losses(*weight):
        args = train_detector.parse_args(["--detector", "rtdetr", "--loss", loss, *weight])
        torch.manual_seed(0)
        model = train_detector.build_model(args, num_classes=4).train()
        torch.manual_seed(1)  # the denoising queries are random: the same draw for both calls
        return {name: value.detach() for name, value in model(images, targets).items()}

    config, doubled = losses(), losses("--classification-weight", "2")
    assert sorted(doubled) == sorted(config)
    classification = "loss_vfl" if loss == "ce" else f"loss_{loss}"
    assert sum(name.startswith(classification) for name in config) >= 4  # final, auxiliary, encoder, denoising
    for name, value in config.items():
        expected = 2 * value if name.startswith(classification) else value
        torch.testing.assert_close(doubled[name], expected, msg=name)


def test_classification_weight_is_checked_and_is_the_detrs_only():
    for bad in ("0", "-1", "inf", "nan"):
        with pytest.raises(SystemExit):
            train_detector.parse_args(["--detector", "rtdetr", "--classification-weight", bad])
    args = train_detector.parse_args(["--detector", "fcos", "--classification-weight", "2"])
    with pytest.raises(SystemExit, match="--classification-weight is a DETR option"):
        train_detector.build_model(args, num_classes=4)
