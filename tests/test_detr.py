"""Rank-based DETRs of Hugging Face transformers (brl_triton.detection_detr): RT-DETR, RT-DETRv2,
D-FINE and DEIMv2 converted by ``convert_to_rank_based``, on tiny models built from configs (no
download). The oracles are independent of the implementation: transformers' own matcher and
torchvision's IoU in the test, the library's loss functions, the unconverted model, and
invariants (shift of all logits, no objects)."""

import copy
import subprocess
import sys

import pytest
import torch
import torchvision

transformers = pytest.importorskip("transformers")
pytest.importorskip("scipy")
from torchvision.ops import box_convert, box_iou, generalized_box_iou_loss  # noqa: E402
from transformers.loss.loss_rt_detr import RTDetrHungarianMatcher  # noqa: E402

import brl_triton  # noqa: E402
from brl_triton import registry  # noqa: E402
from brl_triton.detection import convert_to_rank_based  # noqa: E402
from brl_triton.detection_detr import SUPPORTED_MODELS, RankBasedDetrLoss  # noqa: E402

SIZE = 64
NUM_LABELS = 3
NUM_QUERIES = 10
DECODER_LAYERS = 2
MODELS = ["rt_detr", "rt_detr_v2", "d_fine", "deimv2"]
SPECS = {spec.short: spec for spec in registry.LOSSES if registry.public(spec)}  # the detection loss= choices
LOSSES = list(SPECS)
REPLACED = {"rt_detr": "loss_vfl", "rt_detr_v2": "loss_vfl", "d_fine": "loss_vfl", "deimv2": "loss_mal"}
MIN_QUALITY = 1e-6  # a matched query whose box misses its object still counts as positive


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread is faster than two on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _resnet_config():
    return transformers.RTDetrResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1],
                                           layer_type="basic", out_features=["stage2", "stage3", "stage4"])


def _hgnet_config():
    return transformers.HGNetV2Config(
        stem_channels=[3, 8, 8], stage_in_channels=[8, 16, 32, 64], stage_mid_channels=[8, 8, 16, 16],
        stage_out_channels=[16, 32, 64, 128], stage_num_blocks=[1, 1, 1, 1], stage_numb_of_layers=[1, 1, 1, 1],
        stage_kernel_size=[3, 3, 3, 3], stage_downsample=[False, True, True, True],
        stage_light_block=[False, False, True, True], hidden_sizes=[16, 32, 64, 128],
        out_features=["stage2", "stage3", "stage4"])


def _build(name: str, **settings):
    """A tiny detector of ``name`` (random weights, 3 classes, 10 queries, 2 decoder layers,
    6 denoising queries); ``settings`` override its config."""
    torch.manual_seed(0)
    common = dict(num_labels=NUM_LABELS, d_model=32, encoder_hidden_dim=32, encoder_ffn_dim=64, decoder_ffn_dim=64,
                  num_queries=NUM_QUERIES, decoder_layers=DECODER_LAYERS, encoder_layers=1,
                  encoder_attention_heads=2, decoder_attention_heads=2, num_denoising=6,
                  decoder_in_channels=[32, 32, 32], **settings)
    if name in ("rt_detr", "rt_detr_v2"):
        config_class, model_class = {"rt_detr": (transformers.RTDetrConfig, transformers.RTDetrForObjectDetection),
                                     "rt_detr_v2": (transformers.RTDetrV2Config,
                                                    transformers.RTDetrV2ForObjectDetection)}[name]
        config = config_class(backbone_config=_resnet_config(), encoder_in_channels=[16, 32, 64], **common)
    else:
        config_class, model_class = {"d_fine": (transformers.DFineConfig, transformers.DFineForObjectDetection),
                                     "deimv2": (transformers.Deimv2Config, transformers.Deimv2ForObjectDetection)}[name]
        config = config_class(backbone_config=_hgnet_config(), encoder_in_channels=[32, 64, 128], **common)
    return model_class(config)


def _images():
    return torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


