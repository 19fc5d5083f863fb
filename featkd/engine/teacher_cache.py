"""The teacher-output cache (``train.teacher_cache: DIR``): a sweep pays the teacher's training forward once.

A tuning sweep trains many students on one *stream*: the same teacher, data, seed and world size. The
loaders draw epoch ``e``'s order and augmentation from ``(seed, e)`` alone (:mod:`featkd.data.loaders`; an
augmentation policy per (seed, e, sample), mixup / cutmix per (seed, e, batch)), so the teacher sees the same
batches in every run of the stream and returns the same outputs. A training loader that does not declare this
(``replayable = True``, as every featkd loader does: one a data set's own ``to_bundle`` made) is refused: the
cache is off for the run, with one line saying why. The first run
writes, for every training step, what ``task.forward_teacher`` returned (the logits and the captured
teacher features); later runs read them and never run the teacher in a training step::

    DIR/<key>/key.json               the ingredients of the key (readable; for people, not checked)
    DIR/<key>/rank<r>/epoch<e>.pt    one file per rank and epoch (0-based): every step's outputs, in order,
                                     and a fingerprint of every step's input batch

The key (:func:`stream_ingredients`, SHA-256 of their JSON) holds everything the per-step outputs depend on:
the teacher (model name, options, class, a digest of its ``state_dict``: whatever checkpoint it came from),
its capture points and the task, the data config without the keys that do not shape the training batches
(:data:`NOT_IN_BATCHES`), the seed, the world size and steps per epoch, the autocast dtype, device (GPU
name), CPU threads, ``channels_last`` / ``compile`` / ``deterministic``, the featkd and torch versions and
a digest of the source files that compute the outputs (the teacher's module classes, the capture code, the
task), so an edited model in a checkout is a miss too. The rank is the folder, epoch and step the place in
it. Anything that changes gives another key: a miss, which runs the teacher and writes the new stream.

Second guard: each step's input batch has a fingerprint (two float64 sums, one with fixed pseudo-random
weights). A read compares it with the current batch first; a mismatch (an ingredient the key missed, data
files changed under the same path) warns once and runs the teacher for the rest of that epoch, so a stale
output is never used.

Writing: the outputs of an epoch are copied to the CPU as they come and written at the epoch's end by
:func:`~featkd.engine.runfolder.save_checkpoint` (temporary file, fsync, rename; SHA-256 of the payload
inside). A run killed mid-epoch leaves no file for that epoch; a file whose checksum does not match is
refused on read (one warning; the teacher runs and the file is written again). Two runs of the same stream
at once both write identical files; the rename makes either one complete. A failed write (disk full) is a
warning, never the end of the run. ``train.teacher_cache_max_gb`` caps a stream's files (all epochs and
ranks; each rank gets its share): an epoch that would not fit (or does not fit the free disk space) is not
written, and the teacher runs for it and for the epochs after it. There is no eviction: delete the folder.
The logits alone are never cached for a method that needs features too (the teacher's forward computes
both, so it would run anyway): a step's outputs are cached whole or not at all.

Resume: a run resumed mid-epoch reads the rest of that epoch when its file exists; when not, the teacher
runs for the rest of it and nothing is written for it (its first steps are missing); later epochs are
written as usual. Under DDP each rank reads and writes its own folder; nothing here is a collective.

Not cached: the teacher passes that methods make themselves (MGD's matching statistics, KDA's landmarks,
DFA's search: the eval view), the teacher's evaluation before training, and a stream whose batches or
teacher outputs are not tensors (a line says so, and the run trains uncached).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from featkd.engine import runfolder
from featkd.errors import ConfigError, FeatkdError
from featkd.files import atomic_file

if TYPE_CHECKING:
    from featkd.engine.build import Run

FORMAT = "featkd-teacher-cache"
VERSION = 1

#: data keys that do not change the training batches (evaluation only, loading mechanics); every other key is in
#: the key, the segmentation recipes (scale_range, base_size, crop_size, hflip, storage) included
NOT_IN_BATCHES = ("eval_batch_size", "num_workers", "download", "eval_window", "eval_stride")

#: data keys added after the key's format was fixed, with the value that leaves the batches as before: in the
#: key only when set otherwise, so the streams cached before them keep their keys
#: the label-free keys (data.labels, data.probe) and their labelled defaults: in a key only when set otherwise
LABEL_FREE_KEYS = {"labels": "read", "probe": None}
LATER_DATA_KEYS = {"augment_policy": None, "mixup_alpha": 0.0, "cutmix_alpha": 0.0, "cinic_valid": "unused",
                   **LABEL_FREE_KEYS}

#: input fingerprints agree when within this (float64 sums of float32 inputs; a one-level change of a
#: single 8-bit pixel moves a sum by ~1e-2, rounding by < 1e-9)
_FINGERPRINT_ATOL = 1e-6
_FINGERPRINT_SEED = 20261201

#: what a file holds per tensor beyond its bytes (torch.save's zip entry: header, alignment, directory), about
_ENTRY_BYTES = 512

Outputs = tuple[Any, dict[str, Tensor]]


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"


def _warn(message: str) -> None:
    print(f"featkd: warning: teacher cache: {message}", file=sys.stderr, flush=True)


def code_digest(objects: set[type]) -> str:
    """SHA-256 of the source files defining ``objects`` and their base classes, outside torch itself (covered by
    its version): what a cached result computed by those classes depends on."""
    torch_dir = Path(torch.__file__).resolve().parent
    files = set()
    for obj in objects:
        for cls in inspect.getmro(obj):
            with contextlib.suppress(TypeError, OSError):
                path = Path(inspect.getfile(cls)).resolve()
                if path.is_file() and torch_dir not in path.parents:
                    files.add(path)
    h = hashlib.sha256()
    for path in sorted(files):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def stream_ingredients(run: Run, steps_per_epoch: int) -> dict[str, Any]:
    """Everything the teacher's per-step training outputs depend on (see the module docstring)."""
    import featkd

    cfg, tc = run.cfg, run.cfg.train
    data = {k: v for k, v in dataclasses.asdict(cfg.data).items()
            if k not in NOT_IN_BATCHES and not (k in LATER_DATA_KEYS and v == LATER_DATA_KEYS[k])}
    if data.get("augment_policy"):  # torchvision draws the policy's operations: its version shapes the batches
        import torchvision

        data["torchvision"] = torchvision.__version__
    if data.get("data_dir"):
        data["data_dir"] = str(Path(data["data_dir"]).expanduser().resolve())
    device = run.device
    return {
        "format": VERSION, "featkd": featkd.__version__, "torch": torch.__version__,
        "code": code_digest({type(m) for m in run.teacher.modules()} | {type(run.task), type(run.teacher_capture)}),
        "teacher": {**cfg.teacher_description(),
                    "class": f"{type(run.teacher).__module__}.{type(run.teacher).__qualname__}",
                    "state_dict": runfolder.payload_digest(run.teacher.state_dict())},
        "points": list(run.teacher_capture.points), "task": run.task.name,
        "data": data, "seed": tc.seed, "world_size": run.dist.world_size, "steps_per_epoch": steps_per_epoch,
        "autocast": getattr(run, "amp_name", "bf16" if run.amp else "none"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "channels_last": tc.channels_last, "compile": tc.compile, "deterministic": tc.deterministic,
    }


def stream_key(ingredients: dict[str, Any]) -> str:
    """The folder name of a stream: the first 24 hex digits of the SHA-256 of its ingredients' JSON."""
    text = json.dumps(ingredients, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def open_teacher_cache(run: Run, steps_per_epoch: int, loader: Any = None) -> TeacherCache:
    """The cache of ``run``'s stream as ``train.teacher_cache`` asks (a pass-through when off).

    ``steps_per_epoch``: the training loader's batches per epoch (forwards, not optimiser steps); ``loader``: the
    training loader, refused (the cache off, one line) unless it declares ``replayable``."""
    tc = run.cfg.train
    if tc.teacher_cache_max_gb < 0:
        raise ConfigError(f"train.teacher_cache_max_gb: must be >= 0, got {tc.teacher_cache_max_gb!r}")
    if not tc.teacher_cache:
        return TeacherCache()
    if run.teacher_capture is None:
        run.log(f"teacher cache: method {run.cfg.method_name!r} runs no teacher; nothing to cache")
        return TeacherCache()
    ingredients = stream_ingredients(run, steps_per_epoch)
    folder = Path(tc.teacher_cache).expanduser() / stream_key(ingredients)
    cache = TeacherCache(folder, ingredients, rank=run.dist.rank, steps_per_epoch=steps_per_epoch,
                         max_bytes=int(tc.teacher_cache_max_gb * 1e9) // run.dist.world_size,
                         device=run.device, log=run.log)
    if loader is not None and not getattr(loader, "replayable", False):
        cache.refuse(f"the training loader ({type(loader).__name__}) does not say that its batches are a function "
                     "of (seed, epoch) alone (replayable = True)")
        return cache
    cached = sum(cache.path(e).is_file() for e in range(tc.epochs))
    run.log(f"teacher cache: {folder} holds {cached} of {tc.epochs} epoch(s) for rank {run.dist.rank}")
    return cache


class TeacherCache:
    """The training step's teacher outputs of one stream, read from or written to ``folder``.

    The trainer calls :meth:`begin_epoch` before an epoch's first step (``first``: the step a mid-epoch
    resume starts at), :meth:`outputs` in every step with a function that runs the teacher, and
    :meth:`end_epoch` after the epoch's last step. Without a folder (the option off) every call runs the
    teacher; so does a call outside an epoch begun here (a benchmark calling ``train_step`` directly).
    """

    def __init__(self, folder: Path | None = None, ingredients: dict[str, Any] | None = None, *, rank: int = 0,
                 steps_per_epoch: int = 0, max_bytes: int = 0, device: torch.device | None = None,
                 log: Callable[[str], None] = print) -> None:
        self.folder, self.ingredients, self.rank = folder, ingredients, rank
        self.key = folder.name if folder is not None else None
        self.steps_per_epoch, self.max_bytes = steps_per_epoch, max_bytes
        self.device, self.log = device, log
        self.enabled = folder is not None
        self.off_reason: str | None = None  # set when this run's batches or outputs cannot be cached
        self.counts = {"read_steps": 0, "teacher_steps": 0, "read_epochs": 0, "written_epochs": 0}
        self._epoch: int | None = None
        self._mode: str | None = None  # "read" | "write" | None (the teacher runs, nothing is kept)
        self._file: dict[str, Any] | None = None
        self._logits: list[Tensor | None] = []
        self._features: dict[str, list[Tensor]] = {}
        self._prints: list[Tensor] = []
        self._full = False  # an epoch did not fit the cap: later epochs are not written either
        self._weights: dict[tuple, Tensor] = {}

    # ---- where things are ------------------------------------------------------------------------------
    def path(self, epoch: int) -> Path:
        return self.folder / f"rank{self.rank}" / f"epoch{epoch}.pt"

    def summary(self) -> dict[str, Any] | None:
        """What this rank's cache did (for ``summary.json``); None when the option is off."""
        if not self.enabled:
            return None
        out = {"folder": str(self.folder), "key": self.key, **self.counts}
        return {**out, "off": self.off_reason} if self.off_reason else out

    # ---- the trainer's calls ---------------------------------------------------------------------------
    def begin_epoch(self, epoch: int, first: int = 0) -> None:
        self._epoch, self._mode, self._file = epoch, None, None
        self._logits, self._features, self._prints = [], {}, []
        if not self.enabled or self.off_reason:
            return
        path = self.path(epoch)
        if path.is_file():
            try:
                self._file = self._load(path, epoch)
            except FeatkdError as exc:
                _warn(f"{exc}; the teacher runs for epoch {epoch + 1} (and the file is written again when the "
                      "epoch runs from its first step)")
            else:
                self._mode = "read"
                self.counts["read_epochs"] += 1
                return
        if first == 0 and not self._full:
            self._mode = "write"

    def outputs(self, epoch: int, batch: int, x: Any, teacher: Callable[[], Outputs]) -> Outputs:
        """The teacher's ``(logits, features)`` for step ``batch`` (0-based, within ``epoch``) on input ``x``:
        read from the file, or ``teacher()`` (then kept for the file when this epoch is being written)."""
        if self._mode is None or epoch != self._epoch or not 0 <= batch < self.steps_per_epoch:
            return self._run(teacher)
        if not isinstance(x, Tensor):
            self._off(f"the batches are {type(x).__name__}s, not tensors")
            return self._run(teacher)
        if self._mode == "read":
            if not self._same_input(x, self._file["fingerprints"][batch]):
                _warn(f"the input of step {batch + 1} of epoch {epoch + 1} differs from the one {self.path(epoch)} "
                      "was written for (the key misses an ingredient?); the teacher runs for the rest of the epoch")
                self._mode = None
                return self._run(teacher)
            self.counts["read_steps"] += 1
            f = self._file
            logits = f["logits"][batch]
            return (logits.to(self.device) if logits is not None else None,
                    {p: v[batch].to(self.device) for p, v in f["features"].items()})
        out = self._run(teacher)
        self._keep(epoch, batch, x, out)
        return out

    def end_epoch(self, epoch: int) -> None:
        mode, began = self._mode, self._epoch
        self._mode, self._epoch, self._file = None, None, None
        if mode != "write" or began != epoch or len(self._prints) != self.steps_per_epoch:
            self._logits, self._features, self._prints = [], {}, []
            return
        state = {"format": FORMAT, "version": VERSION, "key": self.key, "rank": self.rank, "epoch": epoch,
                 "steps": self.steps_per_epoch, "fingerprints": self._prints, "logits": self._logits,
                 "features": self._features}
        self._logits, self._features, self._prints = [], {}, []
        try:
            self._write_key()
            runfolder.save_checkpoint(state, self.path(epoch))
        except OSError as exc:
            _warn(f"cannot write {self.path(epoch)} ({exc.strerror or exc}); this run goes on without it")
            return
        self.counts["written_epochs"] += 1

    # ---- helpers -----------------------------------------------------------------------------------------
    def _run(self, teacher: Callable[[], Outputs]) -> Outputs:
        self.counts["teacher_steps"] += 1
        return teacher()

    def refuse(self, why: str) -> None:
        """Turn the cache off for this run (nothing read, nothing written), with one line saying ``why``."""
        self._off(why)

    def _off(self, why: str) -> None:
        if self.off_reason is None:
            self.log(f"teacher cache: off for this run: {why}")
        self.off_reason, self._mode = why, None
        self._logits, self._features, self._prints = [], {}, []

    def _fingerprint(self, x: Tensor | list[Tensor]) -> Tensor:
        """(2,) float64 on the CPU: the sum of ``x`` and its sum weighted by fixed pseudo-random weights (a list
        of images of different sizes: the sum of theirs, each weighted by its place)."""
        if isinstance(x, (list, tuple)):
            return sum((k + 1) * self._fingerprint(t) for k, t in enumerate(x))
        key = (tuple(x.shape), x.device)
        if key not in self._weights:
            g = torch.Generator().manual_seed(_FINGERPRINT_SEED)  # its own generator: the run's RNG is untouched
            self._weights[key] = torch.rand(x.shape, generator=g, dtype=torch.float64).to(x.device)
        xd = x.detach().double()
        return torch.stack([xd.sum(), (xd * self._weights[key]).sum()]).cpu()

    def _same_input(self, x: Tensor, stored: Tensor) -> bool:
        return bool(torch.allclose(self._fingerprint(x), stored, rtol=0.0, atol=_FINGERPRINT_ATOL))

    def _keep(self, epoch: int, batch: int, x: Tensor, out: Outputs) -> None:
        logits, features = out
        ok = (logits is None or isinstance(logits, Tensor)) and isinstance(features, dict) and \
            all(isinstance(v, Tensor) for v in features.values())
        if not ok:
            self._off(f"the teacher's outputs are not tensors ({type(logits).__name__}, {type(features).__name__})")
            return
        if batch != len(self._prints):  # not the next step in order: this epoch cannot be complete
            self._mode = None
            return
        copy = lambda t: t.detach().clone() if t.device.type == "cpu" else t.detach().cpu()  # noqa: E731
        self._prints.append(self._fingerprint(x))
        self._logits.append(copy(logits) if logits is not None else None)
        for point, value in features.items():
            self._features.setdefault(point, []).append(copy(value))
        if batch == 0:
            self._check_room(epoch, logits, features)

    def _check_room(self, epoch: int, logits: Tensor | None, features: dict[str, Tensor]) -> None:
        """After an epoch's first step: will the epoch's file fit the cap and the disk? If not, drop it."""
        tensors = [logits, *features.values()] if logits is not None else list(features.values())
        step = sum(t.numel() * t.element_size() + _ENTRY_BYTES for t in tensors) + 16 + _ENTRY_BYTES  # + fingerprint
        need = step * self.steps_per_epoch
        folder = self.path(epoch).parent
        used = sum(p.stat().st_size for p in folder.glob("epoch*.pt") if p != self.path(epoch)) \
            if folder.is_dir() else 0
        free = shutil.disk_usage(self._existing_parent(folder)).free
        if used + need <= self.max_bytes and need < free:
            return
        why = (f"over train.teacher_cache_max_gb ({_size(self.max_bytes)} for this rank, {_size(used)} used)"
               if used + need > self.max_bytes else "more than the free disk space")
        self.log(f"teacher cache: epoch {epoch + 1} would take {_size(need)}, {why}; the teacher runs for the "
                 "epochs not cached")
        self._full, self._mode = True, None
        self._logits, self._features, self._prints = [], {}, []

    @staticmethod
    def _existing_parent(path: Path) -> Path:
        while not path.exists() and path.parent != path:
            path = path.parent
        return path

    def _load(self, path: Path, epoch: int) -> dict[str, Any]:
        """A cache file, checked: format, key, place and checksum; :class:`FeatkdError` otherwise."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # truncated / foreign files raise many types
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise FeatkdError(f"{path} cannot be read ({first[:200]})") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("version") != VERSION:
            raise FeatkdError(f"{path} is not a featkd teacher-cache file of version {VERSION}")
        digest = state.pop("checksum", None)
        if digest is None or runfolder.payload_digest(state) != digest:
            raise FeatkdError(f"{path} is corrupt (its checksum does not match its contents)")
        where = (state["key"], state["rank"], state["epoch"], state["steps"])
        if where != (self.key, self.rank, epoch, self.steps_per_epoch):
            raise FeatkdError(f"{path} belongs to another stream or place (key, rank, epoch, steps {where})")
        return state

    def _write_key(self) -> None:
        """``key.json`` beside the rank folders, once (a temporary file renamed: concurrent writers agree)."""
        path = self.folder / "key.json"
        if path.is_file():
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as f:
            json.dump(self.ingredients, f, indent=2, sort_keys=True, default=str)
            f.write("\n")
