"""Atomic file writes: a reader, or a run killed mid-write, sees the old file or the complete new one."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_file(path: str | os.PathLike[str], mode: str = "w", *, fsync: bool = False,
                newline: str | None = None) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` (same folder, so the rename is atomic); when the block ends
    without an exception it is renamed over ``path``, else deleted. ``fsync``: flush it to disk first (for
    files a restart must find whole: checkpoints)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a fresh name opened exclusively ("x"): unlike mkstemp's 0600, the file gets the umask's permissions
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, mode.replace("w", "x"), newline=newline) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_file(path) as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, **dumps: Any) -> None:
    """``json.dumps(obj, **dumps)`` plus a final newline, written to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, **dumps) + "\n")


def atomic_copy(src: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Copy file ``src`` to ``path`` atomically."""
    with open(src, "rb") as source, atomic_file(path, "wb") as f:
        shutil.copyfileobj(source, f)
