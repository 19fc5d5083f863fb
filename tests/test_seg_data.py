"""Segmentation data sets (segfolder, voc, cityscapes) on tiny files written in their layouts, the mask-aware
in-memory loaders, and the pinned classification batches. Real files, no mocks."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from featkd.config import from_dict
from featkd.data import DataConfig, build_data
from featkd.data.augment import AugmentSpec, crop_flip_masks
from featkd.data.loaders import InMemoryEvalLoader, InMemoryTrainLoader, Normalizer, TensorSplit
from featkd.data.seg_datasets import VOC_CLASSES
from featkd.errors import ConfigError, DataError

H, W = 16, 24  # every tiny image here is 24 wide, 16 high


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    return message


def save(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    (Image.fromarray(array, mode) if mode else Image.fromarray(array)).save(path)


def palette_png(path: Path, values: np.ndarray) -> None:
    """A VOC-style palette PNG whose pixel values (palette indices) are ``values`` (H, W) uint8."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(values, "L").convert("P")  # keeps the indices
    image.putpalette([v for c in range(256) for v in ((c * 37) % 256, (c * 91) % 256, (c * 53) % 256)])
    image.save(path)


def mask_values(seed: int, num_classes: int, ignore: bool = True) -> np.ndarray:
    m = np.random.default_rng(seed).integers(0, num_classes, (H, W)).astype(np.uint8)
    if ignore:
        m[0, :3] = 255
    return m


def encoding_image(mask: np.ndarray) -> np.ndarray:
    """RGB (H, W, 3) whose red channel encodes ``mask`` (value * 20, 250 for ignore) and green the column."""
    red = np.where(mask == 255, 250, mask.astype(int) * 20).astype(np.uint8)
    green = np.broadcast_to(np.arange(mask.shape[1], dtype=np.uint8) * 10, mask.shape)
    return np.stack([red, green, np.full_like(red, 7)], axis=-1)


def write_segfolder(root: Path, n_train: int = 6, n_test: int = 3, classes: int = 3) -> dict[str, list[np.ndarray]]:
    (root).mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(f"class{k}" for k in range(classes)) + "\n")
    written: dict[str, list[np.ndarray]] = {}
    for split, n in (("train", n_train), ("test", n_test)):
        written[split] = []
        for i in range(n):
            m = mask_values(100 * (split == "test") + i, classes)
            save(root / split / "images" / f"s{i:02d}.png", encoding_image(m))
            save(root / split / "masks" / f"s{i:02d}.png", m, "L")
            written[split].append(m)
    return written


def raw_pixels(x: torch.Tensor, bundle) -> np.ndarray:
    mean = torch.tensor(bundle.mean, dtype=torch.float64).view(1, -1, 1, 1)
    std = torch.tensor(bundle.std, dtype=torch.float64).view(1, -1, 1, 1)
    return torch.round((x.double() * std + mean) * 255).numpy().astype(int)


# ---------------------------------------------------------------------------------------------------------
# The classification path is unchanged


