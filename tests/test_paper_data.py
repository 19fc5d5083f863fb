"""The papers' data sets in their real layouts, written small with PIL (tests/helpers.py): CUB-200-2011 (``cub200``,
MGD's fine-grained transfer) and CINIC-10 (``cinic10``, DFA): counts, classes and labels, one streamed training
step through ``featkd train``, every inconsistency of the files as one line with exit 2, and the base configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from featkd.cli import main
from featkd.config import load_config
from featkd.data import DataConfig, build_data
from featkd.data.classification import CINIC_CLASSES, CINIC_MEAN, CINIC_STD, IMAGENET_MEAN, IMAGENET_STD
from featkd.errors import ConfigError, DataError
from tests.helpers import CUB_CLASSES, cinic_red, write_cinic, write_cub

ROOT = Path(__file__).resolve().parents[1]


def denormalize(x: torch.Tensor, bundle) -> torch.Tensor:
    mean = torch.tensor(bundle.mean).view(1, -1, 1, 1)
    std = torch.tensor(bundle.std).view(1, -1, 1, 1)
    return torch.round((x * std + mean) * 255).to(torch.uint8)


def one_error_line(capsys, dataset: str) -> str:
    """The run's stderr: one ``featkd: error: <dataset>: ...`` line, no traceback."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith(f"featkd: error: {dataset}"), lines[0]
    return lines[0]


def train_config(tmp_path: Path, **data) -> Path:
    raw = {
        "name": "paper-data",
        "data": {"batch_size": 4, "eval_batch_size": 8, "num_workers": 0, **data},
        "student": {"model": "resnet8"}, "method": {"name": "none"},
        "train": {"epochs": 1, "num_threads": 1, "progress": "off", "tensorboard": False, "device": "cpu"},
    }
    path = tmp_path / "paper-data.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def featkd_train(tmp_path: Path, *args: str, **data) -> int:
    return main(["train", str(train_config(tmp_path, **data)), "--out", str(tmp_path / "run"), *args])


# ---- CUB-200-2011 --------------------------------------------------------------------------------------------


@pytest.fixture
def cub(tmp_path) -> tuple[Path, dict[int, tuple[int, int]]]:
    """3 classes x (3 train + 1 test) JPEGs; {image id: (class id, is_train)}."""
    return tmp_path / "cub", write_cub(tmp_path / "cub")


def test_cub_reads_the_official_lists_with_each_image_id_in_its_class(cub):
    data_dir, truth = cub
    bundle = build_data(DataConfig(dataset="cub200", data_dir=str(data_dir), image_size=16))
    assert (bundle.train_size, bundle.val_size, bundle.test_size, bundle.num_classes) == (9, 0, 3, 3)
    assert bundle.input_shape == (3, 16, 16) and bundle.augmentation == "RandomResizedCrop(16) + hflip"
    src = bundle.backend.src
    assert src.train.classes == list(CUB_CLASSES) and (bundle.mean, bundle.std) == (IMAGENET_MEAN, IMAGENET_STD)
    # samples in image-id order, each labelled with its id's class (ids are shuffled across the class folders)
    for split, is_train in ((src.train, 1), (src.test, 0)):
        ids = sorted(k for k, (_, t) in truth.items() if t == is_train)
        assert [label for _, label in split.samples] == [truth[k][0] - 1 for k in ids]
        for (path, label), k in zip(split.samples, ids, strict=True):
            assert Path(path).parent.name == CUB_CLASSES[label], k
    # the decoded pixels agree: class k is tinted in channel k
    x, y = next(iter(bundle.test_loader(8)))
    assert x.shape == (3, 3, 16, 16) and y.tolist() == [label for _, label in src.test.samples]
    assert denormalize(x, bundle).float().mean(dim=(2, 3)).argmax(1).tolist() == y.tolist()
    xb, yb = next(iter(bundle.train_loader(4, seed=0)))
    assert xb.shape == (4, 3, 16, 16) and yb.dtype == torch.int64
    # data_dir may be CUB_200_2011/ itself; val_fraction holds out a stratified third of the training images
    same = build_data(DataConfig(dataset="cub200", data_dir=str(data_dir / "CUB_200_2011"), image_size=16,
                                 val_fraction=1 / 3))
    assert (same.train_size, same.val_size, same.test_size) == (6, 3, 3)
    assert sorted(y for _, ys in same.val_loader(8) for y in ys.tolist()) == [0, 1, 2]


