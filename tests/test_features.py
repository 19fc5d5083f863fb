"""Feature capture on featkd's own models and on unmodified torchvision models (real forward passes)."""

from __future__ import annotations

import copy
import weakref

import pytest
import torch
from torch import nn

from featkd.capture.capture import CapturingModel
from featkd.capture.listing import list_capture_points
from featkd.capture.trace import preceding_batchnorm, trace
from featkd.errors import FeatkdError
from featkd.models import create_model

torchvision = pytest.importorskip("torchvision")


def test_cifar_resnet_stage_outputs_and_pre_relu_nodes():
    model = create_model("resnet20", num_classes=10, in_channels=1).eval()
    x = torch.randn(4, 1, 28, 28)
    points = ["layer1", "layer2", "layer3", "layer3.2.add", "fc:input"]
    cap = CapturingModel(model, points, x[:2])
    assert cap.shapes == {"layer1": (16, 28, 28), "layer2": (32, 14, 14), "layer3": (64, 7, 7),
                          "layer3.2.add": (64, 7, 7), "fc:input": (64,)}
    logits, feats = cap(x)
    torch.testing.assert_close(logits, model(x))  # capturing does not change the output
    pre, post = feats["layer3.2.add"], feats["layer3"]
    assert (pre < 0).any(), "the residual sum before the ReLU has negative entries"
    torch.testing.assert_close(torch.relu(pre), post)


def test_torchvision_resnet18_pre_relu_node_despite_inplace_relu():
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    cap = CapturingModel(model, ["layer1.0.add", "layer1.0", "layer4", "fc:input"], x)
    assert cap.shapes["layer1.0.add"] == (64, 8, 8)
    assert cap.shapes["layer4"] == (512, 1, 1)
    logits, feats = cap(x)
    # torchvision's BasicBlock applies nn.ReLU(inplace=True) to the sum: the capture must be a copy
    assert (feats["layer1.0.add"] < 0).any()
    torch.testing.assert_close(torch.relu(feats["layer1.0.add"]), feats["layer1.0"])
    torch.testing.assert_close(logits, model(x))
    # the original model is untouched: same state_dict keys, still an ordinary ResNet
    assert set(model.state_dict()) == set(torchvision.models.resnet18(num_classes=10).state_dict())


def test_hook_capture_clones_outputs_modified_in_place():
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    cap = CapturingModel(model, ["layer1.0.bn2", "bn1"], x)  # both feed nn.ReLU(inplace=True)
    _, feats = cap(x)
    assert (feats["layer1.0.bn2"] < 0).any() and (feats["bn1"] < 0).any()


