"""COCO annotation helpers without pycocotools: uncompressed RLE masks and instance annotations.

COCO's uncompressed RLE of a binary mask (H, W) is ``{"counts": [c0, c1, ...], "size": [H, W]}``: run lengths
of the mask flattened in COLUMN-major order (down the first column, then the next), alternating 0-runs and
1-runs and always starting with a 0-run (``c0`` is 0 when the first pixel is set). pycocotools reads it with
``mask.frPyObjects(rle, H, W)``; boxes are ``[x, y, w, h]`` in pixels, ``x`` the column.
"""

from __future__ import annotations

from typing import Any

import numpy as np


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
