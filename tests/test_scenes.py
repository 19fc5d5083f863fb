"""The scenes generator (featkd.data.scenes) and the COCO RLE helpers: real Fashion-MNIST / MNIST items."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featkd.config import from_dict
from featkd.data import DataConfig, ScenesConfig, build_data, ensure_scenes, generate_scenes, read_idx
from featkd.data.coco import mask_bbox, rle_decode, rle_encode
from featkd.errors import ConfigError, DataError

TINY = ScenesConfig(train_size=24, test_size=12)


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    return message


def file_hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def scenes_root(tmp_path_factory: pytest.TempPathFactory, fashion_mnist_dir: Path) -> Path:
    """A cache root holding TINY's scenes (``<root>/<digest>/``)."""
    root = tmp_path_factory.mktemp("scenes-cache")
    ensure_scenes(TINY, root)
    return root


@pytest.fixture(scope="module")
def scenes_dir(scenes_root: Path) -> Path:
    return scenes_root / TINY.digest()


def load_coco(folder: Path, split: str) -> dict:
    return json.loads((folder / "annotations" / f"instances_{split}.json").read_text())


# ---------------------------------------------------------------------------------------------------------
# RLE


def rle_cases() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    masks = [rng.random((7, 5)) < 0.4 for _ in range(4)] + [np.zeros((3, 4), bool), np.ones((4, 3), bool)]
    masks[0][0, 0], masks[1][0, 0] = True, False  # both first-pixel cases
    return masks


def test_rle_round_trip() -> None:
    for mask in rle_cases():
        rle = rle_encode(mask)
        assert rle["size"] == list(mask.shape)
        assert sum(rle["counts"]) == mask.size
        np.testing.assert_array_equal(rle_decode(rle), mask)
    # hand-made: column-major runs (1 1 / 0 1 / 0 0), starting with zeros (row-major would be 0 1 2 2 1)
    mask = np.array([[1, 0, 0], [1, 1, 0]], bool)
    assert rle_encode(mask) == {"counts": [0, 2, 1, 1, 2], "size": [2, 3]}
    assert rle_encode(~mask) == {"counts": [2, 1, 1, 2], "size": [2, 3]}


def test_rle_reads_in_pycocotools() -> None:
    coco = pytest.importorskip("pycocotools.mask")
    for mask in rle_cases():
        rle = rle_encode(mask)
        compressed = coco.frPyObjects(rle, *rle["size"])
        np.testing.assert_array_equal(coco.decode(compressed).astype(bool), mask)
        assert int(coco.area(compressed)) == mask.sum()


def test_mask_bbox() -> None:
    mask = np.zeros((6, 8), bool)
    mask[2:4, 3:7] = True
    assert mask_bbox(mask) == [3, 2, 4, 2]


# ---------------------------------------------------------------------------------------------------------
# The generator


def test_scenes_identical_files_for_the_same_seed(scenes_dir: Path, tmp_path: Path) -> None:
    again = generate_scenes(TINY, tmp_path / "again")
    reference = file_hashes(scenes_dir)
    assert len(reference) == 2 * (24 + 12) + 2 + 2  # PNGs, 2 JSON, classes.txt, done
    assert file_hashes(again) == reference
    other = generate_scenes(ScenesConfig(train_size=24, test_size=12, seed=1), tmp_path / "other")
    other_hashes = file_hashes(other)
    assert other_hashes["train/images/000000.png"] != reference["train/images/000000.png"]
    # canvas i depends on (seed, split, i) only: a longer split starts with the same canvases
    longer = generate_scenes(ScenesConfig(train_size=30, test_size=12), tmp_path / "longer")
    assert file_hashes(longer)["train/images/000023.png"] == reference["train/images/000023.png"]