def test_cub_trains_one_streamed_step_through_the_command_line(tmp_path, cub, capsys):
    data_dir, _ = cub
    assert featkd_train(tmp_path, "--set", "train.epochs=1", dataset="cub200", data_dir=str(data_dir),
                        image_size=32, num_workers=1) == 0
    out = capsys.readouterr().out
    assert "cub200: train 9, val 0, test 3; input 3x32x32, 3 classes; train augmentation: RandomResizedCrop(32) + " \
           "hflip; streamed from disk (1 workers)" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["dataset"] == "cub200"


def _rewrite(path: Path, edit) -> None:
    lines = path.read_text().splitlines()
    path.write_text("".join(f"{line}\n" for line in edit(lines)))


def _first_train_id(truth) -> int:
    return min(k for k, (_, t) in truth.items() if t)


# (name, edit of the CUB_200_2011 folder given the truth, the file the line names, what it says)
CUB_ERRORS = [
    ("label missing", lambda r, t: _rewrite(r / "image_class_labels.txt", lambda ls: ls[:4] + ls[5:]),
     "image_class_labels.txt", "has no line for image id 5 ("),
    ("split lists an unknown id", lambda r, t: _rewrite(r / "train_test_split.txt", lambda ls: [*ls, "99 1"]),
     "train_test_split.txt", "line 13: image id 99 is not in"),
    ("image missing from images.txt", lambda r, t: _rewrite(r / "images.txt", lambda ls: ls[1:]),
     "image_class_labels.txt", "line 1: image id 1 is not in"),
    ("class id out of range", lambda r, t: _rewrite(r / "image_class_labels.txt", lambda ls: ["1 4", *ls[1:]]),
     "image_class_labels.txt", "line 1: the class id of image 1 must be in 1..3, got '4'"),
    ("class id 0", lambda r, t: _rewrite(r / "image_class_labels.txt", lambda ls: ["1 0", *ls[1:]]),
     "image_class_labels.txt", "must be in 1..3, got '0'"),
    ("classes.txt id out of range", lambda r, t: _rewrite(r / "classes.txt", lambda ls: [*ls[:2], "7 007.Crow"]),
     "classes.txt", "line 3: class id 7 is outside 1..3"),
    ("listed image does not exist", lambda r, t: next((r / "images").rglob("*.jpg")).unlink(),
     "images.txt", "'s file "),
    ("malformed line", lambda r, t: _rewrite(r / "images.txt", lambda ls: [*ls[:2], "three", *ls[3:]]),
     "images.txt", "line 3: expected '<id> <relative path>'"),
    ("id not a number", lambda r, t: _rewrite(r / "train_test_split.txt", lambda ls: ["x1 1", *ls[1:]]),
     "train_test_split.txt", "line 1: expected '<id> <1|0>'"),
    ("is_training_image not 0 or 1", lambda r, t: _rewrite(r / "train_test_split.txt", lambda ls: ["1 2", *ls[1:]]),
     "train_test_split.txt", "is_training_image of image 1 must be in 0..1, got '2'"),
    ("id listed twice", lambda r, t: _rewrite(r / "images.txt", lambda ls: [*ls, ls[0]]),
     "images.txt", "line 13: id 1 is listed twice (first on line 1)"),
    ("a list file missing", lambda r, t: (r / "classes.txt").unlink(), "classes.txt", " not found"),
    ("no test image", lambda r, t: _rewrite(r / "train_test_split.txt", lambda ls: [f"{x.split()[0]} 1" for x in ls]),
     "train_test_split.txt", "marks no image as test (0)"),
    ("not the CUB folder", lambda r, t: (r / "images.txt").rename(r / "images.list"), "images.txt",
     "data.data_dir is the folder that holds CUB_200_2011/"),
]


@pytest.mark.parametrize("edit, file, says", [c[1:] for c in CUB_ERRORS], ids=[c[0] for c in CUB_ERRORS])
def test_every_inconsistency_of_the_cub_lists_is_one_line_naming_the_file(tmp_path, cub, capsys, edit, file, says):
    data_dir, truth = cub
    edit(data_dir / "CUB_200_2011", truth)
    assert featkd_train(tmp_path, dataset="cub200", data_dir=str(data_dir), image_size=16) == 2
    line = one_error_line(capsys, "cub200")
    assert f"{data_dir / 'CUB_200_2011' / file}" in line and says in line, line


