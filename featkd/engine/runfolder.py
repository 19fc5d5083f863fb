"""A run folder that survives faults: checkpoints that cannot be lost, and one run per folder.

Checkpoints (:func:`save_checkpoint`, :func:`load_checkpoint`, :func:`load_resumable`):

* every training checkpoint carries ``"checksum"``: the SHA-256 of its payload (every tensor's dtype, shape
  and bytes, every plain value, in sorted key order; :func:`payload_digest`), verified on load, so a file
  that still unpickles but whose bytes changed (a bad disk, a partial copy) is refused like a truncated one;
* ``last.pt`` is written to a temporary file and fsynced first; then the current ``last.pt`` is hard-linked
  to ``last.prev.pt`` (the previous good checkpoint, replaced by one rename) and the new file renamed over
  ``last.pt``. At every instant both names hold complete checkpoints, and a save that fails (no space, a
  file-size limit) leaves both as they were and removes its temporary file;
* a resume reads ``last.pt`` and, when it is truncated, corrupt or missing, falls back to ``last.prev.pt``
  with a one-line warning.

One run per folder (:class:`RunLock`): rank 0 holds ``DIR/run.lock`` (JSON: pid, host, start time) with an
exclusive ``flock`` for the whole run. The kernel drops the lock when the process dies, however it dies, so
a lock file left by a killed run is stale by construction: the next run takes it over and says whose it was.
A second run on a folder that a live run holds is refused with one line.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from featkd.engine import checkpoint as ckpt
from featkd.errors import ConfigError, FeatkdError
from featkd.files import atomic_file, atomic_write_text

try:  # POSIX; elsewhere runs are not locked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LAST = "last.pt"
PREVIOUS = "last.prev.pt"
LOCK = "run.lock"

#: config keys that may change when a run is resumed (everything else must match the checkpoint)
RESUMABLE_CHANGES = {
    "train.epochs", "train.stop_after", "train.progress", "train.tensorboard", "train.device", "train.num_threads",
    "train.eval_every", "train.checkpoint_every_steps", "data.num_workers", "data.data_dir",
    "data.eval_batch_size", "name", "train.teacher_cache", "train.teacher_cache_max_gb", "train.log_every_s",
    "train.teacher_eval",
}


# ---------------------------------------------------------------------------------------------------------
# checksums and the rotating save
# ---------------------------------------------------------------------------------------------------------


def _feed(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)};".encode())
        for key in sorted(obj, key=repr):
            h.update(f"{key!r}=".encode())
            _feed(h, obj[key])
    elif isinstance(obj, (list, tuple)):  # one tag: a round trip must not change the digest
        h.update(f"L{len(obj)};".encode())
        for item in obj:
            _feed(h, item)
    else:  # str, int, float (repr is exact), bool, None
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def payload_digest(state: Any) -> str:
    """SHA-256 hex digest of a checkpoint payload (see the module docstring); independent of file layout."""
    h = hashlib.sha256()
    _feed(h, state)
    return h.hexdigest()


def previous_path(path: Path) -> Path:
    """``last.pt`` -> ``last.prev.pt``."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be opened / synced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class _Writes:
    """A file's ``write``/``flush`` for ``torch.save`` that keeps the first ``OSError`` (ENOSPC, EFBIG)."""

    def __init__(self, f: Any) -> None:
        self.f, self.error = f, None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self.f.flush()


def save_checkpoint(state: dict[str, Any], path: str | Path, *, keep_previous: bool = False) -> None:
    """Write ``state`` + its checksum to ``path`` atomically; with ``keep_previous`` the file ``path`` held
    before becomes ``previous_path(path)`` (atomically too). On failure (``OSError``: no space, a file-size
    limit) the temporary file is removed and both files are as they were; the error propagates."""
    path = Path(path)
    payload = {**state, "checksum": payload_digest(state)}
    with atomic_file(path, "wb", fsync=True) as f:
        out = _Writes(f)
        try:
            torch.save(payload, out)
        except Exception:
            if out.error is not None:  # torch reports a failed write as a RuntimeError about positions
                raise out.error from None
            raise
        if keep_previous and path.is_file():
            _keep_as_previous(path)
    _fsync_dir(path.parent)


