"""Scenes: seeded canvases of real Fashion-MNIST items (or MNIST digits), written in standard formats.

:func:`ensure_scenes` returns a folder of generated canvases, generating it once per parameter set
(:class:`~featkd.data.config.ScenesConfig`, the ``data.scenes:`` section); :func:`generate_scenes` writes one
into a given folder. Layout::

    <folder>/train/images/000000.png     RGB canvas, canvas_size x canvas_size
    <folder>/train/masks/000000.png      mode L semantic mask: 0 background, c + 1 for an item of class c
    <folder>/test/...                    the same for the test canvases
    <folder>/annotations/instances_train.json, instances_test.json   COCO instances (boxes, RLE masks)
    <folder>/classes.txt                 background + the 10 class names: the folder is also a `segfolder`
    <folder>/done                        written last; its presence means the folder is complete

The folder is written into a temporary sibling and renamed into place, so an interrupted generation never
leaves a half-written cache. The default cache is ``$XDG_CACHE_HOME/featkd/scenes/<digest>/`` (else
``~/.cache/...``), where ``<digest>`` is a short hash of every parameter and
:data:`~featkd.data.config.SCENES_GENERATOR_VERSION` (:meth:`~featkd.data.config.ScenesConfig.digest`).

COCO JSON: ``images`` (``id`` = the file's number, ``file_name`` relative to ``<split>/images/``),
``categories`` (ids 1..10 = source class + 1, with names), ``annotations`` (``bbox`` [x, y, w, h] and
``area`` of the VISIBLE pixels, ``iscrowd`` 0, ``segmentation`` as uncompressed column-major RLE, see
:mod:`featkd.data.coco`). Two extra fields, ignored by COCO readers, record provenance: ``source_index`` on
each annotation (the item's index in the source split) and ``fragment_sources`` on each image.

Design choices (the defaults; all but the constants below are ``ScenesConfig`` fields):

* Source split: train canvases draw items and fragments only from the source's training split, test
  canvases only from its test split. Canvas ``i`` of a split is drawn from its own generator seeded by
  ``(seed, split, i)``: a larger ``train_size`` keeps the first canvases unchanged.
* Canvas: 96 x 96 px (64-128 allowed), RGB.
* Items per canvas: uniform in [1, 4]. Each is a uniformly drawn source image, resized (bilinear, Pillow)
  from 28 px to ``round(28 * scale)`` px, scale uniform in [0.8, 1.6] (22-45 px), placed uniformly so that
  it lies fully inside the canvas.
* Mask threshold: an item's pixels are those whose resized intensity is >= 32 (of 255), with holes filled
  (``scipy.ndimage.binary_fill_holes``: a dark print on a shirt is still the shirt). Inside its mask an item
  is opaque; below the threshold it fades out (alpha = intensity / 32), so edges are soft.
* Colour: each item is tinted with a random colour (hue uniform, saturation in [0.35, 1], value in
  [0.75, 1]) drawn independently of its class; pixel = tint * intensity.
* Overlap: later items occlude earlier ones; instance masks are the visible pixels. A placement is rejected
  and redrawn (at most 20 tries, then the item is skipped) when the item's box has IoU > 0.3 with an earlier
  item's box (both unoccluded boxes) or when it would leave an earlier item less than 0.5 of its pixels
  visible. So every drawn item has an annotation and the semantic mask matches the image.
* Background, so that masks are not a threshold away: smooth colour noise (a 5 x 5 grid per channel,
  uniform in [0, 72], bilinearly upsampled) + per-pixel Gaussian noise (std 4) + up to 4 faint fragments
  of other source images of the same split (a random 6-16 px crop, scaled like items, random tint, opacity
  up to 0.35 x intensity), which are background in the masks.
* Items whose thresholded mask is empty are skipped (none in Fashion-MNIST or MNIST at 32).

Files are identical for identical parameters on the same software stack (NumPy, Pillow, zlib).
"""

from __future__ import annotations

