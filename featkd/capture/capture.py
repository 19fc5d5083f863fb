"""Capture named intermediate tensors of any ``nn.Module`` in the forward pass that makes its logits.

A *capture point* is a string:

``"layer1"``
    the output of the module with that qualified name (``model.get_submodule("layer1")``);
``"fc:input"``
    the first positional input of that module (e.g. the embedding a classifier sees);
``"backbone[out]"``, ``"backbone.fpn[0]"``
    one entry of a module output that is a Mapping (by key, written without quotes: torchvision's
    ``IntermediateLayerGetter`` and FPN return ``OrderedDict``s keyed ``'out'``, ``'0'``, ``'pool'``...) or
    a tuple / list (by index);
``"layer1.0.add"``
    a torch.fx node, named by the module scope it was traced in plus the operation
    (``add``, ``relu``, ``flatten``; repeated ops get ``_1``, ``_2``...). This reaches tensors that are no
    module's output, such as the residual sum before the final ReLU of a torchvision ``BasicBlock``,
    without editing the model.

:class:`CapturingModel` returns ``(output, {point: tensor})``. It uses forward hooks when every point is a
module output/input/entry (works for any model), and an fx-traced copy of the forward when a point is an fx
node (the traced copy shares the original's parameters and buffers, so the original model is never modified
and its ``state_dict`` stays the one to export). A model that does not trace as a whole (a torchvision
detector) still has fx points: each is looked up in the deepest module enclosing it that traces (for
``backbone.body.layer2.0.add``: ``backbone.body.layer2.0``, else ``backbone.body``, ...; nested choices merge
into the outer one), and while :class:`CapturingModel` runs, that module's ``forward`` is replaced (an
instance attribute, removed again after the call) by its traced copy, which records the node; the rest of
the model runs as usual and hook points work anywhere. Points whose tensor is later modified in place by the
model (``nn.ReLU(inplace=True)`` after a captured sum, say) are cloned at capture time, so a capture always
holds the value the point had when it was produced.

A point may end in a layout suffix (``"encoder.layers.encoder_layer_3:tokens"``, ``":tokens=1"``, ``":nhwc"``):
the tensor captured at the point before the suffix is returned as a (B, C, H, W) map, a ViT's tokens without
the class token reshaped to the patch grid (:mod:`featkd.capture.layouts`, the one adapter every method relies on).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn

from featkd.capture.layouts import split_point, to_map
from featkd.errors import FeatkdError, did_you_mean

INPUT_SUFFIX = ":input"
_ENTRY = re.compile(r"^(?P<module>.+)\[(?P<key>[^\[\]]+)\]$")  # "backbone.fpn[0]" -> ("backbone.fpn", "0")

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


def _try_trace(model: nn.Module) -> TracedModel | None:
    try:
        return trace(model)
    except FeatkdError:
        return None


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
# fx points inside the traceable sub-modules of a model that does not trace as a whole
# ---------------------------------------------------------------------------------------------------------


def _is_leaf(module: nn.Module) -> bool:
    """torch.nn's own layers (Conv2d, ReLU...): fx nodes inside them are not capture points."""
    return torch.fx.Tracer().is_leaf_module(module, "")


def _enclosing_trace(
    model: nn.Module, point: str, cache: dict[str, TracedModel | None]
) -> tuple[str, TracedModel | None]:
    """The deepest module enclosing fx ``point`` that traces and has it: ``(root, traced root)``.

    If no traceable enclosing module has the point, the deepest traceable one (its names serve the "did you
    mean" of the error), or ``("", None)`` when none traces. ``cache`` holds traces by module name.
    """
    modules = _module_names(model)
    parts = point.split(".")
    nearest: tuple[str, TracedModel | None] = ("", None)
    for i in range(len(parts) - 1, 0, -1):
        root = ".".join(parts[:i])
        if root not in modules or _is_leaf(modules[root]):
            continue
        if root not in cache:
            cache[root] = _try_trace(modules[root])
        traced = cache[root]
        if traced is None:
            continue
        if point[len(root) + 1:] in traced.nodes:
            return root, traced
        if nearest[1] is None:
            nearest = (root, traced)
    return nearest


