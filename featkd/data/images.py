"""Reading one image file of a folder data set (COCO, VOC, Cityscapes layouts), with a one-line error."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def open_image(path: Path, name: str) -> Any:
    """The decoded ``PIL.Image.Image`` at ``path`` (any mode); a missing or unreadable file is a
    :class:`featkd.errors.DataError` naming data set ``name`` and the file."""
    from PIL import Image, UnidentifiedImageError

    from featkd.errors import DataError

    try:
        image = Image.open(path)
        image.load()
    except FileNotFoundError:
        raise DataError(f"{name}: image file {path} not found") from None
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        # DecompressionBombError: a header claiming over 2 x Image.MAX_IMAGE_PIXELS pixels (a bad file too)
        raise DataError(f"{name}: cannot read {path} ({' '.join(str(e).split())})") from None
    return image
