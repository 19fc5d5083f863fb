"""The streaming data layer (featkd.data.streaming) on real JPEG folders (imagefolder): batches that do not depend
on the number of workers, a resumed epoch or the world size; bad files as one line or skipped and listed; CRD's
sample indices; resident memory that does not grow with the number of images; a real two-process torchrun run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from featkd.cli import main as cli_main
from featkd.data import DataConfig, build_data
from featkd.data.streaming import StreamDataset, stack_pairs, stream_train_loader
from featkd.errors import DataError
from tests.test_ddp import ENV, TORCHRUN, run

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("ant", "bee", "cat")
QUIET = lambda _m: None  # noqa: E731


def write_jpegs(root: Path, per_class: dict[str, int], seed: int = 0, size: tuple[int, int] | None = None,
                quality: int = 75) -> list[Path]:
    """JPEGs in the ImageFolder layout ``root/<split>/<class>/<i>.jpg``, of random sizes from 20 to 63 pixels
    a side (or ``size`` (W, H)); each class tinted by its own channel. Returns the files written."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    files = []
    for split, n in per_class.items():
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                w, h = size or rng.integers(20, 64, 2)
                pixels = rng.integers(0, 120, (h, w, 3), dtype=np.uint8)
                pixels[..., c] += 120
                files.append(folder / f"{i}.jpg")
                Image.fromarray(pixels).save(files[-1], quality=quality)
    return files


