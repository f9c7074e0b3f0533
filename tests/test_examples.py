"""The detector example: its offline dataset and a 2-iteration run with evaluation."""

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("torchvision")
pytest.importorskip("sklearn")
pytest.importorskip("pycocotools")
pytest.importorskip("efficientnet_lite_pytorch")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import digits_dataset  # noqa: E402
import finetune_fasterrcnn  # noqa: E402


def test_digits_dataset_is_deterministic_with_boxes_inside_images(tmp_path):
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
    other = digits_dataset.make_digits_coco(tmp_path / "c", num_train=6, num_val=3, image_size=160, seed=4)
    assert other[1].read_text() != first[1].read_text()


@pytest.mark.parametrize("detector,model,loss", [("fasterrcnn", "effnet_lite0", "brs"), ("retinanet", "effnet_lite0", "rs"),
                                                ("fasterrcnn", "mobilenet_v3", "ce")])
def test_example_trains_two_iterations_and_evaluates(tmp_path, detector, model, loss):
    summary = finetune_fasterrcnn.main([
        "--detector", detector, "--model", model, "--loss", loss, "--iters", "2", "--num-train", "4", "--num-val", "2",
        "--batch-size", "2", "--image-size", "128", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
        "--device", "cpu",
    ])
    assert 0.0 <= summary["mAP"] <= 1.0 and 0.0 <= summary["mAP50"] <= 1.0
    assert summary["seconds_per_iteration"] > 0 and summary["classification_loss_ms_per_iteration"] > 0
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written["loss"] == loss and written["iterations"] == 2
    assert (tmp_path / "run" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    resumed = finetune_fasterrcnn.main([
        "--detector", detector, "--model", model, "--loss", loss, "--iters", "3", "--num-train", "4", "--num-val", "2",
        "--batch-size", "2", "--image-size", "128", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run2"),
        "--device", "cpu", "--checkpoint", str(tmp_path / "run" / "checkpoint.pt"),
    ])
    assert resumed["iterations"] == 3
