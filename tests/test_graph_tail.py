"""GraphTail: the rest of a model from an injected tensor, on real models (no mocks)."""

from __future__ import annotations

import pytest
import torch

from featkd.capture.capture import CapturingModel
from featkd.capture.graph_tail import GraphTail
from featkd.capture.groups import find_groups
from featkd.errors import FeatkdError
from featkd.models import create_model

torchvision = pytest.importorskip("torchvision")


pytestmark = pytest.mark.usefixtures("one_thread")


def _check_every_group_output(model: torch.nn.Module, shape: tuple[int, int, int]) -> list[str]:
    """Injecting the model's own group-i output into the tail from it reproduces its logits exactly."""
    torch.manual_seed(0)
    model.eval()
    x = torch.randn(3, *shape)
    points = [g.output for g in find_groups(model, shape)]
    capture = CapturingModel(model, points, x[:2])
    with torch.no_grad():
        logits, feats = capture(x)
        assert torch.equal(logits, model(x))
        for p in points:
            out = GraphTail(model, p)(feats[p])
            assert torch.equal(out, logits), f"tail from {p} differs by {(out - logits).abs().max()}"
    return points


def test_cifar_resnet_tails_reproduce_the_logits():
    assert _check_every_group_output(create_model("resnet20", num_classes=10, in_channels=1), (1, 8, 8)) == [
        "layer1.2", "layer2.2", "layer3.2"]
    assert _check_every_group_output(create_model("resnet8", num_classes=10, in_channels=1), (1, 8, 8)) == [
        "layer1", "layer2", "layer3"]


def test_mobilenetv2_tails_reproduce_the_logits():
    model = create_model("mobilenetv2", num_classes=10, in_channels=3, width_mult=0.5)
    points = _check_every_group_output(model, (3, 16, 16))
    assert points == ["blocks.1.1", "blocks.2.2", "blocks.4.2", "blocks.6"]


def test_unmodified_torchvision_resnet18_tails_reproduce_the_logits():
    model = torchvision.models.resnet18(num_classes=10)
    points = _check_every_group_output(model, (3, 32, 32))
    assert points == ["layer1.1", "layer2.1", "layer3.1", "layer4.1"]


def test_tail_from_a_module_input_point_and_train_mode_gradients():
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10, in_channels=1).train()
    x = torch.randn(4, 1, 8, 8)
    capture = CapturingModel(model, ["layer1"], x[:2])
    _, feats = capture(x)
    feature = feats["layer1"].detach().requires_grad_(True)
    tail = GraphTail(model, "layer2:input")  # the input of group 2 is the output of group 1
    out = tail(feature)
    assert out.shape == (4, 10)
    out.sum().backward()
    assert feature.grad is not None and feature.grad.abs().sum() > 0
    assert model.fc.weight.grad is not None  # the tail runs the model's own parameters
    assert model.conv1.weight.grad is None  # ... and nothing upstream of the point


def test_tail_shares_parameters_and_does_not_modify_the_injected_tensor():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()  # in-place ReLUs and += in every block
    tail = GraphTail(model, "layer3.1")
    f = torch.randn(2, 256, 2, 2)
    before = f.clone()
    with torch.no_grad():
        out1 = tail(f)
        model.fc.bias.add_(1.0)
        out2 = tail(f)
    assert torch.equal(f, before)
    torch.testing.assert_close(out2, out1 + 1.0)
    assert {k for k, _ in tail.named_parameters()} == {"model." + k for k, _ in model.named_parameters()}


def test_points_inside_a_residual_block_are_rejected_with_the_skip_named():
    model = create_model("resnet8", num_classes=10, in_channels=1)
    with pytest.raises(FeatkdError, match=r"'layer1\.0\.bn2'.*not self-contained.*'layer1\.0\.add'"):
        GraphTail(model, "layer1.0.bn2")
    with pytest.raises(FeatkdError, match="no capture point 'layer9'"):
        GraphTail(model, "layer9")
