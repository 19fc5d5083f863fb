"""``featkd export``: the student alone as TorchScript / ONNX / safetensors, loaded back and compared.

One real run (digits, ResNet-8, one epoch) is trained through the CLI and exported in every format;
TorchScript always, ONNX where onnxruntime imports, safetensors where it is installed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from featkd.apps.export import export_student
from featkd.engine import checkpoint as ckpt
from featkd.models import create_model

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def featkd(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "featkd", *args], capture_output=True, text=True, env=ENV,
                          cwd=ROOT, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"featkd {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "run"
    featkd("train", "configs/digits-none-resnet8.yaml", "--epochs", "1", "--set", "train.progress=off",
           "--set", "train.tensorboard=false", "--set", "train.num_threads=1", "--out", str(out))
    return out


def student_of(run: Path) -> nn.Module:
    model = create_model("resnet8", num_classes=10, in_channels=1)
    model.load_state_dict(torch.load(run / "student.pt", weights_only=True))
    return model.eval()


def difference(stdout: str) -> float:
    match = re.search(r"on 64 test images: max abs difference (\S+) \(output 64x10\)", stdout)
    assert match, stdout
    return float(match[1])


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_round_trip(run_dir, one_thread):
    out = featkd("export", str(run_dir), "--format", "torchscript").stdout
    assert f"wrote {run_dir / 'student.torchscript'}" in out and difference(out) <= 1e-5
    loaded = torch.jit.load(str(run_dir / "student.torchscript"))
    x = torch.randn(5, 1, 8, 8)  # another batch size than the trace's
    with torch.no_grad():
        assert torch.allclose(loaded(x), student_of(run_dir)(x), atol=1e-5)


def test_onnx_round_trip_with_onnxruntime(run_dir, tmp_path, one_thread):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install onnxruntime)")
    target = tmp_path / "s.onnx"
    out = featkd("export", str(run_dir), "--format", "onnx", "--out", str(target)).stdout
    assert "verified with onnxruntime" in out and difference(out) <= 1e-4
    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 1, 8, 8)
    (got,) = session.run(["output"], {"input": x.numpy()})
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(got), student_of(run_dir)(x), atol=1e-4)
    strict = featkd("export", str(run_dir), "--format", "onnx", "--out", str(target), "--atol", "0", check=False)
    if difference(strict.stdout) > 0:  # float kernels differ in the last bits: the check must say so
        assert strict.returncode == 2 and "is above --atol 0" in strict.stderr


def test_onnx_without_onnxruntime_says_so(tmp_path, monkeypatch, one_thread):
    pytest.importorskip("onnx", reason="the TorchScript-based ONNX exporter needs onnx (pip install onnx)")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    model = create_model("resnet8", num_classes=10, in_channels=1)
    result = export_student(model, torch.randn(4, 1, 8, 8), "onnx", tmp_path / "m.onnx")
    assert result.max_abs_diff is None and (tmp_path / "m.onnx").stat().st_size > 0
    assert result.describe(4) == ("not compared: onnxruntime is not installed (pip install onnxruntime); "
                                  "the file passes onnx.checker")


def test_safetensors_export_is_a_checkpoint_again(run_dir, one_thread):
    pytest.importorskip("safetensors", reason="safetensors is not installed (pip install safetensors)")
    out = featkd("export", str(run_dir), "--format", "safetensors").stdout
    assert difference(out) == 0.0
    path = run_dir / "student.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert f.metadata()["featkd_model"] == "resnet8" and f.metadata()["featkd_input_shape"] == "1x8x8"
    # the exported file is a checkpoint featkd reads: same test accuracy as the run
    ev = json.loads(featkd("eval", str(path), "--config", str(run_dir / "config.yaml"), "--json").stdout)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert ev["accuracy"] == pytest.approx(summary["test_acc"])
    model = create_model("resnet8", num_classes=10, in_channels=1)
    ckpt.load_model_weights(model, path)


class TwoHeads(nn.Module):
    """A segmenter-like model returning a dict, as torchvision segmenters do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.out = nn.Conv2d(4, 3, 1)
        self.aux = nn.Conv2d(4, 3, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.relu(self.conv(x))
        return {"out": self.out(h), "aux": self.aux(h)}


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_dict_outputs_are_compared_entry_by_entry(tmp_path, fmt, one_thread):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install onnxruntime)")
    result = export_student(TwoHeads(), torch.randn(4, 1, 6, 6), fmt, tmp_path / f"m.{fmt}")
    assert result.outputs == {"out": (4, 3, 6, 6), "aux": (4, 3, 6, 6)}
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-5


def test_bad_input_is_one_line(tmp_path):
    missing = featkd("export", str(tmp_path), "--format", "onnx", check=False)
    assert missing.returncode == 2 and "without student.pt or last.pt" in missing.stderr
    torch.save(create_model("resnet8", num_classes=10, in_channels=1).state_dict(), tmp_path / "w.pt")
    no_config = featkd("export", str(tmp_path / "w.pt"), "--format", "torchscript", check=False)
    assert no_config.returncode == 2 and "holds no config: pass --config" in no_config.stderr
