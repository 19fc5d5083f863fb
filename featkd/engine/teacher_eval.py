"""The teacher's test evaluation before training, computed once per teacher and evaluation data and remembered.

Evaluating the teacher on the test split takes minutes on ImageNet-size data, and its number does not change
between the runs of a sweep or the restarts of one run. ``train.teacher_eval``:

* ``auto`` (default): the number of the run folder's ``teacher_eval.json`` (a resumed run), else of the shared
  file ``$FEATKD_CACHE/teacher-evals/<key>.json`` (default ``~/.cache/featkd``, beside the zoo's built weights:
  another run with the same teacher and data), else a fresh evaluation; the places that lack it get it;
* ``always``: a fresh evaluation, written to both places;
* ``off``: no evaluation (``teacher_test_metric`` is null in the summary).

The key (SHA-256 of :func:`eval_ingredients`' JSON, which the files also hold, for people) is what the number
depends on: the teacher (model name, options, class, a digest of its ``state_dict``: whatever file it came from),
the task, the data config without the keys that only shape training batches (:data:`TRAINING_ONLY`), the built
data's evaluation view (normalisation, input shape, classes, test size, sliding windows), the autocast dtype and
device type, the featkd and torch versions and a digest of the source files that compute it (the teacher's
module classes, the task, the data loaders, :meth:`~featkd.engine.build.Run.evaluate`), so an edited evaluator
in a checkout is a miss. Under DDP rank 0 looks the number up and tells the others, so every rank evaluates (a
collective) or none does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from featkd.distributed import broadcast_object
from featkd.engine import runfolder
from featkd.engine.teacher_cache import LABEL_FREE_KEYS, code_digest
from featkd.files import atomic_write_json
from featkd.models.zoo import build_dir

if TYPE_CHECKING:
    from featkd.engine.build import Run

VERSION = 1
RUN_FILE = "teacher_eval.json"

#: data keys that shape only the training batches (or how they are loaded); every other key is in the key
TRAINING_ONLY = ("batch_size", "augment", "crop_padding", "hflip", "scale_jitter", "scale_range", "base_size",
                 "crop_size", "train_subset", "subset_seed", "val_fraction", "num_workers", "download",
                 "augment_policy", "mixup_alpha", "cutmix_alpha", "cinic_valid")


def cache_dir() -> Path:
    """The shared folder of remembered teacher evaluations: ``$FEATKD_CACHE/teacher-evals``."""
    return build_dir().parent / "teacher-evals"


def eval_ingredients(run: Run) -> dict[str, Any]:
    """Everything the teacher's test metrics depend on (see the module docstring)."""
    import featkd
    from featkd.engine.build import Run as RunClass

    cfg, data = run.cfg, run.data
    data_cfg = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k not in TRAINING_ONLY
                and not (k in LABEL_FREE_KEYS and v == LABEL_FREE_KEYS[k])}
    if data_cfg.get("data_dir"):
        data_cfg["data_dir"] = str(Path(data_cfg["data_dir"]).expanduser().resolve())
    view = {k: getattr(data, k, None) for k in ("name", "num_classes", "input_shape", "test_size", "mean", "std",
                                                "ignore_index", "masks", "eval_window", "eval_stride")}
    objects = {type(m) for m in run.teacher.modules()} | {type(run.task), type(data.backend), RunClass}
    return {
        "format": VERSION, "featkd": featkd.__version__, "torch": torch.__version__, "code": code_digest(objects),
        "teacher": {**cfg.teacher_description(),
                    "class": f"{type(run.teacher).__module__}.{type(run.teacher).__qualname__}",
                    "state_dict": runfolder.payload_digest(run.teacher.state_dict())},
        "task": run.task.name, "data": data_cfg, "view": json.loads(json.dumps(view, default=list)),
        "autocast": str(run.amp_dtype) if run.amp else "none", "device": run.device.type,
    }


def eval_key(ingredients: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(ingredients, sort_keys=True, default=str).encode()).hexdigest()


def _read(path: Path, key: str) -> dict[str, float] | None:
    """The metrics in ``path`` when it is a record of ``key``; None when missing, unreadable or another key's."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("key") != key or not isinstance(record.get("metrics"), dict):
        return None
    return record["metrics"]


def _warn(message: str) -> None:
    print(f"featkd: warning: teacher evaluation: {message}", file=sys.stderr, flush=True)


def teacher_test_metrics(run: Run, mode: str, out_dir: Path | None, evaluate: Callable[[], dict[str, Any]], *,
                         lookup_only: bool = False) -> tuple[dict[str, float] | None, bool]:
    """``(metrics, remembered)``: the teacher's scalar test metrics (``{"acc": ..., "loss": ...}``) and whether they
    were read rather than computed by ``evaluate()`` (a collective: every rank calls this); ``(None, False)`` for
    ``mode`` off, or with ``lookup_only`` (a run with nothing left to train) when no number is remembered. Rank 0
    reads and writes the run folder ``out_dir`` (None: none) and the shared file."""
    if mode == "off":
        return None, False
    found = key = ingredients = shared = None
    if run.dist.is_main:
        ingredients = eval_ingredients(run)
        key = eval_key(ingredients)
        shared = cache_dir() / f"{key}.json"
        if mode == "auto" or lookup_only:
            found = (_read(out_dir / RUN_FILE, key) if out_dir is not None else None) or _read(shared, key)
    found = broadcast_object(found, run.dist)
    if found is None and lookup_only:
        return None, False
    metrics = found
    if metrics is None:
        result = evaluate()
        metrics = {k: float(v) for k, v in result.items() if isinstance(v, (int, float, torch.Tensor))
                   and not isinstance(v, bool) and (not isinstance(v, torch.Tensor) or v.numel() == 1)}
    if run.dist.is_main:
        record = {"key": key, "metrics": metrics, "teacher": run.cfg.teacher_label, "ingredients": ingredients}
        targets = [shared] + ([out_dir / RUN_FILE] if out_dir is not None else [])
        for path in targets:
            if _read(path, key) == metrics:
                continue
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_json(path, record, indent=1)
            except OSError as exc:  # a read-only cache is no reason to stop a run
                _warn(f"cannot write {path} ({exc.strerror or exc}); it is evaluated again next time")
    return metrics, found is not None
