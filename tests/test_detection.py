"""Rank-based torchvision detectors (brl_triton.detection): losses, gradients, recipe settings,
inference scores, and a short training run of every supported detector."""

from collections import OrderedDict

import pytest
import torch
from torch import nn

torchvision = pytest.importorskip("torchvision")
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet  # noqa: E402
from torchvision.models.detection import _utils as det_utils  # noqa: E402
from torchvision.models.detection.anchor_utils import AnchorGenerator  # noqa: E402
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead  # noqa: E402
from torchvision.models.detection.keypoint_rcnn import KeypointRCNN, KeypointRCNNHeads, KeypointRCNNPredictor  # noqa: E402
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor  # noqa: E402
from torchvision.ops import MultiScaleRoIAlign, box_iou  # noqa: E402

from brl_triton.detection import (  # noqa: E402
    RankBasedFCOS,
    RankBasedFCOSHead,
    RankBasedRetinaNetHead,
    RankBasedRoIHeads,
    RankBasedRPN,
    convert_to_rank_based,
    init_box_predictor,
    iou_from_deltas,
)

SIZE = 64
CHANNELS = 32
NUM_CLASSES = 5  # background included (torchvision's convention)


def _images():
    g = torch.Generator().manual_seed(0)
    return [torch.rand(3, SIZE, SIZE, generator=g) for _ in range(2)]


def _targets():
    masks = torch.zeros(2, SIZE, SIZE, dtype=torch.uint8)
    masks[0, 10:38, 8:28] = 1  # inside the first box
    masks[1, 36:56, 38:58] = 1
    return [
        {"boxes": torch.tensor([[5.0, 8.0, 30.0, 40.0], [36.0, 34.0, 60.0, 58.0]]), "labels": torch.tensor([1, 3]),
         "masks": masks},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),  # an image without objects
         "masks": torch.zeros(0, SIZE, SIZE, dtype=torch.uint8)},
    ]


class TinyBackbone(nn.Module):
    """A few strided convolutions: feature maps at strides 8, 16, 32 (and 64, 128 with
    ``levels=5``), all with CHANNELS channels, so that every test model builds and runs in
    well under a second."""

    def __init__(self, levels: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, CHANNELS, 3, 4, 1), nn.BatchNorm2d(CHANNELS), nn.ReLU(),
                                  nn.Conv2d(CHANNELS, CHANNELS, 3, 2, 1), nn.ReLU())
        self.down = nn.ModuleList(nn.Sequential(nn.Conv2d(CHANNELS, CHANNELS, 3, 2, 1), nn.ReLU())
                                  for _ in range(levels - 1))
        self.out_channels = CHANNELS

    def forward(self, x):
        features = [self.stem(x)]
        for layer in self.down:
            features.append(layer(features[-1]))
        return OrderedDict((str(i), f) for i, f in enumerate(features))


def _two_stage(cls=FasterRCNN, **extra):
    return cls(TinyBackbone(), rpn_anchor_generator=AnchorGenerator(((16,), (32,), (64,)), ((0.5, 1.0, 2.0),) * 3),
               box_roi_pool=MultiScaleRoIAlign(["0", "1", "2"], 7, 2), box_head=TwoMLPHead(CHANNELS * 49, 64),
               box_predictor=FastRCNNPredictor(64, NUM_CLASSES), min_size=SIZE, max_size=SIZE, **extra)


def _mask_rcnn():
    return _two_stage(MaskRCNN, mask_roi_pool=MultiScaleRoIAlign(["0", "1", "2"], 14, 2),
                      mask_head=MaskRCNNHeads(CHANNELS, (32,), 1), mask_predictor=MaskRCNNPredictor(32, 32, NUM_CLASSES))


def _retinanet_model():
    anchors = AnchorGenerator(tuple((s,) for s in (16, 32, 64, 128, 256)), ((0.5, 1.0, 2.0),) * 5)
    return RetinaNet(TinyBackbone(levels=5), NUM_CLASSES, anchor_generator=anchors, min_size=SIZE, max_size=SIZE)


def _fcos_model():
    return FCOS(TinyBackbone(levels=5), NUM_CLASSES, min_size=SIZE, max_size=SIZE)  # anchors 8..128 = strides