def _keep_as_previous(path: Path) -> None:
    """Make the file at ``path`` also ``previous_path(path)``, atomically (a hard link renamed into place)."""
    link = path.with_name(f".{path.name}.prev.tmp")
    link.unlink(missing_ok=True)
    try:
        try:
            os.link(path, link)  # no copy, no extra space
        except OSError:  # a file system without hard links
            shutil.copy2(path, link)
        os.replace(link, previous_path(path))
    except BaseException:
        link.unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A featkd training checkpoint, checksum verified (files written before checksums are accepted as is).

    Raises :class:`FeatkdError` (one line) when the file is missing, unreadable, foreign or corrupt.
    """
    path = Path(path)
    state = ckpt.load_file(path)
    if not ckpt.is_training_checkpoint(state):
        raise FeatkdError(f"{path} is not a featkd training checkpoint")
    digest = state.pop("checksum", None)
    if digest is not None and payload_digest(state) != digest:
        raise FeatkdError(f"checkpoint {str(path)!r} is corrupt (its checksum does not match its contents)")
    return state


def holds_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` holds a checkpoint to resume from (``last.pt`` or ``last.prev.pt``, readable or not)."""
    last = Path(folder) / LAST
    return last.exists() or previous_path(last).exists()


def describe(state: dict[str, Any]) -> str:
    """Where a checkpoint stands: ``epoch 3``, ``epoch 3, not evaluated`` or ``epoch 3, step 7 of epoch 4``."""
    epochs, batch = int(state["epoch"]), int(state.get("batch", 0))
    where = f", step {batch} of epoch {epochs + 1}" if batch else ", not evaluated" if state.get("pending_eval") else ""
    return f"epoch {epochs}{where}"


def load_resumable(folder: Path, warn: Callable[[str], None]) -> tuple[dict[str, Any], Path] | None:
    """``(state, file)`` of the folder's last good checkpoint: ``last.pt``, else ``last.prev.pt`` (after a
    one-line ``warn``); ``None`` when the folder holds neither. :class:`FeatkdError` when neither is usable."""
    last, prev = folder / LAST, folder / PREVIOUS
    if not last.exists() and not prev.exists():
        return None
    try:
        return load_checkpoint(last), last
    except FeatkdError as exc:
        if not prev.is_file():
            raise
        try:
            state = load_checkpoint(prev)
        except FeatkdError as exc_prev:
            raise FeatkdError(f"cannot resume: {exc}; and {exc_prev}") from None
        warn(f"{exc}; resuming from the previous checkpoint {prev} ({describe(state)})")
        return state, prev


# ---------------------------------------------------------------------------------------------------------
# one run per folder
# ---------------------------------------------------------------------------------------------------------


def _read_holder(path: Path) -> dict[str, Any]:
    try:
        holder = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _holder_text(holder: dict[str, Any]) -> str:
    pid, host = holder.get("pid", "?"), holder.get("host")
    return f"pid {pid}" + (f" on {host}" if host and host != socket.gethostname() else "")


