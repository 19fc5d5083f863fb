"""Every capture point of a model with its shape: what ``featkd layers MODEL`` prints.

A model that traces is listed from its fx graph (module outputs, their entries and fx nodes in execution
order); one that does not is listed through module hooks, with the fx nodes of each outermost traceable
sub-module in its place. The listing runs the model once, in eval mode, on zeros.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn

from featkd.capture.points import INPUT_SUFFIX, CapturePoint, entries, split_entry, submodules
from featkd.capture.trace import TracedModel, op_name, traceable_roots, try_trace
from featkd.modes import eval_mode


class _ShapeRecorder(torch.fx.Interpreter):
    """Runs a graph module and records each node's per-example shape (None for a non-tensor)."""

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
    with the fx nodes of every traceable sub-module in its place. Names are those of the eval-mode graph.
    """
    x = torch.zeros(2, *input_shape)
    with eval_mode(model):
        traced = try_trace(model)
        if traced is None:
            return _list_by_hooks(model, x, include_inputs)
        return _list_traced(traced, (x,), include_inputs)


def _list_traced(
    traced: TracedModel, args: tuple, include_inputs: bool, prefix: str = ""
) -> list[CapturePoint]:
    """The points of a traced (sub-)module run on ``args``, in execution order, named ``prefix.name``."""
    modules = submodules(traced.model)
    recorder = _ShapeRecorder(traced.graph_module)
    recorder.run(*args)
    order = {node: i for i, node in enumerate(traced.graph_module.graph.nodes)}
    points = []
    for name, node in traced.nodes.items():
        op = ""
        entry = split_entry(name)
        module = entry[0] if entry else name
        if traced.kinds[name] == "module" and module in modules:
            op = type(modules[module]).__name__
        elif node.op == "call_module":
            op = type(traced.graph_module.get_submodule(str(node.target))).__name__
        elif node.op in ("call_function", "call_method"):
            op = op_name(node)
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
    roots = traceable_roots(model)
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

    for name, m in submodules(model).items():
        handles.append(m.register_forward_pre_hook(lambda m, a, name=name: pre_hook(m, a, name)))
        handles.append(m.register_forward_hook(lambda m, a, k, o, name=name: hook(m, a, k, o, name),
                                               with_kwargs=True))
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return found