BUILDERS = {"fasterrcnn": _two_stage, "maskrcnn": _mask_rcnn, "retinanet": _retinanet_model, "fcos": _fcos_model}


def _converted(name, loss="brs"):
    torch.manual_seed(0)
    return convert_to_rank_based(BUILDERS[name](), loss)


def _classifier(model):
    if isinstance(model, FasterRCNN):
        return model.roi_heads.box_predictor.cls_score.weight
    return model.head.classification_head.cls_logits.weight


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


@pytest.mark.parametrize("name", list(BUILDERS))
def test_detector_converts_trains_two_steps_and_predicts(name):
    """Every supported detector: converted, two SGD steps with finite losses and a classifier
    that gets gradient, then detections with scores in [0, 1] (and masks for Mask R-CNN)."""
    model = _converted(name)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.003, momentum=0.9)
    model.train()
    for _ in range(2):
        losses = model(_images(), _targets())
        assert all(bool(torch.isfinite(v)) for v in losses.values()), losses
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        assert bool(_classifier(model).grad.abs().sum() > 0)
        optimizer.step()
    model.eval()
    with torch.no_grad():
        detections = model(_images())
    for det in detections:
        assert det["boxes"].shape[0] > 0 and det["boxes"].shape == (det["scores"].shape[0], 4)
        assert bool(((det["scores"] >= 0) & (det["scores"] <= 1)).all())
        # two-stage heads never predict the background column; dense heads have no background
        # column (torchvision trains every column of theirs, the example's column 0 as negatives only)
        assert bool((det["labels"] >= int(name in ("fasterrcnn", "maskrcnn"))).all())
        assert bool((det["labels"] < NUM_CLASSES).all())
        if name == "maskrcnn":
            assert det["masks"].shape == (det["boxes"].shape[0], 1, SIZE, SIZE)
            assert bool(((det["masks"] >= 0) & (det["masks"] <= 1)).all())


@pytest.mark.parametrize("box_balance", ["unit", "classification"])
@pytest.mark.parametrize("loss", ["brs", "rs", "bap", "ap"])
def test_faster_rcnn_losses_are_balanced_and_reach_every_head(loss, box_balance):
    torch.manual_seed(0)
    model = convert_to_rank_based(_two_stage(), loss, box_balance=box_balance)
    assert isinstance(model.rpn, RankBasedRPN) and isinstance(model.roi_heads, RankBasedRoIHeads)
    model.train()
    losses = model(_images(), _targets())
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert all(bool(torch.isfinite(v)) for v in losses.values())
    if box_balance == "classification":  # RS-R-CNN: scaled to the classification losses' values
        torch.testing.assert_close(losses["loss_box_reg"], losses["loss_classifier"])
        torch.testing.assert_close(losses["loss_rpn_box_reg"], losses["loss_objectness"])
    else:  # 1, times rpn_weight for the RPN
        torch.testing.assert_close(losses["loss_box_reg"], torch.tensor(1.0))
        torch.testing.assert_close(losses["loss_rpn_box_reg"], torch.tensor(0.2))
    sum(losses.values()).backward()
    for param in (model.roi_heads.box_predictor.cls_score.weight, model.rpn.head.cls_logits.weight,
                  model.roi_heads.box_predictor.bbox_pred.weight):
        assert param.grad is not None and bool(param.grad.abs().sum() > 0)


def test_mask_rcnn_trains_its_mask_head_on_at_most_the_cap_of_positives(monkeypatch):
    model = _converted("maskrcnn")
    seen = []
    mask_head_forward = model.roi_heads.mask_head.forward
    monkeypatch.setattr(model.roi_heads.mask_head, "forward", lambda x: seen.append(x.shape[0]) or mask_head_forward(x))
    model.train()
    losses = model(_images(), _targets())
    assert set(losses) >= {"loss_mask", "loss_classifier"}
    losses["loss_mask"].backward()
    assert bool(model.roi_heads.mask_predictor.mask_fcn_logits.weight.grad.abs().sum() > 0)
    assert 0 < seen[0] <= 200
    model.roi_heads.mask_positives_per_batch = 3
    model(_images(), _targets())
    assert seen[1] == 3


def test_rpn_ignored_anchors_get_zero_gradient():
    rpn = _converted("fasterrcnn").rpn
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