import colorsys
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from featkd.data.coco import instance_annotation, mask_bbox
from featkd.data.config import DATASETS, SCENES_GENERATOR_VERSION, SCENES_ITEM_SIZE, DataConfig, ScenesConfig
from featkd.errors import DataError, FeatkdError

PLACEMENT_TRIES = 20
BACKGROUND_GRID = 5  # smooth noise: this many grid points per side and channel
PIXEL_NOISE_STD = 4.0
FRAGMENT_SIDES = (6, 16)  # side of a fragment's crop of its source image, in source pixels
TINT_SATURATION = (0.35, 1.0)
TINT_VALUE = (0.75, 1.0)
DONE = "done"
SPLITS = ("train", "test")


@dataclass(frozen=True)
class SourceSplit:
    """One split of the source: uint8 images (N, 28, 28) and int64 labels (N,) in 0..9."""

    images: np.ndarray
    labels: np.ndarray


@dataclass
class Canvas:
    """One generated canvas: ``image`` uint8 (S, S, 3); ``instances`` int (S, S) with 0 for background and
    k + 1 where item k is visible; per item its ``labels`` (source class) and ``sources`` (source index);
    ``fragments``: the source indices of the background fragments."""

    image: np.ndarray
    instances: np.ndarray
    labels: list[int]
    sources: list[int]
    fragments: list[int]

    def semantic_mask(self) -> np.ndarray:
        """uint8 (S, S): 0 background, class + 1 on each item's visible pixels."""
        lut = np.array([0] + [c + 1 for c in self.labels], dtype=np.uint8)
        return lut[self.instances]

    def instance_mask(self, k: int) -> np.ndarray:
        """bool (S, S): the visible pixels of item k."""
        return self.instances == k + 1


# --------------------------------------------------------------------------------------------------------
# Drawing (pure functions of a generator and the source).


def _resize(image: np.ndarray, side: int) -> np.ndarray:
    """uint8 (h, w) -> uint8 (side, side), Pillow's bilinear filter."""
    from PIL import Image

    if image.shape == (side, side):
        return image
    return np.asarray(Image.fromarray(image).resize((side, side), Image.Resampling.BILINEAR))


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) linear interpolation weights, grid end points aligned with the output's."""
    pos = np.linspace(0.0, n_in - 1, n_out)
    lo = np.minimum(np.floor(pos).astype(int), n_in - 2)
    frac = pos - lo
    m = np.zeros((n_out, n_in))
    m[np.arange(n_out), lo] = 1.0 - frac
    m[np.arange(n_out), lo + 1] = frac
    return m


def _tint(rng: np.random.Generator) -> np.ndarray:
    """A random colour (3,) in [0, 1], independent of any class."""
    h = rng.uniform(0.0, 1.0)
    s = rng.uniform(*TINT_SATURATION)
    v = rng.uniform(*TINT_VALUE)
    return np.array(colorsys.hsv_to_rgb(h, s, v))


def _composite(canvas: np.ndarray, top: int, left: int, colour: np.ndarray, alpha: np.ndarray) -> None:
    """Blend ``colour`` (s, s, 3) with ``alpha`` (s, s) into ``canvas`` (S, S, 3) float at (top, left)."""
    s = alpha.shape[0]
    window = canvas[top : top + s, left : left + s]
    a = alpha[..., None]
    window *= 1.0 - a
    window += a * colour


