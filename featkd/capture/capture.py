"""Capture named intermediate tensors of any ``nn.Module`` in the forward pass that makes its logits.

:class:`CapturingModel` returns ``(output, {point: tensor})`` for capture points (:mod:`featkd.capture.points`).
It uses forward hooks when every point is a module output/input/entry (works for any model), and an fx-traced
copy of the forward when a point is an fx node (:mod:`featkd.capture.trace`; the traced copy shares the
original's parameters and buffers, so the original model is never modified and its ``state_dict`` stays the
one to export). The model is traced in train mode and in eval mode, and each call runs the graph of the mode
the model is in, since fx bakes a forward's ``self.training`` branches into the graph. A model that does not
trace as a whole (a torchvision detector) still has fx points: each is looked up in the deepest module
enclosing it that traces (for ``backbone.body.layer2.0.add``: ``backbone.body.layer2.0``, else
``backbone.body``, ...; nested choices merge into the outer one), and while :class:`CapturingModel` runs, that
module's ``forward`` is replaced (an instance attribute, removed again after the call) by its traced copy,
which records the node; the rest of the model runs as usual and hook points work anywhere.

Hooks and swapped forwards exist only during a capturing call: a plain ``model(x)`` stores nothing (its
activations die with the call) and a ``copy.deepcopy(model)`` carries no capture. Points whose tensor is later
modified in place by the model (``nn.ReLU(inplace=True)`` after a captured sum, say) are cloned at capture
time, so a capture always holds the value the point had when it was produced.

A point may end in a layout suffix (``"encoder.layers.encoder_layer_3:tokens"``, ``":tokens=1"``, ``":nhwc"``):
the tensor captured at the point before the suffix is returned as a (B, C, H, W) map, a ViT's tokens without
the class token reshaped to the patch grid (:mod:`featkd.capture.layouts`, the one adapter every method relies on).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn

from featkd.capture.layouts import split_point, to_map
from featkd.capture.points import (
    entries,
    hook_target,
    not_a_tensor_error,
    select_entry,
    submodules,
    unknown_point_error,
)
from featkd.capture.trace import (
    ModeTraces,
    TracedModel,
    has_inplace_user,
    resolve_in_submodule,
    try_trace_modes,
)
from featkd.errors import FeatkdError
from featkd.modes import eval_mode

_Store = Callable[[str, Any], None]  # (point, captured value) -> None


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
        if has_inplace_user(src, modules):
            with graph.inserting_after(new):
                new = graph.call_method("clone", (new,))
            # later users must keep using the original so their in-place op does not touch the clone
        captured.append(new)
    graph.output((original_output, tuple(captured)))
    graph.lint()
    return torch.fx.GraphModule(gm, graph, class_name=gm.__class__.__name__)


def _mode_graph_modules(traces: ModeTraces, points: Sequence[str]) -> dict[bool, torch.fx.GraphModule]:
    """``{training: capturing graph module}``: the copy to run is picked by the model's mode at call time."""
    return {training: _capturing_graph_module(traced, points) for training, traced in traces}


@dataclass
class _Subgraph:
    """A traced sub-module whose forward is swapped for one that also returns ``points`` (global names);
    ``graph_modules``: the capturing copy of each mode, ``{training: GraphModule}``."""

    module: nn.Module
    graph_modules: dict[bool, torch.fx.GraphModule]
    points: tuple[str, ...]


def _subgraphs(model: nn.Module, node_points: Sequence[str], hook_points: Sequence[str]) -> list[_Subgraph]:
    """One :class:`_Subgraph` per outermost chosen root (a root inside another merges into the outer one).

    Hook points strictly inside a root are taken from its graph too: fx inlines non-leaf modules, so their
    hooks would not run inside the traced copy.
    """
    cache: dict[str, ModeTraces | None] = {}
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
        traces = cache[root]
        assert traces is not None
        local = [p[len(root) + 1:] for p in pts]
        for p, name in zip(pts, local):
            if not traces.has(name):  # fx named it differently in the outer trace, or it never runs there
                names = traces.of(traces.train.model.training).names()
                raise unknown_point_error(model, p, [f"{root}.{n}" for n in names])
            traces.check(name, model, p)
        out.append(_Subgraph(traces.train.model, _mode_graph_modules(traces, local), tuple(pts)))
    return out


