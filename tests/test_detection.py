"""Rank-based torchvision detectors (brl_triton.detection): losses, gradients, inference scores."""

import pytest
import torch

torchvision = pytest.importorskip("torchvision")
from torchvision.models.detection import RetinaNet, fasterrcnn_mobilenet_v3_large_fpn  # noqa: E402
from torchvision.models.detection import _utils as det_utils  # noqa: E402
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone  # noqa: E402
from torchvision.ops import box_iou  # noqa: E402
from torchvision.ops.feature_pyramid_network import LastLevelP6P7  # noqa: E402

from brl_triton.detection import (  # noqa: E402
    RankBasedRetinaNetHead,
    RankBasedRoIHeads,
    RankBasedRPN,
    convert_to_rank_based,
    iou_from_deltas,
)

IMAGES = [torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(i)) for i in range(2)]
TARGETS = [
    {"boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0], [70.0, 70.0, 120.0, 110.0]]), "labels": torch.tensor([1, 3])},
    {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},  # an image without objects
]


def _faster_rcnn(loss="brs"):
    torch.manual_seed(0)
    model = fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=5,
                                              min_size=128, max_size=128)
    return convert_to_rank_based(model, loss)


def _retinanet(loss="brs"):
    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5,
                                   returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
    return convert_to_rank_based(RetinaNet(backbone, num_classes=5, min_size=128, max_size=128), loss)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_iou_from_deltas_equals_box_iou_of_decoded_boxes(weights):
    g = torch.Generator().manual_seed(1)
    coder = det_utils.BoxCoder(weights)
    xy = torch.rand(300, 2, generator=g) * 500
    anchors = torch.cat([xy, xy + 5 + torch.rand(300, 2, generator=g) * 200], dim=1)
    scale = 0.3 * torch.tensor(weights)  # deltas are divided by the coder's weights when decoded
    pred, target = torch.randn(300, 4, generator=g) * scale, torch.randn(300, 4, generator=g) * scale
    want = box_iou(coder.decode_single(pred, anchors), coder.decode_single(target, anchors)).diagonal()
    torch.testing.assert_close(iou_from_deltas(coder, pred, target), want, atol=1e-5, rtol=1e-4)
    assert want.min() < 0.5 < want.max()  # the cases cover both low and high overlaps


@pytest.mark.parametrize("loss", ["brs", "rs", "bap", "ap"])
def test_faster_rcnn_trains_with_finite_losses_and_gradients(loss):
    model = _faster_rcnn(loss)
    assert isinstance(model.rpn, RankBasedRPN) and isinstance(model.roi_heads, RankBasedRoIHeads)
    model.train()
    losses = model(IMAGES, TARGETS)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert all(bool(torch.isfinite(v)) for v in losses.values())
    # the box losses are balanced to the classification losses' values (lambda = cls / box)
    torch.testing.assert_close(losses["loss_box_reg"], losses["loss_classifier"])
    torch.testing.assert_close(losses["loss_rpn_box_reg"], losses["loss_objectness"])
    sum(losses.values()).backward()
    for param in (model.roi_heads.box_predictor.cls_score.weight, model.rpn.head.cls_logits.weight,
                  model.roi_heads.box_predictor.bbox_pred.weight):
        assert param.grad is not None and bool(param.grad.abs().sum() > 0)


def test_rpn_ignored_anchors_get_zero_gradient():
    rpn = _faster_rcnn().rpn
    g = torch.Generator().manual_seed(2)
    objectness = torch.randn(400, 1, generator=g, requires_grad=True)
    deltas = (torch.randn(400, 4, generator=g) * 0.1).requires_grad_(True)
    labels = torch.zeros(400)
    labels[:20], labels[20:60] = 1.0, -1.0
    targets = torch.randn(400, 4, generator=g) * 0.1
    cls, box = rpn.compute_loss(objectness, deltas, [labels[:150], labels[150:]], [targets[:150], targets[150:]])
    (cls + box).backward()
    grad = objectness.grad.flatten()
    assert not bool(grad[20:60].any())
    assert bool(grad[:20].any()) and bool(grad[60:].any())
    assert not bool(deltas.grad[20:].any()) and bool(deltas.grad[:20].any())  # box loss: positives only


def test_roi_head_inference_scores_are_sigmoids():
    heads = _faster_rcnn().roi_heads
    heads.score_thresh = 0.0
    class_logits = torch.tensor([[5.0, 2.0, -1.0, 0.5, -3.0]])  # column 0 (background) unused
    proposals = [torch.tensor([[10.0, 10.0, 50.0, 50.0]])]
    boxes, scores, labels = heads.postprocess_detections(class_logits, torch.zeros(1, 20), proposals, [(128, 128)])
    expected = {int(c): torch.sigmoid(class_logits[0, c]).item() for c in range(1, 5)}
    assert sorted(labels[0].tolist()) == [1, 2, 3, 4]
    for label, score in zip(labels[0].tolist(), scores[0].tolist()):
        assert score == pytest.approx(expected[label])


def test_faster_rcnn_eval_returns_detections_with_scores_in_unit_interval():
    model = _faster_rcnn().eval()
    with torch.no_grad():
        detections = model(IMAGES)
    for det in detections:
        assert set(det) == {"boxes", "labels", "scores"}
        assert bool(((det["scores"] >= 0) & (det["scores"] <= 1)).all())
        assert bool((det["labels"] >= 1).all())


@pytest.mark.parametrize("loss", ["brs", "rs"])
def test_retinanet_trains_and_ignores_between_threshold_anchors(loss, monkeypatch):
    model = _retinanet(loss)
    assert isinstance(model.head, RankBasedRetinaNetHead)
    seen = {}
    ranking = model.head.ranking

    def spy(logits, targets):
        seen["targets"] = targets.detach().clone()
        return ranking(logits, targets)

    monkeypatch.setattr(model.head, "ranking", spy)
    model.train()
    losses = model(IMAGES, TARGETS)
    assert set(losses) == {"classification", "bbox_regression"}
    assert all(bool(torch.isfinite(v)) for v in losses.values())
    targets = seen["targets"]
    assert bool((targets > 0).any()) and bool((targets == -1).any())
    assert bool((targets[1] == 0).all())  # the image without objects: negatives only
    sum(losses.values()).backward()
    assert bool(model.head.classification_head.cls_logits.weight.grad.abs().sum() > 0)


def test_conversion_keeps_parameters_and_checks_arguments():
    model = fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=5)
    keys = set(model.state_dict())
    assert convert_to_rank_based(model, "rs") is model
    assert set(model.state_dict()) == keys
    with pytest.raises(ValueError, match="loss must be one of"):
        convert_to_rank_based(fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None), "focal")
    with pytest.raises(TypeError, match="FasterRCNN or RetinaNet"):
        convert_to_rank_based(torch.nn.Linear(2, 2))
    maskrcnn = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3)
    with pytest.raises(ValueError, match="box detection only"):
        convert_to_rank_based(maskrcnn)
