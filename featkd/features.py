"""Capture named intermediate tensors of any ``nn.Module`` in the forward pass that makes its logits.

A *capture point* is a string:

``"layer1"``
    the output of the module with that qualified name (``model.get_submodule("layer1")``);
``"fc:input"``
    the first positional input of that module (e.g. the embedding a classifier sees);
``"layer1.0.add"``
    a torch.fx node, named by the module scope it was traced in plus the operation
    (``add``, ``relu``, ``flatten``; repeated ops get ``_1``, ``_2``...). This reaches tensors that are no
    module's output, such as the residual sum before the final ReLU of a torchvision ``BasicBlock``,
    without editing the model.

:class:`CapturingModel` returns ``(output, {point: tensor})``. It uses forward hooks when every point is a
module output/input (works for any model), and an fx-traced copy of the forward when a point is an fx node
(the traced copy shares the original's parameters and buffers, so the original model is never modified and
its ``state_dict`` stays the one to export). Points whose tensor is later modified in place by the model
(``nn.ReLU(inplace=True)`` after a captured sum, say) are cloned at capture time, so a capture always holds
the value the point had when it was produced.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx
from torch import Tensor, nn

from featkd.errors import FeatkdError, did_you_mean

INPUT_SUFFIX = ":input"

_INPLACE_FUNCTIONS = {
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.iand, operator.ior,
}


@dataclass(frozen=True)
class CapturePoint:
    """One place a tensor can be captured: its name, kind ('module', 'input' or 'node') and shape."""

    name: str
    kind: str
    shape: tuple[int, ...] | None
    op: str = ""


# ---------------------------------------------------------------------------------------------------------
# torch.fx tracing with qualified node names
# ---------------------------------------------------------------------------------------------------------


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


def _op_name(node: torch.fx.Node) -> str:
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
    """Trace ``model`` with torch.fx and name every capturable tensor.

    Raises :class:`FeatkdError` when the model is not fx-traceable (then only module outputs and inputs,
    captured with hooks, are available).
    """
    tracer = _ScopedTracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many types; the user needs the model name and the cause
        raise FeatkdError(
            f"{type(model).__name__} is not torch.fx-traceable ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "capture module outputs or 'module:input' points instead of fx nodes"
        ) from None
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
            base = f"{scope}.{_op_name(node)}" if scope else _op_name(node)
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
        if args and isinstance(args[0], torch.fx.Proxy):
            traced.nodes[mod_name + INPUT_SUFFIX] = args[0].node
            traced.kinds[mod_name + INPUT_SUFFIX] = "input"
    return traced


def _has_inplace_user(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    for user in node.users:
        if user.op == "call_module" and getattr(modules.get(str(user.target)), "inplace", False):
            return True
        if user.op == "call_function" and (user.target in _INPLACE_FUNCTIONS or user.kwargs.get("inplace")):
            return True
        if user.op == "call_method" and re.fullmatch(r"[a-z0-9_]*[a-z0-9]_", str(user.target)):
            return True
    return False


def _capturing_graph_module(traced: TracedModel, points: Sequence[str]) -> torch.fx.GraphModule:
    """A GraphModule (sharing ``traced.model``'s parameters) returning ``(output, (t_1, ..., t_k))``."""
    gm = traced.graph_module
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "output":
            original_output = torch.fx.map_arg(node.args[0], lambda n: env[n])
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    modules = dict(gm.named_modules())
    captured = []
    for point in points:
        src = traced.nodes[point]
        new = env[src]
        if _has_inplace_user(src, modules):
            with graph.inserting_after(new):
                new = graph.call_method("clone", (new,))
            # later users must keep using the original so their in-place op does not touch the clone
        captured.append(new)
    graph.output((original_output, tuple(captured)))
    graph.lint()
    return torch.fx.GraphModule(gm, graph, class_name=gm.__class__.__name__)


# ---------------------------------------------------------------------------------------------------------
# capture
# ---------------------------------------------------------------------------------------------------------


def _module_names(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if name}


def _unknown_point_error(model: nn.Module, point: str, candidates: Iterable[str]) -> FeatkdError:
    return FeatkdError(
        f"{type(model).__name__} has no capture point {point!r}{did_you_mean(point, candidates)}; "
        "run `featkd layers MODEL` to list them"
    )


class CapturingModel(nn.Module):
    """Wraps ``model`` so that ``forward(x)`` returns ``(output, {point: tensor})``.

    Args:
        model: any ``nn.Module``; kept as ``self.model`` and never modified structurally.
        points: capture points (see the module docstring); may be empty.
        example_input: a batch (B >= 2) used once, in eval mode and without grad, to check the points
            and record their shapes in :attr:`shapes` (``{point: shape without the batch dim}``).
    """

    def __init__(self, model: nn.Module, points: Sequence[str], example_input: Tensor) -> None:
        super().__init__()
        self.model = model
        self.points = tuple(dict.fromkeys(points))
        modules = _module_names(model)
        self._use_fx = any(p not in modules and p.removesuffix(INPUT_SUFFIX) not in modules for p in self.points)
        self._captured: dict[str, Tensor] = {}
        self._clone: set[str] = set()
        self._versions: dict[str, int] | None = None
        self._handles: list = []
        if self._use_fx:
            traced = trace(model)
            for p in self.points:
                if p not in traced.nodes:
                    raise _unknown_point_error(model, p, traced.names())
            # Not registered as a submodule: it shares every parameter with self.model already.
            object.__setattr__(self, "_graph_module", _capturing_graph_module(traced, self.points))
        else:
            for p in self.points:
                self._install_hook(modules, p)
        self.shapes = self._probe(example_input)

    def _install_hook(self, modules: dict[str, nn.Module], point: str) -> None:
        if point.endswith(INPUT_SUFFIX):
            def pre_hook(_m: nn.Module, args: tuple) -> tuple | None:
                self._store(point, args[0])
                if point in self._clone:  # the module writes its input in place: give it a copy
                    return (args[0].clone(), *args[1:])
                return None

            module = modules[point.removesuffix(INPUT_SUFFIX)]
            self._handles.append(module.register_forward_pre_hook(pre_hook))
            return

        def hook(_m: nn.Module, _args: tuple, out: Tensor) -> Tensor | None:
            self._store(point, out)
            if point in self._clone:  # the model modifies this tensor in place later: hand it a copy
                return out.clone()
            return None

        self._handles.append(modules[point].register_forward_hook(hook))

    def _store(self, point: str, tensor: Tensor) -> None:
        if point in self._captured:  # a module called twice is captured at its first call (as in fx)
            return
        self._captured[point] = tensor
        if self._versions is not None and isinstance(tensor, Tensor):
            self._versions[point] = tensor._version

    @torch.no_grad()
    def _probe(self, example_input: Tensor) -> dict[str, tuple[int, ...]]:
        was_training = self.model.training
        self.model.eval()
        try:
            if not self._use_fx:
                # One forward to see which captured tensors the model later writes in place; those are
                # cloned from now on (cheap, and only where needed).
                self._versions = {}
                self.model(example_input)
                self._clone = {p for p, v in self._versions.items() if self._captured[p]._version != v}
                self._versions = None
            _, feats = self(example_input)
        finally:
            self.model.train(was_training)
        missing = [p for p in self.points if p not in feats]
        if missing:
            raise FeatkdError(f"capture point {missing[0]!r} of {type(self.model).__name__} was never run")
        shapes = {}
        for p in self.points:
            t = feats[p]
            if not isinstance(t, Tensor):
                raise FeatkdError(f"capture point {p!r} of {type(self.model).__name__} is not a tensor")
            shapes[p] = tuple(t.shape[1:])
        return shapes

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        if self._use_fx:
            out, feats = self._graph_module(x)
            return out, dict(zip(self.points, feats, strict=True))
        self._captured.clear()
        out = self.model(x)
        feats = {p: self._captured[p] for p in self.points if p in self._captured}
        self._captured.clear()
        return out, feats

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


# ---------------------------------------------------------------------------------------------------------
# listing
# ---------------------------------------------------------------------------------------------------------


class _ShapeRecorder(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__(gm)
        self.shapes: dict[torch.fx.Node, tuple[int, ...] | None] = {}

    def run_node(self, n: torch.fx.Node):
        out = super().run_node(n)
        self.shapes[n] = tuple(out.shape[1:]) if isinstance(out, Tensor) else None
        return out


@torch.no_grad()
def list_capture_points(
    model: nn.Module, input_shape: Sequence[int], include_inputs: bool = False
) -> list[CapturePoint]:
    """Every capture point of ``model`` with its per-example shape for inputs of ``input_shape`` (C, H, W).

    Uses fx when the model is traceable (module outputs and fx nodes in execution order, plus
    ``module:input`` points if ``include_inputs``); otherwise module outputs only, through hooks.
    """
    x = torch.zeros(2, *input_shape)
    was_training = model.training
    model.eval()
    try:
        try:
            traced = trace(model)
        except FeatkdError:
            return _list_by_hooks(model, x)
        modules = _module_names(model)
        recorder = _ShapeRecorder(traced.graph_module)
        recorder.run(x)
        order = {node: i for i, node in enumerate(traced.graph_module.graph.nodes)}
        points = []
        for name, node in traced.nodes.items():
            op = ""
            if traced.kinds[name] == "module" and name in modules:
                op = type(modules[name]).__name__
            elif node.op == "call_module":
                op = type(traced.graph_module.get_submodule(str(node.target))).__name__
            elif node.op in ("call_function", "call_method"):
                op = _op_name(node)
            points.append((order[node], name, CapturePoint(name, traced.kinds[name], recorder.shapes.get(node), op)))
        points.sort(key=lambda t: (t[0], t[2].kind != "input", t[1]))
        return [p for _, _, p in points if include_inputs or p.kind != "input"]
    finally:
        model.train(was_training)


def _list_by_hooks(model: nn.Module, x: Tensor) -> list[CapturePoint]:
    found: list[CapturePoint] = []
    handles = []
    for name, m in _module_names(model).items():
        def hook(_m, _a, out, name=name, m=m):
            shape = tuple(out.shape[1:]) if isinstance(out, Tensor) else None
            found.append(CapturePoint(name, "module", shape, type(m).__name__))
        handles.append(m.register_forward_hook(hook))
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return found


def resolve_node(traced: TracedModel, point: str) -> torch.fx.Node:
    """The fx node of a capture point, with the usual error for unknown names."""
    if point not in traced.nodes:
        raise _unknown_point_error(traced.model, point, traced.names())
    return traced.nodes[point]


def preceding_batchnorm(model: nn.Module, point: str) -> nn.BatchNorm2d | None:
    """The BatchNorm2d whose output reaches ``point`` first, walking the graph backwards.

    For a residual sum ``add(bn2(conv2(...)), shortcut)`` this is the residual branch's last BN (the
    first argument is searched first); for a BN module it is the module itself. ``None`` when the walk
    meets a convolution or linear layer, or the input, before any BatchNorm.
    """
    modules = _module_names(model)
    if isinstance(modules.get(point), nn.BatchNorm2d):
        return modules[point]
    traced = trace(model)
    node = resolve_node(traced, point)
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
                return model.get_submodule(str(n.target))
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                continue
        if n.op == "placeholder":
            continue
        frontier.extend(a for a in n.all_input_nodes)
    return None