def test_conversion_sets_the_rs_recipe_and_keeps_the_rpn_proposals():
    torch.manual_seed(0)
    model = _two_stage()
    torch.nn.init.normal_(model.rpn.head.bbox_pred.weight, std=0.1)  # like a trained RPN: proposals move
    features = [torch.randn(1, CHANNELS, 8, 8)]
    anchors = torch.tensor([[8.0, 8.0, 40.0, 40.0]]).expand(3 * 64, 4)

    def proposals():  # the RPN's channels are (anchor, dx/dy/dw/dh)
        deltas = model.rpn.head(features)[1][0][0].reshape(3, 4, 64).permute(0, 2, 1).reshape(-1, 4)
        return model.rpn.box_coder.decode_single(deltas, anchors)

    before = proposals()
    convert_to_rank_based(model)
    after = proposals()
    assert model.rpn.box_coder.weights == (10.0, 10.0, 5.0, 5.0)
    torch.testing.assert_close(after, before)
    assert model.rpn._pre_nms_top_n == {"training": 2000, "testing": 1000}
    assert model.rpn._post_nms_top_n == {"training": 1000, "testing": 1000}
    heads = model.roi_heads
    assert (heads.score_thresh, heads.nms_thresh, heads.detections_per_img) == (0.40, 0.5, 100)
    for name in ("retinanet", "fcos"):
        dense = _converted(name)
        assert (dense.score_thresh, dense.topk_candidates, dense.nms_thresh, dense.detections_per_img) == (
            0.0, 1000, 0.6, 100)


def test_roi_scores_are_softmax_odds_against_background_after_conversion():
    """A softmax-trained RoI classifier keeps its meaning under sigmoid scores: sigmoid of the
    converted logit = p_c / (p_c + p_background); a head that calls everything background then
    lets nothing through the 0.40 threshold."""
    torch.manual_seed(0)
    model = _two_stage()
    cls_score = model.roi_heads.box_predictor.cls_score
    with torch.no_grad():
        cls_score.bias[0] = 6.0  # a head that puts most mass on background
    features = torch.rand(50, 64)
    softmax = torch.softmax(cls_score(features), dim=1)
    convert_to_rank_based(model)
    sigmoid = torch.sigmoid(cls_score(features))
    torch.testing.assert_close(sigmoid[:, 1:], softmax[:, 1:] / (softmax[:, 1:] + softmax[:, :1]))
    assert bool((sigmoid[:, 1:] < model.roi_heads.score_thresh).all())
    convert_to_rank_based(model)  # converting again changes nothing
    torch.testing.assert_close(torch.sigmoid(cls_score(features)), sigmoid)


def test_roi_head_inference_scores_are_sigmoids():
    heads = _converted("fasterrcnn").roi_heads
    heads.score_thresh = 0.0
    class_logits = torch.tensor([[5.0, 2.0, -1.0, 0.5, -3.0]])  # column 0 (background) unused
    proposals = [torch.tensor([[10.0, 10.0, 50.0, 50.0]])]
    boxes, scores, labels = heads.postprocess_detections(class_logits, torch.zeros(1, 20), proposals, [(128, 128)])
    expected = {int(c): torch.sigmoid(class_logits[0, c]).item() for c in range(1, 5)}
    assert sorted(labels[0].tolist()) == [1, 2, 3, 4]
    for label, score in zip(labels[0].tolist(), scores[0].tolist()):
        assert score == pytest.approx(expected[label])


@pytest.mark.parametrize("name", ["retinanet", "fcos"])
def test_one_stage_detectors_detect_right_after_conversion(name):
    """The classification prior (0.01) is kept, so scores start at 0.01: selection by rank still
    returns the 100 best detections per image."""
    model = _converted(name).eval()
    with torch.no_grad():
        detections = model(_images())
    for det in detections:
        assert det["boxes"].shape[0] == 100
        assert bool((det["scores"] > 0).all() & (det["scores"] < 0.05).all())


