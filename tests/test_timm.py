"""``timm:<name>`` models (optional timm package): built sized for the data, listed by ``featkd layers``,
assembled into a run; one-line errors. Skipped with the reason when timm is not installed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from featkd.cli import main
from featkd.config import load_config
from featkd.engine.build import build_run
from featkd.errors import FeatkdError
from featkd.models import create_model

timm = pytest.importorskip("timm", reason="timm is not installed (pip install timm)")
ROOT = Path(__file__).resolve().parents[1]


def test_timm_model_is_timms_with_data_sized_stem_and_head(one_thread):
    model = create_model("timm:resnet18", num_classes=7, in_channels=1)
    reference = timm.create_model("resnet18")
    assert list(model.state_dict()) == list(reference.state_dict())  # same names: nothing else changed
    assert model.conv1.in_channels == 1 and model.fc.out_features == 7
    assert model.eval()(torch.zeros(2, 1, 32, 32)).shape == (2, 7)
    vit = create_model("timm:vit_tiny_patch16_224", num_classes=10, in_channels=1, img_size=28, patch_size=4,
                       depth=2)
    assert vit.eval()(torch.zeros(2, 1, 28, 28)).shape == (2, 10) and len(vit.blocks) == 2


def test_timm_layers_and_a_run(capsys, one_thread):
    assert main(["layers", "timm:resnet18", "--input-shape", "1,32,32", "--filter", r"^layer4\.1\.add$|^fc$"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert rows == [["layer4.1.add", "node", "add", "512x1x1"], ["fc", "module", "Linear", "10"]]
    cfg = load_config(ROOT / "configs" / "digits-fitnets-resnet20-resnet8.yaml",
                      ["student.model=timm:resnet18", "method.pairs=[[layer1, layer1]]", "method.resize_teacher=true"])
    run = build_run(cfg, log=lambda _m: None)
    assert run.student_capture.shapes == {"layer1": (64, 2, 2)}
    assert type(run.student).__module__.startswith("timm.")


@pytest.mark.parametrize("name, options, match", [
    ("timm:resnet19", {}, r"unknown model 'timm:resnet19' \(did you mean 'resnet18'"),
    ("timm:resnet18", {"foo": 1}, r"model 'timm:resnet18': unknown option 'foo'"),
    ("timm:resnet18", {"pretrained": "yes"}, r"option 'pretrained' must be true or false"),
])
def test_timm_errors(name, options, match):
    with pytest.raises(FeatkdError, match=match):
        create_model(name, num_classes=10, in_channels=1, **options)


def test_timm_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(FeatkdError, match=r"timm is required for 'timm:\.\.\.' models: pip install timm"):
        create_model("timm:resnet18", num_classes=10, in_channels=1)