def draw_background(rng: np.random.Generator, source: SourceSplit, cfg: ScenesConfig) -> tuple[np.ndarray, list[int]]:
    """float (S, S, 3) in about [0, 255]: smooth colour noise, pixel noise and faint fragments (their source
    indices are returned)."""
    size = cfg.canvas_size
    grid = rng.uniform(0.0, cfg.background_max, (3, BACKGROUND_GRID, BACKGROUND_GRID))
    up = _interp_matrix(size, BACKGROUND_GRID)
    canvas = np.ascontiguousarray((up @ grid @ up.T).transpose(1, 2, 0))  # (S, S, 3)
    canvas += rng.normal(0.0, PIXEL_NOISE_STD, canvas.shape)
    used = []
    for _ in range(rng.integers(0, cfg.fragments + 1)):
        index = int(rng.integers(len(source.images)))
        side = int(rng.integers(FRAGMENT_SIDES[0], FRAGMENT_SIDES[1] + 1))
        y0, x0 = rng.integers(0, SCENES_ITEM_SIZE - side + 1, 2)
        crop = source.images[index, y0 : y0 + side, x0 : x0 + side]
        out = round(side * rng.uniform(cfg.min_scale, cfg.max_scale))
        patch = _resize(np.ascontiguousarray(crop), out).astype(np.float64)
        top, left = rng.integers(0, size - out + 1, 2)
        opacity = cfg.fragment_opacity * rng.uniform(0.5, 1.0)
        colour = np.broadcast_to(_tint(rng) * 255.0, (out, out, 3))
        _composite(canvas, int(top), int(left), colour, opacity * patch / 255.0)
        used.append(index)
    return canvas, used


def _item_mask(intensity: np.ndarray, threshold: int) -> np.ndarray:
    from scipy.ndimage import binary_fill_holes

    return binary_fill_holes(intensity >= threshold)


def _box_iou(a: list[int], b: list[int]) -> float:
    """IoU of two [x, y, w, h] pixel boxes."""
    iw = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    ih = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def render_canvas(rng: np.random.Generator, source: SourceSplit, cfg: ScenesConfig) -> Canvas:
    """One canvas drawn from ``rng`` with items and fragments of ``source`` (see the module docstring)."""
    size = cfg.canvas_size
    canvas, fragments = draw_background(rng, source, cfg)
    instances = np.zeros((size, size), dtype=np.int32)
    labels: list[int] = []
    sources: list[int] = []
    boxes: list[list[int]] = []
    areas: list[int] = []  # full (unoccluded) pixel count per placed item
    visible: list[int] = []
    for _ in range(rng.integers(cfg.min_items, cfg.max_items + 1)):
        index = int(rng.integers(len(source.images)))
        side = round(SCENES_ITEM_SIZE * rng.uniform(cfg.min_scale, cfg.max_scale))
        intensity = _resize(source.images[index], side)
        mask = _item_mask(intensity, cfg.mask_threshold)
        colour = _tint(rng) * intensity[..., None].astype(np.float64)
        if not mask.any():
            continue
        local_box = mask_bbox(mask)
        for _ in range(PLACEMENT_TRIES):
            top, left = (int(v) for v in rng.integers(0, size - side + 1, 2))
            box = [local_box[0] + left, local_box[1] + top, local_box[2], local_box[3]]
            if any(_box_iou(box, b) > cfg.max_box_iou for b in boxes):
                continue
            window = instances[top : top + side, left : left + side]
            hidden = np.bincount(window[mask], minlength=len(boxes) + 1)[1:]
            left_visible = np.asarray(visible, dtype=np.int64) - hidden
            if (left_visible < cfg.min_visible * np.asarray(areas)).any():
                continue
            window[mask] = len(boxes) + 1
            alpha = np.where(mask, 1.0, intensity / cfg.mask_threshold)
            _composite(canvas, top, left, colour, alpha)
            visible = [*left_visible.tolist(), int(mask.sum())]
            areas.append(int(mask.sum()))
            boxes.append(box)
            labels.append(int(source.labels[index]))
            sources.append(index)
            break
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return Canvas(image, instances, labels, sources, fragments)


def render_split(source: SourceSplit, cfg: ScenesConfig, split: str, count: int) -> Iterator[Canvas]:
    """The ``count`` canvases of ``split``; canvas i uses ``default_rng([seed, split code, i])``."""
    code = SPLITS.index(split)
    for i in range(count):
        yield render_canvas(np.random.default_rng([cfg.seed, code, i]), source, cfg)


# --------------------------------------------------------------------------------------------------------
# Writing.


def _save_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(array).save(path, compress_level=1)


