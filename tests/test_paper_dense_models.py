"""The papers' dense models (issue 25): PSPNet on dilated torchvision ResNets (featkd.models.pspnet) and
torchvision's RetinaNet / Faster R-CNN / Mask R-CNN on torchvision ResNet FPN trunks (featkd.models.tv_detection).
Random weights, small inputs; the one download (``weights_backbone``) is real and fails offline."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from featkd.capture.capture import CapturingModel
from featkd.cli import main as featkd_main
from featkd.config import build_config
from featkd.errors import FeatkdError
from featkd.models import PSPNET_MODELS, TV_DETECTION_MODELS, create_model, model_options
from featkd.tasks.detection import DetectionTask
from featkd.tasks.segmentation import AUX_WEIGHT, SegmentationTask

tvm = pytest.importorskip("torchvision.models")
from torchvision.ops import FrozenBatchNorm2d  # noqa: E402

SMALL = {"min_size": 64, "max_size": 96}  # the detectors' own resize: keep the 64 x 96 test images as they are


@pytest.fixture(autouse=True)
def one_thread(one_thread):
    yield


def convs(module: nn.Module) -> dict[str, tuple]:
    return {n: (m.stride, m.dilation, m.padding) for n, m in module.named_modules() if isinstance(m, nn.Conv2d)}


# --- PSPNet ----------------------------------------------------------------------------------------------------


def test_pspnet_resnet18_output_stride_8_logits_at_input_size_and_aux():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 96)
    plain = create_model("pspnet_resnet18", num_classes=5)
    cap = CapturingModel(plain, ["backbone.layer1", "backbone.layer4", "backbone.layer4.1.add", "classifier.ppm",
                                 "classifier.bottleneck", "classifier.conv_seg"], x)
    assert cap.shapes == {"backbone.layer1": (64, 16, 24), "backbone.layer4": (512, 8, 12),  # stride 4, then 8
                          "backbone.layer4.1.add": (512, 8, 12), "classifier.ppm": (512 + 4 * 128, 8, 12),
                          "classifier.bottleneck": (128, 8, 12), "classifier.conv_seg": (5, 8, 12)}
    out, feats = cap(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 5, 64, 96)
    assert (feats["backbone.layer4.1.add"] < 0).any()  # pre-ReLU, although torchvision's ReLU runs in place
    torch.testing.assert_close(out, nn.functional.interpolate(feats["classifier.conv_seg"], size=(64, 96),
                                                              mode="bilinear", align_corners=False))
    # mmseg's dilations (1, 1, 2, 4) with contract_dilation; a BasicBlock dilates its conv1 only
    body = plain.backbone
    assert [body.layer3[i].conv1.dilation for i in (0, 1)] == [(1, 1), (2, 2)]
    assert [body.layer4[i].conv1.dilation for i in (0, 1)] == [(2, 2), (4, 4)]
    assert {body.get_submodule(f"layer{s}.{i}.conv2").dilation for s in (3, 4) for i in (0, 1)} == {(1, 1)}
    assert [s.stride for n, s in body.named_modules() if n.endswith("downsample.0")] == [(2, 2), (1, 1), (1, 1)]
    assert type(plain.classifier.dropout) is nn.Dropout2d and plain.classifier.dropout.p == 0.1

    aux = create_model("pspnet_resnet18", num_classes=5, aux_loss=True, in_channels=1, pool_scales=[1, 2])
    out = aux(torch.randn(2, 1, 64, 96))
    assert set(out) == {"out", "aux"} and out["out"].shape == out["aux"].shape == (2, 5, 64, 96)
    assert aux.aux_classifier[0].out_channels == 64 and aux.aux_classifier[0].in_channels == 256  # mmseg's R18 aux
    assert len(aux.classifier.ppm.branches) == 2 and aux.backbone.conv1.in_channels == 1

    stem = create_model("pspnet_resnet18", num_classes=5, deep_stem=True, channels=32)
    assert [m.out_channels for m in stem.backbone.conv1 if isinstance(m, nn.Conv2d)] == [32, 32, 64]
    assert stem(x).shape == (2, 5, 64, 96) and stem.classifier.bottleneck[0].out_channels == 32
    with pytest.raises(FeatkdError, match=r"deep_stem has no torchvision ImageNet weights"):
        create_model("pspnet_resnet18", num_classes=5, deep_stem=True, weights_backbone="DEFAULT")


@pytest.mark.parametrize("name", PSPNET_MODELS)
def test_every_pspnet_builds_with_mmseg_widths(name):
    model = create_model(name, num_classes=19, aux_loss=True)
    wide = name != "pspnet_resnet18"
    assert model.classifier.bottleneck[0].out_channels == (512 if wide else 128)  # mmseg: channels 512 / 128
    assert model.aux_classifier[0].out_channels == (256 if wide else 64)  # aux FCNHead 256 / 64
    assert model.classifier.conv_seg.out_channels == 19
    assert list(model_options(name)) == ["weights_backbone", "deep_stem", "channels", "pool_scales", "dropout",
                                         "aux_loss", "aux_channels"]


def test_dilation_of_bottlenecks_is_torchvisions():
    """``dilate_stage`` on a Bottleneck ResNet sets what torchvision's replace_stride_with_dilation builds."""
    ours = create_model("pspnet_resnet50", num_classes=3).backbone
    theirs = tvm.resnet50(weights=None, replace_stride_with_dilation=[False, True, True])
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        assert convs(ours.get_submodule(stage)) == convs(theirs.get_submodule(stage)), stage
    with torch.no_grad():
        assert ours.eval()(torch.zeros(1, 3, 32, 32))["out"].shape == (1, 2048, 4, 4)


