"""The one place matplotlib is imported (an optional package): pyplot on the file-only Agg backend."""

from __future__ import annotations

from typing import Any

from featkd.errors import FeatkdError


def require_pyplot(purpose: str, alternative: str = "") -> Any:
    """``matplotlib.pyplot`` on the Agg backend (files only, never a window); a missing matplotlib is one
    :class:`FeatkdError` naming ``purpose`` (e.g. "the matching heatmaps"), the install command and
    ``alternative`` (e.g. "pass --no-plots") when there is one."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        instead = f" (or {alternative})" if alternative else ""
        raise FeatkdError(f"{purpose} need matplotlib: pip install matplotlib{instead}") from None
    return plt


def have_pyplot() -> bool:
    """Whether matplotlib can be imported (for output that is drawn only when it can be)."""
    try:
        require_pyplot("plots")
    except FeatkdError:
        return False
    return True
