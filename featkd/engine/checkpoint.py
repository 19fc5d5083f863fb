"""Checkpoints: atomic writes, ``weights_only`` loads, RNG state capture, and loading weights into models.

A training checkpoint (``last.pt`` / ``best.pt``) is a dict of tensors and plain Python values only, so
``torch.load(path, weights_only=True)`` reads it::

    {"format": "featkd-checkpoint", "version": 1, "epoch": int (epochs completed), "step": int,
     "student": state_dict, "distiller": state_dict, "optimizer": ..., "scheduler": ...,
     "rng": [per-rank RNG states], "config": dict, "metrics": dict, "best": float | None}

The exported student (``student.pt``) is a plain ``state_dict`` of the unmodified student model, loadable
without featkd: ``model.load_state_dict(torch.load("student.pt", weights_only=True))``.

Weights to load into a model (a config's ``checkpoint:``) may be a run folder (its ``student.pt``, else
``last.pt``), a featkd training checkpoint (its student), a plain ``state_dict`` file (or one under a
``"state_dict"`` key), or a ``.safetensors`` file (optional ``safetensors`` package): :func:`load_state_dict`.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from featkd.errors import FeatkdError, relative_note
from featkd.files import atomic_file

FORMAT = "featkd-checkpoint"
VERSION = 1


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` atomically and fsync'ed (:func:`featkd.files.atomic_file`).

    A reader (or a run killed mid-write) sees either the old file or the complete new one.
    """
    with atomic_file(path, "wb", fsync=True) as f:
        torch.save(obj, f)


def load_file(path: str | Path, what: str = "checkpoint") -> Any:
    """``torch.load(weights_only=True)`` on CPU with one-line errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FeatkdError(f"{what} {str(path)!r} not found{relative_note(path)}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt / foreign pickles raise many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FeatkdError(f"{what} {str(path)!r} cannot be read ({first[:200]})") from None


def is_training_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def model_state_from(obj: Any, path: str | Path) -> dict[str, torch.Tensor]:
    """The model state_dict inside a plain state_dict file or a featkd training checkpoint."""
    if is_training_checkpoint(obj):
        return obj["student"]
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        return obj["state_dict"]
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise FeatkdError(f"{str(path)!r} holds neither a state_dict nor a featkd checkpoint")


def weights_path(path: str | Path) -> Path:
    """The weights file of ``path``: a run folder's ``student.pt`` (else its ``last.pt``), or ``path`` itself."""
    path = Path(path)
    if not path.is_dir():
        return path
    for name in ("student.pt", "last.pt"):
        if (path / name).is_file():
            return path / name
    raise FeatkdError(f"{str(path)!r} is a folder without student.pt or last.pt (not a featkd run folder)")


def load_safetensors(path: str | Path, what: str = "weights") -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file (needs the optional ``safetensors`` package)."""
    path = Path(path)
    if not path.is_file():
        raise FeatkdError(f"{what} {str(path)!r} not found{relative_note(path)}")
    try:
        from safetensors.torch import load_file as load_tensors
    except ImportError:
        raise FeatkdError(f"{what} {str(path)!r}: reading .safetensors files needs the safetensors package: "
                          "pip install safetensors") from None
    try:
        return load_tensors(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise FeatkdError(f"{what} {str(path)!r} cannot be read ({_first_line(exc)})") from None


def load_state_dict(path: str | Path, what: str = "weights") -> dict[str, torch.Tensor]:
    """A model state_dict from a run folder, a featkd checkpoint, a plain state_dict or a .safetensors file."""
    path = weights_path(path)
    if path.suffix == ".safetensors":
        return load_safetensors(path, what)
    return model_state_from(load_file(path, what), path)


def load_model_weights(model: nn.Module, path: str | Path, what: str = "weights") -> None:
    """Load weights (any file :func:`load_state_dict` reads) into ``model``, strictly.

    A mismatch raises :class:`FeatkdError` naming how many keys are missing / unexpected and the first ones.
    """
    state = load_state_dict(path, what)
    path = weights_path(path)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # size mismatches
        detail = " ".join(str(exc).split())
        raise FeatkdError(f"{what} {str(path)!r} does not fit {type(model).__name__}: {detail[:300]}") from None
    if missing or unexpected:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                more = f" (first {', '.join(keys[:3])})" if len(keys) > 3 else f" ({', '.join(keys)})"
                parts.append(f"{len(keys)} {label} key{'s' if len(keys) > 1 else ''}{more}")
        raise FeatkdError(f"{what} {str(path)!r} does not fit {type(model).__name__}: {'; '.join(parts)}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


# ---------------------------------------------------------------------------------------------------------
# RNG state, stored with tensors and plain values only (weights_only-safe)
# ---------------------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