@pytest.mark.parametrize("name,loss", [("retinanet", "brs"), ("retinanet", "rs"), ("fcos", "brs")])
def test_dense_heads_rank_with_iou_targets_and_ignore_between_threshold_anchors(name, loss, monkeypatch):
    model = _converted(name, loss)
    assert isinstance(model.head, RankBasedRetinaNetHead if name == "retinanet" else RankBasedFCOSHead)
    seen = {}
    ranking = model.head.ranking

    def spy(logits, targets, *boxes_and_scores):
        seen["targets"] = targets.detach().clone()
        return ranking(logits, targets, *boxes_and_scores)

    monkeypatch.setattr(model.head, "ranking", spy)
    model.train()
    losses = model(_images(), _targets())
    assert set(losses) == {"classification", "bbox_regression"}  # FCOS: no centerness loss
    assert all(bool(torch.isfinite(v)) for v in losses.values())
    targets = seen["targets"]
    assert bool((targets > 0).any()) and bool((targets <= 1).all())
    assert bool((targets == -1).any()) == (name == "retinanet")  # FCOS has no between-threshold anchors
    assert bool((targets[1] == 0).all())  # the image without objects: negatives only
    sum(losses.values()).backward()
    assert bool(model.head.classification_head.cls_logits.weight.grad.abs().sum() > 0)


@pytest.mark.parametrize("name", ["fasterrcnn", "fcos"])
def test_box_loss_weights_are_the_positives_ground_truth_class_scores(name, monkeypatch):
    """Each positive's GIoU term is weighted by the sigmoid of its logit at its ground-truth class,
    the entry of the ranking whose target is its IoU (the official code takes the highest score
    over the classes instead; see the README's study for why this library does not)."""
    model = _converted(name, "brs")
    heads = model.roi_heads if name == "fasterrcnn" else model.head
    ranking, seen = heads.ranking, {}

    def spy(logits, targets, pred_boxes, target_boxes, scores):
        seen.update(logits=logits.detach().clone(), targets=targets.clone(), scores=scores.detach().clone())
        return ranking(logits, targets, pred_boxes, target_boxes, scores)

    monkeypatch.setattr(heads, "ranking", spy)
    model.train()
    model(_images(), _targets())
    positive = seen["targets"] > 0
    assert 0 < int(positive.sum()) == seen["scores"].numel()
    assert bool((positive.sum(dim=-1) <= 1).all())  # one class per positive, so the order is the rows'
    torch.testing.assert_close(seen["scores"], seen["logits"][positive].sigmoid())


def test_fcos_drops_centerness_from_training_and_scores():
    model = _converted("fcos")
    assert isinstance(model, RankBasedFCOS)
    ctrness = model.head.regression_head.bbox_ctrness
    assert not any(p.requires_grad for p in ctrness.parameters())
    model.eval()
    scores = []
    for bias in (-20.0, 20.0):
        with torch.no_grad():
            ctrness.bias.fill_(bias)
            scores.append(model(_images())[0]["scores"])
    torch.testing.assert_close(scores[0], scores[1])


def test_conversion_keeps_parameters_and_checks_arguments():
    model = _two_stage()
    keys = set(model.state_dict())
    assert convert_to_rank_based(model, "rs") is model
    assert set(model.state_dict()) == keys | {"rpn.box_coder_weights"}  # the one key more (see below)
    fcos = _fcos_model()
    keys = set(fcos.state_dict())
    assert convert_to_rank_based(fcos) is fcos and set(fcos.state_dict()) == keys
    with pytest.raises(ValueError, match="loss must be one of"):
        convert_to_rank_based(_two_stage(), "focal")
    with pytest.raises(TypeError, match="FasterRCNN, MaskRCNN, RetinaNet or FCOS"):
        convert_to_rank_based(torch.nn.Linear(2, 2))
    keypoint = _two_stage(KeypointRCNN, keypoint_roi_pool=MultiScaleRoIAlign(["0"], 14, 2),
                          keypoint_head=KeypointRCNNHeads(CHANNELS, (32,)), keypoint_predictor=KeypointRCNNPredictor(32, 3))
    with pytest.raises(ValueError, match="Keypoint R-CNN"):
        convert_to_rank_based(keypoint)
    ssd = torchvision.models.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                     num_classes=3)
    with pytest.raises(TypeError, match="SSD"):
        convert_to_rank_based(ssd)


