"""Layer groups found from a model's graph and shapes (featkd.capture.groups) and ``featkd layers --groups``."""

from __future__ import annotations

import pytest
import torch
import torch.fx
from torch import nn

from featkd.capture.groups import LayerGroup, cut_nodes, find_groups, groups_from_points, match_groups
from featkd.cli import main
from featkd.errors import ConfigError
from featkd.models import create_model

torchvision = pytest.importorskip("torchvision")


pytestmark = pytest.mark.usefixtures("one_thread")


class Skip(nn.Module):
    """x -> a=relu(x) -> b=a*2 -> c=b+a (skip over b) -> d=c-1: cut nodes x, a, c, d."""

    def forward(self, x):
        a = torch.relu(x)
        b = a * 2
        c = b + a
        return c - 1


def test_cut_nodes_by_hand():
    gm = torch.fx.symbolic_trace(Skip())
    cuts = {n.name for n in cut_nodes(gm.graph)}
    assert cuts == {"x", "relu", "add", "sub"}  # 'mul' is jumped over by relu -> add


def test_cifar_resnet_groups_are_the_stage_blocks():
    groups = find_groups(create_model("resnet20", num_classes=10, in_channels=1), (1, 8, 8))
    assert [g.candidates for g in groups] == [
        ("layer1.0", "layer1.1", "layer1.2"), ("layer2.0", "layer2.1", "layer2.2"),
        ("layer3.0", "layer3.1", "layer3.2")]
    assert [g.shape for g in groups] == [(16, 8, 8), (32, 4, 4), (64, 2, 2)]
    student = find_groups(create_model("resnet8", num_classes=10, in_channels=1), (1, 8, 8))
    assert [g.output for g in student] == ["layer1", "layer2", "layer3"]  # one block per stage


def test_mobilenetv2_groups_keep_candidates_of_the_output_shape():
    groups = find_groups(create_model("mobilenetv2", num_classes=10, width_mult=0.5), (3, 16, 16))
    assert [g.spatial for g in groups] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    # blocks.3.* (32 ch) and blocks.4.* (48 ch) share 4x4: only the output's shape is aggregated
    g = groups[2]
    assert g.blocks == ("blocks.3.0", "blocks.3.1", "blocks.3.2", "blocks.3.3", "blocks.4.0", "blocks.4.1",
                        "blocks.4.2")
    assert g.candidates == ("blocks.4.0", "blocks.4.1", "blocks.4.2") and g.shape == (48, 4, 4)


def test_unmodified_torchvision_resnet18_groups():
    groups = find_groups(torchvision.models.resnet18(num_classes=10), (3, 64, 64))
    assert [g.candidates for g in groups] == [("layer1.0", "layer1.1"), ("layer2.0", "layer2.1"),
                                              ("layer3.0", "layer3.1"), ("layer4.0", "layer4.1")]


def test_explicit_groups_are_checked_for_one_shape():
    model = create_model("resnet20", num_classes=10, in_channels=1)
    groups = groups_from_points(model, (1, 8, 8), [["layer1.1", "layer1.2"], ["layer3.2"]])
    assert groups[0].candidates == ("layer1.1", "layer1.2") and groups[1].shape == (64, 2, 2)
    with pytest.raises(ConfigError, match=r"groups\[0\]: 'layer1\.2' has shape \(16, 8, 8\).*'layer2\.0'"):
        groups_from_points(model, (1, 8, 8), [["layer1.2", "layer2.0"]])


def _g(i: int, size: int) -> LayerGroup:
    return LayerGroup(i, (f"b{i}",), (f"b{i}",), (8, size, size))


def test_match_groups_in_order_or_by_spatial_size():
    t = [_g(0, 32), _g(1, 16), _g(2, 8)]
    assert match_groups(t, [_g(0, 32), _g(1, 16), _g(2, 8)]) == list(zip(t, [_g(0, 32), _g(1, 16), _g(2, 8)],
                                                                         strict=True))
    s = [_g(0, 32), _g(1, 16), _g(2, 8), _g(3, 4)]  # a student with one more stage
    assert [(a.spatial, b.spatial) for a, b in match_groups(t, s)] == [((32, 32),) * 2, ((16, 16),) * 2,
                                                                       ((8, 8),) * 2]
    with pytest.raises(ConfigError, match="share no spatial size"):
        match_groups(t, [_g(0, 5), _g(1, 3)])


def test_layers_groups_command(capsys):
    assert main(["layers", "resnet20", "--input-shape", "1,8,8", "--groups", "--student", "resnet8"]) == 0
    out = capsys.readouterr().out
    assert "teacher resnet20: 3 group(s)" in out
    assert "candidates: layer2.0 layer2.1 layer2.2" in out
    assert "layer3 64x2x2 <- layer3.0, layer3.1, layer3.2 64x2x2" in out
    assert main(["layers", "resnet8", "--input-shape", "1,8,8", "--student", "resnet8"]) == 2
    assert "--student is only used with --groups" in capsys.readouterr().err
