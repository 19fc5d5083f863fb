"""torch.fx tracing with a qualified name for every capturable tensor, and lookups in the traced graph.

:func:`trace` names each node by the module scope it was traced in plus its operation (``layer1.0.add``,
``features.3.relu_1``), and also maps every module output (``layer1``), dict / tuple entry (``fpn[0]``) and
module input (``fc:input``) to its node, so every point of :mod:`featkd.capture.points` resolves in the graph.

fx bakes the branch a forward takes on ``self.training`` into the graph it traces (and a module that returns
a different structure in train mode does so in the graph only): :func:`trace_modes` traces a model in both
modes, as torchvision's ``DualGraphModule`` does, so a capture can run the graph of the mode the model is in.

A model that does not trace as a whole (a torchvision detector) still has fx points inside its traceable
sub-modules: :func:`resolve_in_submodule` finds the deepest module enclosing a point that traces and has it,
and :func:`traceable_roots` lists the outermost ones.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn

from featkd.capture.layouts import split_point
from featkd.capture.points import INPUT_SUFFIX, entries, submodules, unknown_point_error
from featkd.errors import FeatkdError
from featkd.modes import eval_mode

_INPLACE_FUNCTIONS = {
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.iand, operator.ior,
}
#: ops whose output may be the input tensor itself or a view of it: an in-place op after one of them modifies
#: the captured tensor too (timm's BatchNormAct2d: batch_norm -> drop (Identity) -> act (ReLU6, in place))
_ALIAS_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Flatten, nn.Unflatten)
_ALIAS_METHODS = {"view", "view_as", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "permute",
                  "transpose", "t", "expand", "expand_as", "contiguous", "narrow", "select", "unbind", "split",
                  "chunk", "detach"}
_ALIAS_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.permute, torch.transpose,
                    torch.narrow, torch.select, torch.unbind, torch.split, torch.chunk, operator.getitem}


class _ScopedTracer(torch.fx.Tracer):
    """An fx tracer that remembers, for every node, the module scope it was created in.

    It also records the input and output proxies of every module call, so module names and
    ``module:input`` points resolve to graph nodes too.
    """

    def __init__(self) -> None:
        super().__init__()
        self.featkd_scope = ""
        self.module_calls: dict[str, list[tuple[tuple, object]]] = {}

    def call_module(self, m: nn.Module, forward, args, kwargs):
        name = self.path_of_module(m)
        outer, self.featkd_scope = self.featkd_scope, name
        try:
            out = super().call_module(m, forward, args, kwargs)
        finally:
            self.featkd_scope = outer
        self.module_calls.setdefault(name, []).append((args, out))
        return out

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        node.meta["featkd_scope"] = self.featkd_scope
        return node


def op_name(node: torch.fx.Node) -> str:
    """The operation part of a node's point name (``add``, ``relu``, ``flatten``); '' for a module call."""
    if node.op == "call_module":
        return ""
    if node.op in ("call_function", "call_method"):
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "op")
        return target.strip("_") or "op"
    if node.op == "get_attr":
        return str(node.target).rsplit(".", 1)[-1]
    return node.name


@dataclass
class TracedModel:
    """An fx graph of ``model`` with a qualified name for every node, module output and module input."""

    model: nn.Module
    graph_module: torch.fx.GraphModule
    nodes: dict[str, torch.fx.Node] = field(default_factory=dict)  # qualified node name -> node
    kinds: dict[str, str] = field(default_factory=dict)  # qualified name -> 'module' | 'input' | 'node'

    def names(self) -> list[str]:
        return list(self.nodes)


def trace(model: nn.Module) -> TracedModel:
    """Trace ``model`` with torch.fx, in the mode it is in, and name every capturable tensor.

    Raises :class:`FeatkdError` when the model is not fx-traceable (then only module outputs and inputs,
    captured with hooks, and fx nodes inside its traceable sub-modules are available).
    """
    tracer = _ScopedTracer()
    state = {m: dict(vars(m)) for m in model.modules()}
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many types; the user needs the model name and the cause
        raise FeatkdError(
            f"{type(model).__name__} is not torch.fx-traceable ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "capture module outputs or 'module:input' points instead of fx nodes"
        ) from None
    finally:
        _drop_cached_proxies(state)
    gm = torch.fx.GraphModule(model, graph, class_name=type(model).__name__ + "Traced")
    # Node objects are shared between `graph` and `gm.graph` (GraphModule keeps the graph it is given).
    traced = TracedModel(model=model, graph_module=gm)
    used: set[str] = set()
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        scope = node.meta.get("featkd_scope", "")
        if node.op == "call_module":
            base = str(node.target)
        else:
            base = f"{scope}.{op_name(node)}" if scope else op_name(node)
        name, k = base, 0
        while name in used:
            k += 1
            name = f"{base}_{k}"
        used.add(name)
        traced.nodes[name] = node
        traced.kinds[name] = "module" if node.op == "call_module" else "node"
    # Non-leaf modules are inlined by fx: their output is whatever node their forward returned.
    for mod_name, calls in tracer.module_calls.items():
        if not mod_name:
            continue
        args, out = calls[0]  # a module called several times is captured at its first call, as with hooks
        if isinstance(out, torch.fx.Proxy) and traced.kinds.get(mod_name) != "module":
            traced.nodes[mod_name] = out.node
            traced.kinds[mod_name] = "module"
        for key, value in entries(out):  # a dict / tuple of tensors: one point per entry
            if isinstance(value, torch.fx.Proxy):
                traced.nodes[f"{mod_name}[{key}]"] = value.node
                traced.kinds[f"{mod_name}[{key}]"] = "module"
        if args and isinstance(args[0], torch.fx.Proxy):
            traced.nodes[mod_name + INPUT_SUFFIX] = args[0].node
            traced.kinds[mod_name + INPUT_SUFFIX] = "input"
    return traced


