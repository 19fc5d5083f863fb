"""User-facing errors.

Anything a user can cause (a bad config key, an unknown model, a missing layer or data file) raises
:class:`FeatkdError`; the CLI prints its message on one line and exits with status 2. Everything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path


class FeatkdError(Exception):
    """An error caused by the user's input, reported as one line without a traceback."""


class ConfigError(FeatkdError):
    """A configuration value is missing, unknown or of the wrong type."""


class DataError(FeatkdError):
    """A data set cannot be found or read."""


class DivergenceError(FeatkdError):
    """A training loss became NaN or infinite."""


def relative_note(path: str | os.PathLike[str]) -> str:
    """``" (relative to /cwd, the current folder)"`` for a relative ``path``, ``""`` for an absolute one (or
    ``~/...``): appended to a not-found error, since a relative ``data.data_dir`` or checkpoint is looked for
    from the folder featkd was started in, which a user does not always see. The one place that says so."""
    if Path(path).expanduser().is_absolute():
        return ""
    return f" (relative to {os.getcwd()}, the current folder)"


def did_you_mean(name: str, candidates: Iterable[str], limit: int = 3) -> str:
    """Return ``" (did you mean 'a', 'b'?)"`` for the candidates closest to ``name``, or ``""``."""
    close = difflib.get_close_matches(name, list(candidates), n=limit, cutoff=0.5)
    if not close:
        return ""
    return " (did you mean " + ", ".join(repr(c) for c in close) + "?)"


def forward_failed(what: str, shape: Sequence[int], exc: BaseException, hint: str = "") -> FeatkdError:
    """The one-line error for a model's own exception: ``what`` (e.g. ``"student 'nets:Student'"``) failed on
    an input of ``shape`` with ``exc`` (its type and first line); ``hint`` is appended after ``; ``.

    Every command that runs a user-chosen model reports its failure this way (through
    :func:`featkd.modes.probe_output`), instead of the model's traceback.
    """
    first = (str(exc).strip().splitlines() or [""])[0][:300] or type(exc).__name__
    return FeatkdError(f"{what} fails on an input of shape {tuple(shape)} ({type(exc).__name__}: {first})"
                       + (f"; {hint}" if hint else ""))