def test_torchvision_mobilenet_v2_nodes():
    model = torchvision.models.mobilenet_v2(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    names = [p.name for p in list_capture_points(model, (3, 32, 32))]
    assert "features.3.add" in names  # the residual sum of an inverted-residual block
    cap = CapturingModel(model, ["features.3.add", "features.6", "classifier.1:input"], x)
    assert cap.shapes == {"features.3.add": (24, 8, 8), "features.6": (32, 4, 4), "classifier.1:input": (1280,)}


def test_gradients_flow_through_captures():
    model = create_model("resnet8", num_classes=10, in_channels=1)
    x = torch.randn(4, 1, 8, 8)
    cap = CapturingModel(model, ["layer2.0.add"], x[:2])
    _, feats = cap(x)
    feats["layer2.0.add"].pow(2).mean().backward()
    assert model.conv1.weight.grad is not None and model.conv1.weight.grad.abs().sum() > 0
    assert model.fc.weight.grad is None  # the classifier is after the capture point


def test_unknown_point_suggests_near_names():
    model = create_model("resnet8", num_classes=10, in_channels=1)
    with pytest.raises(FeatkdError, match=r"no capture point 'layer1.0.ad'.*did you mean 'layer1.0.add'"):
        CapturingModel(model, ["layer1.0.ad"], torch.zeros(2, 1, 8, 8))
    with pytest.raises(FeatkdError, match=r"'layr2'.*did you mean 'layer2'"):
        CapturingModel(model, ["layr2"], torch.zeros(2, 1, 8, 8))


def test_listing_names_and_shapes():
    model = create_model("resnet8", num_classes=10, in_channels=1)
    points = {p.name: p for p in list_capture_points(model, (1, 28, 28))}
    assert points["layer1"].shape == (16, 28, 28) and points["layer1"].kind == "module"
    assert points["layer1.0.add"].kind == "node" and points["layer1.0.add"].op == "add"
    assert points["fc"].shape == (10,)
    with_inputs = {p.name for p in list_capture_points(model, (1, 28, 28), include_inputs=True)}
    assert "fc:input" in with_inputs and "fc:input" not in points


def test_untraceable_model_still_captures_modules():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            h = self.conv(x)
            if h.sum() > 0:  # data-dependent control flow: not fx-traceable
                h = h * 2
            return self.fc(h.mean((2, 3)))

    model = Branchy()
    with pytest.raises(FeatkdError, match=r"not torch\.fx-traceable"):
        trace(model)
    cap = CapturingModel(model, ["conv", "fc:input"], torch.randn(2, 1, 5, 5))
    assert cap.shapes == {"conv": (4, 5, 5), "fc:input": (4,)}
    assert {p.name for p in list_capture_points(model, (1, 5, 5))} == {"conv", "fc"}


def test_preceding_batchnorm_is_the_residual_branch_bn():
    model = create_model("resnet20", num_classes=10, in_channels=1)
    assert preceding_batchnorm(model, "layer2.0.add") is model.layer2[0].bn2
    tv = torchvision.models.resnet18(num_classes=10)
    assert preceding_batchnorm(tv, "layer2.0.add") is tv.layer2[0].bn2
    assert preceding_batchnorm(tv, "layer1.0.bn1") is tv.layer1[0].bn1
    assert preceding_batchnorm(tv, "conv1") is None


def _installed_hooks(model: nn.Module) -> dict[str, int]:
    """``{module name: forward (pre-)hooks installed}`` for every sub-module that has any."""
    return {name: len(m._forward_hooks) + len(m._forward_pre_hooks) for name, m in model.named_modules()
            if m._forward_hooks or m._forward_pre_hooks}


def test_hook_captures_are_installed_only_while_the_capture_runs():
    model = create_model("resnet8", num_classes=10, in_channels=1).eval()
    x = torch.randn(2, 1, 8, 8)
    cap = CapturingModel(model, ["layer1", "layer2", "fc:input"], x)
    assert not cap.traced_whole and _installed_hooks(model) == {}
    _, feats = cap(x)
    assert set(feats) == {"layer1", "layer2", "fc:input"}
    assert _installed_hooks(model) == {}
    assert _installed_hooks(copy.deepcopy(model)) == {}  # a copy (DFA's search student) fires no capture
    # a plain evaluation call stores nothing: its batch's activations die with the call
    refs = []
    handle = model.layer2.register_forward_hook(lambda _m, _a, out: refs.append(weakref.ref(out)))
    with torch.no_grad():
        model(x)
    handle.remove()
    assert refs and refs[0]() is None
    _, again = cap(x)  # and the capture still works afterwards
    torch.testing.assert_close(again["layer2"], feats["layer2"])


class _TrainBranch(nn.Module):
    """A forward with a ``self.training`` branch, which fx bakes into the graph it traces."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        if self.training:
            y = y * 100
        return torch.relu(y) + 0.01


class _Untraceable(nn.Module):
    """Data-dependent control flow around a traceable sub-module: fx points come from the sub-module."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = _TrainBranch()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        if y.sum() > -1:
            y = y + 1
        return y


@pytest.mark.parametrize("wrapped", [False, True], ids=["whole-model-trace", "traced-submodule"])
def test_fx_captures_follow_the_train_and_eval_branches(wrapped):
    torch.manual_seed(0)
    model = (_Untraceable() if wrapped else _TrainBranch()).train()
    prefix = "inner." if wrapped else ""
    x = torch.randn(2, 4)
    cap = CapturingModel(model, [f"{prefix}relu"], x)  # built (and traced) in train mode
    assert cap.traced_whole is not wrapped
    inner = model.inner if wrapped else model
    for training in (False, True, False):
        model.train(training)
        out, feats = cap(x)
        with torch.no_grad():
            expected = torch.relu(inner.fc(x) * (100 if training else 1))
            torch.testing.assert_close(out, model(x))
        torch.testing.assert_close(feats[f"{prefix}relu"], expected)


@pytest.mark.parametrize("wrapped", [False, True], ids=["whole-model-trace", "traced-submodule"])
def test_a_point_in_only_one_modes_graph_is_an_error(wrapped):
    model, point = (_Untraceable(), "inner.mul") if wrapped else (_TrainBranch(), "mul")
    name = type(model).__name__
    with pytest.raises(FeatkdError, match=rf"^capture point '{point}' of {name} is in its train-mode graph but not "
                                          r"in its eval-mode one"):
        CapturingModel(model.train(), [point], torch.randn(2, 4))
