"""The capture-point grammar: what a point string names, and how ``module[*]`` expands to one point per level.

A *capture point* is a string:

``"layer1"``
    the output of the module with that qualified name (``model.get_submodule("layer1")``);
``"fc:input"``
    the first positional input of that module (e.g. the embedding a classifier sees);
``"backbone[out]"``, ``"backbone.fpn[0]"``
    one entry of a module output that is a Mapping (by key, written without quotes: torchvision's
    ``IntermediateLayerGetter`` and FPN return ``OrderedDict``s keyed ``'out'``, ``'0'``, ``'pool'``...) or
    a tuple / list (by index);
``"backbone.fpn[*]"``
    in a method's pairs only: every (C, H, W) entry of that output, each paired with the other model's entry of
    the same stride (:func:`expand_entry_pairs`);
``"layer1.0.add"``
    a torch.fx node, named by the module scope it was traced in plus the operation (``add``, ``relu``,
    ``flatten``; repeated ops get ``_1``, ``_2``...), :mod:`featkd.capture.trace`. This reaches tensors that
    are no module's output, such as the residual sum before the final ReLU of a torchvision ``BasicBlock``.

The first three are *hook points* (:func:`hook_target`), captured with module hooks on any model; anything
else is an fx node name. A layout suffix (``:tokens``, ``:nhwc``) may end any point
(:mod:`featkd.capture.layouts`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from featkd.errors import ConfigError, FeatkdError, did_you_mean
from featkd.modes import eval_mode

INPUT_SUFFIX = ":input"
ALL_ENTRIES = "[*]"
_ENTRY = re.compile(r"^(?P<module>.+)\[(?P<key>[^\[\]]+)\]$")  # "backbone.fpn[0]" -> ("backbone.fpn", "0")


@dataclass(frozen=True)
class CapturePoint:
    """One place a tensor can be captured: its name, kind ('module', 'input' or 'node'), per-example shape
    (None for a non-tensor) and op (the module class or fx operation that makes it)."""

    name: str
    kind: str
    shape: tuple[int, ...] | None
    op: str = ""


def split_entry(point: str) -> tuple[str, str] | None:
    """``'backbone.fpn[0]'`` -> ``('backbone.fpn', '0')``; None for a point that names no entry."""
    match = _ENTRY.match(point)
    return (match["module"], match["key"]) if match else None


def entries(output: Any) -> list[tuple[str, Any]]:
    """``[(key, value)]`` of a Mapping or tuple/list output (the ``[key]`` of an entry point), else ``[]``."""
    if isinstance(output, Mapping):
        return [(str(k), v) for k, v in output.items()]
    if isinstance(output, (tuple, list)):
        return [(str(i), v) for i, v in enumerate(output)]
    return []


def select_entry(output: Any, key: str) -> Any:
    """``output[key]`` for the ``key`` of a point ``module[key]`` (a Mapping's key as text, or an index)."""
    for k, v in entries(output):
        if k == key:
            return v
    raise KeyError(key)


def submodules(model: nn.Module) -> dict[str, nn.Module]:
    """``{qualified name: module}`` of every sub-module of ``model`` (the model itself, name '', left out)."""
    return {name: m for name, m in model.named_modules() if name}


def hook_target(point: str, modules: Mapping[str, nn.Module]) -> tuple[str, str, str | None] | None:
    """``(module, 'output' | 'input', entry key or None)`` of a hook point; None for an fx node name.

    ``modules``: :func:`submodules` of the model.
    """
    if point in modules:
        return point, "output", None
    if point.endswith(INPUT_SUFFIX) and point.removesuffix(INPUT_SUFFIX) in modules:
        return point.removesuffix(INPUT_SUFFIX), "input", None
    entry = split_entry(point)
    if entry and entry[0] in modules:
        return entry[0], "output", entry[1]
    return None


def unknown_point_error(model: nn.Module, point: str, candidates: Iterable[str]) -> FeatkdError:
    """The one-line error for a point ``model`` does not have, with the nearest ``candidates``."""
    return FeatkdError(
        f"{type(model).__name__} has no capture point {point!r}{did_you_mean(point, candidates)}; "
        "run `featkd layers MODEL` to list them"
    )


def not_a_tensor_error(model: nn.Module, point: str, what: str, keys: Sequence[str]) -> FeatkdError:
    """The one-line error for a point whose value is ``what`` (a dict, a tuple...), naming its tensor ``keys``."""
    hint = f"; capture one entry, e.g. '{point}[{keys[0]}]' (entries: {', '.join(keys)})" if keys else ""
    return FeatkdError(f"capture point {point!r} of {type(model).__name__} is not a tensor ({what}){hint}")


# ---------------------------------------------------------------------------------------------------------
# module[*]: every level of a dict / tuple output, paired by stride
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def entry_strides(model: nn.Module, module_name: str, example: Tensor) -> dict[str, int]:
    """``{key: stride}`` of the (B, C, h, w) entries of a module's dict / tuple output (an FPN's levels) on
    ``example`` (B, C, H, W): ``H / h`` rounded to a power of two (a 96-px input's stride-64 level is 2x2,
    its stride-32 level 3x3); one forward in eval mode."""
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        raise FeatkdError(f"{type(model).__name__} has no module {module_name!r} (in a point "
                          f"'{module_name}{ALL_ENTRIES}'); run `featkd layers MODEL` to list them") from None
    seen: dict[str, int] = {}

    def hook(_m: nn.Module, _args: tuple, out: object) -> None:
        if not seen:
            for key, value in entries(out):
                if isinstance(value, Tensor) and value.ndim == 4:
                    seen[key] = 2 ** round(math.log2(example.shape[-2] / value.shape[-2]))

    handle = module.register_forward_hook(hook)
    try:
        with eval_mode(model):
            model(example)
    finally:
        handle.remove()
    if not seen:
        raise FeatkdError(f"point '{module_name}{ALL_ENTRIES}': the output of {module_name!r} has no (C, H, W) "
                          "entries (it must be a dict or tuple of feature maps, like an FPN's)")
    return seen


def pair_by_stride(student: dict[str, int], teacher: dict[str, int]) -> list[tuple[str, str]]:
    """Pair feature maps of equal stride: ``{point: stride}`` of each side -> ``[(student, teacher), ...]``.

    Within one stride the points pair in the given order (torchvision's mobilenet FPN has two stride-32
    levels '0' and '1'); maps with no partner of their stride are left out. In the student's order."""
    by_stride: dict[int, list[str]] = {}
    for point, stride in teacher.items():
        by_stride.setdefault(stride, []).append(point)
    pairs, used = [], {s: 0 for s in by_stride}
    for point, stride in student.items():
        candidates = by_stride.get(stride, [])
        if used.get(stride, 0) < len(candidates):
            pairs.append((point, candidates[used[stride]]))
            used[stride] += 1
    return pairs


def expand_entry_pairs(pairs: Sequence[Sequence[str]], teacher: nn.Module, student: nn.Module,
                       example: Tensor, key: str = "method.pairs") -> list[list[str]]:
    """Replace each pair ``[module[*], module[*]]`` by one pair per level, levels paired by STRIDE (not by
    key or index: torchvision's mobilenet FPN has two stride-32 levels '0' and '1', its ResNet FPNs start at
    stride 4 (Faster R-CNN) or 8 (RetinaNet)). Levels of one stride pair in output order; a level with no
    partner of its stride is left out. Other pairs are kept as they are. ``example``: (B, C, H, W)."""
    out: list[list[str]] = []
    for i, pair in enumerate(pairs):
        wild = [isinstance(p, str) and p.endswith(ALL_ENTRIES) for p in pair]
        if not any(wild):
            out.append(list(pair))
            continue
        if len(pair) != 2 or not all(wild):
            raise ConfigError(f"{key}[{i}]: '{ALL_ENTRIES}' (every level, paired by stride) must end both points, "
                              f"got {list(pair)}")
        s_mod, t_mod = (p[: -len(ALL_ENTRIES)] for p in pair)
        levels = pair_by_stride(entry_strides(student, s_mod, example), entry_strides(teacher, t_mod, example))
        if not levels:
            raise FeatkdError(f"{key}[{i}]: no level of student {s_mod!r} has the stride of a level of teacher "
                              f"{t_mod!r}")
        out += [[f"{s_mod}[{s}]", f"{t_mod}[{t}]"] for s, t in levels]
    return out
