"""No config points at a file that is not there: every checkpoint resolves or is a buildable zoo recipe, and
``featkd zoo build NAME`` trains a recipe, checks its accuracy and installs the weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from featkd.apps.zoo_build import add_entry, build_recipe
from featkd.config import load_config
from featkd.errors import FeatkdError
from featkd.models.zoo import (
    build_dir,
    entry_score,
    is_download,
    is_recipe,
    load_manifest,
    resolve_weights,
    zoo_entry,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT / "configs")) for p in CONFIGS])
def test_every_config_loads_and_its_checkpoints_resolve(path):
    cfg = load_config(path)
    for role, spec in (("teacher", cfg.teacher), ("student", cfg.student)):
        if spec is None or not spec.checkpoint:
            continue
        where = f"{path.name}: {role}.checkpoint {spec.checkpoint}"
        if spec.checkpoint.startswith("runs/"):  # the run folder of a shipped teacher config, trained first
            first = ROOT / "configs" / f"{spec.checkpoint.removeprefix('runs/')}.yaml"  # its default --out
            assert first.is_file(), f"{where}: no shipped config {first.name} trains it"
            teacher = load_config(first)
            assert teacher.method_name == "none" and teacher.student.model == spec.model, where
            assert teacher.data.dataset == cfg.data.dataset, where
            continue
        if not spec.checkpoint.startswith("zoo:"):
            assert (ROOT / spec.checkpoint).exists(), f"{where} is not in the repository"
            continue
        entry = zoo_entry(spec.checkpoint[len("zoo:"):])
        assert entry["model"] == spec.model, f"{where} holds a {entry['model']}"
        if is_download(entry):  # published weights, fetched on first use (tests/test_zoo_download.py)
            assert entry["url"].startswith(("http://", "https://")) and entry["source"], where
            continue
        if is_recipe(entry) and "sha256" not in entry:  # not built here: it must be buildable
            assert entry["command"] == f"featkd zoo build {entry['name']}", where
            recipe = load_config(entry["recipe_config"])
            assert recipe.student.model == spec.model and recipe.data.dataset == entry["dataset"], where
            with pytest.raises(FeatkdError, match=f"run `featkd zoo build {entry['name']}`"):
                resolve_weights(spec.checkpoint)
        else:
            assert resolve_weights(spec.checkpoint).is_file(), where  # checksum verified


def test_every_recipe_in_the_manifest_is_complete():
    recipes = [e for e in load_manifest().values() if is_recipe(e) and not is_download(e)]
    assert {e["name"] for e in recipes} >= {"digits-torchvision-resnet18", "fashion-mnist-torchvision-resnet34"}
    for entry in recipes:
        assert Path(entry["recipe_config"]).is_file() and entry["command"] == f"featkd zoo build {entry['name']}"
        _, recorded = entry_score(entry)  # test_acc, or test_<metric> (test_ap of a detector)
        assert recorded is None or 0 < recorded <= 100


def test_zoo_add_copies_the_run_and_records_it(tmp_path):
    run, zoo = tmp_path / "run", tmp_path / "zoo"
    run.mkdir()
    (run / "student.pt").write_bytes(b"weights")
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"dataset": "digits"}, "student": {"model": "resnet8"}}))
    (run / "summary.json").write_text(json.dumps({"status": "finished", "test_acc": 90.0, "epochs": 1,
                                                  "train_seconds": 3.04}))
    entry = add_entry(run, "tiny", zoo)
    assert sorted(p.name for p in zoo.iterdir()) == ["manifest.json", "tiny.pt", "tiny.yaml"]  # no temporary left
    assert json.loads((zoo / "manifest.json").read_text()) == [entry]
    assert entry["test_acc"] == 90.0 and entry["train_seconds"] == 3.0 and (zoo / "tiny.pt").read_bytes() == b"weights"


def test_zoo_build_refuses_an_entry_that_ships_its_weights():
    with pytest.raises(FeatkdError, match="zoo entry 'digits-resnet20' ships its weights"):
        build_recipe("digits-resnet20")


def featkd(*args: str, env: dict, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "featkd", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"featkd {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.mark.slow
def test_zoo_build_trains_checks_and_installs(tmp_path, monkeypatch):
    zoo, cache = tmp_path / "zoo", tmp_path / "cache"
    zoo.mkdir()
    (zoo / "tiny.yaml").write_text(yaml.safe_dump({
        "name": "tiny", "data": {"dataset": "digits", "train_subset": 200, "batch_size": 50},
        "student": {"model": "resnet8", "options": {"widths": [4, 8, 16]}}, "method": {"name": "none"},
        "optim": {"lr": 0.1}, "train": {"epochs": 2, "num_threads": 1, "progress": "off", "tensorboard": False}}))
    recipe = {"dataset": "digits", "model": "resnet8", "options": {"widths": [4, 8, 16]}, "config": "tiny.yaml"}
    (zoo / "manifest.json").write_text(json.dumps([
        {"name": "tiny-digits", **recipe, "test_acc": 50.0, "tolerance": 40.0,
         "command": "featkd zoo build tiny-digits"},
        {"name": "tiny-too-good", **recipe, "test_acc": 100.0, "tolerance": 0.5,
         "command": "featkd zoo build tiny-too-good"}]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FEATKD_ZOO": str(zoo), "FEATKD_CACHE": str(cache),
           "PYTHONPATH": str(ROOT)}
    (tmp_path / "kd.yaml").write_text(yaml.safe_dump({
        "data": {"dataset": "digits"}, "method": {"name": "kd"}, "student": {"model": "resnet8"},
        "teacher": {"model": "resnet8", "options": {"widths": [4, 8, 16]}, "checkpoint": "zoo:tiny-digits"}}))
    listed = featkd("zoo", "list", env=env, cwd=tmp_path).stdout
    assert "recipe   featkd zoo build tiny-digits" in listed
    unbuilt = featkd("train", "kd.yaml", "--out", "r", env=env, cwd=tmp_path, check=False)
    assert unbuilt.returncode == 2 and not (tmp_path / "r").exists()
    assert ("zoo entry 'tiny-digits': a recipe whose weights are not built yet: run `featkd zoo build tiny-digits`"
            in unbuilt.stderr)

    out = featkd("zoo", "build", "tiny-digits", "--out", "build-run", env=env, cwd=tmp_path).stdout
    assert "built tiny-digits: test_acc " in out and "(recorded 50.00, tolerance 40: ok)" in out
    record = json.loads((cache / "zoo" / "tiny-digits.json").read_text())
    assert record["passed"] and record["test_acc"] == pytest.approx(
        json.loads((tmp_path / "build-run" / "summary.json").read_text())["test_acc"])
    assert (tmp_path / "build-run" / "command.txt").read_text() == "featkd zoo build tiny-digits --out build-run\n"
    monkeypatch.setenv("FEATKD_ZOO", str(zoo))
    monkeypatch.setenv("FEATKD_CACHE", str(cache))
    assert build_dir() == cache / "zoo"
    weights = resolve_weights("zoo:tiny-digits")  # checksum from the build's record
    assert torch.equal(torch.load(weights, weights_only=True)["fc.weight"],
                       torch.load(tmp_path / "build-run" / "student.pt", weights_only=True)["fc.weight"])
    listed = featkd("zoo", "list", env=env, cwd=tmp_path).stdout
    assert f"ok       {weights}" in listed
    featkd("train", "kd.yaml", "--out", "kd-run", "--epochs", "1", "--set", "data.train_subset=100",
           "--set", "data.batch_size=50", "--set", "train.progress=off", "--set", "train.num_threads=1",
           env=env, cwd=tmp_path)  # the built recipe is a teacher now

    failed = featkd("zoo", "build", "tiny-too-good", "--out", "run2", env=env, cwd=tmp_path, check=False)
    assert failed.returncode == 2 and "is more than 0.5 points below the recorded 100.00; weights not installed" \
        in failed.stderr
    assert not (cache / "zoo" / "tiny-too-good.pt").exists()
    shipped = featkd("zoo", "build", "digits-resnet20", env=env, cwd=tmp_path, check=False)
    assert shipped.returncode == 2 and "ships its weights" in shipped.stderr
