"""Models: shapes, fx-traceability, no in-place ops, parameter counts, options, name schemes and errors,
torchvision adapter."""

from __future__ import annotations

import operator
import sys
from pathlib import Path

import pytest
import torch
from torch import fx, nn

import featkd.models
from featkd.errors import FeatkdError
from featkd.models import (
    DETECTION_MODELS,
    MODELS,
    PSPNET_MODELS,
    SEGMENTATION_MODELS,
    TV_DETECTION_MODELS,
    classifier_name,
    create_model,
    list_models,
    parse_model_name,
)
from featkd.models.registry import NOT_MODEL_FILES
from featkd.models.resnet_cifar import BasicBlock

EXPECTED_NAMES = {
    *(f"resnet{d}" for d in (8, 14, 20, 32, 44, 56, 110)),
    "resnet8x4",
    "resnet32x4",
    "resnet18_cifar",
    "resnet34_cifar",
    *(f"wrn_{d}_{w}" for d, w in ((16, 1), (16, 2), (16, 4), (28, 4), (28, 10), (40, 1), (40, 2), (40, 4))),
    "wrn",
    *(f"vgg{d}" for d in (8, 11, 13, 16, 19)),
    "mobilenetv2",
    "mobilenetv2_x0_5",
    "mobilenetv2_cifar",
    "mobilenetv1",
    "shufflenetv1",
    "shufflenetv2",
    "plaincnn",
}
FIXED_SIZE_NAMES = {"vit_tiny_p4"}  # take only inputs of the image_size they are built for (test_vit_tiny_contract)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: small models, one thread


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def inplace_nodes(graph: fx.Graph) -> list[str]:
    """Graph nodes that modify a tensor in place (``x += y``, ``relu_``, ``add_``...)."""
    bad = []
    for node in graph.nodes:
        if node.op == "call_method" and node.target.endswith("_") and not node.target.startswith("_"):
            bad.append(node.name)
        elif node.op == "call_function":
            name = getattr(node.target, "__name__", "")
            if node.target in (operator.iadd, operator.imul, operator.isub) or (
                name.endswith("_") and not name.startswith("_")
            ):
                bad.append(node.name)
    return bad


def assert_traces_like_eager(model: nn.Module, x: torch.Tensor) -> None:
    """The model traces with torch.fx, the graph has no in-place ops, and the traced model (eval) equals it."""
    traced = fx.symbolic_trace(model)
    assert inplace_nodes(traced.graph) == []
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))


def test_registered_names() -> None:
    assert set(list_models()) == (EXPECTED_NAMES | FIXED_SIZE_NAMES | set(SEGMENTATION_MODELS) | set(DETECTION_MODELS)
                                  | set(PSPNET_MODELS) | set(TV_DETECTION_MODELS))


def test_every_model_file_is_found_and_registers() -> None:
    """Model files are discovered (no hand-kept list): each module of the package but the helpers registers."""
    package = Path(featkd.models.__file__).parent
    files = {f"featkd.models.{p.stem}" for p in package.glob("*.py")
             if p.stem not in NOT_MODEL_FILES and not p.stem.startswith("_")}
    assert {MODELS.get(name).__module__ for name in list_models()} == files


@pytest.mark.parametrize(
    ("name", "parsed"),
    [
        ("resnet8", ("featkd", "resnet8")),
        ("torchvision:resnet18", ("torchvision", "resnet18")),
        ("timm:vit_tiny_patch16_224", ("timm", "vit_tiny_patch16_224")),
        ("nets:Student", ("user", "nets:Student")),
        ("torchvision.nets:build", ("user", "torchvision.nets:build")),  # a user module, not the scheme
    ],
)
def test_parse_model_name(name: str, parsed: tuple[str, str]) -> None:
    assert parse_model_name(name) == parsed


