"""Layer groups found automatically from a model's graph and shapes: the blocks of each same-size stage.

A *layer group* (DFA's term) is a run of consecutive blocks whose outputs share one spatial size, e.g. the
``BasicBlock`` outputs ``layer2.0 .. layer2.2`` of a CIFAR ResNet-20 stage. They are found without any
per-model code:

1. The model is traced with :func:`featkd.capture.trace.trace` and the *cut nodes* of its graph are computed:
   tensors that every path from the input to the output passes through (no skip connection jumps over
   them). Block boundaries are cut nodes; the inside of a residual block is not.
2. A *segment* is a submodule with children whose input and output are both cut nodes (a self-contained
   piece of the network). Walking the module tree from the root, a segment that is merely a chain of two
   or more inner segments ending in its own output (``layer1``, torchvision's ``features``) is opened and
   its inner segments are used; any other segment is a *block* (``layer1.0``, ``features.3``). Containers
   that are never called (``nn.ModuleList``) are looked through. Blocks whose output is not a (C, H, W)
   feature map (a classifier ``Sequential``) are dropped.
3. Consecutive blocks with the same (H, W) form a group. The group's *candidates* are its blocks whose
   (C, H, W) equals that of the group's last block (MobileNetV2 changes channels inside one spatial
   stage; aggregation needs one shape), its *output* is the last block.

Models without composite blocks (a plain VGG-style stack of leaf layers) fall back to every leaf-module
output that is a cut node. The candidate lists can always be given explicitly instead (see
:func:`groups_from_points`); ``featkd layers MODEL --groups`` prints what was found.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from featkd.capture.capture import CapturingModel
from featkd.capture.points import INPUT_SUFFIX
from featkd.capture.trace import TracedModel, trace
from featkd.errors import ConfigError, FeatkdError
from featkd.modes import eval_mode


@dataclass(frozen=True)
class LayerGroup:
    """One same-spatial-size group of blocks.

    ``blocks``: every block output at this size, in execution order; ``candidates``: those of shape
    ``shape`` (C, H, W), the last block's shape; the group's output is ``candidates[-1]``.
    """

    index: int
    blocks: tuple[str, ...]
    candidates: tuple[str, ...]
    shape: tuple[int, int, int]

    @property
    def output(self) -> str:
        return self.candidates[-1]

    @property
    def spatial(self) -> tuple[int, int]:
        return (self.shape[1], self.shape[2])


# ---------------------------------------------------------------------------------------------------------
# graph analysis
# ---------------------------------------------------------------------------------------------------------


def cut_nodes(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """Nodes that every input-to-output path passes through (the placeholder(s) included).

    Only nodes that depend on an input and reach the output count. In topological order a node at
    position p is a cut node iff no edge (u -> w) between such nodes has pos(u) < p < pos(w).
    """
    nodes = list(graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    from_input: set[torch.fx.Node] = set()
    for n in nodes:
        if n.op == "placeholder" or any(a in from_input for a in n.all_input_nodes):
            from_input.add(n)
    to_output: set[torch.fx.Node] = set()
    for n in reversed(nodes):
        if n.op == "output" or any(u in to_output for u in n.users):
            to_output.add(n)
    live = from_input & to_output
    cover = [0] * (len(nodes) + 1)  # difference array: how many edges jump over each position
    for u in live:
        for w in u.users:
            if w in live and pos[w] > pos[u] + 1:
                cover[pos[u] + 1] += 1
                cover[pos[w]] -= 1
    result, running = set(), 0
    for i, n in enumerate(nodes):
        running += cover[i]
        if n in live and running == 0 and n.op != "output":
            result.add(n)
    return result


@torch.no_grad()
def _node_shapes(traced: TracedModel, input_shape: Sequence[int]) -> dict[torch.fx.Node, tuple[int, ...] | None]:
    with eval_mode(traced.model):  # no BatchNorm statistics change while shapes are probed
        ShapeProp(traced.graph_module).propagate(torch.zeros(2, *input_shape))
    shapes = {}
    for node in traced.graph_module.graph.nodes:
        meta = node.meta.get("tensor_meta")
        shapes[node] = tuple(meta.shape[1:]) if hasattr(meta, "shape") else None
    return shapes


def find_blocks(model: nn.Module, input_shape: Sequence[int]) -> list[tuple[str, tuple[int, ...]]]:
    """The block outputs of ``model`` in execution order, with per-example shapes (see the module doc).

    Raises :class:`FeatkdError` when the model is not fx-traceable (give the groups explicitly then).
    """
    traced = trace(model)
    shapes = _node_shapes(traced, input_shape)
    cuts = cut_nodes(traced.graph_module.graph)

    def node(name: str) -> torch.fx.Node | None:
        return traced.nodes.get(name)

    def is_segment(name: str, module: nn.Module) -> bool:
        out, inp = node(name), node(name + INPUT_SUFFIX)
        return (traced.kinds.get(name) == "module" and out is not None and inp is not None and out is not inp
                and out in cuts and inp in cuts and any(True for _ in module.children()))

    def collect(prefix: str, module: nn.Module) -> list[str]:
        found: list[str] = []
        for child_name, child in module.named_children():
            full = prefix + child_name
            inner = collect(full + ".", child)
            if is_segment(full, child):
                # open a pure chain of inner blocks (a stage container); keep anything else whole
                chain = len(inner) >= 2 and node(inner[-1]) is node(full)
                found += inner if chain else [full]
            else:
                found += inner
        return found

    names = collect("", model)
    if not names:  # no composite blocks: every leaf-module output that is a cut node
        leaves = {n for n, m in model.named_modules() if n and not any(True for _ in m.children())}
        names = [n for n, k in traced.kinds.items() if k == "module" and n in leaves and node(n) in cuts]
    order = {n: i for i, n in enumerate(traced.graph_module.graph.nodes)}
    blocks, seen = [], set()
    for name in sorted(names, key=lambda n: order[traced.nodes[n]]):
        nd = traced.nodes[name]
        shape = shapes.get(nd)
        if nd in seen or shape is None or len(shape) != 3:
            continue
        seen.add(nd)
        blocks.append((name, shape))
    return blocks


def _group(blocks: list[tuple[str, tuple[int, ...]]]) -> list[LayerGroup]:
    runs: list[list[tuple[str, tuple[int, ...]]]] = []
    for name, shape in blocks:
        if runs and runs[-1][-1][1][1:] == shape[1:]:
            runs[-1].append((name, shape))
        else:
            runs.append([(name, shape)])
    groups = []
    for i, run in enumerate(runs):
        last = run[-1][1]
        groups.append(LayerGroup(
            index=i, blocks=tuple(n for n, _ in run), candidates=tuple(n for n, s in run if s == last),
            shape=(int(last[0]), int(last[1]), int(last[2])),
        ))
    return groups


def find_groups(model: nn.Module, input_shape: Sequence[int]) -> list[LayerGroup]:
    """The layer groups of ``model`` for inputs of ``input_shape`` (C, H, W), found from its graph."""
    groups = _group(find_blocks(model, input_shape))
    if not groups:
        raise FeatkdError(f"{type(model).__name__}: found no (C, H, W) block outputs to group; "
                          "list the groups explicitly in the config")
    return groups


def groups_from_points(model: nn.Module, input_shape: Sequence[int], groups: Sequence[Sequence[str]],
                       key: str = "groups") -> list[LayerGroup]:
    """Groups given explicitly as lists of capture points; each list must share one (C, H, W) shape.

    The last point of each list is the group's output.
    """
    if not groups or any(not g for g in groups):
        raise ConfigError(f"{key}: give one non-empty list of capture points per group")
    points = [p for g in groups for p in g]
    capture = CapturingModel(model, points, torch.zeros(2, *input_shape))
    out = []
    for i, g in enumerate(groups):
        shapes = {p: capture.shapes[p] for p in g}
        last = shapes[g[-1]]
        for p, s in shapes.items():
            if len(s) != 3 or s != last:
                raise ConfigError(f"{key}[{i}]: {p!r} has shape {s}, but the group's last point {g[-1]!r} "
                                  f"has {last}; the candidates of a group must share one (C, H, W) shape")
        out.append(LayerGroup(index=i, blocks=tuple(g), candidates=tuple(g), shape=tuple(last)))  # type: ignore[arg-type]
    return out


def match_groups(teacher: Sequence[LayerGroup], student: Sequence[LayerGroup]) -> list[tuple[LayerGroup, LayerGroup]]:
    """Pair teacher and student groups: in order when their counts agree, else by equal spatial size.

    Raises :class:`ConfigError` when no pair can be formed.
    """
    if len(teacher) == len(student):
        return list(zip(teacher, student, strict=True))
    by_size = {}
    for t in teacher:
        by_size.setdefault(t.spatial, t)  # several teacher groups of one size: the first
    pairs = [(by_size[s.spatial], s) for s in student if s.spatial in by_size]
    if not pairs:
        raise ConfigError(
            f"teacher groups {[t.spatial for t in teacher]} and student groups {[s.spatial for s in student]} "
            "differ in number and share no spatial size; give method.teacher_groups and method.student_points"
        )
    return pairs


def format_groups(groups: Sequence[LayerGroup], title: str) -> str:
    """A readable table: one line per group with its size and candidates (non-candidates in brackets)."""
    lines = [f"{title}: {len(groups)} group(s)"]
    for g in groups:
        c, h, w = g.shape
        items = [b if b in g.candidates else f"({b})" for b in g.blocks]
        size = f"{h}x{w}"
        lines.append(f"  group {g.index + 1}  {size:>9}  {c:>5} ch  output {g.output:<16} "
                     f"candidates: {' '.join(items)}")
    return "\n".join(lines)
