"""The command line as a user meets it: demo, zoo, layers, config files, data via --data-dir, light import."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from featkd.config import ConfigError, load_config
from featkd.models.zoo import entry_score, is_recipe, load_manifest, resolve_weights
from tests.test_data import write_cifar

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def featkd(*args: str, check: bool = True, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "featkd", *args], capture_output=True, text=True, env=ENV,
                          cwd=cwd, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"featkd {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def test_import_is_light():
    code = ("import sys, featkd, featkd.cli; bad = [m for m in ('torch', 'yaml', 'sklearn', 'torchvision', "
            "'matplotlib', 'tqdm') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_library_import_needs_only_torch_numpy_scipy():
    # Block the optional packages outright: the core library (trainer included) must still import.
    code = (
        "import sys\n"
        "for m in ('yaml', 'sklearn', 'torchvision', 'matplotlib', 'tqdm', 'tensorboard'): sys.modules[m] = None\n"
        "import featkd.engine.trainer, featkd.capture.capture, featkd.methods, featkd.models, featkd.data\n"
        "from featkd.models import create_model\n"
        "from featkd.errors import FeatkdError\n"
        "create_model('resnet8', num_classes=10, in_channels=1)\n"
        "try:\n    create_model('torchvision:resnet18', num_classes=10)\n"
        "except FeatkdError as e:\n    print('msg:', e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "pip install torchvision" in proc.stdout


def test_help_lists_every_command():
    out = featkd("--help").stdout
    for name in ("train", "eval", "layers", "demo", "zoo"):
        assert f"    {name}" in out


def test_layers_lists_points_with_shapes():
    out = featkd("layers", "resnet20", "--input-shape", "1,28,28", "--filter", r"^layer3\.2\.add$|^layer3$").stdout
    rows = [line.split() for line in out.splitlines()[1:]]
    assert ["layer3.2.add", "node", "add", "64x7x7"] in rows
    assert ["layer3", "module", "Sequential", "64x7x7"] in rows
    bad = featkd("layers", "resnet21", check=False)
    assert bad.returncode == 2 and "unknown model 'resnet21' (did you mean" in bad.stderr


# recipes (weights not shipped) are checked in test_zoo_recipes.py
@pytest.mark.parametrize("name", [n for n, e in load_manifest().items() if not is_recipe(e)])
def test_zoo_entry_loads_and_reaches_its_recorded_accuracy(name, request):
    """Every shipped model: checksum, recorded command, and its test accuracy re-measured with its own config."""
    entry = load_manifest()[name]
    assert entry["command"].startswith("featkd train configs/")
    if entry["dataset"] in ("fashion-mnist", "scenes"):  # scenes are generated from Fashion-MNIST items
        request.getfixturevalue("fashion_mnist_dir")  # skip locally / fail in CI when the data is missing
    path = resolve_weights(f"zoo:{name}")  # verifies the checksum
    config = ROOT / "zoo" / entry["config"]
    assert load_config(config).student.model == entry["model"]
    ev = json.loads(featkd("eval", str(path), "--config", str(config), "--json").stdout)
    # CPU kernels may differ in the last bits between machines: allow 0.1 point (10 of 10k test images)
    metric, recorded = entry_score(entry)
    assert ev[metric] == pytest.approx(recorded, abs=0.1)
    listed = [line.split()[0] for line in featkd("zoo", "list").stdout.splitlines()[1:]]
    assert listed.count(name) == 1


def test_every_shipped_config_validates():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.method_name, path


def test_config_base_inheritance_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(
        {"data": {"dataset": "digits", "batch_size": 32}, "optim": {"lr": 0.2}, "method": {"name": "none"}}))
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(
        {"base": "base.yaml", "data": {"train_subset": 100}, "method": {"name": "kd"},
         "teacher": {"model": "resnet8"}}))
    cfg = load_config(tmp_path / "exp.yaml", ["optim.lr=0.3", "method.kd_temperature=2"])
    assert cfg.data.batch_size == 32 and cfg.data.train_subset == 100  # merged section by section
    assert cfg.optim.lr == 0.3 and cfg.method["kd_temperature"] == 2.0
    assert cfg.method["kd_weight"] == 0.5  # the method's defaults are filled in and recorded
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="loop"):
        load_config(tmp_path / "loop.yaml")
    with pytest.raises(ConfigError, match=r"method\.kd_temprature: unknown key \(did you mean 'kd_temperature'"):
        load_config(tmp_path / "exp.yaml", ["method.kd_temprature=3"])


def test_cifar10_through_torchvision_with_data_dir(tmp_path):
    pytest.importorskip("torchvision")
    write_cifar(tmp_path / "cifar", 10, per_file=8)
    cfg = tmp_path / "cifar.yaml"
    cfg.write_text(yaml.safe_dump({
        "data": {"dataset": "cifar10", "batch_size": 8},
        "student": {"model": "resnet8"}, "method": {"name": "none"},
        "train": {"epochs": 1, "num_threads": 1, "progress": "off", "tensorboard": False},
    }))
    out = tmp_path / "run"
    featkd("train", str(cfg), "--data-dir", str(tmp_path / "cifar"), "--out", str(out))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["dataset"] == "cifar10"
    missing = featkd("train", str(cfg), "--data-dir", str(tmp_path / "nothing"), "--out", str(tmp_path / "r2"),
                     check=False)
    assert missing.returncode == 2 and str(tmp_path / "nothing") in missing.stderr
    assert not (tmp_path / "r2").exists()


@pytest.mark.slow
def test_demo_prints_a_table_and_writes_json(tmp_path):
    out_json = tmp_path / "demo.json"
    proc = featkd("demo", "--seeds", "2", "--epochs", "3", "--methods", "none", "kd", "--json", str(out_json),
                  "--work-dir", str(tmp_path / "work"))
    assert "test acc (mean +- std)" in proc.stdout
    rows = json.loads(out_json.read_text())["rows"]
    assert [r["method"] for r in rows] == ["none", "kd"]
    assert all(len(r["accs"]) == 2 and 10 < r["acc_mean"] <= 100 for r in rows)
    assert rows[0]["delta_vs_none"] == 0 and rows[1]["delta_vs_none"] == pytest.approx(
        rows[1]["acc_mean"] - rows[0]["acc_mean"])
    assert rows[1]["teacher_test_acc"] > 95
    bad = featkd("demo", "--methods", "kdd", check=False)
    assert bad.returncode == 2 and "did you mean 'kd'" in bad.stderr


def test_torch_load_of_checkpoints_is_weights_only(tmp_path):
    # a pickle that is not plain tensors/containers is refused with a one-line error naming the file
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, path)
    cfg = ROOT / "configs" / "digits-none-resnet20.yaml"
    proc = featkd("eval", str(path), "--config", str(cfg), check=False)
    assert proc.returncode == 2 and "evil.pt" in proc.stderr and "pwned" not in proc.stdout
