"""Label-free multi-teacher distillation: the teacher ensemble's per-member views, the pure maths of
``methods/multiteacher.py`` (statistics, standardisation, PHI-S, balancing) by hand, label-free data
(``data.labels: ignore``, ``dataset: unlabelled``), and real one-epoch runs of Fashion-MNIST into a ResNet-8 from
the zoo's ResNet-20 and a random timm ViT at its own size (32 px, RGB) through the CLI and the Python API, with
the teacher cache holding both teachers' features, export without the adaptors, and the one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from featkd.cli import main
from featkd.config import ConfigError, build_config
from featkd.data import DataConfig, build_data
from featkd.engine.build import build_run
from featkd.methods.multiteacher import (
    Moments,
    balance_equal,
    channel_rows,
    channel_standardize,
    hadamard,
    phi_s_matrix,
    rotate_channels,
)
from featkd.models import create_model
from featkd.models.ensemble import MemberView, TeacherEnsemble

ROOT = Path(__file__).resolve().parents[1]
VIT = {"model": "timm:vit_tiny_patch16_224", "input_size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
       "options": {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2, "in_channels": 3,
                   "num_classes": 5}}


def config(fashion_mnist_dir: Path, **method) -> dict:
    return {
        "name": "mt-test",
        "data": {"dataset": "fashion-mnist", "data_dir": str(fashion_mnist_dir), "labels": "ignore",
                 "train_subset": 192, "batch_size": 64, "eval_batch_size": 256, "augment": False,
                 "probe": {"dataset": "fashion-mnist", "data_dir": str(fashion_mnist_dir), "train_subset": 300}},
        "teachers": {"cnn": {"model": "resnet20", "checkpoint": "zoo:fashion-mnist-resnet20"}, "vit": VIT},
        "student": {"model": "resnet8"},
        "method": {"name": "multiteacher", "pairs": [["layer3", "cnn:layer3"], ["layer3", "vit:blocks.1"]],
                   "stats_images": 128, "agree_images": 256, **method},
        "optim": {"lr": 0.05},
        "train": {"epochs": 1, "device": "cpu", "progress": "off", "teacher_eval": "off", "tensorboard": False,
                  "log_every_s": 0, "num_threads": 1},
    }


def write(tmp_path: Path, cfg: dict, name: str = "mt.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


# ---- the ensemble --------------------------------------------------------------------------------------------


class Recorder(nn.Module):
    def __init__(self, out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3 if out == 7 else 1, 4, 3)
        self.fc = nn.Linear(4, out)
        self.seen: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def test_the_ensemble_gives_each_teacher_its_own_size_and_normalisation_and_returns_the_first_output():
    a, b = Recorder(10), Recorder(7)
    views = {"a": MemberView(None, None, None, 1), "b": MemberView((32, 40), (0.5, 0.4, 0.3), (0.2, 0.25, 0.5), 3)}
    ens = TeacherEnsemble({"a": a, "b": b}, views, data_mean=(0.3,), data_std=(0.4,)).eval()
    raw = torch.rand(2, 1, 28, 28)
    x = (raw - 0.3) / 0.4
    out = ens(x)
    assert out.shape == (2, 10) and torch.equal(out, a(x))  # the first member's output
    assert ens.input_shapes == {"a": (2, 1, 28, 28), "b": (2, 3, 32, 40)}
    assert a.seen is x  # the data's own view: the batch itself
    want = torch.nn.functional.interpolate(raw.expand(-1, 3, -1, -1), size=(32, 40), mode="bilinear",
                                           align_corners=False)
    want = (want - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.25, 0.5]).view(1, 3, 1, 1)
    torch.testing.assert_close(b.seen, want, atol=1e-5, rtol=1e-5)
    assert ens.qualify("b:conv") == "b.conv" and ens.qualify("conv:input") == "conv:input"
    assert ens.member_of("b.conv") == "b" and ens.member_of("a:fc:input") == "a" and ens.member_of("fc") is None
    assert {n for n, _ in ens.named_modules()} >= {"a.conv", "b.fc"}  # capture points are NAME.module


def test_teachers_config_is_checked():
    base = {"method": {"name": "multiteacher", "pairs": [["layer3", "cnn.layer3"]]}}
    with pytest.raises(ConfigError, match="not both"):
        build_config({**base, "teacher": {"model": "resnet20"}, "teachers": {"cnn": {"model": "resnet20"}}})
    with pytest.raises(ConfigError, match=r"teachers\.2cnn: a teacher's name must be an identifier"):
        build_config({**base, "teachers": {"2cnn": {"model": "resnet20"}}})
    with pytest.raises(ConfigError, match=r"teachers\.eval: 'eval' is reserved"):
        build_config({**base, "teachers": {"eval": {"model": "resnet20"}}})
    with pytest.raises(ConfigError, match=r"teachers\.cnn\.input_size"):
        build_config({**base, "teachers": {"cnn": {"model": "resnet20", "input_size": [1, 2, 3]}}})
    cfg = build_config({**base, "teachers": {"cnn": {"model": "resnet20", "input_size": 32}}})
    assert cfg.teachers["cnn"].input_size == 32 and cfg.teacher_label == "ensemble(cnn=resnet20)"


# ---- the pure maths -------------------------------------------------------------------------------------------


def test_statistics_standardisation_phi_s_and_hadamard_by_hand():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(6, 4, 5, 5, generator=g) * torch.tensor([1.0, 10.0, 0.1, 3.0]).view(1, 4, 1, 1) + 2.0
    rows = channel_rows(feats)
    assert rows.shape == (150, 4) and torch.equal(rows[1], feats[0, :, 0, 1])
    m = Moments(4)
    m.update(rows[:70])
    m.update(rows[70:])  # two batches, like the pass over a loader
    torch.testing.assert_close(m.mean, rows.double().mean(0))
    torch.testing.assert_close(m.var, rows.double().var(0, unbiased=False))
    std = channel_standardize(feats, m.mean.float(), m.var.sqrt().float())
    torch.testing.assert_close(channel_rows(std).mean(0), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(channel_rows(std).std(0, unbiased=False), torch.ones(4), atol=1e-5, rtol=0)
    for n in (1, 2, 12, 20, 64, 192, 768):
        h = hadamard(n)
        assert h is not None and set(h.unique().tolist()) <= {-1.0, 1.0}
        torch.testing.assert_close(h @ h.T, n * torch.eye(n, dtype=torch.float64))
    assert hadamard(100) is None and hadamard(6) is None
    tokens = torch.randn(500, 12, generator=g) @ torch.randn(12, 12, generator=g) + 1.0  # correlated (B, C)
    c = Moments(12, cov=True)
    c.update(tokens)
    r = phi_s_matrix(c.covariance)
    y = rotate_channels(tokens.double(), c.mean, r)
    cov = torch.cov(y.T, correction=0)
    torch.testing.assert_close(cov.diagonal(), torch.ones(12, dtype=torch.float64), atol=1e-6, rtol=0)  # isotropic
    torch.testing.assert_close(y.mean(0), torch.zeros(12, dtype=torch.float64), atol=1e-9, rtol=0)
    lam = torch.linalg.eigvalsh(c.covariance)  # a rotation and one scale: distances shrink by sqrt(mean(lambda))
    d0, d1 = (tokens[0] - tokens[1]).double().norm(), (y[0] - y[1]).norm()
    torch.testing.assert_close(d1, d0 / lam.mean().sqrt())


def test_balance_equal_by_hand():
    ema, started = torch.ones(2), torch.zeros(2)
    first = balance_equal(torch.tensor([2.0, 8.0], requires_grad=True), ema, started, momentum=0.5)
    torch.testing.assert_close(first, torch.tensor([1.0, 1.0]))  # the first value starts each average
    values = torch.tensor([4.0, 8.0], requires_grad=True)
    second = balance_equal(values, ema, started, momentum=0.5)
    torch.testing.assert_close(ema, torch.tensor([3.0, 8.0]))  # 0.5 * 2 + 0.5 * 4, 0.5 * 8 + 0.5 * 8
    torch.testing.assert_close(second, torch.tensor([4.0 / 3.0, 1.0]))
    second.sum().backward()  # the divisor is detached: d/dv (v / ema) = 1 / ema
    torch.testing.assert_close(values.grad, torch.tensor([1.0 / 3.0, 1.0 / 8.0]))


# ---- label-free data -------------------------------------------------------------------------------------------


def test_labels_ignore_gives_minus_one_targets_and_a_labelled_probe(fashion_mnist_dir):
    data = build_data(DataConfig(dataset="fashion-mnist", data_dir=str(fashion_mnist_dir), labels="ignore",
                                 train_subset=100))
    assert not data.labelled and data.probe is not None and data.probe.labelled and data.probe.train_size == 100
    _x, y = next(iter(data.train_loader(50, seed=0)))
    assert (y == -1).all()
    _x, y = next(iter(data.probe.train_eval_loader(50)))
    assert (y >= 0).all()


def test_an_unlabelled_folder_is_found_recursively_with_a_held_out_test_split(tmp_path):
    from PIL import Image

    for i in range(40):
        folder = tmp_path / "imgs" / f"part{i % 3}" / ("deep" if i % 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20 + i, 24), (i * 5, 100, 200)).save(folder / f"{i}.png")
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    data = build_data(DataConfig(dataset="unlabelled", data_dir=str(tmp_path / "imgs"), image_size=16))
    assert (data.train_size, data.test_size, data.labelled, data.probe) == (38, 2, False, None)
    x, y = next(iter(data.train_loader(8, seed=0)))
    assert x.shape == (8, 3, 16, 16) and (y == -1).all()


# ---- real runs -------------------------------------------------------------------------------------------------


def test_cli_run_two_teachers_label_free_with_cache_and_export(tmp_path, fashion_mnist_dir, capsys):
    cfg = config(fashion_mnist_dir, balance="equal")
    cfg["train"]["teacher_cache"] = str(tmp_path / "cache")
    path = write(tmp_path, cfg)
    run = build_run(build_config(yaml.safe_load(path.read_text())), log=lambda _m: None)
    run.teacher(torch.zeros(3, 1, 28, 28))
    assert run.teacher.input_shapes == {"cnn": (3, 1, 28, 28), "vit": (3, 3, 32, 32)}
    assert run.distiller.pairs[1].t_shape == (64, 4, 4) and run.distiller.pairs[1].tokens_prefix == 1  # cls dropped
    assert {n.split(".")[0] for n, _ in run.distiller.named_parameters()} == {"adaptors"}

    for out in ("run1", "run2"):
        assert main(["train", str(path), "--out", str(tmp_path / out)]) == 0
    records = [json.loads((tmp_path / out / "metrics.jsonl").read_text().splitlines()[-1]) for out in ("run1", "run2")]
    rec = records[0]
    assert {"train_mt_cnn", "train_mt_vit", "test_knn_acc", "test_probe_acc", "agree_cnn", "agree_vit"} <= set(rec)
    assert "train_ce" not in rec and "train_acc" not in rec  # no labels, no task term
    assert rec["test_knn_acc"] > 30 and rec["test_probe_acc"] > 30  # 10 classes; chance is 10
    assert all(-1 <= rec[k] <= 1 for k in ("agree_cnn", "agree_vit"))
    summaries = [json.loads((tmp_path / out / "summary.json").read_text()) for out in ("run1", "run2")]
    assert summaries[0]["teacher_cache"]["written_epochs"] == 1 and summaries[0]["metric"] == "knn_acc"
    assert summaries[1]["teacher_cache"]["read_steps"] == 3 and summaries[1]["teacher_cache"]["teacher_steps"] == 0
    assert records[1]["train_loss"] == pytest.approx(rec["train_loss"], rel=1e-6)  # both teachers' features read

    student = torch.load(tmp_path / "run1" / "student.pt", weights_only=True)
    assert set(student) == set(create_model("resnet8", num_classes=10, in_channels=1).state_dict())
    assert main(["export", str(tmp_path / "run1"), "--format", "torchscript"]) == 0
    scripted = torch.jit.load(str(tmp_path / "run1" / "student.torchscript"))
    assert scripted(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert not any("adaptor" in n for n, _ in scripted.named_parameters())
    capsys.readouterr()


def test_python_api_measures_and_applies_the_statistics(fashion_mnist_dir):
    from featkd.api import Distillation
    from featkd.engine.build import build_teacher
    from featkd.tasks import task_for

    cfg = build_config(config(fashion_mnist_dir, loss="cos-smoothl1", weights={"cnn": 2.0}))
    data = build_data(cfg.data)
    run_task = task_for(data)
    teacher = build_teacher(cfg, data, torch.device("cpu"), torch.zeros(2, 1, 28, 28), run_task, lambda _m: None)
    student = create_model("resnet8", num_classes=10, in_channels=1)
    stats = data.train_eval_loader(64, limit=128)
    kd = Distillation(teacher, student, "multiteacher", {"pairs": cfg.method["pairs"], "stats_images": 128,
                                                         "loss": "cos-smoothl1", "weights": {"cnn": 2.0}},
                      example_input=torch.zeros(2, 1, 28, 28), train_loader=stats)
    opt = torch.optim.SGD([*student.parameters(), *kd.parameters()], lr=0.05)
    student.train()
    for x, y in data.train_loader(64, seed=0):
        losses = kd(x, y)
        assert set(losses) == {"mt_cnn", "mt_vit"}
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    d = kd.distiller
    assert d.measured.item() == 1.0 and d.weights.tolist() == [2.0, 1.0]
    # applied: over the statistics images the standardised teacher features have channel mean 0 and std 1
    for i, p in enumerate(d.pairs):
        rows = torch.cat([channel_rows(d.target(i, kd.teacher_capture(x)[1][p.teacher_point])) for x, _ in stats])
        torch.testing.assert_close(rows.mean(0), torch.zeros(rows.shape[1]), atol=1e-3, rtol=0)
        torch.testing.assert_close(rows.std(0, unbiased=False), torch.ones(rows.shape[1]), atol=1e-3, rtol=0)
    assert math.isfinite(float(sum(losses.values()).detach()))


def test_errors_are_one_line(tmp_path, fashion_mnist_dir, capsys):
    cfg = config(fashion_mnist_dir)
    cfg["method"]["pairs"] = [["fc:input", "cnn:layer3"]]
    assert main(["train", str(write(tmp_path, cfg)), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "teacher 'cnn' point 'cnn.layer3'" in err and "fc:input" in err
    cfg = config(fashion_mnist_dir)
    cfg["method"] = {"name": "dkd"}
    cfg["teachers"] = {"cnn": cfg["teachers"]["cnn"]}
    assert main(["train", str(write(tmp_path, cfg, "dkd.yaml")), "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "label-free" in err
    cfg = config(fashion_mnist_dir, standardize="phi-s")
    cfg["teachers"]["vit"]["options"]["embed_dim"] = 36  # 36 = 4 * 9: no Hadamard matrix of that order here
    assert main(["train", str(write(tmp_path, cfg, "phis.yaml")), "--out", str(tmp_path / "z")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "phi-s" in err and "'vit'" in err


@pytest.mark.slow
def test_the_theia_style_config_builds_with_random_weights(tmp_path):
    """The shipped DINOv2 + CLIP -> DeiT-small config (README, docs/methods/multiteacher.md) builds offline with
    random weights: both teachers at their own views, the token pairs adapted (DINOv2's 16x16 grid of 14-px
    patches, CLIP's 14x14 of 16 px, the student's 14x14), PHI-S matrices available for 768 channels."""
    from PIL import Image

    from featkd.config import load_config

    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            Image.new("RGB", (64, 48), (200 if c == "a" else 20, 90, 90)).save(tmp_path / split / c / "0.png")
    sets = [f"data.data_dir={tmp_path}", "data.batch_size=2", "data.num_workers=0",
            "teachers.dino.options.pretrained=false", "teachers.clip.options.pretrained=false",
            "student.options.pretrained=false", "train.device=cpu", "train.amp=none"]
    cfg = load_config(ROOT / "configs" / "imagefolder-multiteacher-dinov2-clip-deit_small.yaml", sets)
    run = build_run(cfg, log=lambda _m: None)
    assert run.teacher.member_names == ("dino", "clip")
    assert [p.t_shape for p in run.distiller.pairs] == [(768, 16, 16), (768, 14, 14)] or all(
        p.t_kind == "tokens" for p in run.distiller.pairs)