def _labels():
    """Two images, three objects (cxcywh, normalised)."""
    return [{"class_labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.3], [0.6, 0.6, 0.4, 0.4]])},
            {"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.4, 0.5, 0.6]])}]


def _no_objects():
    return [{"class_labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)} for _ in range(2)]


class _Recorder:
    """Wraps a model's loss function and keeps the arguments and results of its calls."""

    def __init__(self, loss_function):
        self.loss_function = loss_function
        self.calls = []

    def __call__(self, *args, **kwargs):
        result = self.loss_function(*args, **kwargs)
        self.calls.append((args, kwargs, result))
        return result


def _recorded_training_call(model, labels):
    """Convert-time loss function wrapped, one training forward; returns (args, kwargs, result)."""
    recorder = _Recorder(model.loss_function)
    model.loss_function = recorder
    model.train()
    model(_images(), labels=labels)
    model.loss_function = recorder.loss_function
    return recorder.calls[-1]


def _class_heads(model) -> dict:
    """Every module whose output is class logits (or, for denoising, class embeddings)."""
    heads = {f"decoder.class_embed.{i}": layer for i, layer in enumerate(model.model.decoder.class_embed)}
    heads["enc_score_head"] = model.model.enc_score_head
    heads["denoising_class_embed"] = model.model.denoising_class_embed
    return heads


def _ranking_terms(loss_dict: dict, short: str) -> dict:
    """The classification terms (``loss_<short>`` and its ``_aux_i`` / ``_dn_i``), not aLRP's localisation."""
    return {name: value for name, value in loss_dict.items()
            if name.startswith(f"loss_{short}") and "_localisation" not in name}


def _cxcywh_iou(pred, gt):
    return box_iou(box_convert(pred, "cxcywh", "xyxy"), box_convert(gt, "cxcywh", "xyxy")).diagonal()


def _quality_targets(logits, pred_boxes, labels, indices):
    """IoU targets built from (matched queries, ground truths) per image, by torchvision's box_iou."""
    targets = torch.zeros_like(logits)
    for image, (queries, objects) in enumerate(indices):
        iou = _cxcywh_iou(pred_boxes[image, queries].detach(), labels[image]["boxes"][objects]).clamp(min=MIN_QUALITY)
        targets[image, queries, labels[image]["class_labels"][objects]] = iou
    return targets


# -- 1. conversion -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_conversion_keeps_parameters_and_state_dict_keys(name):
    model = _build(name)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    assert convert_to_rank_based(model, "brs") is model
    assert isinstance(model.loss_function, RankBasedDetrLoss)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[key], before[key]) for key in before)

    convert_to_rank_based(model, "balrp")  # aLRP adds its self-balancing weight, and only that
    assert set(model.state_dict()) - set(before) == {"alrp_balance._extra_state"}
    model.load_state_dict(before)  # a checkpoint from before conversion loads strictly
    convert_to_rank_based(model, "rs")  # another loss removes the weight again
    assert list(model.state_dict()) == list(before)


def test_unsupported_models_and_losses_are_refused_with_the_supported_list():
    detr = transformers.DetrForObjectDetection(transformers.DetrConfig(
        use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=transformers.ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], layer_type="basic",
            out_features=["stage4"]),
        d_model=16, encoder_layers=1, decoder_layers=1, encoder_ffn_dim=16, decoder_ffn_dim=16,
        encoder_attention_heads=2, decoder_attention_heads=2, num_queries=5, num_labels=2))
    with pytest.raises(TypeError) as error:
        convert_to_rank_based(detr, "brs")
    assert "DetrForObjectDetection" in str(error.value)
    assert all(supported in str(error.value) for supported in SUPPORTED_MODELS)
    assert set(SUPPORTED_MODELS) == {"RTDetrForObjectDetection", "RTDetrV2ForObjectDetection",
                                     "DFineForObjectDetection", "Deimv2ForObjectDetection"}
    with pytest.raises(ValueError, match="loss must be one of"):
        convert_to_rank_based(_build("rt_detr"), "focal")
    model = _build("rt_detr")
    own_loss = model.loss_function
    with pytest.raises(ValueError, match="box_balance must be one of weights, classification"):
        convert_to_rank_based(model, "brs", box_balance="unit")  # the torchvision heads' balance
    assert model.loss_function == own_loss  # refused before anything changed


def test_detection_imports_without_transformers_and_the_detr_module_says_what_to_install():
    script = (
        "import sys\n"
        "sys.modules['transformers'] = None  # as if not installed\n"
        "import brl_triton.detection\n"
        "try:\n"
        "    import brl_triton.detection_detr\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "pip install 'brl_triton[detr]'" in result.stdout


# -- 2. a training step ---------------------------------------------------------------------------

# every model with BRS, and every other loss of the registry on one of them
TRAINING_CASES = [(name, "brs") for name in MODELS] + [
    (MODELS[i % len(MODELS)], loss) for i, loss in enumerate(short for short in LOSSES if short != "brs")]


@pytest.mark.parametrize("name,loss", TRAINING_CASES)
def test_training_step_names_the_ranking_terms_and_reaches_every_class_head(name, loss):
    model = _build(name)
    model.train()
    torch.manual_seed(1)  # the denoising queries' noise
    original_names = set(model(_images(), labels=_labels()).loss_dict)
    convert_to_rank_based(model, loss)
    model.zero_grad()
    torch.manual_seed(1)
    output = model(_images(), labels=_labels())

    replaced = REPLACED[name]
    expected = {key.replace(replaced, f"loss_{loss}") for key in original_names}
    if SPECS[loss].regression:  # aLRP's localisation part takes the place of L1, GIoU and FGL
        suffixes = {key[len(replaced):] for key in original_names if key.startswith(replaced)}
        expected = {key for key in expected if not key.startswith(("loss_bbox", "loss_giou", "loss_fgl"))}
        expected |= {f"loss_{loss}_localisation{suffix}" for suffix in suffixes}
    assert set(output.loss_dict) == expected
    assert any("_dn_" in key for key in expected) and any("_aux_" in key for key in expected)
    assert all(torch.isfinite(value) for value in output.loss_dict.values())
    assert torch.isclose(output.loss, sum(output.loss_dict.values()))

    output.loss.backward()
    for head_name, head in _class_heads(model).items():
        gradient = head.weight.grad
        assert gradient is not None and torch.isfinite(gradient).all(), head_name
        assert gradient.abs().sum() > 0, head_name


@pytest.mark.parametrize("name", MODELS)
def test_box_terms_are_the_models_own_by_default(name):
    """box_balance="weights": every L1 / GIoU / FGL term is what the unconverted model's own loss
    gives for the same call (same matching, the config's weights)."""
    model = convert_to_rank_based(_build(name), "brs")
    args, kwargs, (_, loss_dict, _) = _recorded_training_call(model, _labels())
    _, own_dict, _ = _build(name).loss_function(*args, **kwargs)
    box_terms = [key for key in loss_dict if key.startswith(("loss_bbox", "loss_giou", "loss_fgl"))]
    assert box_terms and set(box_terms) <= set(own_dict)
    for key in box_terms:
        assert torch.allclose(loss_dict[key], own_dict[key], rtol=1e-5, atol=1e-7), key


@pytest.mark.parametrize("name", MODELS)
def test_classification_balance_gives_box_terms_the_value_of_their_terms_ranking_loss(name):
    model = convert_to_rank_based(_build(name), "brs", box_balance="classification")
    _, _, (_, loss_dict, _) = _recorded_training_call(model, _labels())
    for key, classification in _ranking_terms(loss_dict, "brs").items():
        suffix = key[len("loss_brs"):]
        for box in ("loss_bbox", "loss_giou", "loss_fgl"):
            if box + suffix in loss_dict:
                assert torch.isclose(loss_dict[box + suffix], classification, rtol=1e-5), box + suffix
    assert "loss_fgl_aux_0" in loss_dict or name.startswith("rt_detr")


# -- 3. a batch without objects ---------------------------------------------------------------------


@pytest.mark.parametrize("name,loss", [(name, "brs") for name in MODELS] + [("rt_detr", "balrp"), ("d_fine", "ap")])
def test_a_batch_without_objects_gives_zero_ranking_terms_attached_to_the_graph(name, loss):
    model = convert_to_rank_based(_build(name), loss)
    model.train()
    output = model(_images(), labels=_no_objects())
    ranking_terms = {key: value for key, value in output.loss_dict.items() if key.startswith(f"loss_{loss}")}
    assert ranking_terms and all(value.item() == 0.0 for value in ranking_terms.values())
    assert all(value.requires_grad for value in ranking_terms.values())
    heads = _class_heads(model)
    parameters = [heads[key].weight for key in heads if key != "denoising_class_embed"]  # no denoising: no objects
    gradients = torch.autograd.grad(sum(ranking_terms.values()), parameters, retain_graph=True, allow_unused=True)
    assert all(gradient is None or not gradient.any() for gradient in gradients)
    output.loss.backward()  # the whole loss too
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# -- 4. invariance to a shift of all class logits -------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_ranking_terms_do_not_change_when_every_class_logit_is_shifted(name):
    # the Hungarian matching's class cost reads sigmoid probabilities, which a shift changes;
    # without it (boxes only) the matching, and with it every ranking target, stays the same
    model = convert_to_rank_based(_build(name, matcher_class_cost=0.0), "brs")
    args, kwargs, _ = _recorded_training_call(model, _labels())
    logits, labels, device, pred_boxes, config, outputs_class, outputs_coord = args
    shift = 2.5
    shifted = dict(kwargs, enc_topk_logits=kwargs["enc_topk_logits"] + shift)
    for loss in LOSSES:
        loss_function = convert_to_rank_based(model, loss).loss_function
        _, reference, _ = loss_function(*args, **kwargs)
        _, moved, _ = loss_function(logits + shift, labels, device, pred_boxes, config, outputs_class + shift,
                                    outputs_coord, **shifted)
        terms = _ranking_terms(reference, loss)
        assert len(terms) == 2 * DECODER_LAYERS + 1  # decoder layers, encoder, denoising per layer
        for key, value in terms.items():
            assert torch.allclose(moved[key], value, rtol=1e-5, atol=1e-6), (loss, key)


# -- 5. equality with the library's function on independently matched targets ------------------------


@pytest.mark.parametrize("name", MODELS)
def test_final_encoder_and_denoising_terms_equal_the_library_loss_of_matched_iou_targets(name):
    model = convert_to_rank_based(_build(name), "brs")
    labels = _labels()
    args, kwargs, (_, loss_dict, _) = _recorded_training_call(model, labels)
    logits, _, _, pred_boxes, config, outputs_class, outputs_coord = args
    clamp_boxes = name in ("d_fine", "deimv2")  # transformers' D-FINE family clamps the boxes it matches
    split = kwargs["denoising_meta_values"]["dn_num_split"]
    matcher = RTDetrHungarianMatcher(config)
    weight = config.weight_loss_mal if name == "deimv2" else config.weight_loss_vfl

    def expected(term_logits, term_boxes, indices=None):
        term_boxes = term_boxes.clamp(0, 1) if clamp_boxes else term_boxes
        if indices is None:
            indices = matcher({"logits": term_logits, "pred_boxes": term_boxes}, labels)
        targets = _quality_targets(term_logits, term_boxes, labels, indices)
        ranking, sorting = brl_triton.bucketed_rank_sort_loss(term_logits.detach(), targets)
        return weight * (ranking + sorting)

    final_logits, final_boxes = logits[:, split[0]:], pred_boxes[:, split[0]:]
    torch.testing.assert_close(loss_dict["loss_brs"], expected(final_logits, final_boxes))
    encoder = f"loss_brs_aux_{DECODER_LAYERS - 1}"  # transformers lists the encoder after the decoder layers
    torch.testing.assert_close(loss_dict[encoder], expected(kwargs["enc_topk_logits"], kwargs["enc_topk_bboxes"]))
    # denoising: each positive denoising query is its object's noisy copy, in every group
    meta = kwargs["denoising_meta_values"]
    groups = meta["dn_num_group"]
    dn_indices = [(positives, torch.arange(len(target["class_labels"])).repeat(groups))
                  for positives, target in zip(meta["dn_positive_idx"], labels)]
    last = DECODER_LAYERS - 1
    torch.testing.assert_close(loss_dict[f"loss_brs_dn_{last}"], expected(
        outputs_class[:, last, :split[0]], outputs_coord[:, last, :split[0]], dn_indices))


@pytest.mark.parametrize("name", ["rt_detr", "deimv2"])
def test_matcher_class_scale_multiplies_the_class_cost_of_the_matching_the_ranking_terms_use(name):
    """The final term is the library's loss of the targets that a matcher with ``scale`` times the
    config's class cost assigns; the config stays as it was. The scale is large enough that the
    assignment differs from the config's own on this call (checked), so the test tells them apart."""
    scale = 1000.0
    model = convert_to_rank_based(_build(name), "brs", matcher_class_scale=scale)
    own_cost = model.config.matcher_class_cost
    labels = _labels()
    args, kwargs, (_, loss_dict, _) = _recorded_training_call(model, labels)
    logits, _, _, pred_boxes, config, _, _ = args
    assert config.matcher_class_cost == own_cost
    split = kwargs["denoising_meta_values"]["dn_num_split"]
    final = {"logits": logits[:, split[0]:], "pred_boxes": pred_boxes[:, split[0]:]}
    if name == "deimv2":  # transformers' D-FINE family clamps the boxes it matches
        final["pred_boxes"] = final["pred_boxes"].clamp(0, 1)
    scaled_config = copy.copy(config)
    scaled_config.matcher_class_cost = own_cost * scale
    indices = RTDetrHungarianMatcher(scaled_config)(final, labels)
    own_indices = RTDetrHungarianMatcher(config)(final, labels)
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(indices, own_indices))
    targets = _quality_targets(final["logits"], final["pred_boxes"], labels, indices)
    ranking, sorting = brl_triton.bucketed_rank_sort_loss(final["logits"].detach(), targets)
    weight = config.weight_loss_mal if name == "deimv2" else config.weight_loss_vfl
    torch.testing.assert_close(loss_dict["loss_brs"], weight * (ranking + sorting))


def test_matcher_class_scale_is_checked_and_is_the_detrs_only():
    model = _build("rt_detr")
    own_loss = model.loss_function
    for bad in (0.0, -1.0, float("nan"), float("inf"), "2"):
        with pytest.raises(ValueError, match="matcher_class_scale must be a finite number > 0"):
            convert_to_rank_based(model, "brs", matcher_class_scale=bad)
    assert model.loss_function == own_loss  # refused before anything changed
    fcos = torchvision.models.detection.fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3)
    with pytest.raises(ValueError, match="matcher_class_scale applies to transformers' DETRs only"):
        convert_to_rank_based(fcos, "brs", matcher_class_scale=2.0)


