"""The model registry and factory: :data:`MODELS`, and :func:`create_model`, which dispatches on a name's scheme.

A model name is one of (:func:`parse_model_name`, like timm's factory):

- ``resnet8``: a featkd model, registered in :data:`MODELS` by its model file in this package;
- ``torchvision:<name>``: torchvision's model (:mod:`featkd.models.torchvision_models`);
- ``timm:<name>``: timm's model (:mod:`featkd.models.timm_models`);
- ``package.module:callable``: a model from the user's code (:mod:`featkd.models.user`).

Model files are found, not listed: :func:`load_models` imports every module of this package but the helpers in
:data:`NOT_MODEL_FILES`, and each registers its models with ``@MODELS.register(name)`` (a new file is new
models). A model file imports ``MODELS`` from this module, never from the package facade ``featkd.models``
(which is still being imported while the files load).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import pkgutil
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from torch import nn

from featkd.errors import FeatkdError
from featkd.models.timm_models import create_timm_model, is_timm_model
from featkd.models.torchvision_models import create_torchvision_model, is_torchvision_model
from featkd.models.user import create_user_model
from featkd.registry import Registry

__all__ = [
    "MODELS",
    "NOT_MODEL_FILES",
    "Scheme",
    "check_options",
    "classifier_name",
    "create_model",
    "list_models",
    "load_models",
    "model_factory",
    "model_options",
    "parse_model_name",
]

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")

#: the model-name schemes besides featkd's own names ("user": ``package.module:callable``)
Scheme = Literal["featkd", "torchvision", "timm", "user"]
_PREFIXED: tuple[Scheme, ...] = ("torchvision", "timm")

#: modules of this package that register no model (helpers, adapters, the zoo): :func:`load_models` skips them
NOT_MODEL_FILES = frozenset({"ensemble", "init", "registry", "timm_models", "torchvision_models", "user", "zoo"})

_loaded = False


def register_factory(name: str, factory: Callable[..., nn.Module], options: Sequence[inspect.Parameter],
                     returns: type, doc: str) -> None:
    """Register a generated ``factory(*, num_classes, in_channels=3, **options)`` under ``name`` with the
    signature and annotations spelled out (``options``: keyword-only parameters after those two), so
    :func:`model_options` checks a config's options against it like a hand-written factory's."""
    kw = inspect.Parameter.KEYWORD_ONLY
    params = [inspect.Parameter("num_classes", kw, annotation=int),
              inspect.Parameter("in_channels", kw, default=3, annotation=int), *options]
    factory.__signature__ = inspect.Signature(params, return_annotation=returns)  # type: ignore[attr-defined]
    factory.__annotations__ = {p.name: p.annotation for p in params} | {"return": returns}
    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = doc
    MODELS.register(name)(factory)


def load_models() -> None:
    """Import every model file of this package once (see the module docstring); each registers its models."""
    global _loaded
    if _loaded:
        return
    _loaded = True  # first: a model file that lists or builds models while it loads must not walk again
    package = __name__.rpartition(".")[0]
    for info in pkgutil.iter_modules([str(Path(__file__).parent)], prefix=f"{package}."):
        leaf = info.name.rsplit(".", 1)[-1]
        if leaf not in NOT_MODEL_FILES and not leaf.startswith("_"):
            importlib.import_module(info.name)


def parse_model_name(name: str) -> tuple[Scheme, str]:
    """``(scheme, name within it)``: ``("torchvision", "resnet18")`` for ``torchvision:resnet18``, ``("timm",
    ...)``, ``("user", "nets:Student")`` (the whole spec) for any other ``prefix:rest``, else ``("featkd", name)``."""
    prefix, sep, rest = name.partition(":")
    if not sep:
        return "featkd", name
    for scheme in _PREFIXED:
        if prefix == scheme:
            return scheme, rest
    return "user", name


def list_models() -> list[str]:
    """Names of the featkd models (``torchvision:``, ``timm:`` and user models are accepted too but not listed)."""
    load_models()
    return MODELS.names()


def model_factory(name: str) -> Callable[..., nn.Module]:
    """The registered factory of featkd model ``name``; unknown names get a "did you mean" that also proposes
    ``torchvision:<name>`` / ``timm:<name>`` when those packages have a model of that name."""
    load_models()
    if name not in MODELS:
        raise _unknown_model(name)
    return MODELS.get(name)


def model_options(name: str) -> dict[str, inspect.Parameter]:
    """The options (keyword arguments besides ``num_classes`` and ``in_channels``) of a featkd model."""
    params = inspect.signature(model_factory(name)).parameters
    return {k: p for k, p in params.items() if k not in ("num_classes", "in_channels")}


def create_model(name: str, *, num_classes: int, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """Build model ``name`` (any scheme, see the module docstring) with freshly initialised weights.

    Unknown names, unknown or ill-typed options and invalid option values raise :class:`FeatkdError`.
    """
    for arg, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if not _matches(value, int) or value < 1:
            raise FeatkdError(f"model {name!r}: {arg} must be a positive integer, got {value!r}")
    scheme, inner = parse_model_name(name)
    if scheme == "torchvision":
        return create_torchvision_model(inner, num_classes=num_classes, in_channels=in_channels, **kwargs)
    if scheme == "timm":
        return create_timm_model(inner, num_classes=num_classes, in_channels=in_channels, **kwargs)
    if scheme == "user":
        return create_user_model(inner, num_classes=num_classes, in_channels=in_channels, **kwargs)
    factory = model_factory(name)
    check_options(name, factory, kwargs)
    try:
        return factory(num_classes=num_classes, in_channels=in_channels, **kwargs)
    except ValueError as exc:  # the constructors raise ValueError for inconsistent option values
        raise FeatkdError(f"model {name!r}: {exc}") from None


def check_options(name: str, factory: Callable[..., nn.Module], options: dict[str, Any]) -> None:
    """Every option is a keyword of ``factory`` and fits its type hint; else :class:`FeatkdError`."""
    allowed = model_options(name)
    hints = typing.get_type_hints(factory)
    for key, value in options.items():
        if key not in allowed:
            raise FeatkdError(f"model {name!r}: unknown option {key!r} (allowed: {', '.join(allowed) or 'none'})")
        hint = hints.get(key, Any)
        if not _matches(value, hint):
            raise FeatkdError(f"model {name!r}: option {key!r} must be {_type_name(hint)}, got {value!r}")


def classifier_name(model: nn.Module) -> str:
    """Qualified name of the final classifier: the last ``nn.Linear`` in ``named_modules()`` order."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise FeatkdError(f"{type(model).__name__} has no nn.Linear classifier")
    return names[-1]


def _unknown_model(name: str) -> FeatkdError:
    """The error for an unknown plain name: ``torchvision:<name>`` / ``timm:<name>`` first when one exists (the
    usual slip is leaving out the scheme: ``resnet18``), then the closest featkd names."""
    names = MODELS.names()
    elsewhere = [f"{scheme}:{name}" for scheme, exists in (("torchvision", is_torchvision_model),
                                                            ("timm", is_timm_model)) if exists(name)]
    close = [*elsewhere, *difflib.get_close_matches(name, names, n=3, cutoff=0.5)][:3]
    hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
    return FeatkdError(f"unknown model {name!r}{hint}; featkd models: {', '.join(names)}; or torchvision:<name>, "
                       "timm:<name>, or a model from your code: package.module:callable")


def _matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits the type hint (the simple hints model options use)."""
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args, strict=True))
        return not args or all(_matches(v, args[0]) for v in value)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