def _drop_cached_proxies(state: dict[nn.Module, dict[str, Any]]) -> None:
    """Undo what a traced forward cached on its modules: fx runs it on Proxies, and a module that keeps a
    value computed there (torchvision's ``MultiScaleRoIAlign`` sets ``scales`` / ``map_levels`` on its first
    call) would keep a Proxy that breaks its next real call. Each such attribute gets its old value back."""
    for module, before in state.items():
        for key, value in list(vars(module).items()):
            if isinstance(value, torch.fx.Proxy):
                if key in before:
                    setattr(module, key, before[key])
                else:
                    delattr(module, key)


def try_trace(model: nn.Module) -> TracedModel | None:
    """:func:`trace`, or None for a model that is not fx-traceable."""
    try:
        return trace(model)
    except FeatkdError:
        return None


@dataclass
class ModeTraces:
    """The train-mode and the eval-mode trace of one model (each bakes in its own ``self.training`` branches)."""

    train: TracedModel
    eval: TracedModel

    def of(self, training: bool) -> TracedModel:
        """The trace for a model whose ``training`` flag is ``training``."""
        return self.train if training else self.eval

    def __iter__(self) -> Iterator[tuple[bool, TracedModel]]:
        """``(training, trace)`` for both modes."""
        return iter(((True, self.train), (False, self.eval)))

    def has(self, name: str) -> bool:
        """Whether ``name`` is a point of either mode's graph."""
        return name in self.train.nodes or name in self.eval.nodes

    def check(self, name: str, model: nn.Module | None = None, shown: str | None = None) -> None:
        """Raise a one-line :class:`FeatkdError` if ``name`` is a point of one mode's graph only (a capture
        must run in both modes). ``model``, ``shown``: the model and the point's name the error gives (the
        whole model's and the global name, for a traced sub-module); by default the traced model and ``name``."""
        if self.has(name) and not (name in self.train.nodes and name in self.eval.nodes):
            there, missing = ("train", "eval") if name in self.train.nodes else ("eval", "train")
            owner = type(model if model is not None else self.train.model).__name__
            raise FeatkdError(
                f"capture point {shown or name!r} of {owner} is in its {there}-mode graph but not in its "
                f"{missing}-mode one (a `self.training` branch); capture a point both modes run"
            )


def trace_modes(model: nn.Module) -> ModeTraces:
    """:func:`trace` ``model`` in train mode and in eval mode; every sub-module keeps its own ``training`` flag
    afterwards. Raises :class:`FeatkdError` if either mode does not trace."""
    with eval_mode(model):  # restores each module's flag, also after the train-mode trace inside
        traced_eval = trace(model)
        model.train()
        traced_train = trace(model)
    return ModeTraces(train=traced_train, eval=traced_eval)


def try_trace_modes(model: nn.Module) -> ModeTraces | None:
    """:func:`trace_modes`, or None for a model that does not trace in both modes."""
    try:
        return trace_modes(model)
    except FeatkdError:
        return None