def write_bad(folder: Path, kinds: tuple[str, ...] = ("zero", "truncated", "text")) -> list[Path]:
    """Bad files named .jpg in ``folder``: empty, a JPEG cut in half, a text file."""
    good = sorted(folder.glob("*.jpg"))[0].read_bytes()
    content = {"zero": b"", "truncated": good[: len(good) // 2], "text": b"not an image\nat all\n"}
    paths = []
    for kind in kinds:
        paths.append(folder / f"bad_{kind}.jpg")
        paths[-1].write_bytes(content[kind])
    return paths


@pytest.fixture(scope="module")
def jpeg_root(tmp_path_factory) -> Path:
    """3 classes x 12 training (36) and x 3 validation JPEGs of varied sizes."""
    root = tmp_path_factory.mktemp("jpegs")
    write_jpegs(root, {"train": 12, "val": 3})
    return root


def epoch_batches(loader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch)
    return [(x, y, loader.batch_indices.clone()) for x, y in loader]


def assert_same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for (xa, ya, ia), (xb, yb, ib) in zip(a, b, strict=True):
        assert torch.equal(ia, ib) and torch.equal(ya, yb) and torch.equal(xa, xb)


def bundle(root: Path, workers: int = 0, **kw):
    return build_data(DataConfig(dataset="imagefolder", data_dir=str(root), image_size=16, num_workers=workers,
                                 **kw))


# ---- determinism ------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on 2 cores
def test_training_batches_do_not_depend_on_the_workers_and_a_resumed_epoch_repeats_them(jpeg_root):
    loaders = {w: bundle(jpeg_root, w).train_loader(8, seed=5) for w in (0, 1, 3)}
    ref = {e: epoch_batches(loaders[0], e) for e in (0, 1)}
    assert len(ref[1]) == 4 and ref[1][0][0].shape == (8, 3, 16, 16)
    for w in (1, 3):
        for e in (1, 0):  # the workers started in epoch 1, then epoch 0 (persistent workers, a new order)
            assert_same(epoch_batches(loaders[w], e), ref[e])
    # epochs differ in order and crops: the comparisons above could fail
    assert not torch.equal(ref[0][0][2], ref[1][0][2])
    # a resumed epoch (set_epoch again, on a used loader and on a fresh one) repeats the batches
    epoch_batches(loaders[3], 2)
    assert_same(epoch_batches(loaders[3], 1), ref[1])
    assert_same(epoch_batches(bundle(jpeg_root, 1).train_loader(8, seed=5), 1), ref[1])
    # each sample's labels are its folder's class
    samples = bundle(jpeg_root).backend.src.train.samples
    for _x, y, ix in ref[1]:
        assert y.tolist() == [samples[i][1] for i in ix.tolist()]


def test_two_ranks_together_give_the_single_process_batches_with_the_same_pixels(jpeg_root):
    data = bundle(jpeg_root, 1)
    single = epoch_batches(data.train_loader(8, seed=2), 3)
    ranks = [epoch_batches(data.train_loader(8, seed=2, rank=r, world_size=2), 3) for r in range(2)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 4
    for b, (x, y, ix) in enumerate(single):
        pixels = {i: (xi, yi) for i, xi, yi in zip(ix.tolist(), x, y, strict=True)}
        shared = [(i, xi, yi) for r in ranks for i, xi, yi in zip(r[b][2].tolist(), r[b][0], r[b][1], strict=True)]
        assert sorted(i for i, _, _ in shared) == sorted(pixels)  # the same samples, 4 + 4
        for i, xi, yi in shared:
            assert torch.equal(xi, pixels[i][0]) and torch.equal(yi, pixels[i][1])


def test_a_user_error_in_a_worker_is_raised_as_one_line():
    """DataLoader re-raises a worker's exception with the worker's traceback in its message; the streaming
    loader raises the user error itself."""

    def transform(sample):
        if sample[1] == 3:
            raise DataError("toy: sample 3 has no label file")
        return sample

    ds = StreamDataset(lambda j: (torch.zeros(1, 2, 2), j), range(8), transform, skip_bad=True)
    loader = stream_train_loader(ds, stack_pairs, lambda x, y: (x, y), 4, seed=0, rank=0, world_size=1,
                                 device="cpu", drop_last=True, num_workers=2)
    with pytest.raises(DataError) as exc:
        list(loader)
    assert str(exc.value) == "toy: sample 3 has no label file"  # not skipped either: it is not a bad file


# ---- bad files --------------------------------------------------------------------------------------------


def train_config(tmp_path: Path, root: Path, **data) -> Path:
    raw = {
        "name": "stream",
        "data": {"dataset": "imagefolder", "data_dir": str(root), "image_size": 16, "batch_size": 8,
                 "eval_batch_size": 8, "num_workers": 2, **data},
        "student": {"model": "resnet8"}, "method": {"name": "none"},
        "train": {"epochs": 1, "num_threads": 1, "progress": "off", "tensorboard": False},
    }
    path = tmp_path / "stream.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def featkd_train(*args: str) -> subprocess.CompletedProcess:
    """``featkd train ARGS`` in a fresh process (warnings off: stderr must hold the error line alone, wherever the
    suite runs, e.g. DataLoader's warning about more workers than cores)."""
    return subprocess.run([sys.executable, "-m", "featkd", "train", *args], cwd=ROOT,
                          env={**ENV, "PYTHONWARNINGS": "ignore"}, capture_output=True, text=True, timeout=300)


def assert_one_error_line(proc: subprocess.CompletedProcess, bad: list[Path]) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[0].startswith("featkd: error: imagefolder: cannot read ")
    named = [p for p in bad if str(p) in lines[0]]
    assert len(named) == 1, lines[0]
    return lines[0]


@pytest.fixture
def bad_root(tmp_path) -> tuple[Path, list[Path], list[Path]]:
    """29 good + 3 bad training files (4 full batches of 8: every file is read each epoch), 9 good + 1 bad
    validation files."""
    root = tmp_path / "data"
    write_jpegs(root, {"train": 10, "val": 3})
    (root / "train" / "cat" / "9.jpg").unlink()
    bad_train = write_bad(root / "train" / "bee")
    bad_val = write_bad(root / "val" / "ant", ("truncated",))
    return root, bad_train, bad_val


def test_a_bad_training_file_met_in_a_worker_is_one_line(tmp_path, bad_root):
    root, bad_train, _ = bad_root
    (root / "val" / "ant" / "bad_truncated.jpg").unlink()
    out = tmp_path / "run"
    proc = featkd_train(str(train_config(tmp_path, root)), "--out", str(out))
    assert_one_error_line(proc, bad_train)
    assert (out / "config.yaml").is_file() and not (out / "last.pt").exists()


def test_a_bad_validation_file_is_one_line_and_the_epochs_trained_are_kept(tmp_path, bad_root):
    from featkd.engine.runfolder import load_checkpoint

    root, bad_train, bad_val = bad_root
    for p in bad_train:
        p.unlink()
    out = tmp_path / "run"
    config = str(train_config(tmp_path, root))
    # epoch 1 is not evaluated (eval_every 2); epoch 2's evaluation reads the bad file
    proc = featkd_train(config, "--out", str(out), "--set", "train.epochs=2", "--set", "train.eval_every=2")
    line = assert_one_error_line(proc, bad_val)
    assert line.endswith("(epoch 2, not evaluated) keeps the epoch's training, continue with --resume"), line
    state = load_checkpoint(out / "last.pt")
    assert state["epoch"] == 2 and state["pending_eval"] and len(state["history"]) == 2
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]

    bad_val[0].unlink()  # the file fixed: --resume evaluates epoch 2 without training it again
    proc = featkd_train(config, "--out", str(out), "--set", "train.epochs=2", "--set", "train.eval_every=2",
                        "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and "test_acc" in records[1] and "test_acc" not in records[0]
    assert records[1]["step"] == state["step"]  # no step trained twice
    assert not load_checkpoint(out / "last.pt").get("pending_eval")


def test_bad_files_skipped_are_listed_once_in_the_run_folder(tmp_path, bad_root):
    from PIL import ImageFile

    root, bad_train, bad_val = bad_root
    out = tmp_path / "run"
    code = cli_main(["train", str(train_config(tmp_path, root)), "--out", str(out), "--set", "data.bad_files=skip",
                     "--set", "train.epochs=2"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["epochs"] == 2
    lines = (out / "skipped_files.txt").read_text().splitlines()
    assert len(lines) == 4
    assert sorted(next(str(p) for p in bad_train + bad_val if str(p) in line) for line in lines) == \
        sorted(map(str, bad_train + bad_val))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # nothing featkd imports turned PIL's truncation check off


# ---- methods that need sample indices ---------------------------------------------------------------------


def test_crd_trains_on_the_streamed_imagefolder(tmp_path, jpeg_root, one_thread):
    from featkd.config import build_config
    from featkd.engine.trainer import Trainer

    cfg = build_config({
        "name": "crd", "data": {"dataset": "imagefolder", "data_dir": str(jpeg_root), "image_size": 32,
                                "batch_size": 12, "eval_batch_size": 12, "num_workers": 1},
        "teacher": {"model": "resnet20"}, "student": {"model": "resnet8"},
        "method": {"name": "crd", "feat_dim": 16, "nce_k": 20},  # negatives: other_class (a labels pass)
        "train": {"epochs": 1, "num_threads": 1, "progress": "off", "tensorboard": False},
    })
    trainer = Trainer(cfg, tmp_path / "out", log=QUIET)
    before = trainer.distiller.bank_s.clone()
    result = trainer.fit()
    assert result.status == "finished" and result.test_acc is not None
    assert trainer.distiller.bank_s.shape[0] == 36
    changed = (trainer.distiller.bank_s != before).any(1)
    assert int(changed.sum()) == 36  # 3 steps of 12: every training sample's memory row was written


# ---- memory -------------------------------------------------------------------------------------------------

PEAK_RSS = r"""
import sys
from featkd.data import DataConfig, build_data
bundle = build_data(DataConfig(dataset="imagefolder", data_dir=sys.argv[1], image_size=64, num_workers=0))
loader = bundle.train_loader(16, seed=0)
seen = 0
for b, (x, _y) in enumerate(loader):
    seen += len(x)
    if b == 4:
        break
kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(bundle.train_size, seen, kib)
"""


@pytest.fixture(scope="session")
def large_folders(tmp_path_factory) -> dict[int, Path]:
    """2,000 generated 640x480 JPEGs in one ImageFolder and the first 200 of them (hard links) in another."""
    base = tmp_path_factory.mktemp("large")
    big = base / "n2000"
    write_jpegs(big, {"train": 667, "val": 1}, size=(640, 480), quality=20)  # 2,001 training images
    small = base / "n200"
    for split, n in (("train", 67), ("val", 1)):  # 201
        for name in CLASSES:
            (small / split / name).mkdir(parents=True)
            for i in range(n):
                os.link(big / split / name / f"{i}.jpg", small / split / name / f"{i}.jpg")
    return {2001: big, 201: small}


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_resident_memory_does_not_grow_with_the_number_of_images(large_folders):
    peaks = {}
    for n, root in large_folders.items():
        proc = subprocess.run([sys.executable, "-c", PEAK_RSS, str(root)], cwd=ROOT, env=ENV, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        size, seen, kib = map(int, proc.stdout.split())
        assert (size, seen) == (n, 80)
        peaks[n] = kib / 1024
    print(f"peak resident memory: {peaks[201]:.0f} MiB with 201 images, {peaks[2001]:.0f} MiB with 2,001")
    # decoded in memory the 1,800 extra images would take 1,800 x 640 x 480 x 3 bytes = 1.6 GiB
    assert abs(peaks[2001] - peaks[201]) < 200


# ---- a real torchrun run -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_process_torchrun_trains_on_the_streamed_imagefolder(tmp_path, jpeg_root):
    cfg = train_config(tmp_path, jpeg_root, num_workers=1)
    out = tmp_path / "ddp"
    proc = run([*TORCHRUN, "-m", "featkd", "train", str(cfg), "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["status"] == "finished" and summary["epochs"] == 1
    assert proc.stdout.count("streamed from disk (1 workers)") == 1 and proc.stdout.count("done: test_acc") == 1
    # 36 training images, global batch 8: 4 steps, 4 images per rank each
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert record["step"] == 4
