"""Models from the user's own code: ``model: package.module:callable`` in a config or on the command line.

The spec names a callable by its module's import path and its attribute path: ``nets:Student``,
``mypkg.nets:build_student``, ``nets:Zoo.small`` (a class, a function, a classmethod...). featkd imports the
module with these folders first on ``sys.path`` (for the import only; ``sys.path`` is restored after):

1. the working directory;
2. the folder of every config file read in this process (:func:`add_search_dir`, called by
   :func:`featkd.config.load_config`), so a config can sit beside the module it names.

Then ``sys.path`` as usual (an installed package, ``PYTHONPATH``). The callable gets the model's ``options``
as keyword arguments, plus ``num_classes`` and ``in_channels`` (the data set's) when its signature accepts
them (by name or through ``**kwargs``) and ``options`` does not set them; it must return an ``nn.Module``.
Whether its output fits the task (``(B, K)`` logits for classification) is checked when a run is built.

Errors are one line naming the spec: a module that is not found (and where featkd looked), a module whose
own import fails, a missing attribute (with "did you mean"), something not callable, a call that fails, a
return value that is not an ``nn.Module``.

A run folder's ``config.yaml`` records the spec as written, so evaluating or exporting the run later needs
the module importable again (the same working directory, or ``PYTHONPATH``).
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from featkd.errors import FeatkdError, did_you_mean

__all__ = ["add_search_dir", "create_user_model", "import_callable", "search_dirs"]

_IDENT = r"[A-Za-z_]\w*"
_SPEC = re.compile(rf"^(?P<module>{_IDENT}(?:\.{_IDENT})*):(?P<attr>{_IDENT}(?:\.{_IDENT})*)$")

#: folders of the config files read in this process, searched after the working directory
_SEARCH_DIRS: list[Path] = []


def add_search_dir(folder: str | Path) -> None:
    """Search ``folder`` for user model modules (after the working directory and earlier folders)."""
    folder = Path(folder).resolve()
    if folder not in _SEARCH_DIRS:
        _SEARCH_DIRS.append(folder)


def search_dirs() -> list[Path]:
    """The folders put first on ``sys.path`` while a user module is imported, in order."""
    dirs = [Path.cwd().resolve(), *_SEARCH_DIRS]
    return [d for i, d in enumerate(dirs) if d not in dirs[:i]]


@contextmanager
def _on_sys_path(dirs: list[Path]) -> Iterator[None]:
    saved = list(sys.path)
    sys.path[:0] = [str(d) for d in dirs]
    try:
        yield
    finally:
        sys.path[:] = saved


def import_callable(spec: str) -> Callable[..., Any]:
    """The callable named by ``spec`` (``package.module:attr.path``), imported as the module docstring says."""
    match = _SPEC.match(spec)
    if not match:
        raise FeatkdError(f"model {spec!r}: expected package.module:callable (e.g. mynets:Student), or a "
                          "featkd model name (`featkd layers --help`), torchvision:<name>")
    module_name, attr_path = match["module"], match["attr"]
    dirs = search_dirs()
    try:
        with _on_sys_path(dirs):
            module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            where = ", ".join(str(d) for d in dirs)
            raise FeatkdError(f"model {spec!r}: no module named {exc.name!r} (looked in {where}, then sys.path; "
                              "see featkd/models/user.py)") from None
        raise FeatkdError(f"model {spec!r}: importing {module_name!r} failed: {exc}") from None
    except Exception as exc:  # the user's module raised while being imported
        raise FeatkdError(f"model {spec!r}: importing {module_name!r} failed "
                          f"({type(exc).__name__}: {_first_line(exc)})") from None
    obj: Any = module
    done = module_name
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            where = getattr(module, "__file__", None) or module_name
            raise FeatkdError(f"model {spec!r}: {done!r} ({where}) has no attribute {part!r}"
                              f"{did_you_mean(part, names)}")
        obj = getattr(obj, part)
        done = f"{done}.{part}" if done != module_name else f"{module_name}:{part}"
    if not callable(obj):
        raise FeatkdError(f"model {spec!r}: {attr_path} is a {type(obj).__name__}, not a callable that builds a model")
    return obj


def create_user_model(spec: str, *, num_classes: int, in_channels: int, **options: Any) -> nn.Module:
    """Import and call ``spec`` (see the module docstring); the result is checked to be an ``nn.Module``."""
    factory = import_callable(spec)
    kwargs = dict(options)
    for key, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if key not in kwargs and _accepts(factory, key):
            kwargs[key] = value
    try:
        model = factory(**kwargs)
    except Exception as exc:  # the user's constructor: one line naming the spec and the arguments
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise FeatkdError(f"model {spec!r}: calling it with ({args}) failed "
                          f"({type(exc).__name__}: {_first_line(exc)})") from None
    if not isinstance(model, nn.Module):
        raise FeatkdError(f"model {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _accepts(factory: Callable[..., Any], key: str) -> bool:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # some builtins have no signature
        return False
    return key in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]