def resolve_in_submodule(
    model: nn.Module, point: str, cache: dict[str, TracedModel | None] | None = None
) -> tuple[str, TracedModel, str]:
    """``(root, traced root, name in it)`` for fx ``point`` of a model that does not trace as a whole.

    ``root`` is the deepest module enclosing the point that traces and has it (see the module docstring);
    errors name the point and suggest near names.
    """
    root, traced = _enclosing_trace(model, point, {} if cache is None else cache)
    if traced is None:
        raise FeatkdError(
            f"capture point {point!r}: {type(model).__name__} is not torch.fx-traceable and no module enclosing "
            "the point is either; capture module outputs or 'module:input' points instead of fx nodes"
        )
    local = point[len(root) + 1:]
    if local not in traced.nodes:
        raise _unknown_point_error(model, point, [f"{root}.{n}" for n in traced.names()])
    return root, traced, local


@dataclass
class _Subgraph:
    """A traced sub-module whose forward is swapped for one that also returns ``points`` (global names)."""

    module: nn.Module
    graph_module: torch.fx.GraphModule
    points: tuple[str, ...]


def _subgraphs(model: nn.Module, node_points: Sequence[str], hook_points: Sequence[str]) -> list[_Subgraph]:
    """One :class:`_Subgraph` per outermost chosen root (a root inside another merges into the outer one).

    Hook points strictly inside a root are taken from its graph too: fx inlines non-leaf modules, so their
    hooks would not run inside the traced copy.
    """
    cache: dict[str, TracedModel | None] = {}
    chosen = {point: resolve_in_submodule(model, point, cache)[0] for point in node_points}
    roots = sorted(set(chosen.values()), key=len)
    outer = {r: next(o for o in roots if r == o or r.startswith(o + ".")) for r in roots}
    groups: dict[str, list[str]] = {}
    for point, root in chosen.items():
        groups.setdefault(outer[root], []).append(point)
    for point in hook_points:
        root = next((r for r in groups if point.startswith(r + ".")), None)
        if root is not None:
            groups[root].append(point)
    out = []
    for root, pts in groups.items():
        traced = cache[root]
        assert traced is not None
        local = [p[len(root) + 1:] for p in pts]
        for p, name in zip(pts, local):
            if name not in traced.nodes:  # fx named it differently in the outer trace, or it never runs there
                raise _unknown_point_error(model, p, [f"{root}.{n}" for n in traced.names()])
        out.append(_Subgraph(traced.model, _capturing_graph_module(traced, local), tuple(pts)))
    return out


def _traceable_roots(model: nn.Module) -> dict[str, TracedModel]:
    """The outermost non-leaf sub-modules that trace, in a model that does not (searched top-down)."""
    roots: dict[str, TracedModel] = {}

    def walk(module: nn.Module, prefix: str) -> None:
        for child_name, child in module.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            if _is_leaf(child):
                continue
            traced = _try_trace(child)
            if traced is not None:
                roots[name] = traced
            else:
                walk(child, name)

    walk(model, "")
    return roots


# ---------------------------------------------------------------------------------------------------------
# capture
# ---------------------------------------------------------------------------------------------------------


def _module_names(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if name}


def _hook_target(point: str, modules: Mapping[str, nn.Module]) -> tuple[str, str, str | None] | None:
    """``(module, 'output' | 'input', entry key or None)`` of a hook point; None for an fx node name."""
    if point in modules:
        return point, "output", None
    if point.endswith(INPUT_SUFFIX) and point.removesuffix(INPUT_SUFFIX) in modules:
        return point.removesuffix(INPUT_SUFFIX), "input", None
    match = _ENTRY.match(point)
    if match and match["module"] in modules:
        return match["module"], "output", match["key"]
    return None


def _unknown_point_error(model: nn.Module, point: str, candidates: Iterable[str]) -> FeatkdError:
    return FeatkdError(
        f"{type(model).__name__} has no capture point {point!r}{did_you_mean(point, candidates)}; "
        "run `featkd layers MODEL` to list them"
    )


def _not_a_tensor_error(model: nn.Module, point: str, what: str, keys: Sequence[str]) -> FeatkdError:
    hint = f"; capture one entry, e.g. '{point}[{keys[0]}]' (entries: {', '.join(keys)})" if keys else ""
    return FeatkdError(f"capture point {point!r} of {type(model).__name__} is not a tensor ({what}){hint}")