def test_an_unreadable_cub_image_is_a_bad_file_stopped_or_skipped(cub):
    data_dir, _ = cub
    path = sorted((data_dir / "CUB_200_2011" / "images").rglob("*.jpg"))[0]
    path.write_bytes(path.read_bytes()[:40])  # a truncated JPEG: it exists, so the lists are consistent
    stopped = build_data(DataConfig(dataset="cub200", data_dir=str(data_dir), image_size=16))
    skipping = build_data(DataConfig(dataset="cub200", data_dir=str(data_dir), image_size=16, bad_files="skip"))
    in_train = any(p == str(path) for p, _ in stopped.backend.src.train.samples)
    loader = (lambda b: b.train_eval_loader(16)) if in_train else (lambda b: b.test_loader(16))
    with pytest.raises(DataError) as exc:
        list(loader(stopped))
    assert str(exc.value).startswith(f"cub200: cannot read {path}") and "\n" not in str(exc.value)
    kept = loader(skipping)
    assert sum(len(y) for _, y in kept) == (8 if in_train else 2) and len(kept.skipped) == 1


# ---- CINIC-10 --------------------------------------------------------------------------------------------------


@pytest.fixture
def cinic(tmp_path) -> Path:
    """10 classes x 2 train / 1 valid / 1 test PNGs."""
    write_cinic(tmp_path / "cinic")
    return tmp_path / "cinic"


def _labels_from_pixels(x: torch.Tensor, bundle) -> list[int]:
    red = denormalize(x, bundle)[:, 0].flatten(1)
    assert (red == red[:, :1]).all()  # the eval transform keeps the 32x32 pixels
    return [(int(r) - cinic_red(0)) // 20 for r in red[:, 0]]


def test_cinic_reads_its_three_splits(cinic):
    data = build_data(DataConfig(dataset="cinic10", data_dir=str(cinic)))
    assert (data.train_size, data.val_size, data.test_size, data.num_classes) == (20, 0, 10, 10)
    assert data.input_shape == (3, 32, 32) and data.augmentation == "random crop (pad 4) + hflip"
    assert (data.mean, data.std) == (CINIC_MEAN, CINIC_STD) and data.backend.src.train.classes == list(CINIC_CLASSES)
    x, y = next(iter(data.test_loader(16)))
    assert y.tolist() == list(range(10)) and _labels_from_pixels(x, data) == y.tolist()
    train = torch.cat([y for _, y in data.train_eval_loader(16)])
    assert train.tolist() == [c for c in range(10) for _ in range(2)]  # greyscale PNGs read as RGB too
    xb, yb = next(iter(data.train_loader(8, seed=1)))
    assert xb.shape == (8, 3, 32, 32) and yb.dtype == torch.int64

    as_val = build_data(DataConfig(dataset="cinic10", data_dir=str(cinic), cinic_valid="val"))
    assert (as_val.train_size, as_val.val_size, as_val.test_size) == (20, 10, 10)
    (xv, yv), = list(as_val.val_loader(16))
    assert yv.tolist() == list(range(10)) and _labels_from_pixels(xv, as_val) == yv.tolist()
    assert [p.split("/")[-3] for p, _ in as_val.backend.src.val.samples] == ["valid"] * 10

    merged = build_data(DataConfig(dataset="cinic10", data_dir=str(cinic), cinic_valid="train", val_fraction=0.5))
    assert (merged.train_size, merged.val_size, merged.test_size) == (15, 15, 10)
    paths = [p for p, _ in merged.backend.src.train.samples]
    assert sum("/valid/" in p for p in paths) == 10 and sum("/train/" in p for p in paths) == 20
    assert merged.backend.src.train.targets == [c for c in range(10) for _ in range(2)] + list(range(10))

    plain = build_data(DataConfig(dataset="cinic10", data_dir=str(cinic), augment=False, image_size=16))
    assert plain.augmentation == "none" and next(iter(plain.train_loader(4, seed=0)))[0].shape == (4, 3, 16, 16)


def test_cinic_trains_one_streamed_step_with_valid_as_the_validation_split(tmp_path, cinic, capsys):
    assert featkd_train(tmp_path, "--set", "train.epochs=1", dataset="cinic10", data_dir=str(cinic),
                        cinic_valid="val", batch_size=10) == 0
    out = capsys.readouterr().out
    assert "cinic10: train 20, val 10, test 10; input 3x32x32, 10 classes; train augmentation: random crop (pad 4) " \
           "+ hflip; streamed from disk (0 workers)" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["dataset"] == "cinic10"


CINIC_ERRORS = [
    ("valid/ missing", {"cinic_valid": "train"}, lambda r: (r / "valid").rename(r / "validation"),
     "cinic10: {r}/valid not found (data.cinic_valid: train reads it)"),
    ("test/ missing", {}, lambda r: (r / "test").rename(r / "testing"), "cinic10: {r}/test not found"),
    ("class folder missing", {}, lambda r: (r / "train" / "cat").rename(r / "cat"),
     "cinic10: {r}/train has no class folder 'cat'"),
    ("extra class folder", {}, lambda r: (r / "test" / "bear").mkdir(),
     "cinic10: {r}/test/bear is not a CINIC-10 class folder"),
    ("empty class folder", {}, lambda r: [p.unlink() for p in (r / "test" / "ship").iterdir()],
     "cinic10: {r}/test: Found no valid file for the classes ship"),
]


@pytest.mark.parametrize("data, edit, says", [c[1:] for c in CINIC_ERRORS], ids=[c[0] for c in CINIC_ERRORS])
def test_a_cinic_layout_error_is_one_line_naming_the_folder(tmp_path, cinic, capsys, data, edit, says):
    edit(cinic)
    assert featkd_train(tmp_path, dataset="cinic10", data_dir=str(cinic), **data) == 2
    line = one_error_line(capsys, "cinic10")
    assert says.format(r=cinic) in line, line


def test_cinic_valid_is_checked_with_the_config(tmp_path, cinic, capsys):
    with pytest.raises(ConfigError, match=r"data\.cinic_valid: only cinic10 has a valid/ folder"):
        DataConfig(dataset="cifar10", cinic_valid="train").validate()
    with pytest.raises(ConfigError, match=r"data\.val_fraction: with data\.cinic_valid: val"):
        DataConfig(dataset="cinic10", cinic_valid="val", val_fraction=0.1).validate()
    assert featkd_train(tmp_path, dataset="cinic10", data_dir=str(cinic), cinic_valid="both") == 2
    assert "data.cinic_valid: 'both' is not allowed (allowed: unused, val, train)" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"data\.cinic_valid: must be unused, val or train, got 'both'"):
        DataConfig(dataset="cinic10", cinic_valid="both").validate()  # type: ignore[arg-type]