@pytest.mark.parametrize("loss", ["alrp", "balrp"])
def test_alrp_final_term_equals_the_library_loss_with_giou_regression_losses(loss):
    model = convert_to_rank_based(_build("rt_detr"), loss)
    initial_weight = model.alrp_balance.weight
    labels = _labels()
    args, kwargs, (_, loss_dict, _) = _recorded_training_call(model, labels)
    logits, _, _, pred_boxes, config = args[:5]
    split = kwargs["denoising_meta_values"]["dn_num_split"]
    final_logits, final_boxes = logits[:, split[0]:], pred_boxes[:, split[0]:]
    indices = RTDetrHungarianMatcher(config)({"logits": final_logits, "pred_boxes": final_boxes}, labels)
    targets = _quality_targets(final_logits, final_boxes, labels, indices)
    regression = torch.zeros(targets.shape)  # per (image, query, class) entry, read at the positives
    for image, (queries, objects) in enumerate(indices):
        giou = generalized_box_iou_loss(box_convert(final_boxes[image, queries], "cxcywh", "xyxy"),
                                        box_convert(labels[image]["boxes"][objects], "cxcywh", "xyxy"))
        regression[image, queries, labels[image]["class_labels"][objects]] = giou.detach() / 2
    classification, localisation = getattr(brl_triton, SPECS[loss].function_name)(
        final_logits.detach(), targets, regression[targets > 0])
    torch.testing.assert_close(loss_dict[f"loss_{loss}"], config.weight_loss_vfl * classification)
    torch.testing.assert_close(loss_dict[f"loss_{loss}_localisation"],
                               config.weight_loss_vfl * initial_weight * localisation)


