"""Run outputs on rank 0: per-epoch metrics as JSONL and CSV, TensorBoard scalars, Weights & Biases (optional),
progress bars."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from featkd.errors import FeatkdError
from featkd.files import atomic_file, atomic_write_text

#: the run folder's record of its W&B run id, so a resumed run logs into the same W&B run
WANDB_ID_FILE = "wandb_id.txt"


def require_wandb() -> Any:
    """The ``wandb`` module, imported only when ``train.wandb`` is set; a one-line error when it is missing."""
    try:
        import wandb
    except ImportError:
        raise FeatkdError("train.wandb: the wandb package is not installed; pip install wandb "
                          "(or set train.wandb: null)") from None
    return wandb


def start_wandb(out_dir: Path, options: Any, config: dict[str, Any] | None) -> Any:
    """``wandb.init`` for the run folder ``out_dir`` with ``options`` (a :class:`~featkd.config.WandbConfig`):
    named after the folder unless ``options.name``; a folder that ran before (a resume) continues its W&B run."""
    wandb = require_wandb()
    id_file = out_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else None
    try:
        run = wandb.init(project=options.project, entity=options.entity, name=options.name or out_dir.name,
                         tags=list(options.tags) or None, mode=options.mode, config=config, dir=str(out_dir),
                         id=run_id, resume="allow" if run_id else None)
    except Exception as exc:  # wandb's own errors (no login, no network) span many types: one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise FeatkdError(f"train.wandb: wandb.init failed ({first[:200]}); log in (wandb login), set "
                          "train.wandb.mode: offline, or train.wandb: null") from None
    if run_id is None and getattr(run, "id", None):
        atomic_write_text(id_file, f"{run.id}\n")
    return run


class MetricsWriter:
    """Writes one record per epoch to ``metrics.jsonl`` and ``metrics.csv`` (and TensorBoard if installed).

    Both files are rewritten from the full history, so after a resume they hold exactly the epochs that
    the checkpoint has seen (a run killed between checkpoint and log cannot leave a gap or a duplicate).
    With ``wandb`` (``train.wandb``) the numbers of each new record also go to Weights & Biases, step = epoch
    (a resumed run sends the epochs from its own on; ``config``: the run's config, recorded there).
    """

    def __init__(self, out_dir: Path | None, tensorboard: bool = True, log=print, *, wandb: Any = None,
                 config: dict[str, Any] | None = None) -> None:
        self.out_dir = out_dir
        self._tb = None
        self._wandb = start_wandb(out_dir, wandb, config) if out_dir is not None and wandb is not None else None
        self._wandb_epoch: int | None = None  # the last epoch sent to W&B (None: nothing yet in this session)
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
        if self._wandb is not None:
            self._send_wandb(history)

    def _send_wandb(self, history: list[dict[str, Any]]) -> None:
        """The records after the last one sent (this session's first write: the newest only; the earlier epochs
        were sent by the session that ran them)."""
        if self._wandb_epoch is None:
            self._wandb_epoch = history[-1]["epoch"] - 1
        for rec in history:
            if rec["epoch"] > self._wandb_epoch:
                numbers = {k: v for k, v in rec.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
                self._wandb.log(numbers, step=rec["epoch"])
                self._wandb_epoch = rec["epoch"]

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def bars_shown(mode: str | bool, enabled: bool) -> bool:
    """Whether :func:`progress` shows tqdm bars: asked for (``mode`` on/True, or auto on a terminal) and installed."""
    if not (enabled and (mode in ("on", True) or (mode == "auto" and sys.stderr.isatty()))):
        return False
    return importlib.util.find_spec("tqdm") is not None  # an optional extra


def progress(iterable: Iterable, total: int, desc: str, mode: str | bool, enabled: bool) -> Iterator:
    """Wrap ``iterable`` in a tqdm bar when :func:`bars_shown`."""
    if bars_shown(mode, enabled):
        from tqdm import tqdm

        return iter(tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True))
    return iter(iterable)


def _clock(seconds: float) -> str:
    """``m:ss``, or ``h:mm:ss`` from an hour on."""
    s = max(0, round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class StepLines:
    """Where no progress bars are shown (stdout in a log file, a cluster job), a line every ``every_s`` seconds
    (``train.log_every_s``; 0: none) while an epoch trains, so a log shows that the run is alive long before the
    epoch ends: ``step 120/391 of epoch 2/30  1534 img/s  loss 1.2345  eta 0:32 of the epoch, 14:05 of the run``.
    Images/s and both ETAs are measured from the epoch's first step in this process; the run's ETA counts the
    epochs up to ``end`` (``train.stop_after`` or ``train.epochs``) at that rate, without the evaluations."""

    def __init__(self, every_s: float, log: Callable[[str], None], *, epochs: int, end: int, steps: int,
                 batch_size: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s, self.log, self.epochs, self.end, self.steps = every_s, log, epochs, end, steps
        self.batch_size, self.clock = batch_size, clock
        self.epoch = self.first = 0
        self.t0 = self.last = 0.0

    def start(self, epoch: int, first: int = 0) -> None:
        """Epoch ``epoch`` (0-based) begins after ``first`` steps (a mid-epoch resume)."""
        self.epoch, self.first = epoch, first
        self.t0 = self.last = self.clock()

    def after(self, done: int, loss_sum: Callable[[], float]) -> None:
        """After step ``done`` (1-based) of the epoch; ``loss_sum()`` (the sum of the epoch's per-step losses so
        far) is read only when a line is due (it may wait for the device)."""
        if self.every_s <= 0:
            return
        now = self.clock()
        if now - self.last < self.every_s or done >= self.steps:  # the epoch's own line follows its last step
            return
        self.last = now
        rate = (done - self.first) / max(now - self.t0, 1e-9)  # steps per second
        left = self.steps - done
        run_left = left + max(0, self.end - self.epoch - 1) * self.steps
        self.log(f"step {done}/{self.steps} of epoch {self.epoch + 1}/{self.epochs}  "
                 f"{rate * self.batch_size:.0f} img/s  loss {loss_sum() / done:.4f}  "
                 f"eta {_clock(left / rate)} of the epoch, {_clock(run_left / rate)} of the run")


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
    if "train_images_per_s" in rec:
        parts.append(f"{rec['train_images_per_s']:.0f} img/s")
    parts.append(f"{rec['epoch_time']:.1f}s")
    return "  ".join(parts)
