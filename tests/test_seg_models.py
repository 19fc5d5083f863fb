"""Segmentation models: torchvision's through the adapter, featkd's own, and capturing features inside them
(hook points, dict entries, fx pre-ReLU nodes; also in a model that does not trace as a whole)."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from featkd.capture.capture import CapturingModel
from featkd.capture.listing import list_capture_points
from featkd.capture.trace import preceding_batchnorm
from featkd.cli import main as featkd_main
from featkd.errors import FeatkdError
from featkd.models import SEGMENTATION_MODELS, create_model, model_kind, segmentation_logits
from featkd.models.segmentation import BACKBONES
from tests.test_models import inplace_nodes

torchvision = pytest.importorskip("torchvision")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: small models, one thread


# --- torchvision segmenters --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "in_channels", "hooks", "node", "block", "after"),
    [
        ("fcn_resnet50", 1, {"backbone[out]": (2048, 8, 8), "backbone.layer4": (2048, 8, 8),
                             "classifier": (5, 8, 8), "classifier.4": (5, 8, 8), "classifier.2": (512, 8, 8)},
         ("backbone.layer1.0.add", (256, 16, 16)), "backbone.layer1.0", torch.relu),
        ("deeplabv3_resnet50", 3, {"backbone[out]": (2048, 8, 8), "classifier.0": (256, 8, 8),
                                   "classifier.4": (5, 8, 8)},
         ("backbone.layer4.2.add", (2048, 8, 8)), "backbone.layer4.2", torch.relu),
        ("lraspp_mobilenet_v3_large", 3, {"backbone[low]": (40, 8, 8), "backbone[high]": (960, 4, 4),
                                          "classifier": (5, 8, 8)},
         ("backbone.5.add", (40, 8, 8)), "backbone.5", None),  # a linear bottleneck: no ReLU after the sum
    ],
)
def test_torchvision_segmenter_capture(name, in_channels, hooks, node, block, after):
    torch.manual_seed(0)
    model = create_model(f"torchvision:{name}", num_classes=5, in_channels=in_channels).eval()
    x = torch.randn(2, in_channels, 64, 64)
    assert model_kind(model, x) == "segmentation"
    by_hooks = CapturingModel(model, list(hooks), x)
    assert by_hooks.shapes == hooks
    point, shape = node
    cap = CapturingModel(model, [*hooks, point, block], x)  # an fx node: the whole model is traced
    assert cap.shapes == {**hooks, point: shape, block: shape}
    out, feats = cap(x)
    assert segmentation_logits(out).shape == (2, 5, 64, 64)
    torch.testing.assert_close(segmentation_logits(out), model(x)["out"])
    hooked = by_hooks(x)[1]
    for p in hooks:
        torch.testing.assert_close(feats[p], hooked[p])
    pre, post = feats[point], feats[block]
    if after is None:
        torch.testing.assert_close(pre, post)
    else:  # the sum before the block's in-place ReLU really is pre-ReLU
        assert (pre < 0).any() and (post >= 0).all()
        torch.testing.assert_close(after(pre), post)
    with pytest.raises(FeatkdError, match=r"'backbone' of \w+ is not a tensor.*e\.g\. 'backbone\["):
        CapturingModel(model, ["backbone"], x)


def test_torchvision_segmenter_options_and_gray_input():
    model = create_model("torchvision:lraspp_mobilenet_v3_large", num_classes=4, in_channels=1)
    reference = torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                           num_classes=4).state_dict()
    ours = model.state_dict()
    assert list(ours) == list(reference)
    assert {k for k in ours if ours[k].shape != reference[k].shape} == {"backbone.0.0.weight"}
    assert ours["backbone.0.0.weight"].shape[1] == 1
    assert create_model("torchvision:fcn_resnet50", num_classes=4).aux_classifier is None
    with pytest.raises(FeatkdError, match=r"unknown option 'aux' \(allowed: progress, aux_loss, weights_backbone\)"):
        create_model("torchvision:fcn_resnet50", num_classes=4, aux=True)


# --- featkd segmenters -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SEGMENTATION_MODELS)
def test_featkd_segmenter_contract(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, in_channels=1)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert model(x).shape == (2, 3, 16, 16)  # train mode, batch 2 (the ASPP pooling branch's BN)
    last = list(model.named_modules())[-1][1]
    assert isinstance(last, nn.Conv2d) and last.out_channels == 3
    assert [n for n, m in model.named_modules() if getattr(m, "inplace", False)] == []
    traced = fx.symbolic_trace(model)
    assert inplace_nodes(traced.graph) == []
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))
    assert model_kind(model, x) == "segmentation"
    stride = BACKBONES[name.split("_", 1)[1]].output_stride
    node = "backbone.layer2.0.add" if "resnet" in name else "backbone.blocks.1.1.add"
    cap = CapturingModel(model, ["classifier", node], x)
    assert cap.shapes["classifier"] == (3, 16 // stride, 16 // stride)


def test_featkd_segmenter_options_and_names():
    model = create_model("deeplab_resnet20", num_classes=4, widths=[8, 16, 32], head_channels=24, rates=[1, 3])
    assert model.backbone.layer3[0].conv2.out_channels == 32
    assert model.classifier[4].in_channels == 24
    assert [m[0].dilation for m in model.classifier[0].convs[1:3]] == [(1, 1), (3, 3)]
    # the trunk is the classifier's own modules: same names under `backbone.`, no pooling or fc
    names = {n for n, _ in create_model("resnet20", num_classes=4).named_modules()}
    trunk = {n.removeprefix("backbone.") for n, _ in model.named_modules() if n.startswith("backbone.")}
    assert trunk == names - {"", "avgpool", "fc"}
    assert model_kind(create_model("resnet8", num_classes=4), torch.zeros(2, 3, 8, 8)) == "classification"
    with pytest.raises(FeatkdError, match=r"unknown option 'rates' \(allowed: widths, stem_width, head_channels, "):
        create_model("fcn_resnet8", num_classes=4, rates=[1])
    with pytest.raises(FeatkdError, match=r"model 'deeplab_resnet8': rates must be positive"):
        create_model("deeplab_resnet8", num_classes=4, rates=[0])


# --- capture in a model that does not trace as a whole ------------------------------------------------------


class DataDependent(nn.Module):
    """A segmenter behind data-dependent control flow: torch.fx cannot trace it, its sub-modules can."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.sum() > 1e9:  # depends on the data
            x = x * 0
        return {"out": self.inner(x)}


