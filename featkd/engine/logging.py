"""Run outputs on rank 0: per-epoch metrics as JSONL and CSV, TensorBoard scalars, progress bars."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from featkd.files import atomic_file, atomic_write_text


class MetricsWriter:
    """Writes one record per epoch to ``metrics.jsonl`` and ``metrics.csv`` (and TensorBoard if installed).

    Both files are rewritten from the full history, so after a resume they hold exactly the epochs that
    the checkpoint has seen (a run killed between checkpoint and log cannot leave a gap or a duplicate).
    """

    def __init__(self, out_dir: Path | None, tensorboard: bool = True, log=print) -> None:
        self.out_dir = out_dir
        self._tb = None
        if out_dir is not None and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # optional extra
                log("tensorboard is not installed (pip install tensorboard); writing JSONL/CSV only")
            else:
                self._tb = SummaryWriter(str(out_dir / "tensorboard"))

    def write(self, history: list[dict[str, Any]]) -> None:
        if self.out_dir is None or not history:
            return
        lines = "".join(json.dumps(rec, sort_keys=False) + "\n" for rec in history)
        atomic_write_text(self.out_dir / "metrics.jsonl", lines)
        keys: list[str] = []
        for rec in history:
            keys.extend(k for k in rec if k not in keys)
        with atomic_file(self.out_dir / "metrics.csv", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(history)
        if self._tb is not None:
            last = history[-1]
            for key, value in last.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self._tb.add_scalar(key, value, last["epoch"])
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def progress(iterable: Iterable, total: int, desc: str, mode: str | bool, enabled: bool) -> Iterator:
    """Wrap ``iterable`` in a tqdm bar when asked for (``mode`` on/True, or auto on a terminal) and installed."""
    want = enabled and (mode in ("on", True) or (mode == "auto" and sys.stderr.isatty()))
    if want:
        try:
            from tqdm import tqdm
        except ImportError:  # optional extra
            want = False
        else:
            return iter(tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True))
    return iter(iterable)


def format_epoch(rec: dict[str, Any], epochs: int, train_metric: str | None = "acc",
                 eval_metrics: tuple[str, ...] = ("acc",)) -> str:
    """One console line for an epoch record: loss terms, the task's training metric (None: the task has
    none), its eval metrics."""
    shown = ("train_loss", f"train_{train_metric}", "train_images_per_s")
    terms = ", ".join(f"{k[6:]} {v:.4g}" for k, v in rec.items() if k.startswith("train_") and k not in shown)
    parts = [f"epoch {rec['epoch']}/{epochs}", f"loss {rec['train_loss']:.4f}" + (f" ({terms})" if terms else "")]
    if train_metric is not None:
        parts.append(f"train_{train_metric} {rec[f'train_{train_metric}']:.2f}")
    for key in (f"{split}_{m}" for split in ("val", "test") for m in eval_metrics):
        if key in rec:
            parts.append(f"{key} {rec[key]:.2f}")
    parts.append(f"lr {rec['lr']:.3g}")
    parts.append(f"{rec['epoch_time']:.1f}s")
    return "  ".join(parts)