def test_scenes_layout_and_cache(scenes_root: Path, scenes_dir: Path) -> None:
    assert sorted(p.name for p in scenes_root.iterdir()) == [TINY.digest()]  # no temporary leftovers
    assert (scenes_dir / "done").read_text().strip() == TINY.digest()
    assert (scenes_dir / "classes.txt").read_text().splitlines() == ["background", *TINY.class_names]
    image = Image.open(scenes_dir / "train" / "images" / "000000.png")
    mask = Image.open(scenes_dir / "train" / "masks" / "000000.png")
    assert (image.mode, image.size, mask.mode, mask.size) == ("RGB", (96, 96), "L", (96, 96))
    stamp = (scenes_dir / "done").stat().st_mtime_ns
    assert ensure_scenes(TINY, scenes_root) == scenes_dir  # cached: not generated again
    assert (scenes_dir / "done").stat().st_mtime_ns == stamp
    assert ScenesConfig(train_size=25).digest() != ScenesConfig().digest()


def test_scenes_canvases_use_only_their_source_split(scenes_dir: Path, fashion_mnist_dir: Path) -> None:
    for split, prefix, n_source in (("train", "train", 60_000), ("test", "t10k", 10_000)):
        labels = read_idx(fashion_mnist_dir / f"{prefix}-labels-idx1-ubyte.gz")
        assert len(labels) == n_source
        coco = load_coco(scenes_dir, split)
        assert coco["info"]["source_split"] == split
        sources = np.array([a["source_index"] for a in coco["annotations"]])
        categories = np.array([a["category_id"] for a in coco["annotations"]])
        assert len(sources) >= (24 if split == "train" else 12)  # at least one item per canvas
        assert ((sources >= 0) & (sources < n_source)).all()
        # the recorded source image's label is the annotation's class: items come from this split
        np.testing.assert_array_equal(labels[sources] + 1, categories)
        fragments = [i for image in coco["images"] for i in image["fragment_sources"]]
        assert fragments and all(0 <= i < n_source for i in fragments)
        if split == "train":
            assert sources.max() >= 10_000  # really the 60k training split, not the 10k test split


def test_scenes_coco_json_matches_the_masks(scenes_dir: Path) -> None:
    try:
        import pycocotools.mask as pycoco
    except ImportError:
        pycoco = None
    for split in ("train", "test"):
        coco = load_coco(scenes_dir, split)
        assert [(c["id"], c["name"]) for c in coco["categories"]] == list(
            zip(range(1, 11), TINY.class_names, strict=True)
        )
        by_image: dict[int, list[dict]] = {}
        for ann in coco["annotations"]:
            by_image.setdefault(ann["image_id"], []).append(ann)
        assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])
        assert len(coco["images"]) == (24 if split == "train" else 12)
        for image in coco["images"]:
            assert (image["width"], image["height"]) == (96, 96)
            assert (scenes_dir / split / "images" / image["file_name"]).is_file()
            semantic = np.asarray(Image.open(scenes_dir / split / "masks" / image["file_name"]))
            anns = by_image.get(image["id"], [])
            assert anns, "every canvas has at least one item"
            union = np.zeros((96, 96), dtype=np.uint8)
            for ann in anns:
                assert ann["iscrowd"] == 0
                mask = rle_decode(ann["segmentation"])
                assert ann["segmentation"]["size"] == [96, 96]
                assert ann["area"] == mask.sum() > 0
                x, y, w, h = ann["bbox"]
                assert min(x, y) >= 0 and x + w <= 96 and y + h <= 96
                assert ann["bbox"] == mask_bbox(mask)
                assert (semantic[mask] == ann["category_id"]).all()
                assert not union[mask].any(), "instances are disjoint (visible pixels)"
                union[mask] = ann["category_id"]
                if pycoco is not None:
                    rle = pycoco.frPyObjects(ann["segmentation"], 96, 96)
                    np.testing.assert_array_equal(pycoco.decode(rle).astype(bool), mask)
                    np.testing.assert_allclose(pycoco.toBbox(rle), ann["bbox"])
            # the decoded instances of each class are exactly the semantic mask's pixels of that class
            np.testing.assert_array_equal(union, semantic)


