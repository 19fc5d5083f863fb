"""Run the rest of an fx-traceable model from an injected tensor ("the tail after a capture point").

``GraphTail(model, "layer2")(f)`` computes the model's output with the tensor at capture point ``layer2``
replaced by ``f``: everything downstream of that point runs, nothing upstream does. For the output of
layer group i this is "the student from the input of group i+1" that DFA's teacher-to-student bridge
path needs. It works for any model :func:`featkd.capture.trace.trace` can trace (CIFAR ResNets, MobileNetV2,
unmodified torchvision models) without per-model code:

* the traced graph is copied from the model's output backwards; the point's node becomes the tail's only
  input (a placeholder), so only its descendants (and constants such as ``get_attr`` nodes) are copied;
* if a downstream node also needs a tensor computed *before* the point (a skip connection around it, or
  the input's batch size), the point is not a cut of the graph and :class:`FeatkdError` says which node;
* the tail shares the model's parameters and buffers (it calls the same submodules), so ``model.train()``
  / ``.eval()`` and weight updates apply to it; the model itself is never modified;
* if the original graph modifies the point's tensor in place (``nn.ReLU(inplace=True)``, ``+=``), the
  injected tensor is cloned first so the caller's tensor is left untouched.

Injecting the model's own value at the point reproduces its output exactly (tested on ResNets,
MobileNetV2 and torchvision's resnet18).
"""

from __future__ import annotations

from typing import Any

import torch.fx
from torch import Tensor, nn

from featkd.capture.trace import TracedModel, has_inplace_user, resolve_node, trace
from featkd.errors import FeatkdError


def tail_graph_module(traced: TracedModel, point: str) -> torch.fx.GraphModule:
    """A GraphModule ``f(feature) -> output`` computing ``traced.model``'s output from ``point``'s tensor.

    Shares every submodule, parameter and buffer with ``traced.model``.
    """
    gm = traced.graph_module
    start = resolve_node(traced, point)
    if start.op == "placeholder":
        raise FeatkdError(f"{point!r} is the model's input; the tail from it is the whole model")
    output = next(n for n in gm.graph.nodes if n.op == "output")
    graph = torch.fx.Graph()
    feature = graph.placeholder("feature")
    modules = dict(gm.named_modules())
    if has_inplace_user(start, modules):
        feature = graph.call_method("clone", (feature,))
    env: dict[torch.fx.Node, torch.fx.Node] = {start: feature}
    parent: dict[torch.fx.Node, torch.fx.Node] = {}  # who asked for a node first, for the error message
    # iterative post-order from the output: deep networks would exceed Python's recursion limit
    stack = [(a, False) for a in output.all_input_nodes]
    while stack:
        n, ready = stack.pop()
        if n in env:
            continue
        if n.op == "placeholder":
            raise _not_a_cut(traced, point, start, n, parent)
        if ready:
            env[n] = graph.node_copy(n, lambda a: env[a])
            continue
        stack.append((n, True))
        for a in n.all_input_nodes:
            if a not in env:
                parent.setdefault(a, n)
                stack.append((a, False))
    if not _depends_on(output, start):
        raise FeatkdError(f"{type(traced.model).__name__}: the output does not depend on {point!r}")
    graph.output(torch.fx.map_arg(output.args[0], lambda n: env[n]))
    graph.lint()
    return torch.fx.GraphModule(gm, graph, class_name=type(traced.model).__name__ + "Tail")


def _not_a_cut(traced: TracedModel, point: str, start: torch.fx.Node, reached: torch.fx.Node,
               parent: dict[torch.fx.Node, torch.fx.Node]) -> FeatkdError:
    """The error for a tail that needs the model's input: name the downstream node and what it uses."""
    names: dict[torch.fx.Node, str] = {}
    for name, node in traced.nodes.items():
        names.setdefault(node, name)
    chain = [reached]
    while chain[-1] in parent:
        chain.append(parent[chain[-1]])
    # the first node on the way back to the output that is downstream of the point uses chain[k - 1]
    k = next((i for i, n in enumerate(chain) if _depends_on(n, start)), len(chain) - 1)
    user, used = chain[k], chain[max(k - 1, 0)]
    return FeatkdError(
        f"{type(traced.model).__name__}: the tail from {point!r} is not self-contained: "
        f"{names.get(user, user.name)!r} after it also uses {names.get(used, used.name)!r} computed before it "
        "(a skip connection around the point); inject at a block boundary instead"
    )


def _depends_on(node: torch.fx.Node, ancestor: torch.fx.Node) -> bool:
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n is ancestor:
            return True
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return False


class GraphTail(nn.Module):
    """``model``'s computation downstream of capture ``point``, fed with an injected tensor.

    Args:
        model: an fx-traceable ``nn.Module`` (registered as ``self.model``; shared, never modified).
        point: a capture point (module output, ``module:input`` or fx node name, see
            :mod:`featkd.capture.points`) that the output depends on only through itself.
        traced: an existing :func:`trace` of ``model`` to reuse.

    ``forward(feature)``: ``feature`` has the point's shape, e.g. (B, C_i, H_i, W_i); returns what
    ``model`` returns (logits (B, K) for a classifier).
    """

    def __init__(self, model: nn.Module, point: str, traced: TracedModel | None = None) -> None:
        super().__init__()
        self.model = model
        self.point = point
        # not registered as a submodule: it shares every parameter with self.model already
        object.__setattr__(self, "_graph_module", tail_graph_module(traced or trace(model), point))

    def forward(self, feature: Tensor) -> Any:
        return self._graph_module(feature)
