"""Streamed semantic segmentation (featkd.data.seg_stream) on files written in the real layouts: Cityscapes at
2048 x 1024 with real label ids, VOC with images of different sizes. The recipes (rescale, crop with 0 / 255
padding, flip), determinism, bad files met in workers, sliding-window evaluation, the teacher-cache key, and a
short `featkd train` run evaluated at full resolution. Real files, no mocks."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from featkd.config import from_dict
from featkd.data import DataConfig, ScenesConfig, build_data
from featkd.data.seg_stream import Recipe
from featkd.engine.teacher_cache import stream_ingredients, stream_key
from featkd.errors import ConfigError, DataError
from featkd.tasks import task_for
from featkd.tasks.segmentation import SegmentationTask, window_starts

ROOT = Path(__file__).resolve().parents[1]
CS_H, CS_W = 1024, 2048
#: Cityscapes label ids and their train ids: road, sidewalk, building, car, person, unlabeled, bicycle,
#: vegetation, sky (cityscapesScripts labels.py)
LABEL_IDS = np.array([7, 8, 11, 26, 24, 0, 33, 21, 23], np.uint8)
TRAIN_IDS = np.array([0, 1, 2, 13, 11, 255, 18, 8, 10])
MMSEG = {"scale_range": [0.5, 2.0], "base_size": [1024, 2048], "crop_size": [512, 1024]}


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    return message


def save(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    (Image.fromarray(array, mode) if mode else Image.fromarray(array)).save(path, compress_level=1)


def red_of(train_ids: np.ndarray) -> np.ndarray:
    """The red channel that encodes a train-id mask: id * 10, 250 where ignored."""
    return np.where(train_ids == 255, 250, train_ids.astype(int) * 10).astype(np.uint8)


def encoded(train_ids: np.ndarray) -> np.ndarray:
    """RGB (H, W, 3): red encodes the mask, green the column (x // 8 mod 256: it falls where a flip ran)."""
    h, w = train_ids.shape
    green = np.broadcast_to((np.arange(w) // 8 % 256).astype(np.uint8), (h, w))
    return np.stack([red_of(train_ids), green, np.full((h, w), 9, np.uint8)], axis=-1)


def cityscapes_label_ids(k: int, h: int, w: int) -> np.ndarray:
    """Blocks of real label ids, 1/16 of the width by 1/4 of the height, shifted by ``k``."""
    cols = (np.arange(w) * 16 // w + k) % len(LABEL_IDS)
    rows = np.arange(h) * 4 // h
    return LABEL_IDS[(cols[None, :] + rows[:, None]) % len(LABEL_IDS)]


def write_cityscapes(root: Path, h: int = CS_H, w: int = CS_W, train: int = 3, val: int = 2) -> dict[str, list]:
    """``leftImg8bit/{train,val}/<city>/<city>_00000k_000019_leftImg8bit.png`` + ``gtFine/..._labelIds.png``;
    returns the train-id masks per split, in file order."""
    written: dict[str, list] = {"train": [], "val": []}
    for split, city, n in (("train", "aachen", train), ("val", "lindau", val)):
        for k in range(n):
            stem = f"{city}_{k:06d}_000019"
            ids = cityscapes_label_ids(k + 3 * (split == "val"), h, w)
            train_ids = to_train_ids(ids)
            save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", encoded(train_ids))
            save(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", ids, "L")
            written[split].append(train_ids)
    return written


def to_train_ids(ids: np.ndarray) -> np.ndarray:
    """The train ids (H, W) of label ids, by :data:`LABEL_IDS` -> :data:`TRAIN_IDS`."""
    table = np.full(256, 255, np.int64)
    table[LABEL_IDS] = TRAIN_IDS
    return table[ids]


@pytest.fixture(scope="module")
def cityscapes(tmp_path_factory) -> tuple[Path, dict[str, list]]:
    root = tmp_path_factory.mktemp("cityscapes")
    return root, write_cityscapes(root)


def palette_png(path: Path, values: np.ndarray) -> None:
    """A VOC-style palette PNG whose pixel values (palette indices) are ``values``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(values, "L").convert("P")
    image.putpalette([v for c in range(256) for v in ((c * 37) % 256, (c * 91) % 256, (c * 53) % 256)])
    image.save(path)


VOC_SIZES = {"2007_000032": (16, 24), "2007_000039": (20, 18), "2007_000063": (12, 30),
             "2007_000033": (14, 20), "2007_000042": (18, 26)}


def write_voc(root: Path) -> dict[str, np.ndarray]:
    """VOC layout, images of different sizes; masks hold classes 0..12 and 255 (a void border)."""
    base = root / "VOCdevkit" / "VOC2012"
    (base / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    names = list(VOC_SIZES)
    (base / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(names[:3]) + "\n")
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(names[3:]) + "\n")
    written = {}
    for k, (name, (h, w)) in enumerate(VOC_SIZES.items()):
        m = np.random.default_rng(k).integers(0, 13, (h, w)).astype(np.uint8)
        m[-1, :] = 255
        palette_png(base / "SegmentationClass" / f"{name}.png", m)
        save(base / "JPEGImages" / f"{name}.png", encoded(m))  # PNG bytes: exact pixels (PIL reads by content)
        (base / "JPEGImages" / f"{name}.png").rename(base / "JPEGImages" / f"{name}.jpg")
        written[name] = m
    return written


def raw(x: torch.Tensor, bundle) -> np.ndarray:
    """The uint8 pixel values (B, 3, H, W) of a normalised batch."""
    mean = torch.tensor(bundle.mean, dtype=torch.float64).view(1, -1, 1, 1)
    std = torch.tensor(bundle.std, dtype=torch.float64).view(1, -1, 1, 1)
    return torch.round((x.double() * std + mean) * 255).numpy().astype(int)


def batches(bundle, epoch: int, seed: int = 0, batch: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader = bundle.train_loader(batch, seed=seed)
    loader.set_epoch(epoch)
    return list(loader)


# ---------------------------------------------------------------------------------------------------------
# Cityscapes at 2048 x 1024


def test_cityscapes_mmseg_recipe_streams_crops_and_evaluates_at_full_resolution(cityscapes) -> None:
    root, written = cityscapes
    bundle = build_data(DataConfig(dataset="cityscapes", data_dir=str(root), **MMSEG))
    assert bundle.storage.startswith("streamed from disk") and "data.scale_range" in bundle.storage
    assert bundle.input_shape == (3, 512, 1024) and (bundle.train_size, bundle.test_size) == (3, 2)
    assert bundle.augmentation == ("random rescale [0.5, 2] of 1024x2048 (keep ratio) + random crop 512x1024 "
                                   "(padded 0, mask 255) + hflip")
    valid = set(TRAIN_IDS.tolist())
    for epoch in range(2):
        (x, y), = batches(bundle, epoch)
        assert x.shape == (2, 3, 512, 1024) and x.dtype == torch.float32
        assert y.shape == (2, 512, 1024) and y.dtype == torch.int64
        assert set(y.unique().tolist()) <= valid
        red, labelled = raw(x, bundle)[:, 0], (y != 255).numpy()
        # the image moved with its mask: red encodes the train id (bilinear blends only at block edges)
        agree = np.abs(red - y.numpy() * 10) <= 2
        assert agree[labelled].mean() > 0.97
    # evaluation: every image whole, unresized, masks mapped to train ids at 2048 x 1024
    loader = bundle.test_loader(1)
    for (x, y), mask in zip(loader, written["val"], strict=True):
        assert x.shape == (1, 3, CS_H, CS_W)
        np.testing.assert_array_equal(y[0].numpy(), mask)
        np.testing.assert_array_equal(raw(x, bundle)[0, 0], red_of(mask))


def test_auto_streams_over_the_memory_limit_and_keeps_a_small_uniform_set_in_memory(cityscapes) -> None:
    root, _ = cityscapes
    small = build_data(DataConfig(dataset="cityscapes", data_dir=str(root)))
    assert small.storage.startswith("in memory") and small.input_shape == (3, CS_H, CS_W)
    big = build_data(DataConfig(dataset="cityscapes", data_dir=str(root), memory_limit_gb=0.01))
    assert big.storage.startswith("streamed from disk") and "over data.memory_limit_gb 0.01" in big.storage
    assert big.augmentation == "hflip" and big.input_shape == (3, CS_H, CS_W)
    for (xs, ys), (xb, yb) in zip(small.test_loader(1), big.test_loader(1), strict=True):
        assert torch.equal(xs, xb) and torch.equal(ys, yb)


def test_same_seed_and_epoch_give_the_same_batch_whatever_the_workers(cityscapes) -> None:
    root, _ = cityscapes
    cfg = dict(dataset="cityscapes", data_dir=str(root), scale_range=[0.5, 2.0], crop_size=[256, 512])
    a = build_data(DataConfig(**cfg))
    b = build_data(DataConfig(**cfg, num_workers=2))
    (xa, ya), = batches(a, epoch=1)
    (xb, yb), = batches(b, epoch=1)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    (xc, _), = batches(a, epoch=2)
    (xd, _), = batches(a, epoch=1, seed=1)
    assert not torch.equal(xa, xc) and not torch.equal(xa, xd)


def test_scenes_stays_in_memory_and_streams_the_same_samples_when_asked(tmp_path: Path, fashion_mnist_dir) -> None:
    scenes = ScenesConfig(train_size=12, test_size=6, canvas_size=64)
    memory = build_data(DataConfig(dataset="scenes", data_dir=str(tmp_path), scenes=scenes, augment=False))
    assert memory.storage.startswith("in memory (") and "under data.memory_limit_gb" in memory.storage
    stream = build_data(DataConfig(dataset="scenes", data_dir=str(tmp_path), scenes=scenes, augment=False,
                                   storage="stream"))
    assert stream.storage.startswith("streamed from disk") and stream.input_shape == memory.input_shape
    assert (stream.mean, stream.std) == (memory.mean, memory.std)  # its own statistics, taken one image at a time
    for (xm, ym), (xs, ys) in zip(memory.test_loader(4), stream.test_loader(4), strict=True):
        assert torch.equal(ym, ys) and torch.allclose(xm, xs)


# ---------------------------------------------------------------------------------------------------------
# VOC: images of different sizes


def test_voc_of_mixed_sizes_streams_and_pads_batches_with_0_and_255(tmp_path: Path) -> None:
    written = write_voc(tmp_path)
    bundle = build_data(DataConfig(dataset="voc", data_dir=str(tmp_path)))
    assert "the images differ in size" in bundle.storage and bundle.input_shape == (3, 16, 24)
    val = list(VOC_SIZES)[3:]
    x, y = next(iter(bundle.test_loader(2)))  # padded to the batch's largest: 18 x 26
    assert x.shape == (2, 3, 18, 26) and y.shape == (2, 18, 26)
    pixels = raw(x, bundle)
    for k, name in enumerate(val):
        h, w = VOC_SIZES[name]
        np.testing.assert_array_equal(y[k, :h, :w].numpy(), written[name])
        np.testing.assert_array_equal(pixels[k, 0, :h, :w], red_of(written[name]))
        assert (y[k, h:] == 255).all() and (y[k, :, w:] == 255).all()
        assert (pixels[k, :, h:] == 0).all() and (pixels[k, :, :, w:] == 0).all()
    sizes = [tuple(yy.shape[-2:]) for _, yy in bundle.test_loader(1)]  # batch 1: each at its own size
    assert sizes == [VOC_SIZES[n] for n in val]
    # a crop larger than every image: padded right / bottom, so the crop keeps each image at the top left
    crop = build_data(DataConfig(dataset="voc", data_dir=str(tmp_path), crop_size=[22, 32], hflip=False))
    assert crop.augmentation == "random crop 22x32 (padded 0, mask 255)"
    loader = crop.train_loader(3, seed=0)
    x, y = next(iter(loader))
    assert x.shape == (3, 3, 22, 32)
    for k, i in enumerate(loader.batch_indices.tolist()):
        name = list(VOC_SIZES)[i]
        h, w = VOC_SIZES[name]
        np.testing.assert_array_equal(y[k, :h, :w].numpy(), written[name])
        assert (y[k, h:] == 255).all() and (y[k, :, w:] == 255).all()
        assert (raw(x, crop)[k, :, h:] == 0).all()


def test_flips_move_masks_with_images(tmp_path: Path) -> None:
    write_voc(tmp_path)
    bundle = build_data(DataConfig(dataset="voc", data_dir=str(tmp_path), crop_size=[10, 16]))
    flipped = kept = 0
    for epoch in range(4):
        for x, y in batches(bundle, epoch, batch=3):
            pixels = raw(x, bundle)
            labelled = y != 255
            assert torch.equal(torch.from_numpy(pixels[:, 0])[labelled], y[labelled] * 10)  # exact: no resize
            steps = np.diff(pixels[:, 1].astype(int), axis=-1)  # green: the column, falling where flipped
            flipped += int((steps <= 0).all(axis=(1, 2)).sum())
            kept += int((steps >= 0).all(axis=(1, 2)).sum())
    assert flipped >= 1 and kept >= 1


def test_rescale_sizes_follow_torchvision_and_mmseg() -> None:
    mmseg = Recipe(scale_range=(0.5, 2.0), base_size=(1024, 2048), crop_size=(512, 1024))
    assert mmseg.resized(1024, 2048, 0.5) == (512, 1024) and mmseg.resized(1024, 2048, 2.0) == (2048, 4096)
    # keep ratio: the largest factor that fits the long side in 2048 and the short in 1024 (the order is moot)
    assert mmseg.resized(375, 500, 1.0) == (1024, 1365) == Recipe(base_size=(2048, 1024)).resized(375, 500, 1.0)
    assert mmseg.resized(1000, 500, 1.0) == (2048, 1024)
    torch.manual_seed(0)
    shorts = [min(Recipe(scale_range=(0.5, 2.0), base_size=520).resized(300, 400)) for _ in range(200)]
    assert min(shorts) >= 260 and max(shorts) <= 1040 and len(set(shorts)) > 50  # torchvision RandomResize
    own = [Recipe(scale_range=(0.5, 1.0)).resized(100, 60) for _ in range(50)]
    assert all(50 <= h <= 100 and abs(w / h - 0.6) < 0.02 for h, w in own)


# ---------------------------------------------------------------------------------------------------------
# Bad files met in a worker


def test_a_bad_mask_in_a_worker_is_one_data_error_line_naming_the_file(tmp_path: Path) -> None:
    write_cityscapes(tmp_path, h=64, w=128, train=4, val=1)
    gt = tmp_path / "gtFine" / "train" / "aachen"
    bad = cityscapes_label_ids(1, 64, 128).copy()
    bad[3, 4] = 40  # not a Cityscapes label id
    save(gt / "aachen_000001_000019_gtFine_labelIds.png", bad, "L")
    save(gt / "aachen_000002_000019_gtFine_labelIds.png", np.zeros((63, 128), np.uint8), "L")
    cfg = dict(dataset="cityscapes", data_dir=str(tmp_path), storage="stream", num_workers=2, crop_size=32)
    bundle = build_data(DataConfig(**cfg))  # nothing decoded yet
    with pytest.raises(DataError) as exc:
        list(bundle.train_eval_loader(4))
    message = one_line(exc)
    assert ("aachen_000001_000019_gtFine_labelIds.png: mask value 40 is not a Cityscapes label id" in message
            or "aachen_000002_000019_gtFine_labelIds.png is 128x63 but its image" in message)
    with pytest.raises(DataError) as exc:
        list(bundle.train_eval_loader(1, indices=torch.tensor([2])))
    assert "aachen_000002_000019_gtFine_labelIds.png is 128x63 but its image" in one_line(exc)
    with pytest.raises(DataError) as exc:
        for _ in bundle.train_loader(4, seed=0):
            pass
    assert "aachen_00000" in one_line(exc)
    skipping = build_data(DataConfig(**cfg, bad_files="skip"))
    loader = skipping.train_loader(4, seed=0)
    (x, _), = list(loader)
    assert x.shape == (4, 3, 32, 32) and len(loader.skipped) >= 2
    assert any("mask value 40" in line for line in loader.skipped)


# ---------------------------------------------------------------------------------------------------------
# Config


def test_recipe_options_are_checked_and_name_the_fix(tmp_path: Path) -> None:
    write_voc(tmp_path)
    voc = dict(dataset="voc", data_dir=str(tmp_path))
    with pytest.raises(ConfigError) as exc:
        build_data(DataConfig(**voc, storage="memory", image_size=16, crop_size=8))
    assert one_line(exc).startswith("data.crop_size:") and "data.storage: stream" in one_line(exc)
    with pytest.raises(ConfigError) as exc:
        build_data(DataConfig(**voc, crop_padding=2))
    assert one_line(exc).startswith("data.crop_padding:") and "data.crop_size" in one_line(exc)
    with pytest.raises(ConfigError) as exc:
        build_data(DataConfig(**voc, base_size=16, image_size=16, storage="stream"))
    assert one_line(exc).startswith("data.base_size:")
    with pytest.raises(ConfigError) as exc:
        build_data(DataConfig(dataset="digits", crop_size=8))
    assert one_line(exc).startswith("data.crop_size:") and "segmentation" in one_line(exc)
    for raw_cfg, key in (({"scale_range": [2.0, 1.0]}, "scale_range"), ({"crop_size": [0, 3]}, "crop_size"),
                         ({"base_size": [1, 2, 3]}, "base_size"), ({"eval_stride": 4}, "eval_stride"),
                         ({"eval_window": [8, 8], "eval_stride": [4, 9]}, "eval_stride")):
        with pytest.raises(ConfigError) as exc:
            from_dict(DataConfig, raw_cfg, "data")
        assert one_line(exc).startswith(f"data.{key}")
    cfg = from_dict(DataConfig, {"eval_window": [769, 769]}, "data")
    bundle = build_data(DataConfig(**voc, eval_window=cfg.eval_window))
    assert (bundle.eval_window, bundle.eval_stride) == ((769, 769), (513, 513))  # mmseg's 769 configs


# ---------------------------------------------------------------------------------------------------------
# Sliding-window evaluation


def test_window_starts_cover_every_pixel() -> None:
    for length in range(1, 60):
        for window in (1, 5, 16, 64):
            for stride in {1, max(1, window // 2), max(1, 2 * window // 3), window}:
                covered = np.zeros(length, bool)
                starts = window_starts(length, window, stride)
                for s in starts:
                    assert s >= 0 and (s + window <= length or (s == 0 and length < window))
                    covered[s : s + window] = True
                assert covered.all() and starts == sorted(set(starts))


def test_sliding_window_predict_equals_whole_image_predict_for_a_pointwise_model() -> None:
    torch.manual_seed(0)
    model = nn.Conv2d(3, 5, 1)  # translation-equivariant: each pixel's logits depend on that pixel only
    x = torch.randn(2, 3, 37, 53)
    task = SegmentationTask(5, eval_window=(16, 20), eval_stride=(11, 13))
    with torch.no_grad():
        slid, whole = task.predict(model, x), model(x)
        assert slid.shape == whole.shape and torch.allclose(slid, whole, atol=1e-6)
        assert task.predict(model, x[..., :16, :20]) is not None  # fits one window: the whole image
        torchvision_style = task.predict(lambda t: {"out": model(t)}, x)  # {'out': logits} models too
        assert torch.allclose(torchvision_style, whole, atol=1e-6)
        half = task.predict(nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(3, 5, 1)), x)  # lower-resolution logits
        assert half.shape == (2, 5, 37, 53)
        wide = SegmentationTask(5, eval_window=(64, 20), eval_stride=(64, 7))  # taller than the image
        assert torch.allclose(wide.predict(model, x), whole, atol=1e-6)


def test_the_task_takes_the_window_from_the_bundle(tmp_path: Path) -> None:
    write_voc(tmp_path)
    bundle = build_data(DataConfig(dataset="voc", data_dir=str(tmp_path), eval_window=[8, 12]))
    task = task_for(bundle)
    assert (task.eval_window, task.eval_stride) == ((8, 12), (6, 8))
    assert "evaluated in 8x12 windows, stride 6x8" in bundle.describe()


# ---------------------------------------------------------------------------------------------------------
# Teacher cache key


def _key(**data) -> str:
    cfg = DataConfig(dataset="cityscapes", data_dir="/nowhere", **data)
    torch.manual_seed(0)
    teacher = nn.Conv2d(3, 19, 1)  # the same weights every time
    run = SimpleNamespace(
        cfg=SimpleNamespace(data=cfg, teacher=SimpleNamespace(model="fcn_resnet8", options={}),
                            teacher_description=lambda: {"model": "fcn_resnet8", "options": {}},
                            train=SimpleNamespace(seed=0, channels_last=False, compile=False, deterministic=False)),
        teacher=teacher, teacher_capture=SimpleNamespace(points=["out"]), task=SegmentationTask(19),
        dist=SimpleNamespace(world_size=1), amp=False, device=torch.device("cpu"),
    )
    return stream_key(stream_ingredients(run, steps_per_epoch=10))


def test_the_teacher_cache_key_follows_the_training_recipe_not_the_evaluation_window() -> None:
    base = _key(**MMSEG)
    for change in ({"crop_size": [512, 512]}, {"scale_range": [0.75, 2.0]}, {"base_size": 1024},
                   {"hflip": False}, {"storage": "memory"}):
        assert _key(**{**MMSEG, **change}) != base, change
    assert _key(**MMSEG, eval_window=[1024, 1024], eval_stride=512) == base
    assert {f.name for f in dataclasses.fields(DataConfig)} >= {"scale_range", "base_size", "crop_size"}


# ---------------------------------------------------------------------------------------------------------
# featkd train, end to end


@pytest.mark.slow
def test_featkd_train_streams_cityscapes_crops_and_evaluates_at_2048x1024(tmp_path: Path, cityscapes) -> None:
    root, written = cityscapes
    raw_cfg = {
        "name": "cityscapes-stream",
        "data": {"dataset": "cityscapes", "data_dir": str(root), "batch_size": 2, "eval_batch_size": 1,
                 "num_workers": 2, "scale_range": [0.5, 2.0], "base_size": [1024, 2048], "crop_size": [256, 512],
                 "eval_window": [1024, 1024]},
        "student": {"model": "fcn_resnet8"},
        "method": {"name": "none"},
        "optim": {"optimizer": "adamw", "lr": 1e-3},
        "train": {"epochs": 1, "num_threads": 2, "progress": "off", "tensorboard": False, "seed": 0},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw_cfg))
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "featkd", "train", str(path), "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "input 3x256x512" in proc.stdout and "streamed from disk (2 workers)" in proc.stdout
    assert "evaluated in 1024x1024 windows, stride 683x683" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["metric"] == "miou"
    # the metric counted every labelled pixel of the two 2048 x 1024 validation masks
    from featkd.config import build_config
    from featkd.engine.build import build_run

    run = build_run(build_config(raw_cfg), log=lambda _m: None)
    result = run.evaluate(run.student)
    labelled = sum(int((m != 255).sum()) for m in written["val"])
    assert result["pixels"] == labelled