class CapturingModel(nn.Module):
    """Wraps ``model`` so that ``forward(x)`` returns ``(output, {point: tensor})``.

    Args:
        model: any ``nn.Module``; kept as ``self.model`` and never modified structurally.
        points: capture points (see the module docstring); may be empty. A point may end in a layout
            suffix, ``:tokens``, ``:tokens=P`` or ``:nhwc`` (:mod:`featkd.capture.layouts`): its tensor is then
            returned as a (B, C, H, W) map.
        example_input: a batch (B >= 2) used once, in eval mode and without grad, to check the points
            and record their shapes in :attr:`shapes` (``{point: shape without the batch dim}``).
    """

    def __init__(self, model: nn.Module, points: Sequence[str], example_input: Tensor) -> None:
        super().__init__()
        self.model = model
        self.points = tuple(dict.fromkeys(points))
        # point -> (the point it is captured at, layout suffix or None); several points may share a source
        self._layouts = {p: split_point(p) for p in self.points}
        self._sources = tuple(dict.fromkeys(src for src, _ in self._layouts.values()))
        self._input_hw: tuple[int, int] | None = _spatial_size(example_input)  # for run(), which has no input
        modules = _module_names(model)
        node_points = [p for p in self._sources if _hook_target(p, modules) is None]
        self._captured: dict[str, Any] = {}
        self._clone: set[str] = set()
        self._versions: dict[str, int] | None = None
        self._handles: list = []
        self._subgraphs: list[_Subgraph] = []
        traced = _try_trace(model) if node_points else None
        self._use_fx = traced is not None
        if traced is not None:  # one traced copy of the whole forward, every point a node of it
            for p in self._sources:
                if p not in traced.nodes:
                    keys = [k[len(p) + 1:-1] for k in traced.nodes if k.startswith(p + "[")]
                    if keys:  # a module whose output is a dict or a tuple
                        raise _not_a_tensor_error(model, p, "dict or tuple", keys)
                    raise _unknown_point_error(model, p, traced.names())
            # Not registered as a submodule: it shares every parameter with self.model already.
            object.__setattr__(self, "_graph_module", _capturing_graph_module(traced, self._sources))
        else:  # hooks for module points; traced sub-modules, swapped in while we run, for fx nodes
            hook_points = [p for p in self._sources if p not in node_points]
            self._subgraphs = _subgraphs(model, node_points, hook_points) if node_points else []
            in_subgraphs = {p for sub in self._subgraphs for p in sub.points}
            for p in hook_points:
                if p not in in_subgraphs:
                    target = _hook_target(p, modules)
                    assert target is not None
                    self._install_hook(modules[target[0]], p, *target[1:])
        self.shapes = self._probe(example_input)

    def _install_hook(self, module: nn.Module, point: str, where: str, key: str | None) -> None:
        if where == "input":
            def pre_hook(_m: nn.Module, args: tuple) -> None:
                self._store(point, args[0])

            self._handles.append(module.register_forward_pre_hook(pre_hook))
            return

        def hook(_m: nn.Module, _args: tuple, out: Any) -> None:
            if key is None:
                self._store(point, out)
                return
            try:
                self._store(point, select_entry(out, key))
            except KeyError:
                self._store(point, _MissingEntry(out, key))

        self._handles.append(module.register_forward_hook(hook))

    def _store(self, point: str, tensor: Any) -> None:
        if point in self._captured:  # a module called twice is captured at its first call (as in fx)
            return
        if point in self._clone:  # the model modifies this tensor in place later: keep a copy
            tensor = tensor.clone()
        self._captured[point] = tensor
        if self._versions is not None and isinstance(tensor, Tensor):
            self._versions[point] = tensor._version

    @contextmanager
    def _swapped_forwards(self) -> Iterator[None]:
        """Run each traced sub-module's capturing copy in place of its forward, for one call of the model."""
        saved = []
        for sub in self._subgraphs:
            saved.append(sub.module.__dict__.get("forward"))
            sub.module.forward = self._subgraph_forward(sub)
        try:
            yield
        finally:
            for sub, previous in zip(self._subgraphs, saved):
                del sub.module.forward
                if previous is not None:
                    sub.module.forward = previous

    def _subgraph_forward(self, sub: _Subgraph):
        def forward(*args: Any, **kwargs: Any) -> Any:
            out, feats = sub.graph_module(*args, **kwargs)
            for point, tensor in zip(sub.points, feats):
                self._store(point, tensor)
            return out

        return forward

    def _run_model(self, x: Tensor, *args: Any) -> Any:
        self._captured.clear()
        with self._swapped_forwards():
            return self.model(x, *args)

    @torch.no_grad()
    def _probe(self, example_input: Tensor) -> dict[str, tuple[int, ...]]:
        was_training = self.model.training
        self.model.eval()
        try:
            if not self._use_fx:
                # One forward to see which captured tensors the model later writes in place; those are
                # cloned from now on (cheap, and only where needed).
                self._versions = {}
                self._run_model(example_input)
                self._clone = {p for p, v in self._versions.items() if self._captured[p]._version != v}
                self._versions = None
                self._captured.clear()
            _, feats = self._capture(example_input)
        finally:
            self.model.train(was_training)
        missing = [p for p in self._sources if p not in feats]
        if missing:
            raise FeatkdError(f"capture point {missing[0]!r} of {type(self.model).__name__} was never run")
        for p in self._sources:
            t = feats[p]
            if isinstance(t, _MissingEntry):
                keys = ", ".join(k for k, _ in entries(t.output)) or "none"
                raise FeatkdError(f"capture point {p!r} of {type(self.model).__name__}: the module's output "
                                  f"({type(t.output).__name__}) has no entry {t.key!r} (entries: {keys})")
            if not isinstance(t, Tensor):
                keys = [k for k, v in entries(t) if isinstance(v, Tensor)]
                raise _not_a_tensor_error(self.model, p, type(t).__name__, keys)
        return {p: tuple(t.shape[1:]) for p, t in self._adapt(feats, self._input_hw).items()}

    def forward(self, x: Tensor, *args: Any) -> tuple[Any, dict[str, Tensor]]:
        """``(model(x, *args), {point: tensor})``; ``args``: further inputs of the model's forward (a
        detector's targets in train mode)."""
        out, feats = self._capture(x, *args)
        return out, self._adapt(feats, _spatial_size(x))

    def _capture(self, x: Tensor, *args: Any) -> tuple[Any, dict[str, Any]]:
        """``(model(x, *args), {source point: captured value})``, before any layout is applied."""
        if self._use_fx:
            out, feats = self._graph_module(x, *args)
            return out, dict(zip(self._sources, feats, strict=True))
        out = self._run_model(x, *args)
        feats = {p: self._captured[p] for p in self._sources if p in self._captured}
        self._captured.clear()
        return out, feats

    def _adapt(self, feats: dict[str, Any], input_hw: tuple[int, int] | None) -> dict[str, Any]:
        """``{point: tensor}`` from the captured sources: points with a layout suffix as (B, C, H, W) maps."""
        return {p: feats[src] if layout is None else to_map(feats[src], layout, p, input_hw)
                for p, (src, layout) in self._layouts.items() if src in feats}

    @property
    def traced_whole(self) -> bool:
        """Whether the points come from one fx trace of the model's whole forward (else hooks, and traced
        sub-modules swapped in while the model runs)."""
        return self._use_fx

    def run(self, fn: Callable[[], Any]) -> tuple[Any, dict[str, Tensor]]:
        """``(fn(), {point: tensor})`` for a call ``fn`` that runs part of the model (a detector's backbone
        alone, say): hook and sub-module points fire as in :meth:`forward`; points ``fn`` does not reach are
        absent. Not for a model captured through one fx trace of its whole forward (its points are nodes of
        that forward)."""
        if self._use_fx:
            raise FeatkdError(f"{type(self.model).__name__} is captured through its traced forward; call the "
                              "capture itself")
        self._captured.clear()
        with self._swapped_forwards():
            out = fn()
        feats = {p: self._captured[p] for p in self._sources if p in self._captured}
        self._captured.clear()
        return out, self._adapt(feats, self._input_hw)

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _spatial_size(x: Any) -> tuple[int, int] | None:
    """(H, W) of an image batch (B, C, H, W), whose aspect ratio a token point's patch grid has; else None."""
    return (int(x.shape[-2]), int(x.shape[-1])) if isinstance(x, Tensor) and x.ndim == 4 else None