@pytest.mark.parametrize("name", ["fasterrcnn", "retinanet"])
@pytest.mark.parametrize("loss", ["alrp", "balrp"])
def test_alrp_conversion_trains_box_regression_through_the_localisation_part(name, loss):
    """aLRP heads: the box loss is the localisation part with (1 - GIoU) / 2 per positive, times
    the head's self-balancing weight; it reaches the regression branch, the classification part
    the classifier, and each head balances on its own."""
    import brl_triton

    model = _converted(name, loss)
    heads = [model.rpn, model.roi_heads] if name == "fasterrcnn" else [model.head]
    balances = {id(head.ranking.balance) for head in heads}
    assert len(balances) == len(heads)  # the RPN and the RoI head do not share one weight
    calls = []
    original = brl_triton._outputs.localisation

    def spy(logits, regression_losses, weights, other):
        calls.append(regression_losses.detach().clone())
        return original(logits, regression_losses, weights, other)

    brl_triton._outputs.localisation = spy
    try:
        model.train()
        losses = model(_images(), _targets())
    finally:
        brl_triton._outputs.localisation = original
    assert calls and all(bool(((c >= 0) & (c <= 1)).all()) for c in calls)
    assert all(bool(torch.isfinite(v)) for v in losses.values())
    box_key = "loss_box_reg" if name == "fasterrcnn" else "bbox_regression"
    assert losses[box_key] > 0
    sum(losses.values()).backward()
    regression = (model.roi_heads.box_predictor.bbox_pred.weight if name == "fasterrcnn"
                  else model.head.regression_head.bbox_reg.weight)
    assert bool(regression.grad.abs().sum() > 0) and bool(_classifier(model).grad.abs().sum() > 0)
    # the weight is the period's (C + L) / L: with a period of one step, that step's
    balance = heads[-1].ranking.balance
    balance.load_state_dict(brl_triton.SelfBalancingWeight(period=1).state_dict())  # a fresh period of one step
    losses = model(_images(), _targets())
    classification = losses["loss_classifier" if name == "fasterrcnn" else "classification"]
    localisation = losses[box_key] / 50.0  # the initial weight
    assert balance.weight == pytest.approx(float((classification + localisation).detach() / localisation), rel=1e-5)


@pytest.mark.parametrize("name", ["fasterrcnn", "fcos"])
def test_alrp_self_balancing_weights_are_in_the_state_dict_and_resume(name):
    """A resumed aLRP run once restarted every head's weight at 50: it lived outside the model."""
    import io

    model = _converted(name, "alrp")
    heads = [model.rpn, model.roi_heads] if name == "fasterrcnn" else [model.head]
    for index, head in enumerate(heads):  # mid-period: a weight, steps and the period's sums
        head.ranking.balance.weight = 265.9 - index
        head.ranking.balance.record(torch.tensor(0.8), torch.tensor(0.1 + index))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    resumed = _converted(name, "alrp")
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    resumed_heads = [resumed.rpn, resumed.roi_heads] if name == "fasterrcnn" else [resumed.head]
    for head, original in zip(resumed_heads, heads):
        assert head.ranking.balance.get_extra_state() == original.ranking.balance.get_extra_state()
        assert head.ranking.balance.weight != 50.0
    # the other losses add no key
    assert not [key for key in _converted(name, "brs").state_dict() if "balance" in key]


@pytest.mark.parametrize("name", ["fasterrcnn", "maskrcnn"])
@pytest.mark.parametrize("loss", ["brs", "alrp"])
def test_a_checkpoint_saved_before_conversion_loads_into_the_converted_model(name, loss):
    """Loading before or after convert_to_rank_based gives the same model: the RPN's regression
    layer is rescaled for the converted box coder and the classifier re-expressed against its
    background row as they load (once, the RPN's layer loaded back unscaled: 1 proposal of 257
    matched the original's)."""
    import copy

    torch.manual_seed(0)
    original = BUILDERS[name]()
    checkpoint = copy.deepcopy(original.state_dict())
    converted_then_nothing = convert_to_rank_based(copy.deepcopy(original), loss)
    torch.manual_seed(1)  # other initial weights, all overwritten by the checkpoint
    loaded_after = convert_to_rank_based(BUILDERS[name](), loss)
    loaded_after.load_state_dict(checkpoint)  # strict: the missing marker and balance keys are filled in
    want = converted_then_nothing.state_dict()
    for key, value in loaded_after.state_dict().items():
        if not key.endswith("_extra_state"):
            torch.testing.assert_close(value, want[key], rtol=0, atol=0, msg=key)
    proposals = []
    for model in (converted_then_nothing, loaded_after):
        model.eval()
        with torch.no_grad():
            images = model.transform(_images())[0]
            proposals.append(model.rpn(images, model.backbone(images.tensors))[0])
    for a, b in zip(*proposals):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the converted checkpoint also loads back, unchanged; an unconverted model refuses it
    again = convert_to_rank_based(BUILDERS[name](), loss)
    again.load_state_dict(converted_then_nothing.state_dict())
    torch.testing.assert_close(again.rpn.head.bbox_pred.weight, want["rpn.head.bbox_pred.weight"], rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="rpn.box_coder_weights"):
        BUILDERS[name]().load_state_dict(converted_then_nothing.state_dict())
    # a converted model's checkpoint saved before the marker existed loads unchanged too (its
    # zeroed background row tells it from an unconverted one); once it was rescaled a second time
    old = {key: value for key, value in converted_then_nothing.state_dict().items()
           if key != "rpn.box_coder_weights" and not key.endswith("_extra_state")}
    again.load_state_dict(old, strict=False)
    torch.testing.assert_close(again.rpn.head.bbox_pred.weight, want["rpn.head.bbox_pred.weight"], rtol=0, atol=0)