def test_the_segmentation_task_trains_the_aux_head_with_mmsegs_weight():
    torch.manual_seed(0)
    model = create_model("pspnet_resnet18", num_classes=4, aux_loss=True, channels=16, aux_channels=8)
    x, y = torch.randn(2, 3, 32, 48), torch.randint(0, 4, (2, 32, 48))
    y[0, :4] = 255
    task = SegmentationTask(4)
    cap = CapturingModel(model, ["classifier.conv_seg"], x)
    torch.manual_seed(1)
    logits, feats, terms = task.forward_student(cap, x, y)
    torch.manual_seed(1)  # the same dropout masks
    out = model(x)
    assert set(terms) == {"ce", "aux"} and logits.shape == (2, 4, 32, 48) and AUX_WEIGHT == 0.4
    assert feats["classifier.conv_seg"].shape == (2, 4, 4, 6)  # the logits before upsampling, stride 8
    ce = nn.functional.cross_entropy(out["aux"], y, ignore_index=255)
    torch.testing.assert_close(terms["aux"], 0.4 * ce)
    torch.testing.assert_close(terms["ce"], nn.functional.cross_entropy(out["out"], y, ignore_index=255))
    assert task.loss_terms(logits, y, terms) == terms
    plain = create_model("pspnet_resnet18", num_classes=4, channels=16)
    assert task.forward_student(CapturingModel(plain, [], x), x, y)[2] is None  # one term, "ce", as before


# --- detectors on torchvision ResNet FPN trunks -----------------------------------------------------------------


def targets(masks: bool) -> list[dict[str, torch.Tensor]]:
    out = []
    for box in ([4.0, 6.0, 40.0, 30.0], [50.0, 20.0, 90.0, 60.0]):
        t = {"boxes": torch.tensor([box]), "labels": torch.tensor([2])}
        if masks:
            m = torch.zeros(1, 64, 96, dtype=torch.uint8)
            m[0, int(box[1]):int(box[3]), int(box[0]):int(box[2])] = 1
            t["masks"] = m
        out.append(t)
    return out