@dataclass
class _MissingEntry:
    """Stored for a point ``module[key]`` whose module output has no such entry (reported by the probe)."""

    output: Any
    key: str


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

    Uses fx when the model is traceable (module outputs, their entries and fx nodes in execution order, plus
    ``module:input`` points if ``include_inputs``); otherwise module outputs (and entries) through hooks,
    with the fx nodes of every traceable sub-module in its place.
    """
    x = torch.zeros(2, *input_shape)
    was_training = model.training
    model.eval()
    try:
        traced = _try_trace(model)
        if traced is None:
            return _list_by_hooks(model, x, include_inputs)
        return _list_traced(traced, (x,), include_inputs)
    finally:
        model.train(was_training)


def _list_traced(
    traced: TracedModel, args: tuple, include_inputs: bool, prefix: str = ""
) -> list[CapturePoint]:
    """The points of a traced (sub-)module run on ``args``, in execution order, named ``prefix.name``."""
    modules = _module_names(traced.model)
    recorder = _ShapeRecorder(traced.graph_module)
    recorder.run(*args)
    order = {node: i for i, node in enumerate(traced.graph_module.graph.nodes)}
    points = []
    for name, node in traced.nodes.items():
        op = ""
        entry = _ENTRY.match(name)
        module = entry["module"] if entry else name
        if traced.kinds[name] == "module" and module in modules:
            op = type(modules[module]).__name__
        elif node.op == "call_module":
            op = type(traced.graph_module.get_submodule(str(node.target))).__name__
        elif node.op in ("call_function", "call_method"):
            op = _op_name(node)
        full = f"{prefix}.{name}" if prefix else name
        points.append((order[node], full, CapturePoint(full, traced.kinds[name], recorder.shapes.get(node), op)))
    points.sort(key=lambda t: (t[0], t[2].kind != "input", t[1]))
    return [p for _, _, p in points if include_inputs or p.kind != "input"]


def _output_points(name: str, module: nn.Module, out: Any) -> list[CapturePoint]:
    """A module's output as points: itself if a tensor, else one point per tensor entry."""
    op = type(module).__name__
    if isinstance(out, Tensor):
        return [CapturePoint(name, "module", tuple(out.shape[1:]), op)]
    found = [CapturePoint(f"{name}[{k}]", "module", tuple(v.shape[1:]), op)
             for k, v in entries(out) if isinstance(v, Tensor)]
    return found or [CapturePoint(name, "module", None, op)]


