"""Models from the user's own code (``module:callable``) and the weight files a checkpoint may be.

A user module is written into a temporary folder and distilled through the CLI from there; the import
errors, the config folder on the search path, run folders, plain state_dicts and safetensors files are
checked on real models.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from featkd.config import load_config
from featkd.engine import checkpoint as ckpt
from featkd.errors import FeatkdError
from featkd.models import create_model

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

NETS = '''
import torch
from torch import nn


class Net(nn.Module):
    """A small CNN for 8x8 digits: body (conv-bn-relu x 2), pool, fc."""

    def __init__(self, num_classes, in_channels, width=8):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU())
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.body(x), 1), 1))


def build_student(width=4, **kwargs):  # num_classes / in_channels arrive through **kwargs
    return Net(width=width, **kwargs)


def three():
    return 3


def rgb_net(num_classes):  # ignores the data set's channels
    return Net(num_classes, 3)


RGB_ONLY = Net(10, 3)
'''


def write_module(folder: Path, name: str, text: str = NETS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.py"
    path.write_text(text)
    return path


def featkd(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "featkd", *args], capture_output=True, text=True, env=ENV,
                          cwd=cwd, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"featkd {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


TINY_TRAIN = {"epochs": 1, "num_threads": 1, "progress": "off", "tensorboard": False}


@pytest.mark.slow
def test_user_module_distilled_through_the_cli(tmp_path):
    """Train a teacher from the user's module, then distil into another of its models (FitNets on the
    module's own layer names) with the teacher's run folder as checkpoint; list its layers; evaluate."""
    write_module(tmp_path, "mynets")
    data = {"dataset": "digits", "train_subset": 200, "batch_size": 50}
    (tmp_path / "teacher.yaml").write_text(yaml.safe_dump({
        "name": "user-teacher", "data": data, "student": {"model": "mynets:Net", "options": {"width": 8}},
        "method": {"name": "none"}, "optim": {"lr": 0.1}, "train": TINY_TRAIN}))
    (tmp_path / "distil.yaml").write_text(yaml.safe_dump({
        "name": "user-fitnets", "data": data,
        "teacher": {"model": "mynets:Net", "options": {"width": 8}, "checkpoint": "teacher-run"},
        "student": {"model": "mynets:build_student", "options": {"width": 4}},
        "method": {"name": "fitnets", "pairs": [["body", "body"]], "weight": 1.0}, "optim": {"lr": 0.1},
        "train": TINY_TRAIN}))
    featkd("train", "teacher.yaml", "--out", "teacher-run", cwd=tmp_path)
    out = featkd("train", "distil.yaml", "--out", "student-run", cwd=tmp_path).stdout
    assert "student mynets:build_student | method fitnets" in out
    summary = json.loads((tmp_path / "student-run" / "summary.json").read_text())
    assert summary["status"] == "finished" and 0 <= summary["test_acc"] <= 100
    # the student alone, loadable without featkd
    sys.path.insert(0, str(tmp_path))
    try:
        import mynets  # noqa: F401  (the user's module, as the user would import it)

        student = sys.modules["mynets"].build_student(width=4, num_classes=10, in_channels=1)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("mynets", None)
    student.load_state_dict(torch.load(tmp_path / "student-run" / "student.pt", weights_only=True))
    rows = [line.split() for line in featkd("layers", "mynets:Net", "--input-shape", "1,8,8",
                                            "--option", "width=8", cwd=tmp_path).stdout.splitlines()]
    assert ["body", "module", "Sequential", "16x8x8"] in rows
    ev = json.loads(featkd("eval", "student-run", "--json", cwd=tmp_path).stdout)
    assert ev["model"] == "mynets:build_student" and ev["accuracy"] == pytest.approx(summary["test_acc"])
    # one-line errors, exit 2, nothing written
    bad = featkd("train", "distil.yaml", "--set", "student.model=mynets:Nett", "--out", "bad-run",
                 cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "has no attribute 'Nett' (did you mean 'Net'?)" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad-run").exists()
    bad = featkd("train", "distil.yaml", "--set", "student.model=mynets:rgb_net", "--set", "student.options={}",
                 "--out", "bad-run", cwd=tmp_path, check=False)  # a model for RGB input on 1-channel digits
    assert bad.returncode == 2 and not (tmp_path / "bad-run").exists()
    assert "student 'mynets:rgb_net' fails on an input of shape (2, 1, 8, 8) (RuntimeError: " in bad.stderr
    bad = featkd("train", "distil.yaml", "--set", "student.options.in_channels=3", cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "student.options.in_channels: set from the data set (digits)" in bad.stderr


def test_module_beside_the_config_is_found_from_another_working_directory(tmp_path, monkeypatch):
    write_module(tmp_path / "project", "featkd_test_beside_config")
    cfg_path = tmp_path / "project" / "exp.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "data": {"dataset": "digits"}, "method": {"name": "none"},
        "student": {"model": "featkd_test_beside_config:Net", "options": {"width": 4}}}))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    spec = "featkd_test_beside_config:Net"
    with pytest.raises(FeatkdError, match="no module named 'featkd_test_beside_config'"):
        create_model(spec, num_classes=10, in_channels=1)
    cfg = load_config(cfg_path)  # puts the config's folder on the search path
    model = create_model(cfg.student.model, num_classes=10, in_channels=1, **cfg.student.options)
    assert type(model).__name__ == "Net" and model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    assert str(tmp_path / "project") not in sys.path  # only while importing


@pytest.mark.parametrize("spec, match", [
    ("featkd_test_errors:Nope", r"'featkd_test_errors' \(.*featkd_test_errors.py\) has no attribute 'Nope'"),
    ("featkd_test_errors:Net.nope", r"'featkd_test_errors:Net' \(.*\) has no attribute 'nope'"),
    ("featkd_test_errors:three", r"returned int, not a torch\.nn\.Module"),
    ("featkd_test_no_such_module:Net", r"no module named 'featkd_test_no_such_module' \(looked in "),
    ("featkd_test_broken:Net", r"importing 'featkd_test_broken' failed: No module named 'not_installed_dep'"),
    ("featkd_test_syntax:Net", r"importing 'featkd_test_syntax' failed \(SyntaxError"),
    ("featkd_test_errors:RGB_ONLY.training", r"training is a bool, not a callable"),
    ("featkd_test_errors:", r"expected package\.module:callable"),
])
def test_import_errors_are_one_line(tmp_path, monkeypatch, spec, match):
    write_module(tmp_path, "featkd_test_errors")
    write_module(tmp_path, "featkd_test_broken", "import not_installed_dep\n")
    write_module(tmp_path, "featkd_test_syntax", "def broken(:\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FeatkdError, match=match) as info:
        create_model(spec, num_classes=10, in_channels=1)
    assert "\n" not in str(info.value)


def test_options_and_sizes_reach_the_callable(tmp_path, monkeypatch):
    write_module(tmp_path, "featkd_test_options")
    monkeypatch.chdir(tmp_path)
    model = create_model("featkd_test_options:build_student", num_classes=7, in_channels=3, width=2)
    assert model.fc.out_features == 7 and model.body[0].in_channels == 3 and model.body[0].out_channels == 2
    with pytest.raises(FeatkdError, match=r"calling it with \(depth=3, num_classes=10, in_channels=1\) failed "
                                          r"\(TypeError: .*'depth'"):
        create_model("featkd_test_options:Net", num_classes=10, in_channels=1, depth=3)


# ---- checkpoints ---------------------------------------------------------------------------------------


def test_weights_from_every_kind_of_file(tmp_path):
    source = create_model("resnet8", num_classes=10, in_channels=1)
    state = source.state_dict()
    x = torch.randn(2, 1, 8, 8)
    expected = source.eval()(x)
    torch.save(state, tmp_path / "plain.pt")
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "wrapped.pt")
    run = tmp_path / "run"
    run.mkdir()
    torch.save(state, run / "student.pt")
    files = [tmp_path / "plain.pt", tmp_path / "wrapped.pt", run, run / "student.pt"]
    try:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")
        files.append(tmp_path / "w.safetensors")
    except ImportError:
        pass
    for path in files:
        model = create_model("resnet8", num_classes=10, in_channels=1)
        ckpt.load_model_weights(model, path)
        assert torch.equal(model.eval()(x), expected), path
    with pytest.raises(FeatkdError, match=r"without student\.pt or last\.pt"):
        ckpt.load_model_weights(source, tmp_path)


def test_key_mismatch_names_the_first_keys(tmp_path):
    torch.save(create_model("resnet8", num_classes=10, in_channels=1).state_dict(), tmp_path / "r8.pt")
    deeper = create_model("resnet14", num_classes=10, in_channels=1)
    with pytest.raises(FeatkdError, match=r"r8\.pt' does not fit CifarResNet: 30 missing keys \(first layer1\.1\."):
        ckpt.load_model_weights(deeper, tmp_path / "r8.pt")
    state = create_model("resnet8", num_classes=10, in_channels=1).state_dict()
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "extra.pt")
    with pytest.raises(FeatkdError, match=r"1 unexpected key \(extra\.weight\)"):
        ckpt.load_model_weights(create_model("resnet8", num_classes=10, in_channels=1), tmp_path / "extra.pt")


def test_safetensors_missing_says_how_to_install(tmp_path, monkeypatch):
    (tmp_path / "w.safetensors").write_bytes(b"\0" * 16)
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(FeatkdError, match="needs the safetensors package: pip install safetensors"):
        ckpt.load_state_dict(tmp_path / "w.safetensors")
