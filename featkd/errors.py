"""User-facing errors.

Anything a user can cause (a bad config key, an unknown model, a missing layer or data file) raises
:class:`FeatkdError`; the CLI prints its message on one line and exits with status 2. Everything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class FeatkdError(Exception):
    """An error caused by the user's input, reported as one line without a traceback."""


class ConfigError(FeatkdError):
    """A configuration value is missing, unknown or of the wrong type."""


class DataError(FeatkdError):
    """A data set cannot be found or read."""


class DivergenceError(FeatkdError):
    """A training loss became NaN or infinite."""


def did_you_mean(name: str, candidates: Iterable[str], limit: int = 3) -> str:
    """Return ``" (did you mean 'a', 'b'?)"`` for the candidates closest to ``name``, or ``""``."""
    close = difflib.get_close_matches(name, list(candidates), n=limit, cutoff=0.5)
    if not close:
        return ""
    return " (did you mean " + ", ".join(repr(c) for c in close) + "?)"