@pytest.mark.parametrize(("kind", "terms"), [
    ("retinanet", {"classification", "bbox_regression"}),
    ("fasterrcnn", {"classifier", "box_reg", "objectness", "rpn_box_reg"}),
    ("maskrcnn", {"classifier", "box_reg", "objectness", "rpn_box_reg", "mask"}),
])
def test_each_family_trains_and_predicts(kind, terms):
    torch.manual_seed(0)
    name = f"{kind}_resnet18_fpn"
    extra = {"detections_per_img": 10} if kind == "retinanet" else {  # lighter than COCO's 512 RoIs, 1000 proposals
        "box_detections_per_img": 10, "box_batch_size_per_image": 32, "rpn_post_nms_top_n_train": 100,
        "rpn_post_nms_top_n_test": 50}
    model = create_model(name, num_classes=4, **SMALL, **extra)  # 3 categories + background 0
    classes = model.head.classification_head.num_classes if kind == "retinanet" else \
        model.roi_heads.box_predictor.cls_score.out_features
    assert classes == 4
    task = DetectionTask(4, masks=kind == "maskrcnn")
    task.check_models(None, model, "", name, "test")
    x = torch.rand(2, 3, 64, 96)
    pre_relu = ["backbone.body.layer1.1.add", "backbone.body.layer2.1.add", "backbone.body.layer3.1.add",
                "backbone.body.layer4.1.add"]
    cap = CapturingModel(model, [*pre_relu, "backbone.fpn[0]"], x)
    assert [cap.shapes[p] for p in pre_relu] == [(64, 16, 24), (128, 8, 12), (256, 4, 6), (512, 2, 3)]
    model.train()
    _, feats, losses = task.forward_student(cap, x, targets(kind == "maskrcnn"))
    assert set(losses) == terms and all(math.isfinite(float(v.detach())) for v in losses.values())
    assert all((feats[p] < 0).any() for p in pre_relu)  # the sums before the in-place ReLU
    (sum(losses.values()) + feats["backbone.body.layer2.1.add"].square().mean()).backward()
    assert model.backbone.body.conv1.weight.grad.abs().sum() > 0  # no weights: every layer trains
    model.eval()
    with torch.no_grad():
        out = model(list(x))
    task.check_output(out, "student", name, "test")
    keys = {"boxes", "labels", "scores"} | ({"masks"} if kind == "maskrcnn" else set())
    assert len(out) == 2 and all(set(o) == keys and len(o["boxes"]) <= 10 for o in out)