def _hash(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def test_digits_batches_unchanged() -> None:
    """Hashes computed by the data layer before segmentation existed (same code, run 2026-12-01)."""
    bundle = build_data(DataConfig(dataset="digits"))
    assert bundle.task == "classification"
    loader = bundle.train_loader(128, seed=0)
    loader.set_epoch(0)
    x, y = next(iter(loader))
    assert _hash(x, y) == "374f82be59c89a6a"
    loader.set_epoch(3)
    assert _hash(*next(iter(loader))) == "a5a4d4566d0176c1"
    assert _hash(*next(iter(bundle.test_loader(512)))) == "f5a532f2bf21043c"
    sub = build_data(DataConfig(dataset="digits", train_subset=300, val_fraction=0.1, subset_seed=1))
    loader = sub.train_loader(64, seed=2)
    loader.set_epoch(1)
    assert _hash(*next(iter(loader))) == "f95a25250bef9bb6"
    assert _hash(*next(iter(sub.val_loader(512)))) == "d17c65a6035a1378"


# ---------------------------------------------------------------------------------------------------------
# Loaders with masks


def test_mask_crop_flip_follows_the_image() -> None:
    n = 32
    masks = torch.from_numpy(np.stack([mask_values(i, 5) for i in range(n)]))
    images = torch.from_numpy(np.stack([encoding_image(m) for m in masks.numpy()])).permute(0, 3, 1, 2)
    split = TensorSplit(images.contiguous(), masks, ignore_index=255)
    raw = Normalizer((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 1.0)  # x = the uint8 values as floats
    loader = InMemoryTrainLoader(split, raw, AugmentSpec(3, True), 8, seed=0)
    padded = flipped = 0
    for epoch in range(3):
        loader.set_epoch(epoch)
        for x, y in loader:
            assert x.dtype == torch.float32 and x.shape == (8, 3, H, W)
            assert y.dtype == torch.int64 and y.shape == (8, H, W)
            red, green = x[:, 0].long(), x[:, 1].long()
            labelled = y != 255
            assert torch.equal(red[labelled], y[labelled] * 20)
            pad = (y == 255) & (red == 0) & (green == 0)  # padding: image 0, mask = the ignore index
            assert torch.equal((y == 255) & ~pad, (y == 255) & (red == 250))  # else the file's own ignore
            padded += int(pad.any(dim=(1, 2)).sum())
            col = green[:, H // 2, W // 2] // 10
            flipped += int((green[:, H // 2, W // 2 + 1] // 10 < col).sum())
    assert padded > 0 and flipped > 0
    # eval: unaugmented, in order
    x, y = next(iter(InMemoryEvalLoader(split, raw, 32)))
    assert torch.equal(y, masks.long()) and torch.equal(x.to(torch.uint8), images)


def test_crop_flip_masks_pads_with_the_ignore_index() -> None:
    masks = torch.arange(12, dtype=torch.uint8).view(1, 3, 4)
    out = crop_flip_masks(masks, torch.tensor([[0, 0]]), torch.tensor([True]), 1, 255)
    assert out[0, 0].tolist() == [255, 255, 255, 255]
    assert out[0, 1].tolist() == [2, 1, 0, 255]


def test_tensor_split_checks_mask_shapes() -> None:
    images = torch.zeros(2, 3, 4, 5, dtype=torch.uint8)
    with pytest.raises(ValueError):
        TensorSplit(images, torch.zeros(2, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError):
        TensorSplit(images, torch.zeros(2, 4, 5, dtype=torch.int64))


# ---------------------------------------------------------------------------------------------------------
# segfolder


def test_segfolder_reads_masks_and_augments_consistently(tmp_path: Path) -> None:
    written = write_segfolder(tmp_path)
    cfg = DataConfig(dataset="segfolder", data_dir=str(tmp_path), crop_padding=3)
    bundle = build_data(cfg)
    assert (bundle.task, bundle.num_classes, bundle.class_names) == (
        "segmentation", 3, ("class0", "class1", "class2")
    )
    assert bundle.input_shape == (3, H, W) and (bundle.train_size, bundle.test_size) == (6, 3)
    assert bundle.augmentation == "random crop (pad 3) + hflip"
    x, y = next(iter(bundle.test_loader(8)))
    np.testing.assert_array_equal(y.numpy(), np.stack(written["test"]))
    red = np.stack([encoding_image(m)[..., 0] for m in written["test"]])
    np.testing.assert_array_equal(raw_pixels(x, bundle)[:, 0], red)
    loader = bundle.train_loader(6, seed=0)
    for epoch in range(2):
        loader.set_epoch(epoch)
        x, y = next(iter(loader))
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and y.shape == (6, H, W)
        red = torch.from_numpy(raw_pixels(x, bundle)[:, 0])
        labelled = y != 255
        assert torch.equal(red[labelled], y[labelled] * 20)
        assert set(red[~labelled].unique().tolist()) <= {0, 250}
        assert ((y == 255) & (red == 0)).any()  # some padding, labelled ignore


def test_segfolder_subset_and_val_are_seeded_permutations(tmp_path: Path) -> None:
    write_segfolder(tmp_path, n_train=10)
    cfg = dict(dataset="segfolder", data_dir=str(tmp_path), augment=False)
    full = build_data(DataConfig(**cfg))
    _, everything = next(iter(full.train_eval_loader(10)))
    a = build_data(DataConfig(**cfg, train_subset=4, val_fraction=0.2, subset_seed=3))
    b = build_data(DataConfig(**cfg, train_subset=4, val_fraction=0.2, subset_seed=3))
    assert (a.train_size, a.val_size) == (4, 2)
    ya, yb = next(iter(a.train_eval_loader(4)))[1], next(iter(b.train_eval_loader(4)))[1]
    assert torch.equal(ya, yb)
    val = next(iter(a.val_loader(4)))[1]
    rows = {m.numpy().tobytes(): i for i, m in enumerate(everything)}
    picked = [rows[m.numpy().tobytes()] for m in torch.cat([ya, val])]
    assert len(set(picked)) == 6 and picked[:4] == sorted(picked[:4])
    c = build_data(DataConfig(**cfg, train_subset=4, val_fraction=0.2, subset_seed=4))
    assert not torch.equal(next(iter(c.train_eval_loader(4)))[1], ya)


def test_segfolder_resizes_to_image_size(tmp_path: Path) -> None:
    write_segfolder(tmp_path, n_train=2, n_test=1)
    m = np.zeros((8, 12), np.uint8)
    m[:, 6:] = 2
    save(tmp_path / "train" / "images" / "big.png", np.zeros((8, 12, 3), np.uint8))
    save(tmp_path / "train" / "masks" / "big.png", m, "L")
    with pytest.raises(DataError) as exc:  # in memory; auto streams a set of mixed sizes (test_seg_stream.py)
        build_data(DataConfig(dataset="segfolder", data_dir=str(tmp_path), storage="memory"))
    assert "big.png is 12x8" in one_line(exc) and "data.image_size" in one_line(exc)
    bundle = build_data(DataConfig(dataset="segfolder", data_dir=str(tmp_path), image_size=[4, 6], augment=False))
    assert bundle.input_shape == (3, 4, 6)
    x, y = next(iter(bundle.train_eval_loader(3)))
    assert x.shape == (3, 3, 4, 6)
    assert y[0].tolist() == [[0, 0, 0, 2, 2, 2]] * 4  # nearest: values kept, no blends
    assert set(y[1:].unique().tolist()) <= {0, 1, 2, 255}


@pytest.mark.parametrize(
    "damage, culprit",
    [
        ("bad value", "masks/s01.png: mask value 7 is not a class id (0..2) or the ignore index 255"),
        ("size", "masks/s01.png is 24x15 but its image"),
        ("no mask", "images/s01.png has no mask"),
        ("no classes", "classes.txt not found"),
        ("empty", "no images"),
        ("rgb mask", "masks/s01.png: a mask must be a single-channel PNG"),
    ],
)
def test_segfolder_bad_input(tmp_path: Path, damage: str, culprit: str) -> None:
    write_segfolder(tmp_path, n_train=3, n_test=1)
    mask = tmp_path / "train" / "masks" / "s01.png"
    if damage == "bad value":
        m = mask_values(1, 3)
        m[5, 5] = 7
        save(mask, m, "L")
    elif damage == "size":
        save(mask, np.zeros((H - 1, W), np.uint8), "L")
    elif damage == "no mask":
        mask.unlink()
    elif damage == "no classes":
        (tmp_path / "classes.txt").unlink()
    elif damage == "empty":
        for p in (tmp_path / "test" / "images").iterdir():
            p.unlink()
    elif damage == "rgb mask":
        save(mask, np.zeros((H, W, 3), np.uint8))
    with pytest.raises(DataError) as exc:
        build_data(DataConfig(dataset="segfolder", data_dir=str(tmp_path)))
    assert culprit in one_line(exc)


def test_segmentation_sets_need_their_root(tmp_path: Path) -> None:
    for name in ("segfolder", "voc", "cityscapes"):
        with pytest.raises(DataError) as exc:
            build_data(DataConfig(dataset=name, data_dir=str(tmp_path / "nowhere")))
        assert str(tmp_path / "nowhere") in one_line(exc)
        with pytest.raises(DataError) as exc:
            build_data(DataConfig(dataset=name))
        assert "data.data_dir is not set" in one_line(exc)


def test_image_size_config() -> None:
    assert from_dict(DataConfig, {"image_size": [16, 24]}, "data").image_size == [16, 24]
    assert from_dict(DataConfig, {"image_size": 32}, "data").image_size == 32
    for bad in ([0, 3], [1, 2, 3], -1):
        with pytest.raises(ConfigError) as exc:
            from_dict(DataConfig, {"image_size": bad}, "data")
        assert one_line(exc).startswith("data.image_size")


# ---------------------------------------------------------------------------------------------------------
# VOC and Cityscapes layouts


def test_voc_layout(tmp_path: Path) -> None:
    base = tmp_path / "VOCdevkit" / "VOC2012"
    ids = {"train": ["2007_000032", "2007_000039", "2007_000063"], "val": ["2007_000033", "2007_000042"]}
    written = {}
    for split, names in ids.items():
        (base / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
        (base / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
        for k, name in enumerate(names):
            m = mask_values(k + 10 * (split == "val"), 21)
            m[-1, :] = 255  # VOC's void border
            palette_png(base / "SegmentationClass" / f"{name}.png", m)
            save(base / "JPEGImages" / f"{name}.jpg", encoding_image(m))
            written[name] = m
    assert Image.open(base / "SegmentationClass" / "2007_000032.png").mode == "P"
    bundle = build_data(DataConfig(dataset="voc", data_dir=str(tmp_path)))
    assert (bundle.num_classes, bundle.class_names, bundle.task) == (21, VOC_CLASSES, "segmentation")
    assert (bundle.train_size, bundle.test_size, bundle.input_shape) == (3, 2, (3, H, W))
    _, y = next(iter(bundle.test_loader(2)))  # test = val.txt, in its order
    np.testing.assert_array_equal(y.numpy(), np.stack([written[n] for n in ids["val"]]))
    _, y = next(iter(bundle.train_eval_loader(3)))
    np.testing.assert_array_equal(y.numpy(), np.stack([written[n] for n in ids["train"]]))
    (base / "SegmentationClass" / "2007_000039.png").unlink()
    with pytest.raises(DataError) as exc:
        build_data(DataConfig(dataset="voc", data_dir=str(tmp_path)))
    assert "2007_000039.jpg has no mask" in one_line(exc)


def test_cityscapes_layout_maps_label_ids_to_train_ids(tmp_path: Path) -> None:
    # label ids: 7 road -> 0, 26 car -> 13, 24 person -> 11, 0 unlabeled -> 255, 4 static -> 255, 33 bicycle -> 18
    ids = np.array([7, 26, 24, 0, 4, 33], np.uint8)
    train_ids = np.array([0, 13, 11, 255, 255, 18])
    label_ids = np.resize(ids, (H, W)).astype(np.uint8)
    for split, city, stem in (("train", "aachen", "aachen_000000_000019"), ("train", "bochum", "bochum_000000_000313"),
                              ("val", "lindau", "lindau_000000_000019")):
        save(tmp_path / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", np.full((H, W, 3), 90, np.uint8))
        save(tmp_path / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", label_ids, "L")
    # a prepared train-id mask takes precedence over the label ids
    prepared = np.full((H, W), 5, np.uint8)
    save(tmp_path / "gtFine" / "val" / "lindau" / "lindau_000000_000019_gtFine_labelTrainIds.png", prepared, "L")
    bundle = build_data(DataConfig(dataset="cityscapes", data_dir=str(tmp_path), augment=False))
    assert bundle.num_classes == 19 and len(bundle.class_names) == 19
    assert (bundle.class_names[0], bundle.class_names[11], bundle.class_names[13]) == ("road", "person", "car")
    assert (bundle.train_size, bundle.test_size) == (2, 1)
    _, y = next(iter(bundle.train_eval_loader(2)))
    np.testing.assert_array_equal(y[0].numpy(), np.resize(train_ids, (H, W)))
    _, y = next(iter(bundle.test_loader(1)))
    assert (y == 5).all()
    bad = label_ids.copy()
    bad[3, 4] = 40
    save(tmp_path / "gtFine" / "train" / "bochum" / "bochum_000000_000313_gtFine_labelIds.png", bad, "L")
    with pytest.raises(DataError) as exc:
        build_data(DataConfig(dataset="cityscapes", data_dir=str(tmp_path)))
    assert "bochum_000000_000313_gtFine_labelIds.png: mask value 40 is not a Cityscapes label id" in one_line(exc)
