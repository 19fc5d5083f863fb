"""Small shared builders for the tests (real modules, no mocks)."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from featkd.methods.base import BuildContext


class TinyNet(nn.Module):
    """conv(in -> width) -> ReLU -> global pool -> fc; capture points 'conv', 'act', 'fc:input'."""

    def __init__(self, width: int, in_channels: int = 1, num_classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.act(self.conv(x))), 1))


def tiny_context(s_width: int = 2, t_width: int = 3, size: int = 4) -> BuildContext:
    torch.manual_seed(0)
    return BuildContext(teacher=TinyNet(t_width), student=TinyNet(s_width), input_shape=(1, size, size),
                        num_classes=3, device=torch.device("cpu"))


class OutputWatcher:
    """Reads a subprocess's stdout (lines) and stderr on threads, so a test can wait for a marker line (the first
    epoch's log line, say) instead of sleeping a fixed time before it signals the process."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.err: list[str] = []
        self._changed = threading.Condition()
        self._threads = [threading.Thread(target=self._read, args=(s, b), daemon=True)
                         for s, b in ((proc.stdout, self.lines), (proc.stderr, self.err)) if s is not None]
        for t in self._threads:
            t.start()

    def _read(self, stream, into: list[str]) -> None:
        for line in stream:
            with self._changed:
                into.append(line)
                self._changed.notify_all()
        with self._changed:  # end of the stream: the process exited (or closed it)
            self._changed.notify_all()

    def wait_for(self, predicate: Callable[[str], bool], what: str, timeout: float = 240) -> str:
        """The first stdout line that satisfies ``predicate``; fails when the process ends or ``timeout`` seconds
        pass without one."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                hit = next((x for x in self.lines if predicate(x)), None)
                if hit is not None:
                    return hit
                ended = not any(t.is_alive() for t in self._threads)
                left = deadline - time.monotonic()
                if ended or left <= 0:
                    why = f"it exited ({self.proc.poll()})" if ended else f"{timeout:g}s passed"
                    raise AssertionError(f"no {what} before {why}:\n{(''.join(self.lines + self.err))[-3000:]}")
                self._changed.wait(min(left, 1.0))  # woken by every new line

    def finish(self, timeout: float = 120) -> tuple[str, str]:
        """Wait for the process to exit; its whole stdout and stderr."""
        self.proc.wait(timeout=timeout)
        for t in self._threads:
            t.join(timeout=10)
        return "".join(self.lines), "".join(self.err)


# ---- data sets in their real layouts (small, written with PIL) ------------------------------------------------

CUB_CLASSES = ("001.Red_Tanager", "002.Green_Jay", "003.Blue_Jay")  # class k (0-based) is tinted in channel k


def write_cub(data_dir: Path, train_per_class: int = 3, test_per_class: int = 1, seed: int = 0
              ) -> dict[int, tuple[int, int]]:
    """CUB-200-2011's layout in ``data_dir/CUB_200_2011``: ``images/<NNN.Name>/<name>_<i>.jpg`` (JPEGs of 20-63
    pixels a side, class k tinted in channel k) and ``images.txt``, ``image_class_labels.txt``,
    ``train_test_split.txt``, ``classes.txt`` as the official release writes them (one ``<id> <value>`` line per
    image, in id order). The image ids are shuffled across classes, so id order is not folder order. Returns
    ``{image id: (class id (1-based), is_training_image)}``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    root = data_dir / "CUB_200_2011"
    items = [(c, i, int(i < train_per_class)) for c in range(len(CUB_CLASSES))
             for i in range(train_per_class + test_per_class)]
    ids = rng.permutation(len(items)) + 1
    truth, images = {}, {}
    for image_id, (c, i, is_train) in zip(ids.tolist(), items, strict=True):
        name = CUB_CLASSES[c]
        relative = f"{name}/{name.split('.')[1]}_{i:04d}.jpg"
        (root / "images" / name).mkdir(parents=True, exist_ok=True)
        w, h = rng.integers(20, 64, 2)
        pixels = rng.integers(0, 100, (h, w, 3), dtype=np.uint8)
        pixels[..., c] += 150
        Image.fromarray(pixels).save(root / "images" / relative, quality=90)
        truth[image_id], images[image_id] = (c + 1, is_train), relative
    order = sorted(truth)
    (root / "images.txt").write_text("".join(f"{k} {images[k]}\n" for k in order))
    (root / "image_class_labels.txt").write_text("".join(f"{k} {truth[k][0]}\n" for k in order))
    (root / "train_test_split.txt").write_text("".join(f"{k} {truth[k][1]}\n" for k in order))
    (root / "classes.txt").write_text("".join(f"{c + 1} {name}\n" for c, name in enumerate(CUB_CLASSES)))
    return truth


def cinic_red(c: int) -> int:
    """The red value of every pixel of a CINIC-10 image of class ``c`` written by :func:`write_cinic`."""
    return 20 * c + 15


def write_cinic(data_dir: Path, per_class: dict[str, int] | None = None, seed: int = 0) -> None:
    """CINIC-10's layout: ``data_dir/{train,valid,test}/<class>/<split>_<i>.png``, 32x32 PNGs, ``per_class`` images
    of each of the 10 classes per split (default 2 / 1 / 1). Class c's red channel is :func:`cinic_red` (c) everywhere
    (green and blue random); the first image of each class in ``train`` is greyscale (mode L, value ``cinic_red``):
    featkd reads every image as RGB."""
    from PIL import Image

    from featkd.data.classification import CINIC_CLASSES

    rng = np.random.default_rng(seed)
    for split, n in (per_class or {"train": 2, "valid": 1, "test": 1}).items():
        for c, name in enumerate(CINIC_CLASSES):
            folder = data_dir / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                if split == "train" and i == 0:
                    image = Image.fromarray(np.full((32, 32), cinic_red(c), dtype=np.uint8))
                else:
                    pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                    pixels[..., 0] = cinic_red(c)
                    image = Image.fromarray(pixels)
                image.save(folder / f"{split}_{i}.png")