def test_cinic_valid_left_unused_keeps_the_teacher_cache_and_evaluation_keys():
    from featkd.engine.teacher_cache import LATER_DATA_KEYS
    from featkd.engine.teacher_eval import TRAINING_ONLY

    assert LATER_DATA_KEYS["cinic_valid"] == DataConfig().cinic_valid == "unused"  # in a stream's key only when used
    assert "cinic_valid" in TRAINING_ONLY  # the test split is test/ whatever it says


# ---- the base configs ------------------------------------------------------------------------------------------


def test_the_base_configs_hold_the_papers_recipes():
    cub = load_config(ROOT / "configs" / "base" / "cub200.yaml")
    assert (cub.data.dataset, cub.data.image_size, cub.data.batch_size, cub.train.epochs) == ("cub200", 224, 64, 120)
    o = cub.optim
    assert (o.optimizer, o.lr, o.momentum, o.nesterov, o.weight_decay, o.schedule, o.gamma, o.warmup_epochs) == (
        "sgd", 0.01, 0.9, True, 1e-4, "step", 0.1, 0.0)
    cinic = load_config(ROOT / "configs" / "base" / "cinic10.yaml")
    o = cinic.optim
    assert (cinic.data.dataset, cinic.data.image_size, cinic.data.batch_size, cinic.train.epochs) == (
        "cinic10", None, 64, 300)
    assert (o.lr, o.momentum, o.nesterov, o.weight_decay, o.schedule, o.min_lr) == (0.1, 0.9, False, 1e-4, "cosine", 0)


def test_the_cub_milestones_drop_the_rate_in_the_epochs_mgd_drops_it():
    """MGD (cls/main_mgd.py) builds MultiStepLR(milestones=[31, 61, 81], gamma=0.1) and steps it once after each
    epoch; featkd's step schedule is stepped every iteration. Every iteration of every epoch must get MGD's rate."""
    from featkd.engine.schedule import lr_factor

    optim = load_config(ROOT / "configs" / "base" / "cub200.yaml").optim
    steps = 3
    factor = lr_factor(optim, 120, steps)
    sgd = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=optim.lr)
    mgd = torch.optim.lr_scheduler.MultiStepLR(sgd, milestones=[31, 61, 81], gamma=0.1)
    for epoch in range(120):
        rate = sgd.param_groups[0]["lr"]
        for it in range(epoch * steps, (epoch + 1) * steps):
            assert optim.lr * factor(it) == pytest.approx(rate, rel=1e-9), (epoch, it)
        sgd.step()
        mgd.step()
    assert rate == pytest.approx(1e-5)