def test_scenes_background_is_not_black_and_items_are_tinted(scenes_dir: Path) -> None:
    image = np.asarray(Image.open(scenes_dir / "train" / "images" / "000003.png")).astype(int)
    semantic = np.asarray(Image.open(scenes_dir / "train" / "masks" / "000003.png"))
    background = image[semantic == 0]
    assert background.mean() > 10 and background.std() > 5  # clutter, not a constant
    assert (image[semantic > 0].max(axis=0) > 100).any()


def test_scenes_from_mnist(tmp_path: Path, mnist_tgz: Path) -> None:
    cfg = ScenesConfig(source="mnist", source_dir=str(mnist_tgz), train_size=4, test_size=2, canvas_size=64)
    folder = ensure_scenes(cfg, tmp_path)
    coco = load_coco(folder, "test")
    assert [c["name"] for c in coco["categories"]] == [str(d) for d in range(10)]
    assert Image.open(folder / "test" / "images" / "000001.png").size == (64, 64)


def test_scenes_failed_generation_leaves_nothing(tmp_path: Path) -> None:
    cfg = ScenesConfig(source="mnist", source_dir=str(tmp_path / "missing.tgz"), train_size=2, test_size=2)
    with pytest.raises(DataError) as exc:
        ensure_scenes(cfg, tmp_path / "cache")
    assert "missing.tgz" in one_line(exc)
    assert not any((tmp_path / "cache").iterdir())
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(DataError) as exc:
        generate_scenes(TINY, tmp_path / "full")
    assert str(tmp_path / "full") in one_line(exc)


def test_scenes_config_checked_key_by_key() -> None:
    data = from_dict(DataConfig, {"dataset": "scenes", "scenes": {"canvas_size": 64, "max_items": 2}}, "data")
    assert data.scenes == ScenesConfig(canvas_size=64, max_items=2)
    for bad, key in (
        ({"canvas_size": 200}, "data.scenes.canvas_size"),
        ({"min_items": 3, "max_items": 2}, "data.scenes.min_items"),
        ({"max_scale": 5.0}, "data.scenes.max_scale"),
        ({"sorce": "mnist"}, "data.scenes.sorce"),
    ):
        with pytest.raises(ConfigError) as exc:
            from_dict(DataConfig, {"dataset": "scenes", "scenes": bad}, "data")
        assert one_line(exc).startswith(key)


def test_scenes_data_set_reads_the_written_files(scenes_root: Path, scenes_dir: Path) -> None:
    bundle = build_data(DataConfig(dataset="scenes", data_dir=str(scenes_root), scenes=TINY, augment=False))
    assert (bundle.task, bundle.num_classes, bundle.input_shape) == ("segmentation", 11, (3, 96, 96))
    assert bundle.class_names == ("background", *TINY.class_names)
    assert (bundle.train_size, bundle.test_size, bundle.ignore_index) == (24, 12, 255)
    assert "11 classes (segmentation, ignore index 255)" in bundle.describe()
    x, y = next(iter(bundle.test_loader(12)))
    assert x.shape == (12, 3, 96, 96) and y.shape == (12, 96, 96) and y.dtype.is_floating_point is False
    for i in (0, 11):
        want = np.asarray(Image.open(scenes_dir / "test" / "masks" / f"{i:06d}.png"))
        np.testing.assert_array_equal(y[i].numpy(), want)
        pixels = np.asarray(Image.open(scenes_dir / "test" / "images" / f"{i:06d}.png")).transpose(2, 0, 1)
        mean = np.array(bundle.mean)[:, None, None]
        std = np.array(bundle.std)[:, None, None]
        np.testing.assert_array_equal(np.rint((x[i].double().numpy() * std + mean) * 255), pixels)