def _list_by_hooks(model: nn.Module, x: Tensor, include_inputs: bool) -> list[CapturePoint]:
    """Module points in the order their forward ends, for a model that does not trace; each outermost
    traceable sub-module is listed by fx instead (its nodes and modules in execution order), run on the
    arguments it gets in the model's forward (its hook listing stays if the traced copy cannot run them)."""
    roots = _traceable_roots(model)
    found: list[CapturePoint] = []
    seen: set[str] = set()
    starts: dict[str, int] = {}
    handles = []

    def pre_hook(m: nn.Module, args: tuple, name: str) -> None:
        if name in seen:
            return
        if include_inputs and args and isinstance(args[0], Tensor):
            found.append(CapturePoint(name + INPUT_SUFFIX, "input", tuple(args[0].shape[1:]), type(m).__name__))
        starts.setdefault(name, len(found))

    def hook(m: nn.Module, args: tuple, kwargs: dict, out: Any, name: str) -> None:
        if name in seen:  # a module called several times is listed at its first call
            return
        seen.add(name)
        if name in roots and not kwargs:
            try:
                inner = _list_traced(roots[name], args, include_inputs, prefix=name)
            except Exception:  # the traced copy does not run on these arguments
                inner = None
            if inner is not None:
                del found[starts[name]:]
                found.extend(inner)
        found.extend(_output_points(name, m, out))

    for name, m in _module_names(model).items():
        handles.append(m.register_forward_pre_hook(lambda m, a, name=name: pre_hook(m, a, name)))
        handles.append(m.register_forward_hook(lambda m, a, k, o, name=name: hook(m, a, k, o, name),
                                               with_kwargs=True))
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
    meets a convolution or linear layer, or the input, before any BatchNorm. In a model that does not trace
    as a whole, the walk stays inside the traced sub-module that holds ``point``. A layout suffix
    (``:tokens``, :mod:`featkd.capture.layouts`) is ignored.
    """
    point = split_point(point)[0]
    modules = _module_names(model)
    if isinstance(modules.get(point), nn.BatchNorm2d):
        return modules[point]
    traced = _try_trace(model)
    local = point
    if traced is None:
        _, traced, local = resolve_in_submodule(model, point)
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