class CapturingModel(nn.Module):
    """Wraps ``model`` so that ``forward(x)`` returns ``(output, {point: tensor})``.

    Args:
        model: any ``nn.Module``; kept as ``self.model`` and never modified structurally (no hook stays on it
            between calls).
        points: capture points (see :mod:`featkd.capture.points`); may be empty. A point may end in a layout
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
        modules = submodules(model)
        node_points = [p for p in self._sources if hook_target(p, modules) is None]
        self._clone: set[str] = set()
        # (module name, point, 'output' | 'input', entry key or None): hooked only while the capture runs
        self._hook_points: list[tuple[str, str, str, str | None]] = []
        self._subgraphs: list[_Subgraph] = []
        # {training: GraphModule} when one trace of the whole forward has every point. Not registered as
        # submodules: they share every parameter with self.model already.
        self._graph_modules: dict[bool, torch.fx.GraphModule] = {}
        traces = try_trace_modes(model) if node_points else None
        if traces is not None:  # one traced copy of the whole forward per mode, every point a node of it
            for p in self._sources:
                if not traces.has(p):
                    current = traces.of(model.training)
                    keys = [k[len(p) + 1:-1] for k in current.nodes if k.startswith(p + "[")]
                    if keys:  # a module whose output is a dict or a tuple
                        raise not_a_tensor_error(model, p, "dict or tuple", keys)
                    raise unknown_point_error(model, p, current.names())
                traces.check(p)
            self._graph_modules = _mode_graph_modules(traces, self._sources)
        else:  # hooks for module points; traced sub-modules, swapped in while we run, for fx nodes
            hook_points = [p for p in self._sources if p not in node_points]
            self._subgraphs = _subgraphs(model, node_points, hook_points) if node_points else []
            in_subgraphs = {p for sub in self._subgraphs for p in sub.points}
            for p in hook_points:
                if p not in in_subgraphs:
                    target = hook_target(p, modules)
                    assert target is not None
                    self._hook_points.append((target[0], p, target[1], target[2]))
        self.shapes = self._probe(example_input)

    @property
    def traced_whole(self) -> bool:
        """Whether the points come from one fx trace of the model's whole forward (else hooks, and traced
        sub-modules swapped in while the model runs)."""
        return bool(self._graph_modules)

    def forward(self, x: Tensor, *args: Any) -> tuple[Any, dict[str, Tensor]]:
        """``(model(x, *args), {point: tensor})``; ``args``: further inputs of the model's forward (a
        detector's targets in train mode)."""
        out, feats = self._capture(x, *args)
        return out, self._adapt(feats, _spatial_size(x))

    def run(self, fn: Callable[[], Any]) -> tuple[Any, dict[str, Tensor]]:
        """``(fn(), {point: tensor})`` for a call ``fn`` that runs part of the model (a detector's backbone
        alone, say): hook and sub-module points fire as in :meth:`forward`; points ``fn`` does not reach are
        absent. Not for a model captured through one fx trace of its whole forward (its points are nodes of
        that forward)."""
        if self.traced_whole:
            raise FeatkdError(f"{type(self.model).__name__} is captured through its traced forward; call the "
                              "capture itself")
        out, feats = self._run(fn)
        return out, self._adapt(feats, self._input_hw)

    def _capture(self, x: Tensor, *args: Any) -> tuple[Any, dict[str, Any]]:
        """``(model(x, *args), {source point: captured value})``, before any layout is applied."""
        if self.traced_whole:
            out, feats = self._graph_modules[self.model.training](x, *args)
            return out, dict(zip(self._sources, feats, strict=True))
        return self._run(lambda: self.model(x, *args))

    def _run(self, fn: Callable[[], Any], versions: dict[str, int] | None = None) -> tuple[Any, dict[str, Any]]:
        """``(fn(), {source point: captured value})`` with the hooks and swapped forwards in place during ``fn``
        only. ``versions``, if given, gets each captured tensor's ``_version`` when it was stored."""
        captured: dict[str, Any] = {}

        def store(point: str, value: Any) -> None:
            if point in captured:  # a module called twice is captured at its first call (as in fx)
                return
            if point in self._clone:  # the model modifies this tensor in place later: keep a copy
                value = value.clone()
            captured[point] = value
            if versions is not None and isinstance(value, Tensor):
                versions[point] = value._version

        with self._installed(store):
            out = fn()
        return out, {p: captured[p] for p in self._sources if p in captured}

    @contextmanager
    def _installed(self, store: _Store) -> Iterator[None]:
        """Hooks on the model and each traced sub-module's capturing copy in place of its forward, for one
        call; both are gone afterwards, also after an error (MMRazor's recorders work the same way)."""
        handles: list[torch.utils.hooks.RemovableHandle] = []
        swapped: list[tuple[nn.Module, Any]] = []
        try:
            for module_name, point, where, key in self._hook_points:
                handles.append(_install_hook(self.model.get_submodule(module_name), point, where, key, store))
            for sub in self._subgraphs:
                swapped.append((sub.module, sub.module.__dict__.get("forward")))
                sub.module.forward = _subgraph_forward(sub, store)
            yield
        finally:
            for handle in handles:
                handle.remove()
            for module, previous in swapped:
                del module.forward
                if previous is not None:
                    module.forward = previous

    @torch.no_grad()
    def _probe(self, example_input: Tensor) -> dict[str, tuple[int, ...]]:
        with eval_mode(self.model):
            if not self.traced_whole:
                # One forward to see which captured tensors the model later writes in place; those are
                # cloned from now on (cheap, and only where needed).
                versions: dict[str, int] = {}
                _, first = self._run(lambda: self.model(example_input), versions)
                self._clone = {p for p, v in versions.items() if first[p]._version != v}
                del first
            _, feats = self._capture(example_input)
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
                raise not_a_tensor_error(self.model, p, type(t).__name__, keys)
        return {p: tuple(t.shape[1:]) for p, t in self._adapt(feats, self._input_hw).items()}

    def _adapt(self, feats: dict[str, Any], input_hw: tuple[int, int] | None) -> dict[str, Any]:
        """``{point: tensor}`` from the captured sources: points with a layout suffix as (B, C, H, W) maps."""
        return {p: feats[src] if layout is None else to_map(feats[src], layout, p, input_hw)
                for p, (src, layout) in self._layouts.items() if src in feats}