def test_unknown_name_proposes_the_torchvision_model_first() -> None:
    """`resnet18` is torchvision's (and timm's): the scheme is what is missing, not a featkd near-miss."""
    pytest.importorskip("torchvision")
    with pytest.raises(FeatkdError, match=r"^unknown model 'resnet18' \(did you mean 'torchvision:resnet18', ") as info:
        create_model("resnet18", num_classes=10)
    assert "'resnet8'" in str(info.value) and "\n" not in str(info.value)


def test_unknown_name_without_torchvision_or_timm(monkeypatch: pytest.MonkeyPatch) -> None:
    for module in ("torchvision", "torchvision.models", "timm"):
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(FeatkdError, match=r"^unknown model 'resnet18' \(did you mean 'resnet8', "):
        create_model("resnet18", num_classes=10)


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_model_contract(name: str) -> None:
    torch.manual_seed(0)
    gray = create_model(name, num_classes=10, in_channels=1)
    rgb = create_model(name, num_classes=100, in_channels=3)
    with torch.no_grad():  # train mode: BatchNorm must cope with batch 2 at 1x1 maps
        assert gray(torch.randn(2, 1, 8, 8)).shape == (2, 10)
        assert gray(torch.randn(2, 1, 28, 28)).shape == (2, 10)
        assert rgb(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    for model, num_classes in ((gray, 10), (rgb, 100)):
        clf = model.get_submodule(classifier_name(model))
        assert isinstance(clf, nn.Linear)
        assert clf.out_features == num_classes
        assert list(model.named_modules())[-1][1] is clf
    assert [n for n, m in rgb.named_modules() if getattr(m, "inplace", False)] == []
    assert_traces_like_eager(gray, torch.randn(2, 1, 28, 28))


# Published sizes with CIFAR-100 heads (CRD, Tian et al. 2020, table 1/2 and mdistiller; confident for all but
# shufflenetv2, which we recall as 1.35-1.36M). Our measurements: resnet56 861,620; resnet110 1,736,564;
# resnet8x4 1,233,540; resnet32x4 7,433,860; wrn_40_2 2,255,156; wrn_16_2 703,284; vgg13 9,462,180;
# vgg8 3,965,028; mobilenetv2_x0_5 812,836; shufflenetv2 1,355,528 (exact counts of CRD's definitions:
# tests/test_paper_models.py).
@pytest.mark.parametrize(
    ("name", "published"),
    [
        ("resnet56", 0.86e6),
        ("resnet110", 1.74e6),
        ("resnet8x4", 1.23e6),
        ("resnet32x4", 7.43e6),
        ("wrn_40_2", 2.26e6),
        ("wrn_16_2", 0.70e6),
        ("vgg13", 9.46e6),
        ("vgg8", 3.96e6),
        ("mobilenetv2_x0_5", 0.81e6),
        ("shufflenetv2", 1.36e6),
    ],
)
def test_parameter_counts_cifar100(name: str, published: float) -> None:
    assert n_params(create_model(name, num_classes=100)) == pytest.approx(published, rel=0.01)


def test_resnet20_cifar10_parameter_count() -> None:
    # With 1x1-conv + BN projection shortcuts (option B, as in CRD): 272,474. He et al.'s "0.27M" is option A
    # (parameter-free zero-padding shortcuts), 269,722; the two projections add 2 * (conv + BN) = 2,752.
    assert n_params(create_model("resnet20", num_classes=10)) == 272_474


def test_resnet_blocks_have_separate_residual_add_before_relu() -> None:
    model = create_model("resnet20", num_classes=10)
    graph = fx.symbolic_trace(model).graph
    blocks = [name for name, m in model.named_modules() if isinstance(m, BasicBlock)]
    assert blocks == [f"layer{i}.{j}" for i in (1, 2, 3) for j in range(3)]
    for block in blocks:
        adds = [
            node
            for node in graph.nodes
            if node.op == "call_function"
            and node.target in (operator.add, torch.add)
            and next(reversed(node.meta["nn_module_stack"])) == block
        ]
        assert len(adds) == 1, block
        (add,) = adds
        # the sum is taken of the last BN of the residual branch and feeds the block's final ReLU only
        assert next(a.target for a in add.args if isinstance(a, fx.Node)) == f"{block}.bn2"
        assert [(u.op, u.target) for u in add.users] == [("call_module", f"{block}.relu2")]
    # torchvision's feature extraction names these nodes 'layer1.0.add', ...
    feature_extraction = pytest.importorskip("torchvision.models.feature_extraction")
    train_nodes, _ = feature_extraction.get_graph_node_names(model)
    assert {f"{b}.add" for b in blocks} <= set(train_nodes)


@pytest.mark.parametrize(("name", "last_bn"), [("resnet8x4", "bn2"), ("mobilenetv2_x0_5", "conv.7")])
def test_residual_sum_takes_the_branch_last_bn_first(name: str, last_bn: str) -> None:
    # MGD walks back from a sum to the residual branch's last BN, searching the first argument first.
    graph = fx.symbolic_trace(create_model(name, num_classes=10)).graph
    adds = [n for n in graph.nodes if n.op == "call_function" and n.target is operator.add]
    assert adds
    for add in adds:
        block = next(reversed(add.meta["nn_module_stack"]))
        assert (add.args[0].op, add.args[0].target) == ("call_module", f"{block}.{last_bn}")


@pytest.mark.parametrize(
    ("name", "stages", "sizes"),
    [
        ("resnet20", ["layer1", "layer2", "layer3"], [28, 14, 7]),
        ("wrn_16_1", ["layer1", "layer2", "layer3"], [28, 14, 7]),
        ("shufflenetv2", ["layer1", "layer2", "layer3"], [28, 14, 7]),
        ("mobilenetv2_x0_5", [f"blocks.{i}" for i in range(7)], [28, 28, 14, 7, 7, 4, 4]),
        ("vgg8", [f"block{i}" for i in range(5)], [28, 14, 7, 4, 4]),
        ("plaincnn", ["block1", "block2"], [14, 7]),
    ],
)
def test_documented_stage_sizes_on_28x28(name: str, stages: list[str], sizes: list[int]) -> None:
    model = create_model(name, num_classes=10, in_channels=1).eval()
    seen: dict[str, int] = {}
    for stage in stages:
        model.get_submodule(stage).register_forward_hook(
            lambda _m, _i, out, stage=stage: seen.__setitem__(stage, out.shape[-1])
        )
    with torch.no_grad():
        model(torch.randn(1, 1, 28, 28))
    assert [seen[s] for s in stages] == sizes


def test_vgg_pools_never_go_below_1x1() -> None:
    model = create_model("vgg8", num_classes=10, in_channels=1)
    with torch.no_grad():
        assert model(torch.randn(2, 1, 2, 2)).shape == (2, 10)
        assert model(torch.randn(2, 1, 1, 1)).shape == (2, 10)
    assert isinstance(model.pool3, nn.Identity)
    big = create_model("vgg8", num_classes=10, in_channels=1, input_size=64)
    assert isinstance(big.pool3, nn.MaxPool2d)
    with torch.no_grad():
        assert big(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_options() -> None:
    small = create_model("resnet8", num_classes=10, in_channels=1, widths=[8, 16, 32])
    assert small.conv1.out_channels == 8
    assert small.layer3[0].conv2.out_channels == 32
    assert small.fc.in_features == 32
    assert create_model("resnet8x4", num_classes=10).conv1.out_channels == 32
    assert create_model("resnet8x4", num_classes=10, widths=[16, 32, 64]).conv1.out_channels == 16
    assert create_model("resnet8", num_classes=10, stem_width=4).conv1.out_channels == 4

    assert n_params(create_model("wrn", num_classes=10, depth=16, widen_factor=1)) == n_params(
        create_model("wrn_16_1", num_classes=10)
    )
    assert create_model("wrn_16_1", num_classes=10, dropout=0.3).layer1[0].dropout.p == 0.3
    assert n_params(create_model("mobilenetv2", num_classes=10, width_mult=0.5)) == n_params(
        create_model("mobilenetv2_x0_5", num_classes=10)
    )
    assert create_model("shufflenetv2", num_classes=10, net_size=0.5).fc.in_features == 1024
    assert create_model("vgg8", num_classes=10, batchnorm=False).block0[0].bias is not None

    plain = create_model("plaincnn", num_classes=10)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    with_bn = create_model("plaincnn", num_classes=10, batchnorm=True)
    assert any(isinstance(m, nn.BatchNorm2d) for m in with_bn.modules())
    deep = create_model("plaincnn", num_classes=10, in_channels=1, widths=[4, 8, 16, 32], pool_size=2)
    with torch.no_grad():
        assert deep(torch.randn(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        (
            "resnet8",
            {"widht": [8]},
            r"^model 'resnet8': unknown option 'widht' \(allowed: widths, stem_width\)$",
        ),
        ("resnet8", {"widths": "abc"}, r"option 'widths' must be list\[int\] \| None, got 'abc'"),
        ("resnet8", {"widths": [8, 16]}, r"model 'resnet8': widths must be 3 positive"),
        ("wrn", {"depth": True}, r"option 'depth' must be int"),
        ("wrn", {"depth": 17}, r"model 'wrn': depth must be 6n\+4"),
        ("shufflenetv2", {"net_size": 3}, r"net_size must be one of 0.5, 1, 1.5, 2"),
        ("mobilenetv2_x0_5", {"width_mult": 1.0}, r"unknown option 'width_mult' \(allowed: none\)"),
        ("resnet8x", {}, r"unknown model 'resnet8x' \(did you mean 'resnet8"),
    ],
)
def test_user_errors(name: str, kwargs: dict, match: str) -> None:
    with pytest.raises(FeatkdError, match=match) as info:
        create_model(name, num_classes=10, **kwargs)
    assert "\n" not in str(info.value)


def test_bad_num_classes() -> None:
    with pytest.raises(FeatkdError, match="num_classes must be a positive integer"):
        create_model("resnet8", num_classes=0)


def test_vit_tiny_contract() -> None:
    """torchvision's VisionTransformer itself with 4x4 patches: the CNNs' contract at its own image_size."""
    vt = pytest.importorskip("torchvision.models.vision_transformer")
    torch.manual_seed(0)
    gray = create_model("vit_tiny_p4", num_classes=10, in_channels=1)
    rgb = create_model("vit_tiny_p4", num_classes=100, in_channels=3, image_size=32, num_layers=2)
    assert type(gray) is vt.VisionTransformer and gray.conv_proj.in_channels == 1
    assert gray.conv_proj.kernel_size == gray.conv_proj.stride == (4, 4) and len(gray.encoder.layers) == 4
    reference = vt.VisionTransformer(image_size=28, patch_size=4, num_layers=4, num_heads=4, hidden_dim=64,
                                     mlp_dim=128, num_classes=10).state_dict()
    assert {k: v.shape[:1] for k, v in gray.state_dict().items()} == {k: v.shape[:1] for k, v in reference.items()}
    with torch.no_grad():
        assert gray(torch.randn(2, 1, 28, 28)).shape == (2, 10)
        assert rgb(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    for model, num_classes in ((gray, 10), (rgb, 100)):
        assert classifier_name(model) == "heads.head" and model.heads.head.out_features == num_classes
        assert list(model.named_modules())[-1][1] is model.heads.head
    assert [n for n, m in gray.named_modules() if getattr(m, "inplace", False)] == []
    assert_traces_like_eager(gray, torch.randn(2, 1, 28, 28))
    with pytest.raises(FeatkdError, match=r"model 'vit_tiny_p4': image_size must be a positive multiple of the "
                                          r"patch size 4, got 30"):
        create_model("vit_tiny_p4", num_classes=10, image_size=30)
    with pytest.raises(FeatkdError, match=r"hidden_dim divisible by num_heads, got 4, 66, 4"):
        create_model("vit_tiny_p4", num_classes=10, hidden_dim=66)


# --- torchvision adapter ---


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_gray_input(name: str) -> None:
    tvm = pytest.importorskip("torchvision.models")
    model = create_model(f"torchvision:{name}", num_classes=10, in_channels=1)
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    clf = model.get_submodule(classifier_name(model))
    assert isinstance(clf, nn.Linear)
    assert clf.out_features == 10
    reference = tvm.get_model(name, num_classes=10).state_dict()
    ours = model.state_dict()
    assert list(ours) == list(reference)
    first_conv = next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    changed = {k for k in ours if ours[k].shape != reference[k].shape}
    assert changed == {f"{first_conv}.weight"}
    assert ours[f"{first_conv}.weight"].shape[1] == 1


def test_torchvision_rgb_is_unmodified() -> None:
    tvm = pytest.importorskip("torchvision.models")
    model = create_model("torchvision:resnet18", num_classes=10)
    reference = tvm.resnet18(num_classes=10)
    assert type(model) is type(reference)
    assert [(k, v.shape) for k, v in model.state_dict().items()] == [
        (k, v.shape) for k, v in reference.state_dict().items()
    ]


def test_torchvision_pretrained_weights_are_adapted(monkeypatch: pytest.MonkeyPatch) -> None:
    tvm = pytest.importorskip("torchvision.models")
    pretrained: dict[str, torch.Tensor] = {}

    def fake_get_model(name: str, **kwargs: object) -> nn.Module:  # no download: random "pretrained" weights
        assert kwargs.pop("weights") == "DEFAULT"
        assert "num_classes" not in kwargs
        model = tvm.resnet18()
        pretrained.update({k: v.clone() for k, v in model.state_dict().items()})
        return model

    monkeypatch.setattr(tvm, "get_model", fake_get_model)
    model = create_model("torchvision:resnet18", num_classes=10, in_channels=2, weights="DEFAULT")
    state = model.state_dict()
    assert model.fc.out_features == 10
    assert model.fc.in_features == 512
    expected = pretrained["conv1.weight"].mean(1, keepdim=True).repeat(1, 2, 1, 1) * 1.5
    torch.testing.assert_close(state["conv1.weight"], expected)
    torch.testing.assert_close(state["layer1.0.conv1.weight"], pretrained["layer1.0.conv1.weight"])
    # a grey image copied to both channels gives the activations of the RGB kernel on the grey image
    gray = torch.randn(1, 1, 8, 8)
    rgb_out = nn.functional.conv2d(gray.expand(1, 3, 8, 8), pretrained["conv1.weight"], stride=2, padding=3)
    torch.testing.assert_close(model.conv1(gray.expand(1, 2, 8, 8)), rgb_out)


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("torchvision:resnet19", {}, r"unknown model 'torchvision:resnet19' \(did you mean 'resnet18'"),
        ("torchvision:resnet18", {"widht": 3}, r"model 'torchvision:resnet18': unknown option 'widht'"),
        ("torchvision:mobilenet_v2", {"width_mult": "x"}, r"invalid options \{'width_mult': 'x'\}"),
        ("torchvision:resnet18", {"weights": 3}, r"option 'weights' must be a string, got 3"),
        ("torchvision:resnet18", {"pretrained": True},
         r"unknown option 'pretrained': torchvision models take weights=DEFAULT \(or a weights enum name"),
        ("torchvision:fcn_resnet50", {"pretrained_backbone": True}, r"take weights_backbone=DEFAULT"),
    ],
)
def test_torchvision_errors(name: str, kwargs: dict, match: str) -> None:
    pytest.importorskip("torchvision")
    with pytest.raises(FeatkdError, match=match) as info:
        create_model(name, num_classes=10, **kwargs)
    assert "\n" not in str(info.value)


def test_torchvision_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.models", None)
    with pytest.raises(FeatkdError, match=r"torchvision is required .*pip install torchvision"):
        create_model("torchvision:resnet18", num_classes=10)