def test_init_box_predictor_starts_the_roi_regression_at_the_identity():
    """mmdetection's init: ground-truth boxes fed in as proposals come out (almost) unchanged."""
    torch.manual_seed(0)
    model = _two_stage().eval()
    predictor = init_box_predictor(model.roi_heads.box_predictor)
    assert predictor is model.roi_heads.box_predictor
    with torch.no_grad():
        images, targets = model.transform(_images(), _targets())
        features = model.backbone(images.tensors)
        boxes, labels = targets[0]["boxes"], targets[0]["labels"]
        pooled = model.roi_heads.box_roi_pool(features, [boxes], images.image_sizes)
        _, deltas = predictor(model.roi_heads.box_head(pooled))
        refined = model.roi_heads.box_coder.decode(deltas, [boxes]).reshape(len(boxes), -1, 4)[
            torch.arange(len(boxes)), labels]
    assert box_iou(refined, boxes).diagonal().min() > 0.995  # torchvision's default init: 0.965 here
    for layer, std in ((predictor.cls_score, 0.01), (predictor.bbox_pred, 0.001)):
        assert not layer.bias.any() and 0.7 * std < layer.weight.std() < 1.3 * std
    with pytest.raises(TypeError, match="predictor: expected a module with nn.Linear layers"):
        init_box_predictor(nn.Linear(3, 3))


@pytest.mark.parametrize("box_weighting", ["uniform", "score"])
@pytest.mark.parametrize("box_balance", ["unit", "classification"])
def test_box_loss_is_the_weighted_mean_giou_scaled_to_its_value(box_balance, box_weighting):
    """The oracle: torchvision's GIoU loss of each positive, averaged with weights 1 (uniform) or
    the detached scores, times a detached factor that sets its value to 1 or to the
    classification loss's."""
    from torchvision.ops import generalized_box_iou_loss

    from brl_triton.detection import RankingLoss

    g = torch.Generator().manual_seed(0)
    target_boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 20.0, 25.0], [2.0, 3.0, 8.0, 9.0]])
    pred_boxes = (target_boxes + torch.randn(3, 4, generator=g)).requires_grad_()
    scores = torch.tensor([0.9, 0.2, 0.5], requires_grad=True)
    targets = torch.zeros(3, 4)
    targets[torch.arange(3), torch.tensor([0, 1, 3])] = torch.tensor([0.7, 0.4, 0.9])
    ranking = RankingLoss("brs", box_balance=box_balance, box_weighting=box_weighting)
    classification, box = ranking(torch.randn(3, 4, generator=g), targets, pred_boxes, target_boxes, scores)

    weights = scores.detach() if box_weighting == "score" else torch.ones(3)
    giou = generalized_box_iou_loss(pred_boxes, target_boxes, reduction="none")
    mean = (weights * giou).sum() / weights.sum()
    value = classification.detach() if box_balance == "classification" else torch.tensor(1.0)
    want_grad, = torch.autograd.grad(mean * value / mean.detach(), pred_boxes)
    torch.testing.assert_close(box, value)
    box.backward()
    torch.testing.assert_close(pred_boxes.grad, want_grad)
    assert scores.grad is None  # the weights are detached