class RunLock:
    """The exclusive lock of a run folder (see the module docstring). Not re-entrant."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def check(self) -> None:
        """Refuse (:class:`FeatkdError`) if a live run holds the folder; creates nothing."""
        if fcntl is None or self.held or not self.path.is_file():
            return
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return
        try:
            self._try_lock(fd)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _try_lock(self, fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_text(_read_holder(self.path))
            raise FeatkdError(f"{self.folder} is in use by a running featkd ({holder}, lock {self.path}); "
                              "wait for it to end or choose another --out") from None

    def acquire(self, log: Callable[[str], None]) -> None:
        """Take the lock (creating the folder); says so when it takes over the lock of a dead run."""
        if fcntl is None or self.held:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                self._try_lock(fd)
                # the file may have been released (unlinked) between our open and our flock: lock the live name
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            except BaseException:
                os.close(fd)
                raise
            if same:
                break
            os.close(fd)
        old = _read_holder(self.path)
        if old.get("pid") not in (None, os.getpid()):
            log(f"took over the stale lock {self.path} of {_holder_text(old)} (that process is no longer running)")
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Remove the lock file and drop the lock (safe to call twice)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(fd)

    def __del__(self) -> None:  # a Trainer that is dropped without fit() still frees its folder
        with contextlib.suppress(Exception):
            self.release()


#: config keys added after run folders were first written, with the value that means "as before": a checkpoint
#: written without the key equals a config that has it at this value (so older runs still resume)
LATER_CONFIG_KEYS = {"teachers": None, "data.labels": "read", "data.probe": None}


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two config dicts (``method`` compared as one value)."""
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        path = f"{prefix}{k}"
        if path in LATER_CONFIG_KEYS and (k not in old or k not in new) and \
                (old if k in old else new)[k] == LATER_CONFIG_KEYS[path]:
            continue
        if isinstance(a, dict) and isinstance(b, dict) and k != "method":
            keys += config_differences(a, b, path + ".")
        elif a != b:
            keys.append(path)
    return keys


@dataclass
class ResumePoint:
    """The checkpoint a run continues from."""

    state: dict[str, Any]
    path: Path  # last.pt, or last.prev.pt when last.pt was unreadable
    rotate: bool  # keep the file being replaced as last.prev.pt (not when last.pt was found corrupt)
    saved_at: str  # where it stands, for messages (describe())


def check_run_folder(out_dir: Path | None, resume: bool | str, config: dict[str, Any], lock: RunLock | None,
                     warn: Callable[[str], None]) -> ResumePoint | None:
    """Decide, before anything is built or written, what a run may do with ``out_dir``.

    ``resume``: True (continue from ``last.pt``, else ``last.prev.pt``; missing is an error), ``"auto"`` (the
    same when a checkpoint exists, else a fresh start) or False (a folder already holding a run is an error).
    ``config``: the new run's config as a dict; it may differ from the checkpoint's only in
    :data:`RESUMABLE_CHANGES`. ``lock``: checked (a live run holding the folder is an error) when given; rank 0
    passes it, other ranks None. ``warn``: where the fallback to ``last.prev.pt`` is reported.
    Returns the checkpoint to resume from, or None for a fresh start.
    """
    if resume not in (False, True, "auto"):
        raise FeatkdError(f"resume: expected true, false or 'auto', got {resume!r}")
    if out_dir is None:
        if resume:
            raise FeatkdError("--resume needs --out DIR (the run folder holding last.pt)")
        return None
    if lock is not None:
        lock.check()  # a live run holds the folder: refuse before anything is built or written
    last = out_dir / LAST
    if not resume:
        if holds_checkpoint(out_dir):
            raise FeatkdError(f"{out_dir} already holds a run (last.pt); pass --resume to continue it "
                              "or choose another --out")
        return None
    found = load_resumable(out_dir, warn)
    if found is None:
        if resume == "auto":
            return None
        raise FeatkdError(f"cannot resume: {last} not found")
    state, path = found
    changed = [k for k in config_differences(state["config"], config) if k not in RESUMABLE_CHANGES]
    if changed:
        raise ConfigError(f"cannot resume {path}: the config differs in {', '.join(changed[:5])}")
    return ResumePoint(state, path, path == last, describe(state))


SKIPPED = "skipped_files.txt"


def append_skipped(out_dir: Path, lines: list[str], log: Callable[[str], None]) -> None:
    """Add the bad files skipped (``data.bad_files: skip``; one "file: reason" line each, each file once) to
    ``out_dir/skipped_files.txt``, and say how many there are now."""
    path = out_dir / SKIPPED
    known = path.read_text().splitlines() if path.is_file() else []
    new = [line for line in dict.fromkeys(lines) if line not in set(known)]
    if new:
        atomic_write_text(path, "".join(f"{line}\n" for line in [*known, *new]))
        log(f"data: skipped {len(new)} bad file(s), {len(known) + len(new)} in all: see {path}")