def write_split(folder: Path, source: SourceSplit, cfg: ScenesConfig, split: str) -> dict[str, Any]:
    """Write ``folder/<split>/{images,masks}/*.png``; return the split's COCO dict."""
    count = cfg.train_size if split == "train" else cfg.test_size
    images_dir, masks_dir = folder / split / "images", folder / split / "masks"
    images_dir.mkdir(parents=True)
    masks_dir.mkdir()
    images, annotations = [], []
    for i, canvas in enumerate(render_split(source, cfg, split, count)):
        name = f"{i:06d}.png"
        _save_png(canvas.image, images_dir / name)
        _save_png(canvas.semantic_mask(), masks_dir / name)
        size = cfg.canvas_size
        images.append(
            {"id": i, "file_name": name, "width": size, "height": size, "fragment_sources": canvas.fragments}
        )
        for k, (label, index) in enumerate(zip(canvas.labels, canvas.sources, strict=True)):
            ann = instance_annotation(len(annotations) + 1, i, label + 1, canvas.instance_mask(k))
            ann["source_index"] = index
            annotations.append(ann)
    categories = [
        {"id": c + 1, "name": name, "supercategory": cfg.source} for c, name in enumerate(cfg.class_names)
    ]
    info = {
        "description": f"featkd scenes of {cfg.source} items ({split} canvases)",
        "version": str(SCENES_GENERATOR_VERSION),
        "split": split,
        "source": cfg.source,
        "source_split": split,
        "generator": asdict(cfg),
    }
    return {"info": info, "licenses": [], "images": images, "annotations": annotations, "categories": categories}


def load_source(cfg: ScenesConfig) -> dict[str, SourceSplit]:
    """The source's train and test splits, read by its registered data set (``source_dir`` as data_dir)."""
    src = DATASETS.get(cfg.source)(DataConfig(dataset=cfg.source, data_dir=cfg.source_dir))
    return {
        "train": SourceSplit(src.train_images[:, 0].numpy(), src.train_labels.numpy()),
        "test": SourceSplit(src.test_images[:, 0].numpy(), src.test_labels.numpy()),
    }


def _write_all(folder: Path, cfg: ScenesConfig) -> None:
    source = load_source(cfg)
    cocos = {split: write_split(folder, source[split], cfg, split) for split in SPLITS}
    (folder / "classes.txt").write_text("\n".join(("background", *cfg.class_names)) + "\n")
    (folder / "annotations").mkdir()
    for split, coco in cocos.items():
        with open(folder / "annotations" / f"instances_{split}.json", "w") as f:
            f.write(json.dumps(coco, separators=(",", ":")))
    (folder / DONE).write_text(cfg.digest() + "\n")


def _is_complete(folder: Path, cfg: ScenesConfig) -> bool:
    marker = folder / DONE
    return marker.is_file() and marker.read_text().strip() == cfg.digest()


def generate_scenes(cfg: ScenesConfig, out_dir: str | os.PathLike[str]) -> Path:
    """Generate the scenes of ``cfg`` into ``out_dir`` (absent or empty), atomically: everything is written
    into a temporary sibling folder, renamed to ``out_dir`` at the end. Returns ``out_dir``."""
    cfg.validate()
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise FeatkdError("the scenes generator needs Pillow: pip install pillow") from None
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"scenes: {out} already exists and is not an empty folder; delete it or choose another")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        _write_all(tmp, cfg)
        if out.is_dir():
            out.rmdir()  # empty (checked above)
        os.rename(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_complete(out, cfg):  # another process finished the same generation first
            return out
        raise DataError(f"scenes: cannot write {out} ({e})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def default_cache_root() -> Path:
    """``$XDG_CACHE_HOME/featkd/scenes``, else ``~/.cache/featkd/scenes``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "featkd" / "scenes"


def ensure_scenes(cfg: ScenesConfig, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder of ``cfg``'s scenes, ``<cache_dir or default_cache_root()>/<cfg.digest()>``, generated
    first when it is not there yet."""
    cfg.validate()
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_root()
    out = root / cfg.digest()
    if _is_complete(out, cfg):
        return out
    if out.exists() and any(out.iterdir()):
        raise DataError(f"scenes: {out} is incomplete (no valid {DONE} marker); delete it to regenerate")
    return generate_scenes(cfg, out)