@pytest.mark.parametrize("name", TV_DETECTION_MODELS)
def test_every_detector_builds(name):
    model = create_model(name, num_classes=3, **SMALL)
    depth = int(name.split("_resnet")[1].split("_")[0])
    retina = name.startswith("retinanet")
    body, fpn = model.backbone.body, model.backbone.fpn
    assert type(body.layer1[0].bn1) is nn.BatchNorm2d and all(p.requires_grad for p in body.parameters())
    assert len(fpn.inner_blocks) == (3 if retina else 4) and model.backbone.out_channels == 256
    assert type(fpn.extra_blocks).__name__ == ("LastLevelP6P7" if retina else "LastLevelMaxPool")
    assert body.layer4[-1].conv1.in_channels == (512 if depth < 50 else 2048)
    if depth < 50:  # the forward of the 50 / 101 trunks only costs time
        model.eval()
        with torch.no_grad():
            levels = model.backbone(torch.rand(1, 3, 256, 256))
        strides = {k: 256 // v.shape[-2] for k, v in levels.items()}
        assert strides == ({"0": 8, "1": 16, "2": 32, "p6": 64, "p7": 128} if retina else
                           {"0": 4, "1": 8, "2": 16, "3": 32, "pool": 64})


def test_retinanet_resnet50_fpn_is_torchvisions_and_options_reach_the_class():
    ours = create_model("retinanet_resnet50_fpn", num_classes=5)
    theirs = create_model("torchvision:retinanet_resnet50_fpn", num_classes=5)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert repr(ours.transform) == repr(theirs.transform)  # 800 / 1333, ImageNet mean / std: torchvision's defaults
    m = create_model("maskrcnn_resnet18_fpn", num_classes=3, in_channels=1, trainable_layers=2, rpn_nms_thresh=0.6,
                     box_batch_size_per_image=64, min_size=[48, 64], max_size=96)
    assert m.rpn.nms_thresh == 0.6 and m.roi_heads.fg_bg_sampler.batch_size_per_image == 64
    assert tuple(m.transform.min_size) == (48, 64) and m.transform.image_mean == [0.5]
    body = m.backbone.body
    assert body.conv1.in_channels == 1 and not body.conv1.weight.requires_grad  # frozen as the conv it replaced
    assert not any(p.requires_grad for p in body.layer2.parameters()) and body.layer3[0].conv1.weight.requires_grad
    for name, options, message in [
        ("retinanet_resnet18_fpn", {"trainable_layers": 6}, r"trainable_layers must be in 0\.\.5"),
        ("retinanet_resnet18_fpn", {"rpn_nms_thresh": 0.5}, r"unknown option 'rpn_nms_thresh'"),
        ("fasterrcnn_resnet18_fpn", {"anchor_generator": None}, r"unknown option 'anchor_generator'"),
        ("pspnet_resnet50", {"weights_backbone": "IMAGENET1K_V9"},
         r"weights_backbone 'IMAGENET1K_V9' is not one of torchvision's resnet50 weights \(IMAGENET1K_V1, "
         r"IMAGENET1K_V2, DEFAULT\)"),
    ]:
        with pytest.raises(FeatkdError, match=message):
            create_model(name, num_classes=3, **options)


@pytest.mark.parametrize("name", ["pspnet_resnet18", "fasterrcnn_resnet18_fpn"])
def test_weights_backbone_downloads_or_fails_in_one_line(name):
    """The real download: offline (this machine) one FeatkdError line naming the model and the weights; where a
    network exists the ImageNet weights load, and a detector's trunk is frozen as torchvision freezes it."""
    try:
        model = create_model(name, num_classes=3, weights_backbone="DEFAULT")
    except FeatkdError as exc:
        message = str(exc)
        assert "\n" not in message and message.startswith(f"model {name!r}: could not download weights_backbone "
                                                          "'DEFAULT': ")
        return
    reference = tvm.resnet18(weights="DEFAULT").state_dict()
    body = model.backbone.body if hasattr(model.backbone, "body") else model.backbone
    torch.testing.assert_close(body.layer1[0].conv1.weight, reference["layer1.0.conv1.weight"])
    if name.startswith("fasterrcnn"):
        assert type(body.layer1[0].bn1) is FrozenBatchNorm2d and not body.layer1[0].conv1.weight.requires_grad
        assert body.layer2[0].conv1.weight.requires_grad  # trainable_layers 3: layer2-4


def test_layers_lists_the_pre_relu_stage_points(capsys):
    assert featkd_main(["layers", "retinanet_resnet18_fpn", "--input-shape", "3,64,96", "--num-classes", "4",
                        "--option", "min_size=64", "--option", "max_size=96", "--filter", r"\.1\.add$"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert rows == [[f"backbone.body.layer{i}.1.add", "node", "add", shape]
                    for i, shape in enumerate(["64x16x24", "128x8x12", "256x4x6", "512x2x3"], 1)]
    assert featkd_main(["layers", "pspnet_resnet18", "--input-shape", "3,64,64", "--num-classes", "4", "--filter",
                        r"^backbone\.layer4(\.1\.add)?$|^classifier(\.ppm|\.bottleneck|\.conv_seg)?$"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert rows == [["backbone.layer4.1.add", "node", "add", "512x8x8"],
                    ["backbone.layer4", "module", "Sequential", "512x8x8"],
                    ["classifier.ppm", "module", "PyramidPooling", "1024x8x8"],
                    ["classifier.bottleneck", "module", "Sequential", "128x8x8"],
                    ["classifier", "module", "PSPHead", "4x8x8"],
                    ["classifier.conv_seg", "module", "Conv2d", "4x8x8"]]


# --- a distillation step through featkd's own build path ----------------------------------------------------------


@pytest.mark.parametrize("method", [
    {"name": "cwd", "pairs": [["classifier.conv_seg", "classifier.conv_seg"]]},  # MMRazor's CWD: the logits
    {"name": "fitnets", "pairs": [["backbone.layer4.1.add", "backbone.layer4.2.add"],
                                  ["classifier.bottleneck", "classifier.bottleneck"]]},
], ids=lambda m: m["name"])
def test_pspnet_r50_to_r18_distillation_step(method, tmp_path, fashion_mnist_dir):
    from featkd.engine.trainer import Trainer

    raw = {
        "name": "pspnet-kd",
        "data": {"dataset": "scenes", "data_dir": str(tmp_path),
                 "scenes": {"canvas_size": 64, "train_size": 4, "test_size": 2}, "batch_size": 2,
                 "eval_batch_size": 2},
        "teacher": {"model": "pspnet_resnet50", "options": {"channels": 64}},
        "student": {"model": "pspnet_resnet18", "options": {"aux_loss": True}},
        "method": method,
        "optim": {"optimizer": "sgd", "lr": 0.01},
        "train": {"epochs": 1, "num_threads": 1, "progress": "off", "tensorboard": False},
    }
    trainer = Trainer(build_config(raw), out_dir=None, log=lambda _m: None)
    assert trainer.run.student_capture.points and trainer.run.teacher_capture.points
    before = trainer.student.backbone.layer4[1].conv1.weight.detach().clone()
    loader = trainer.train_loader
    loader.set_epoch(0)
    x, y = next(iter(loader))
    losses, logits = trainer.train_step(x, y, 0)
    assert set(losses) == {"ce", "aux", method["name"]} and logits.shape == (2, 11, 64, 64)
    assert all(math.isfinite(float(v.detach())) for v in losses.values()) and float(losses[method["name"]].detach()) > 0
    assert not torch.equal(before, trainer.student.backbone.layer4[1].conv1.weight)
