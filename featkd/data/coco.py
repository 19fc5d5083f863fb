"""COCO annotation helpers: uncompressed RLE masks, instance annotations, and reading an instances file.

COCO's uncompressed RLE of a binary mask (H, W) is ``{"counts": [c0, c1, ...], "size": [H, W]}``: run lengths
of the mask flattened in COLUMN-major order (down the first column, then the next), alternating 0-runs and
1-runs and always starting with a 0-run (``c0`` is 0 when the first pixel is set). pycocotools reads it with
``mask.frPyObjects(rle, H, W)``; boxes are ``[x, y, w, h]`` in pixels, ``x`` the column.

Writing needs no pycocotools. :func:`read_instances` reads and checks an ``instances_*.json`` in plain JSON;
:func:`annotation_mask` decodes a segmentation: uncompressed RLE by :func:`rle_decode`, polygons and
compressed RLE (COCO's crowd regions, results files) through pycocotools.

Checks of :func:`read_instances` (each a one-line :class:`~featkd.errors.DataError` naming the file and the
annotation id): an annotation's ``image_id`` must be an image of the file and its ``category_id`` one of
``categories``; ``bbox`` must be 4 finite numbers with ``w, h >= 0`` (``x2 >= x1``) and lie inside its image
up to :data:`BOX_TOLERANCE` pixels (the excess is clipped: COCO's own files have boxes a fraction of a pixel
past the border). ``iscrowd`` defaults to 0 and ``area`` to ``w * h``.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featkd.errors import DataError, FeatkdError

BOX_TOLERANCE = 1.0  # pixels a box may extend past its image (clipped); further is an error


def rle_encode(mask: np.ndarray) -> dict[str, list[int]]:
    """Uncompressed COCO RLE of a boolean ``mask`` (H, W)."""
    h, w = mask.shape
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate(([0], change, [flat.size])))
    if flat.size and flat[0]:
        counts = np.concatenate(([0], counts))
    return {"counts": counts.tolist(), "size": [h, w]}


def rle_decode(rle: dict[str, Any]) -> np.ndarray:
    """The boolean mask (H, W) of an uncompressed COCO RLE (inverse of :func:`rle_encode`)."""
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    if counts.sum() != h * w:
        raise ValueError(f"RLE counts sum to {counts.sum()}, not {h} * {w}")
    values = np.arange(len(counts)) % 2 == 1
    return np.repeat(values, counts).reshape((h, w), order="F")


def mask_bbox(mask: np.ndarray) -> list[int]:
    """The tight ``[x, y, w, h]`` box of a non-empty boolean ``mask`` (H, W)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
    return [x0, y0, x1 - x0 + 1, y1 - y0 + 1]


def instance_annotation(ann_id: int, image_id: int, category_id: int, mask: np.ndarray) -> dict[str, Any]:
    """A COCO instance annotation for the boolean ``mask`` (H, W): box, area (pixel count), RLE."""
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": mask_bbox(mask),
        "area": int(mask.sum()),
        "iscrowd": 0,
        "segmentation": rle_encode(mask),
    }


# --------------------------------------------------------------------------------------------------------
# Reading an instances file.


@dataclass
class CocoImage:
    """One image entry and its checked annotations (boxes ``[x1, y1, x2, y2]`` in pixels, clipped)."""

    id: int
    file_name: str
    width: int | None
    height: int | None
    boxes: list[list[float]] = field(default_factory=list)
    categories: list[int] = field(default_factory=list)  # COCO category ids
    iscrowd: list[bool] = field(default_factory=list)
    area: list[float] = field(default_factory=list)
    segmentations: list[Any] = field(default_factory=list)  # as in the file (None where absent)
    annotation_ids: list[Any] = field(default_factory=list)


@dataclass
class CocoInstances:
    """A checked ``instances_*.json``: images in file order, categories sorted by id."""

    path: Path
    images: list[CocoImage]
    category_ids: list[int]
    category_names: list[str]


def _load_json(path: Path, name: str) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"{name}: {path} not found")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{name}: {path} is not a readable JSON file ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{name}: {path} is not a COCO instances file (no 'images' list)")
    return data