def has_inplace_user(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether an op after ``node`` modifies its tensor in place (``nn.ReLU(inplace=True)``, ``+=``, ``x.add_``),
    directly or through ops that pass the same storage on (an ``nn.Identity``, a view), so a capture or an
    injected tensor must be cloned first. ``modules``: the graph module's named modules."""
    for user in node.users:
        if user.op == "call_module" and getattr(modules.get(str(user.target)), "inplace", False):
            return True
        if user.op == "call_function" and (user.target in _INPLACE_FUNCTIONS or user.kwargs.get("inplace")):
            return True
        if user.op == "call_method" and re.fullmatch(r"[a-z0-9_]*[a-z0-9]_", str(user.target)):
            return True
        if is_alias(user, modules) and has_inplace_user(user, modules):
            return True
    return False


def is_alias(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node``'s output may share its input's storage (see :data:`_ALIAS_MODULES`)."""
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), _ALIAS_MODULES)
    if node.op == "call_method":
        return str(node.target) in _ALIAS_METHODS
    return node.op == "call_function" and node.target in _ALIAS_FUNCTIONS


def resolve_node(traced: TracedModel, point: str) -> torch.fx.Node:
    """The fx node of a capture point, with the usual error for unknown names."""
    if point not in traced.nodes:
        raise unknown_point_error(traced.model, point, traced.names())
    return traced.nodes[point]


# ---------------------------------------------------------------------------------------------------------
# fx points inside the traceable sub-modules of a model that does not trace as a whole
# ---------------------------------------------------------------------------------------------------------


def is_leaf(module: nn.Module) -> bool:
    """torch.nn's own layers (Conv2d, ReLU...): fx nodes inside them are not capture points."""
    return torch.fx.Tracer().is_leaf_module(module, "")


def _enclosing_trace(
    model: nn.Module, point: str, cache: dict[str, ModeTraces | None]
) -> tuple[str, ModeTraces | None]:
    """The deepest module enclosing fx ``point`` that traces (in both modes) and has it: ``(root, traces)``.

    If no traceable enclosing module has the point, the deepest traceable one (its names serve the "did you
    mean" of the error), or ``("", None)`` when none traces. ``cache`` holds traces by module name.
    """
    modules = submodules(model)
    parts = point.split(".")
    nearest: tuple[str, ModeTraces | None] = ("", None)
    for i in range(len(parts) - 1, 0, -1):
        root = ".".join(parts[:i])
        if root not in modules or is_leaf(modules[root]):
            continue
        if root not in cache:
            cache[root] = try_trace_modes(modules[root])
        traces = cache[root]
        if traces is None:
            continue
        if traces.has(point[len(root) + 1:]):
            return root, traces
        if nearest[1] is None:
            nearest = (root, traces)
    return nearest


def resolve_in_submodule(
    model: nn.Module, point: str, cache: dict[str, ModeTraces | None] | None = None
) -> tuple[str, ModeTraces, str]:
    """``(root, its traces, name in them)`` for fx ``point`` of a model that does not trace as a whole.

    ``root`` is the deepest module enclosing the point that traces and has it (see the module docstring);
    errors name the point and suggest near names, or name the mode whose graph lacks it.
    """
    root, traces = _enclosing_trace(model, point, {} if cache is None else cache)
    if traces is None:
        raise FeatkdError(
            f"capture point {point!r}: {type(model).__name__} is not torch.fx-traceable and no module enclosing "
            "the point is either; capture module outputs or 'module:input' points instead of fx nodes"
        )
    local = point[len(root) + 1:]
    if not traces.has(local):
        raise unknown_point_error(model, point, [f"{root}.{n}" for n in traces.of(model.training).names()])
    traces.check(local, model, point)
    return root, traces, local


def traceable_roots(model: nn.Module) -> dict[str, TracedModel]:
    """The outermost non-leaf sub-modules that trace (in their current mode), in a model that does not
    (searched top-down): ``{name: trace}``."""
    roots: dict[str, TracedModel] = {}

    def walk(module: nn.Module, prefix: str) -> None:
        for child_name, child in module.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            if is_leaf(child):
                continue
            traced = try_trace(child)
            if traced is not None:
                roots[name] = traced
            else:
                walk(child, name)

    walk(model, "")
    return roots


def preceding_batchnorm(model: nn.Module, point: str) -> nn.BatchNorm2d | None:
    """The BatchNorm2d whose output reaches ``point`` first, walking the graph backwards.

    For a residual sum ``add(bn2(conv2(...)), shortcut)`` this is the residual branch's last BN (the
    first argument is searched first); for a BN module it is the module itself. ``None`` when the walk
    meets a convolution or linear layer, or the input, before any BatchNorm. In a model that does not trace
    as a whole, the walk stays inside the traced sub-module that holds ``point`` (its graph of the mode that
    sub-module is in). A layout suffix (``:tokens``, :mod:`featkd.capture.layouts`) is ignored.
    """
    point = split_point(point)[0]
    modules = submodules(model)
    if isinstance(modules.get(point), nn.BatchNorm2d):
        return modules[point]
    traced = try_trace(model)
    local = point
    if traced is None:
        root, traces, local = resolve_in_submodule(model, point)
        traced = traces.of(modules[root].training)
    node = resolve_node(traced, local)
    gm_modules = dict(traced.graph_module.named_modules())
    frontier, seen = [node], set()
    while frontier:
        n = frontier.pop(0)
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_module":
            m = gm_modules[str(n.target)]
            if isinstance(m, nn.BatchNorm2d):
                return traced.model.get_submodule(str(n.target))
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                continue
        if n.op == "placeholder":
            continue
        frontier.extend(a for a in n.all_input_nodes)
    return None
