"""Distillation methods: one module per method, each registered under a short name.

``METHODS.get(name)`` returns the :class:`~featkd.methods.base.Distiller` subclass; its ``Config``
dataclass documents the options accepted in a config's ``method:`` section.
"""

from __future__ import annotations

from featkd.methods.base import Batch, BuildContext, Distiller, DistillerConfig, RunContext
from featkd.registry import Registry

METHODS: Registry[type[Distiller]] = Registry("method")


def register(name: str):
    """Class decorator: register a Distiller subclass under ``name`` (also stored as ``cls.name``)."""

    def add(cls: type[Distiller]) -> type[Distiller]:
        cls.name = name
        return METHODS.register(name)(cls)

    return add


def _import_all() -> None:
    """Import every module of this package and its sub-packages: each method registers itself (a new file,
    or a new sub-package for a method of several files, is a new method)."""
    import importlib
    import pkgutil

    for info in pkgutil.walk_packages(__path__, prefix=f"{__name__}."):
        leaf = info.name.rsplit(".", 1)[-1]
        if leaf not in ("base", "common") and not leaf.startswith("_"):
            importlib.import_module(info.name)


_import_all()

__all__ = ["METHODS", "Batch", "BuildContext", "Distiller", "DistillerConfig", "RunContext", "register"]