def test_fx_points_inside_traceable_submodules():
    torch.manual_seed(0)
    inner = create_model("fcn_resnet8", num_classes=3, in_channels=1, widths=[4, 8, 8])
    model = DataDependent(inner).eval()
    keys = list(model.state_dict())
    x = torch.randn(2, 1, 16, 16)
    points = ["inner.backbone.layer2.0.add", "inner.backbone.layer2.0", "inner.interpolate", "inner.classifier"]
    cap = CapturingModel(model, points, x)  # 'inner.interpolate' and the add node nest: one traced 'inner'
    assert cap.shapes == {"inner.backbone.layer2.0.add": (8, 8, 8), "inner.backbone.layer2.0": (8, 8, 8),
                          "inner.interpolate": (3, 16, 16), "inner.classifier": (3, 4, 4)}
    out, feats = cap(x)
    torch.testing.assert_close(out["out"], model(x)["out"])
    torch.testing.assert_close(feats["inner.interpolate"], out["out"])
    torch.testing.assert_close(torch.relu(feats["inner.backbone.layer2.0.add"]), feats["inner.backbone.layer2.0"])
    assert "forward" not in vars(inner) and list(model.state_dict()) == keys  # nothing left behind
    feats["inner.backbone.layer2.0.add"].pow(2).mean().backward()
    assert inner.backbone.conv1.weight.grad is not None
    assert preceding_batchnorm(model, "inner.backbone.layer2.0.add") is inner.backbone.layer2[0].bn2
    with pytest.raises(FeatkdError, match=r"no capture point 'inner.backbone.layer2.0.ad'.*did you mean"):
        CapturingModel(model, ["inner.backbone.layer2.0.ad"], x)
    listed = {p.name: p for p in list_capture_points(model, (1, 16, 16))}
    assert listed["inner.backbone.layer2.0.add"].kind == "node"
    assert listed["inner.backbone.layer2.0.add"].shape == (8, 8, 8)
    assert listed["inner"].shape == (3, 16, 16)


def test_torchvision_detector_backbone_points():
    torch.manual_seed(0)
    model = torchvision.models.detection.retinanet_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=3, min_size=64, max_size=64).eval()
    x = torch.rand(2, 3, 64, 64)
    points = ["backbone.body.layer2.0.add", "backbone.body.layer2.0", "backbone.fpn[0]", "backbone.fpn[p7]"]
    cap = CapturingModel(model, points, x)
    assert cap.shapes == {"backbone.body.layer2.0.add": (512, 8, 8), "backbone.body.layer2.0": (512, 8, 8),
                          "backbone.fpn[0]": (256, 8, 8), "backbone.fpn[p7]": (256, 1, 1)}
    detections, feats = cap(x)
    assert isinstance(detections, list) and set(detections[0]) == {"boxes", "scores", "labels"}
    assert (feats["backbone.body.layer2.0.add"] < 0).any()
    torch.testing.assert_close(torch.relu(feats["backbone.body.layer2.0.add"]), feats["backbone.body.layer2.0"])
    with pytest.raises(FeatkdError, match=r"has no entry 'p8' \(entries: 0, 1, 2, p6, p7\)"):
        CapturingModel(model, ["backbone.fpn[p8]"], x)


# --- featkd layers ------------------------------------------------------------------------------------------


def test_layers_lists_segmenter_points(capsys):
    assert featkd_main(["layers", "torchvision:fcn_resnet50", "--input-shape", "3,64,64", "--num-classes", "5",
                        "--filter", r"^backbone\.layer1\.0\.add$|^backbone\[out\]$|^classifier(\.4)?$"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert rows == [["backbone.layer1.0.add", "node", "add", "256x16x16"],
                    ["backbone[out]", "module", "IntermediateLayerGetter", "2048x8x8"],
                    ["classifier", "module", "FCNHead", "5x8x8"],
                    ["classifier.4", "module", "Conv2d", "5x8x8"]]
    assert featkd_main(["layers", "fcn_resnet8", "--input-shape", "1,96,96", "--filter", r"^backbone\.layer3\.0\.add$"
                        r"|^classifier$"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert rows == [["backbone.layer3.0.add", "node", "add", "64x24x24"],
                    ["classifier", "module", "FCNHead", "10x24x24"]]
