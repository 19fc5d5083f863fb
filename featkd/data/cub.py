"""CUB-200-2011's own listing files read into its train and test splits (registered as ``cub200`` in
:mod:`featkd.data.classification`).

The layout (the README shipped inside ``CUB_200_2011/``): ``images/<NNN.Species_Name>/<file>.jpg`` and four text
files of one ``<id> <value>`` pair a line:

* ``images.txt``: ``<image id> <path under images/>``;
* ``image_class_labels.txt``: ``<image id> <class id>``, class ids 1-based;
* ``train_test_split.txt``: ``<image id> <1 = train | 0 = test>``;
* ``classes.txt``: ``<class id> <NNN.Name>``: the class names, one line per class (200).

Samples are in image-id order, labels are ``class id - 1``; 5,994 train / 5,794 test images in the official
release. Every inconsistency is a one-line :class:`~featkd.errors.DataError` naming the file and the line or the
image id: a malformed line, an id listed twice, an image id missing from one of the three image files, a class id
outside ``1..len(classes.txt)``, a listed image file that does not exist (checked at build time: a stat per file,
nothing decoded; an unreadable file is a bad file of :mod:`featkd.data.streaming`, met when it is read).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from featkd.data.bundle import ImageList
from featkd.errors import DataError

CUB_FOLDER = "CUB_200_2011"
NAME = "cub200"


@dataclass(frozen=True)
class Line:
    """One ``<id> <value>`` line of a listing file: its 1-based line number, the id and the rest of the line."""

    number: int
    id: int
    value: str


def find_root(data_dir: Path) -> Path:
    """The ``CUB_200_2011`` folder: ``data_dir`` itself when it holds ``images.txt``, else ``data_dir/CUB_200_2011``."""
    for root in (data_dir, data_dir / CUB_FOLDER):
        if (root / "images.txt").is_file():
            return root
    raise DataError(f"{NAME}: neither {data_dir / 'images.txt'} nor {data_dir / CUB_FOLDER / 'images.txt'} found; "
                    f"data.data_dir is the folder that holds {CUB_FOLDER}/ (CUB_200_2011.tgz unpacked) or that "
                    "folder itself")


def _is_count(text: str) -> bool:
    return text.isascii() and text.isdigit()


def read_lines(path: Path, what: str) -> list[Line]:
    """The ``<id> <what>`` lines of ``path`` (blank lines skipped); a missing file, a line that is not a positive
    integer id, a space and a value, or an id listed twice is a one-line DataError."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{NAME}: {path} not found (CUB-200-2011 lists its images in {path.parent})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{NAME}: cannot read {path} ({' '.join(str(e).split())})") from None
    lines: list[Line] = []
    first: dict[int, int] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        parts = raw.strip().split(maxsplit=1)
        if len(parts) != 2 or not _is_count(parts[0]) or int(parts[0]) < 1:
            raise DataError(f"{NAME}: {path} line {number}: expected '<id> <{what}>' with a positive integer id, "
                            f"got {raw.strip()[:80]!r}")
        line = Line(number, int(parts[0]), parts[1])
        if line.id in first:
            raise DataError(f"{NAME}: {path} line {number}: id {line.id} is listed twice (first on line "
                            f"{first[line.id]})")
        first[line.id] = number
        lines.append(line)
    if not lines:
        raise DataError(f"{NAME}: {path} lists nothing")
    return lines


def _integer(path: Path, line: Line, what: str, allowed: range) -> int:
    if not _is_count(line.value) or int(line.value) not in allowed:
        raise DataError(f"{NAME}: {path} line {line.number}: {what} of image {line.id} must be in "
                        f"{allowed.start}..{allowed.stop - 1}, got {line.value!r}")
    return int(line.value)


def _same_ids(images: dict[int, Line], path: Path, lines: list[Line], images_txt: Path) -> dict[int, Line]:
    """``lines`` by id, after checking that they list exactly the image ids of ``images.txt``."""
    by_id = {line.id: line for line in lines}
    for line in lines:
        if line.id not in images:
            raise DataError(f"{NAME}: {path} line {line.number}: image id {line.id} is not in {images_txt}")
    for image_id, line in images.items():
        if image_id not in by_id:
            raise DataError(f"{NAME}: {path} has no line for image id {image_id} ({images_txt} line {line.number})")
    return by_id


def read_cub(data_dir: Path) -> tuple[ImageList, ImageList]:
    """The (train, test) splits of the CUB-200-2011 folder found from ``data_dir`` (:func:`find_root`); each an
    :class:`~featkd.data.bundle.ImageList` of ``(image file, class id - 1)`` in image-id order, with the class
    names of ``classes.txt``."""
    root = find_root(data_dir)
    files = {name: root / f"{name}.txt" for name in ("images", "image_class_labels", "train_test_split", "classes")}
    class_lines = read_lines(files["classes"], "NNN.Name")
    classes = range(1, len(class_lines) + 1)
    for line in class_lines:
        if line.id not in classes:
            raise DataError(f"{NAME}: {files['classes']} line {line.number}: class id {line.id} is outside "
                            f"1..{len(class_lines)} (the file lists {len(class_lines)} classes)")
    names = [line.value for line in sorted(class_lines, key=lambda line: line.id)]
    images = {line.id: line for line in read_lines(files["images"], "relative path")}
    labels = _same_ids(images, files["image_class_labels"], read_lines(files["image_class_labels"], "class id"),
                       files["images"])
    split = _same_ids(images, files["train_test_split"], read_lines(files["train_test_split"], "1|0"),
                      files["images"])
    samples: dict[int, list[tuple[str, int]]] = {1: [], 0: []}
    for image_id in sorted(images):
        line = images[image_id]
        path = root / "images" / line.value
        if not path.is_file():
            raise DataError(f"{NAME}: {files['images']} line {line.number}: image {image_id}'s file {path} not found")
        label = _integer(files["image_class_labels"], labels[image_id], "the class id", classes) - 1
        is_train = _integer(files["train_test_split"], split[image_id], "is_training_image", range(2))
        samples[is_train].append((str(path), label))
    for is_train, which in ((1, "training (1)"), (0, "test (0)")):
        if not samples[is_train]:
            raise DataError(f"{NAME}: {files['train_test_split']} marks no image as {which}")
    return ImageList(samples[1], names), ImageList(samples[0], names)
