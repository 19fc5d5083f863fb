"""The shipped configs for real data: ImageFolder (a pretrained torchvision ResNet-50 fine-tuned, then distilled
into a ResNet-18) and CIFAR-100 (ResNet-32x4 -> ResNet-8x4), one per headline method.

Each family is copied with ``featkd configs copy`` into a fresh folder, as a pip user does, and run from there:
the ImageFolder teacher is fine-tuned for one epoch on a tiny generated folder (random weights: no network here;
the configs name ``weights: DEFAULT``), then every student config trains one epoch from that run folder, the
``teacher.checkpoint`` the configs name. The CIFAR-100 teacher trains one epoch on a tiny CIFAR-100 in
torchvision's pickle format, and every student config is built on it (``build_run``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from featkd import resources
from featkd.cli import main
from featkd.config import load_config
from tests.test_data import write_cifar
from tests.test_streaming import write_jpegs

pytest.importorskip("torchvision")

IMAGEFOLDER_TEACHER = "imagefolder-none-torchvision-resnet50"
IMAGEFOLDER_STUDENTS = [f"imagefolder-{m}-torchvision-resnet50-resnet18" for m in ("kd", "dkd", "mgd-amp", "cwt",
                                                                                     "fitnets")]
CIFAR_TEACHER = "cifar100-none-resnet32x4"
CIFAR_STUDENTS = ["cifar100-none-resnet8x4"] + [f"cifar100-{m}-resnet32x4-resnet8x4"
                                                for m in ("kd", "dkd", "mgd-amp", "cwt", "fitnets")]
# tiny, fast runs: one epoch, one thread, no workers, nothing written besides the run folder
QUICK = ["--epochs", "1", "--device", "cpu", "--set", "train.num_threads=1", "--set", "train.progress=off",
         "--set", "train.tensorboard=false", "--set", "train.eval_every=1"]


def copy_configs(names: list[str], dest: Path) -> None:
    for name in names:
        resources.copy_example(name, dest)


def test_the_real_data_configs_are_listed_and_say_what_they_are(capsys):
    assert main(["configs", "list", "^(imagefolder|cifar100)-"]) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[1:] if line.strip()}
    for name in [IMAGEFOLDER_TEACHER, *IMAGEFOLDER_STUDENTS]:
        dataset, method, teacher, student = rows[name]
        assert dataset == "imagefolder" and student.startswith("torchvision:")
        assert teacher == ("-" if method == "none" else "torchvision:resnet50")
    assert rows[CIFAR_TEACHER] == ["cifar100", "none", "-", "resnet32x4"]
    for name in CIFAR_STUDENTS[1:]:
        assert rows[name][0] == "cifar100" and rows[name][2:] == ["resnet32x4", "resnet8x4"]
    # the teacher step loads ImageNet weights (whose classifier is replaced); the students distil from its run
    teacher = load_config(resources.example_config(IMAGEFOLDER_TEACHER))
    assert teacher.student.options == {"weights": "DEFAULT"} and teacher.method_name == "none"
    for name in IMAGEFOLDER_STUDENTS:
        cfg = load_config(resources.example_config(name))
        assert cfg.teacher.checkpoint == f"runs/{IMAGEFOLDER_TEACHER}" and cfg.teacher.model == teacher.student.model
        assert cfg.student.options == {"weights": "DEFAULT"} and cfg.data.image_size == 224
    for name in CIFAR_STUDENTS[1:]:
        assert load_config(resources.example_config(name)).teacher.checkpoint == f"runs/{CIFAR_TEACHER}"


@pytest.mark.slow
def test_imagefolder_configs_fine_tune_the_teacher_then_train_every_student(tmp_path, monkeypatch, capsys):
    images = tmp_path / "images"
    write_jpegs(images, {"train": 6, "val": 2})
    work = tmp_path / "work"
    copy_configs([IMAGEFOLDER_TEACHER, *IMAGEFOLDER_STUDENTS], work)
    monkeypatch.chdir(work)  # the configs' relative paths (runs/...) are read from the folder featkd runs in
    tiny = [*QUICK, "--data-dir", str(images), "--set", "student.options.weights=null", "--set", "data.image_size=32",
            "--set", "data.num_workers=0", "--set", "data.batch_size=6", "--set", "data.eval_batch_size=6"]
    assert main(["train", f"{IMAGEFOLDER_TEACHER}.yaml", *tiny]) == 0
    out = capsys.readouterr().out
    assert "imagefolder: train 18" in out and "student torchvision:resnet50 | method none" in out
    assert (work / "runs" / IMAGEFOLDER_TEACHER / "student.pt").is_file()
    for name in IMAGEFOLDER_STUDENTS:
        assert main(["train", f"{name}.yaml", *tiny]) == 0, name
        summary = json.loads((work / "runs" / name / "summary.json").read_text())
        assert summary["status"] == "finished" and summary["dataset"] == "imagefolder", name
        assert "teacher torchvision:resnet50: test_acc" in capsys.readouterr().out, name


@pytest.mark.slow
def test_cifar100_configs_train_the_teacher_and_build_every_student(tmp_path, monkeypatch, capsys):
    from featkd.engine.build import build_run

    write_cifar(tmp_path / "cifar", 100, per_file=40)
    work = tmp_path / "work"
    copy_configs([CIFAR_TEACHER, *CIFAR_STUDENTS], work)
    monkeypatch.chdir(work)
    tiny = ["--data-dir", str(tmp_path / "cifar"), "--set", "data.batch_size=20", "--set", "optim.milestones=[0.5]"]
    assert main(["train", f"{CIFAR_TEACHER}.yaml", *QUICK, *tiny]) == 0
    assert "cifar100: train 40" in capsys.readouterr().out
    overrides = [f"data.data_dir={tmp_path / 'cifar'}", "train.device=cpu", "train.epochs=2", "optim.milestones=[1]"]
    threads = torch.get_num_threads()
    try:
        for name in CIFAR_STUDENTS:
            cfg = load_config(work / f"{name}.yaml", overrides)
            run = build_run(cfg, log=lambda _m: None)
            assert run.data.num_classes == 100 and run.data.input_shape == (3, 32, 32), name
            if cfg.method_name != "none":  # the teacher is the one trained above, loaded from its run folder
                assert cfg.teacher.checkpoint == f"runs/{CIFAR_TEACHER}"
                trained = torch.load(work / "runs" / CIFAR_TEACHER / "student.pt", weights_only=True)
                weight = next(iter(trained))
                assert torch.equal(run.teacher.state_dict()[weight].cpu(), trained[weight]), name
    finally:
        torch.set_num_threads(threads)


def test_a_config_that_is_not_there_says_where_it_was_looked_for_and_how_to_get_it(tmp_path, monkeypatch, capsys):
    """After a pip install there is no configs/ folder: `featkd match configs/NAME.yaml` (any command that takes a
    config) names the folder it looked in and the `featkd configs copy` that writes that very file."""
    monkeypatch.chdir(tmp_path)
    name = "fashion-mnist-mgd-amp-resnet20-resnet8"
    assert main(["match", f"configs/{name}.yaml", "--out", "runs/match"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"featkd: error: config file 'configs/{name}.yaml' not found (relative to {tmp_path}, the current "
                   f"folder); it is one of featkd's shipped configs: `featkd configs copy {name} configs` writes it "
                   "there (with the base/ files it needs)")
    assert main(["configs", "copy", name, "configs"]) == 0  # the command it gave: the same line now finds the file
    assert (tmp_path / "configs" / f"{name}.yaml").is_file() and (tmp_path / "configs" / "base").is_dir()
    capsys.readouterr()
    # a near name: the nearest shipped config; a bare unknown name: how to list and copy them
    assert main(["train", "imagefolder-kd-torchvision-resnet50-resnet.yaml"]) == 2
    assert ("the nearest shipped config is 'imagefolder-kd-torchvision-resnet50-resnet18': `featkd configs copy "
            "imagefolder-kd-torchvision-resnet50-resnet18 .` writes imagefolder-kd-torchvision-resnet50-resnet18.yaml"
            ) in capsys.readouterr().err
    assert main(["search", "mine.yaml", "--out", "runs/s"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        f"not found (relative to {tmp_path}, the current folder); `featkd configs list` shows the shipped configs, "
        "`featkd configs copy NAME .` copies one here")
    # an absolute path is named as it is; a run folder's config.yaml (train --resume) gets no example hint
    assert main(["kernel", str(tmp_path / "x.yaml"), "--n", "10", "--out", "k"]) == 2
    assert f"config file '{tmp_path / 'x.yaml'}' not found; " in capsys.readouterr().err
    assert main(["train", "--resume", "--out", "runs/gone"]) == 2
    assert capsys.readouterr().err.strip() == (f"featkd: error: config file 'runs/gone/config.yaml' not found "
                                               f"(relative to {tmp_path}, the current folder)")