def _install_hook(module: nn.Module, point: str, where: str, key: str | None,
                  store: _Store) -> torch.utils.hooks.RemovableHandle:
    """Register the hook that hands ``point`` (``module``'s input, output or output entry ``key``) to ``store``."""
    if where == "input":
        def pre_hook(_m: nn.Module, args: tuple) -> None:
            store(point, args[0])

        return module.register_forward_pre_hook(pre_hook)

    def hook(_m: nn.Module, _args: tuple, out: Any) -> None:
        if key is None:
            store(point, out)
            return
        try:
            store(point, select_entry(out, key))
        except KeyError:
            store(point, _MissingEntry(out, key))

    return module.register_forward_hook(hook)


def _subgraph_forward(sub: _Subgraph, store: _Store) -> Callable[..., Any]:
    """The forward swapped into ``sub.module``: its capturing copy for the mode the sub-module is in (its own
    ``self.training`` branches read its own flag), handing each point to ``store``."""
    def forward(*args: Any, **kwargs: Any) -> Any:
        out, feats = sub.graph_modules[sub.module.training](*args, **kwargs)
        for point, tensor in zip(sub.points, feats):
            store(point, tensor)
        return out

    return forward


def _spatial_size(x: Any) -> tuple[int, int] | None:
    """(H, W) of an image batch (B, C, H, W), whose aspect ratio a token point's patch grid has; else None."""
    return (int(x.shape[-2]), int(x.shape[-1])) if isinstance(x, Tensor) and x.ndim == 4 else None


@dataclass
class _MissingEntry:
    """Stored for a point ``module[key]`` whose module output has no such entry (reported by the probe)."""

    output: Any
    key: str