def read_instances(path: str | Path, name: str = "coco") -> CocoInstances:
    """Read and check the COCO instances file ``path`` (see the module docstring)."""
    path = Path(path)
    data = _load_json(path, name)
    cats = data.get("categories")
    if not isinstance(cats, list) or not cats:
        raise DataError(f"{name}: {path} has no 'categories' list")
    try:
        by_cat = {int(c["id"]): str(c.get("name", c["id"])) for c in cats}
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{name}: {path}: every category needs an integer 'id'") from None
    images: dict[int, CocoImage] = {}
    for entry in data["images"]:
        try:
            image = CocoImage(int(entry["id"]), str(entry["file_name"]),
                              int(entry["width"]) if "width" in entry else None,
                              int(entry["height"]) if "height" in entry else None)
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{name}: {path}: image entry {entry!r:.80} needs an integer 'id' and a "
                            "'file_name'") from None
        if image.id in images:
            raise DataError(f"{name}: {path}: image id {image.id} appears twice")
        images[image.id] = image
    for ann in data.get("annotations") or []:
        _add_annotation(ann, images, by_cat, path, name)
    ids = sorted(by_cat)
    return CocoInstances(path, list(images.values()), ids, [by_cat[i] for i in ids])


def _add_annotation(ann: Any, images: dict[int, CocoImage], cats: dict[int, str], path: Path, name: str) -> None:
    ann_id = ann.get("id") if isinstance(ann, dict) else None
    where = f"{name}: {path}: annotation {ann_id}"
    if not isinstance(ann, dict):
        raise DataError(f"{name}: {path}: an annotation is not a mapping ({ann!r:.60})")
    image = images.get(ann.get("image_id"))  # type: ignore[arg-type]
    if image is None:
        raise DataError(f"{where}: image_id {ann.get('image_id')!r} is not an image of the file")
    cat = ann.get("category_id")
    if cat not in cats:
        known = ", ".join(map(str, sorted(cats)))
        raise DataError(f"{where}: category_id {cat!r} is not in the categories list ({known})")
    box = ann.get("bbox")
    if (not isinstance(box, (list, tuple)) or len(box) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
        raise DataError(f"{where}: bbox must be [x, y, w, h] (4 numbers), got {box!r}")
    if not all(math.isfinite(v) for v in box):
        raise DataError(f"{where}: bbox {list(box)} is not finite")
    x, y, w, h = (float(v) for v in box)
    if w < 0 or h < 0:
        raise DataError(f"{where}: bbox {list(box)} has a negative width or height (x2 < x1 or y2 < y1)")
    width, height = image.width, image.height
    if width is not None and height is not None:
        tol = BOX_TOLERANCE
        if x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
            raise DataError(f"{where}: bbox {list(box)} lies outside its image {image.file_name} ({width}x{height})")
        x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
        x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
    else:
        x1, y1, x2, y2 = x, y, x + w, y + h
    crowd = ann.get("iscrowd", 0)
    if crowd not in (0, 1, True, False):
        raise DataError(f"{where}: iscrowd must be 0 or 1, got {crowd!r}")
    area = ann.get("area", w * h)
    if not isinstance(area, (int, float)) or not math.isfinite(area) or area < 0:
        raise DataError(f"{where}: area must be a non-negative number, got {area!r}")
    image.boxes.append([x1, y1, x2, y2])
    image.categories.append(int(cat))
    image.iscrowd.append(bool(crowd))
    image.area.append(float(area))
    image.segmentations.append(ann.get("segmentation"))
    image.annotation_ids.append(ann_id)


def annotation_mask(segmentation: Any, height: int, width: int, where: str) -> np.ndarray:
    """The boolean mask (height, width) of a COCO ``segmentation``: polygons (a list of [x1, y1, x2, y2, ...]),
    uncompressed RLE (``counts`` a list) or compressed RLE (``counts`` a string)."""
    if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        if list(segmentation.get("size", ())) != [height, width]:
            raise DataError(f"{where}: RLE size {segmentation.get('size')} is not the image's [{height}, {width}]")
        try:
            return rle_decode(segmentation)
        except ValueError as e:
            raise DataError(f"{where}: {e}") from None
    try:
        from pycocotools import mask as mask_utils
    except ImportError:
        raise FeatkdError("polygon and compressed-RLE masks need pycocotools: pip install pycocotools") from None
    try:
        if isinstance(segmentation, list):
            if not segmentation or not all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
                                           for p in segmentation):
                raise DataError(f"{where}: a polygon segmentation is a list of [x1, y1, x2, y2, x3, y3, ...]")
            rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
        elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), (str, bytes)):
            if list(segmentation.get("size", ())) != [height, width]:
                raise DataError(f"{where}: RLE size {segmentation.get('size')} is not the image's [{height}, {width}]")
            rle = segmentation
        else:
            raise DataError(f"{where}: segmentation must be polygons or an RLE, got {type(segmentation).__name__}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # pycocotools' NumPy 2 __array__ warning
            return mask_utils.decode(rle).astype(bool)
    except (TypeError, ValueError) as e:
        raise DataError(f"{where}: cannot decode the segmentation ({e})") from None
