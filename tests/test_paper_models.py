"""The models the papers' settings name, by name: exact parameter counts of the reference definitions, stage
sizes, the capture points the methods use (MobileNet-V1's pre-ReLU stage ends, ShuffleNetV1's pre-ReLU sums,
KDA's pooled feature), ``featkd layers`` and one short ``featkd train`` run of the ResNet-50 -> MobileNet-V1 pair.

Random weights only (no download); small inputs (32x32, MobileNet-V1 at 64x64, digits for the run).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from featkd.capture.capture import CapturingModel
from featkd.capture.trace import preceding_batchnorm
from featkd.cli import main
from featkd.errors import FeatkdError
from featkd.models import create_model
from tests.test_models import n_params

MBV1_PRE_RELU = ("layer1.2.bn_pw", "layer2.1.bn_pw", "layer3.5.bn_pw", "layer4.1.bn_pw")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: small models, one thread



# Counts of the reference definitions, computed by building each one (``sum(p.numel())``) at the repositories'
# commits HobbitLong/RepDistiller@b84f547, idstcv/KDA@0f509e6, KaiyuYue/mgd@910a636; every featkd model also
# gave the reference's logits when loaded with its weights (by state_dict order).
REFERENCE_COUNTS = [
    # name, classes, count, source (repository: file, function)
    ("resnet56", 100, 861_620, "RepDistiller models/resnet.py resnet56"),
    ("resnet20", 100, 278_324, "RepDistiller models/resnet.py resnet20"),
    ("resnet110", 100, 1_736_564, "RepDistiller models/resnet.py resnet110"),
    ("resnet32", 100, 472_756, "RepDistiller models/resnet.py resnet32"),
    ("resnet32x4", 100, 7_433_860, "RepDistiller models/resnet.py resnet32x4"),
    ("resnet8x4", 100, 1_233_540, "RepDistiller models/resnet.py resnet8x4"),
    ("wrn_40_2", 100, 2_255_156, "RepDistiller models/wrn.py wrn_40_2"),
    ("wrn_16_2", 100, 703_284, "RepDistiller models/wrn.py wrn_16_2"),
    ("wrn_40_1", 100, 569_780, "RepDistiller models/wrn.py wrn_40_1"),
    ("vgg13", 100, 9_462_180, "RepDistiller models/vgg.py vgg13_bn (model_dict 'vgg13')"),
    ("vgg8", 100, 3_965_028, "RepDistiller models/vgg.py vgg8_bn (model_dict 'vgg8')"),
    ("mobilenetv2_cifar", 100, 812_836, "RepDistiller models/mobilenetv2.py mobile_half ('MobileNetV2')"),
    ("shufflenetv1", 100, 949_258, "RepDistiller models/ShuffleNetv1.py ShuffleV1"),
    ("shufflenetv2", 100, 1_355_528, "RepDistiller models/ShuffleNetv2.py ShuffleV2"),
    ("resnet18_cifar", 100, 11_220_132, "KDA resnet_cifar.py resnet18"),
    ("resnet34_cifar", 100, 21_328_292, "KDA resnet_cifar.py resnet34"),
    ("mobilenetv1", 1000, 4_231_976, "mgd cls/models/mobilenetv1.py mobilenet_v1"),
]


@pytest.mark.parametrize(("name", "classes", "count", "source"), REFERENCE_COUNTS, ids=[r[0] for r in REFERENCE_COUNTS])
def test_reference_parameter_counts(name: str, classes: int, count: int, source: str) -> None:
    """Exact parameter counts of the reference definitions (the CIFAR-100 heads, MobileNet-V1 at 1000 classes):

    ==================  ==========  ===================================================================
    featkd name         count       reference (repository, file, function)
    ==================  ==========  ===================================================================
    resnet56            861,620     RepDistiller models/resnet.py resnet56
    resnet20            278,324     RepDistiller models/resnet.py resnet20
    resnet110           1,736,564   RepDistiller models/resnet.py resnet110
    resnet32            472,756     RepDistiller models/resnet.py resnet32
    resnet32x4          7,433,860   RepDistiller models/resnet.py resnet32x4
    resnet8x4           1,233,540   RepDistiller models/resnet.py resnet8x4
    wrn_40_2            2,255,156   RepDistiller models/wrn.py wrn_40_2
    wrn_16_2            703,284     RepDistiller models/wrn.py wrn_16_2
    wrn_40_1            569,780     RepDistiller models/wrn.py wrn_40_1
    vgg13               9,462,180   RepDistiller models/vgg.py vgg13_bn (conv biases before BN included)
    vgg8                3,965,028   RepDistiller models/vgg.py vgg8_bn
    mobilenetv2_cifar   812,836     RepDistiller models/mobilenetv2.py mobile_half
    shufflenetv1        949,258     RepDistiller models/ShuffleNetv1.py ShuffleV1 (CRD's "0.95M")
    shufflenetv2        1,355,528   RepDistiller models/ShuffleNetv2.py ShuffleV2
    resnet18_cifar      11,220,132  KDA resnet_cifar.py resnet18
    resnet34_cifar      21,328,292  KDA resnet_cifar.py resnet34
    mobilenetv1 (1000)  4,231,976   mgd cls/models/mobilenetv1.py mobilenet_v1
    ==================  ==========  ===================================================================
    """
    assert n_params(create_model(name, num_classes=classes)) == count, source


def stage_shapes(model: nn.Module, points: list[str], x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    model.eval()
    with torch.no_grad():
        _, feats = CapturingModel(model, points, x)(x)
    return {p: tuple(f.shape[1:]) for p, f in feats.items()}


def test_mobilenetv1_pre_relu_stage_ends() -> None:
    """The four split points of MGD at strides 4/8/16/32: BN outputs with their negative values kept, whose ReLU
    is the stage output; the preceding BN of each point (MGD's margins) is the point's own BN."""
    torch.manual_seed(0)
    model = create_model("mobilenetv1", num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    assert model(x).shape == (2, 10)
    posts = ["layer1", "layer2", "layer3", "layer4"]
    model.eval()
    with torch.no_grad():
        _, feats = CapturingModel(model, [*MBV1_PRE_RELU, *posts, "fc:input"], x)(x)
    shapes = [(128, 16, 16), (256, 8, 8), (512, 4, 4), (1024, 2, 2)]
    for pre, post, shape in zip(MBV1_PRE_RELU, posts, shapes, strict=True):
        assert tuple(feats[pre].shape[1:]) == shape
        assert feats[pre].min() < 0
        torch.testing.assert_close(feats[pre].relu(), feats[post])
        assert preceding_batchnorm(model, pre) is model.get_submodule(pre)
    assert tuple(feats["fc:input"].shape) == (2, 1024)
    half = create_model("mobilenetv1", num_classes=10, width_mult=0.5)
    assert half.fc.in_features == 512 and half.layer1[-1].bn_pw.num_features == 64


def test_layers_lists_the_mobilenetv1_pre_relu_points(capsys) -> None:
    assert main(["layers", "mobilenetv1", "--input-shape", "3,64,64", "--filter", r"\.bn_pw$"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    by_name = {row[0]: row for row in rows}
    assert len(rows) == 13  # one pointwise BN per depthwise-separable block
    for point, shape in zip(MBV1_PRE_RELU, ("128x16x16", "256x8x8", "512x4x4", "1024x2x2"), strict=True):
        assert by_name[point] == [point, "module", "BatchNorm2d", shape]


def test_shufflenetv1_stages_and_pre_relu_points() -> None:
    """CRD's strides (every stage starts at stride 2) and its ``preact`` features as fx nodes."""
    torch.manual_seed(0)
    model = create_model("shufflenetv1", num_classes=100)
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 100)
    points = ["layer1.0.cat", "layer1.3.add", "layer2.7.add", "layer3.3.add", "layer3", "fc:input"]
    assert stage_shapes(model, points, x) == {
        "layer1.0.cat": (240, 16, 16), "layer1.3.add": (240, 16, 16), "layer2.7.add": (480, 8, 8),
        "layer3.3.add": (960, 4, 4), "layer3": (960, 4, 4), "fc:input": (960,),
    }
    assert preceding_batchnorm(model, "layer2.7.add") is model.layer2[7].bn3
    assert preceding_batchnorm(model, "layer1.0.cat") is model.layer1[0].bn3
    assert model.layer1[0].conv1.groups == 1 and model.layer1[1].conv1.groups == 3  # 24-channel input: 1 group
    for groups, width in ((1, 576), (2, 800)):
        other = create_model("shufflenetv1", num_classes=10, in_channels=1, groups=groups)
        assert other.fc.in_features == width
        with torch.no_grad():
            assert other(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    with pytest.raises(FeatkdError, match="groups must be one of 1, 2, 3, got 8"):
        create_model("shufflenetv1", num_classes=10, groups=8)


def test_kda_resnets_and_their_pooled_feature() -> None:
    from featkd.methods.kda.distiller import default_point

    torch.manual_seed(0)
    model = create_model("resnet18_cifar", num_classes=100)
    assert default_point(model) == "fc:input"
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 100)
    assert stage_shapes(model, ["conv1", "layer1", "layer2", "layer3.1.add", "layer4.1.add", "fc:input"], x) == {
        "conv1": (64, 32, 32), "layer1": (64, 32, 32), "layer2": (128, 16, 16), "layer3.1.add": (256, 8, 8),
        "layer4.1.add": (512, 4, 4), "fc:input": (512,),
    }
    deep = create_model("resnet34_cifar", num_classes=100)
    assert [len(deep.get_submodule(f"layer{i}")) for i in (1, 2, 3, 4)] == [3, 4, 6, 3]
    assert default_point(deep) == "fc:input"


def test_mobilenetv2_cifar_is_crds_stride_2_stem_variant() -> None:
    """``mobile_half``: the stride-2 stem halves every stage of ``mobilenetv2_x0_5`` (same weights' shapes)."""
    model = create_model("mobilenetv2_cifar", num_classes=100)
    x = torch.randn(2, 3, 32, 32)
    shapes = stage_shapes(model, ["blocks.1", "blocks.2", "blocks.4", "blocks.6", "classifier:input"], x)
    assert shapes == {"blocks.1": (12, 16, 16), "blocks.2": (16, 8, 8), "blocks.4": (48, 4, 4),
                      "blocks.6": (160, 2, 2), "classifier:input": (1280,)}
    half = create_model("mobilenetv2_x0_5", num_classes=100)
    assert [v.shape for v in model.state_dict().values()] == [v.shape for v in half.state_dict().values()]


def test_mgd_resnet50_to_mobilenetv1_trains_on_the_pre_relu_points(tmp_path) -> None:
    """``featkd train``'s Python path (build_config -> the Trainer) for MGD's ImageNet pair on digits (8x8: the
    stages are 2/1/1/1 px in both networks): the four pre-ReLU pairs are captured and give a finite loss."""
    from featkd.config import build_config
    from featkd.engine.trainer import train

    cfg = build_config({
        "name": "mgd-r50-mbv1",
        "data": {"dataset": "digits", "train_subset": 32, "batch_size": 16},
        "teacher": {"model": "torchvision:resnet50"},
        "student": {"model": "mobilenetv1"},
        "method": {"name": "mgd", "reducer": "amp",
                   "pairs": [[s, t] for s, t in zip(MBV1_PRE_RELU, ("layer1.2.add", "layer2.3.add", "layer3.5.add",
                                                                    "layer4.2.add"), strict=True)]},
        "optim": {"lr": 0.01},
        "train": {"epochs": 1, "deterministic": True, "num_threads": 1, "progress": "off", "tensorboard": False},
    })
    result = train(cfg, tmp_path / "run", log=lambda _m: None)
    assert result.status == "finished"
    losses = [row["train_mgd"] for row in result.history if "train_mgd" in row]
    assert losses and all(torch.isfinite(torch.tensor(v)) and v > 0 for v in losses)


def test_a_capture_before_an_inplace_op_behind_an_identity_is_not_overwritten():
    """timm's BatchNormAct2d runs batch_norm -> drop (nn.Identity) -> act (ReLU6, in place): the pre-activation
    point `...bn2.batch_norm` keeps its negative values (the capture is cloned: the in-place op is found through
    the Identity that passes the same tensor on), and ReLU6 of it is the module's own output."""
    pytest.importorskip("timm")
    torch.manual_seed(0)
    model = create_model("timm:mobilenetv1_100", num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    points = ["blocks.1.1.bn2.batch_norm", "blocks.1.1.bn2"]
    with torch.no_grad():
        _, feats = CapturingModel(model, points, x)(x)
    pre, post = feats[points[0]], feats[points[1]]
    assert pre.min() < 0
    torch.testing.assert_close(torch.nn.functional.relu6(pre), post)