def test_alrp_weight_is_recorded_once_per_training_step_and_saved_as_a_tensor(tmp_path):
    model = convert_to_rank_based(_build("d_fine"), "balrp")
    balance = model.alrp_balance
    model.train()
    model(_images(), labels=_labels())
    assert balance._steps == 1  # one step of the period for all terms together
    with torch.no_grad():
        model(_images(), labels=_labels())  # a validation loss does not count
    assert balance._steps == 1
    state = model.state_dict()["alrp_balance._extra_state"]
    assert isinstance(state, torch.Tensor)  # safetensors, hence save_pretrained, hold tensors only
    model.save_pretrained(tmp_path)
    resumed = convert_to_rank_based(_build("d_fine"), "balrp")
    resumed.load_state_dict(model.state_dict())
    assert resumed.alrp_balance.get_extra_state().tolist()[:3] == state.tolist()[:3]
    assert torch.equal(resumed.alrp_balance.get_extra_state().isnan(), state.isnan())


# -- 6. inference ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_inference_and_post_processing_are_those_of_the_unconverted_model(name):
    original = _build(name).eval()
    converted = convert_to_rank_based(copy.deepcopy(original), "brs").eval()
    processor = transformers.RTDetrImageProcessor()
    with torch.no_grad():
        expected, output = original(_images()), converted(_images())
        with_labels = converted(_images(), labels=_labels())  # evaluation loss: no denoising terms
    assert torch.equal(output.logits, expected.logits) and torch.equal(output.pred_boxes, expected.pred_boxes)
    assert output.logits.shape == (2, NUM_QUERIES, NUM_LABELS)
    sizes = [(SIZE, SIZE)] * 2
    results = processor.post_process_object_detection(output, threshold=0.0, target_sizes=sizes)
    reference = processor.post_process_object_detection(expected, threshold=0.0, target_sizes=sizes)
    for result, wanted, logits in zip(results, reference, output.logits):
        assert set(result) == {"scores", "labels", "boxes"} and result["boxes"].shape == (NUM_QUERIES, 4)
        assert all(torch.equal(result[key], wanted[key]) for key in result)
        top_scores = logits.sigmoid().flatten().topk(NUM_QUERIES).values
        torch.testing.assert_close(result["scores"], top_scores)
    assert torch.isfinite(with_labels.loss) and not any("_dn_" in key for key in with_labels.loss_dict)
