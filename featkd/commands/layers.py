"""``featkd layers MODEL [--input-shape C,H,W]``: list capture points and their shapes.

Works for classifiers and segmenters alike (``featkd layers torchvision:fcn_resnet50 --input-shape 3,64,64``):
entries of dict outputs are listed as ``module[key]`` (``backbone[out]``), and in a model that does not
trace as a whole the fx nodes of its traceable sub-modules are listed in their place.

Points that are no per-example tensor (``x.shape`` / ``size`` / ``dim`` calls, ``assert``, ``eq`` on sizes, a
module returning a tuple such as ``nn.MultiheadAttention``, reads of parameters and buffers such as a ViT's
``class_token``: nothing a method can distil) are hidden unless ``--all`` is given; a line on stderr says how
many.

A per-example (N, C) shape that reads as tokens (0, 1 or 2 leading tokens + a patch grid of the input's aspect,
:mod:`featkd.capture.layouts`) gets a last column, ``1+7x7``: capture the point as ``NAME:tokens`` to distil it as a
(C, 7, 7) map.

``--groups`` shows instead the layer groups found from the model's graph and shapes (the blocks of each
same-spatial-size stage, as DFA uses them; :mod:`featkd.capture.groups`); with ``--student NAME`` also the
student's groups and how the two are paired.
"""

from __future__ import annotations

import argparse
import sys

HELP = "list a model's capture points with their output shapes"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="registry name, e.g. resnet20, mobilenetv2, torchvision:resnet18, or your own "
                                 "package.module:callable (importable from the working directory)")
    p.add_argument("--input-shape", default="3,32,32", help="C,H,W of one example (default 3,32,32)")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--option", dest="options", action="append", default=[], metavar="KEY=VALUE",
                   help="model constructor option, e.g. --option width_mult=0.5 (repeatable)")
    p.add_argument("--filter", help="only names matching this regular expression")
    p.add_argument("--inputs", action="store_true", help="also list 'module:input' points")
    p.add_argument("--all", action="store_true",
                   help="also list the points that are no per-example tensor (sizes, asserts, getattr, eq, tuples, "
                        "parameters)")
    p.add_argument("--kind", choices=["all", "module", "node"], default="all")
    p.add_argument("--groups", action="store_true",
                   help="show the layer groups (same-spatial-size blocks) instead of every point")
    p.add_argument("--student", help="with --groups: a student model to show and pair with MODEL")


def parse_shape(text: str) -> tuple[int, int, int]:
    from featkd.errors import FeatkdError

    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise FeatkdError(f"--input-shape {text!r}: expected C,H,W with positive integers, e.g. 1,28,28")
    return shape  # type: ignore[return-value]


def run(args: argparse.Namespace) -> int:
    import re

    from featkd.capture.layouts import token_hint
    from featkd.capture.listing import list_capture_points
    from featkd.config import parse_override
    from featkd.errors import FeatkdError
    from featkd.models import create_model

    shape = parse_shape(args.input_shape)
    options = {}
    for item in args.options:
        keys, value = parse_override(item)
        options[".".join(keys)] = value
    model = create_model(args.model, num_classes=args.num_classes, in_channels=shape[0], **options)
    check_forward(model, shape, f"model {args.model!r}")
    if args.groups or args.student:
        return show_groups(args, model, shape)
    try:
        pattern = re.compile(args.filter) if args.filter else None
    except re.error as exc:
        raise FeatkdError(f"--filter {args.filter!r}: not a regular expression ({exc})") from None
    points = list_capture_points(model, shape, include_inputs=args.inputs)
    rows = [p for p in points if (args.kind == "all" or p.kind == args.kind)
            and (pattern is None or pattern.search(p.name))]
    hidden = 0 if args.all else sum(not per_example(p) for p in rows)
    if hidden:
        rows = [p for p in rows if per_example(p)]
    width = max([len(p.name) for p in rows] + [4])
    op_width = max([len(p.op) for p in rows] + [18])
    dims = ["x".join(map(str, p.shape)) if p.shape is not None else "-" for p in rows]
    tokens = [token_hint(p.shape, shape[1:]) for p in rows]  # (N, C) shapes that read as tokens
    shape_title = f"shape (per example, input {'x'.join(map(str, shape))})"
    dims_width = max([len(d) for d in dims] + [len(shape_title)]) if any(tokens) else 0
    print(f"{'name':<{width}}  {'kind':<6}  {'op':<{op_width}}  {shape_title:<{dims_width}}"
          + ("  tokens (leading+grid, as NAME:tokens)" if any(tokens) else ""))
    for p, d, t in zip(rows, dims, tokens, strict=True):
        print(f"{p.name:<{width}}  {p.kind:<6}  {p.op:<{op_width}}  " + (f"{d:<{dims_width}}  {t}" if t else d))
    if hidden:  # on stderr: stdout stays the table
        print(f"({hidden} points that are no per-example tensor are hidden: sizes, asserts, getattr, tuples, "
              "parameters...; --all lists them)", file=sys.stderr)
    return 0


def check_forward(model, shape: tuple[int, int, int], what: str) -> None:
    """Run ``model`` once on a batch of 2 zero inputs of ``shape``: an exception of the model's own (an input
    too small for it, too few channels) is one line naming it and the shape, not a traceback from the listing."""
    import torch

    from featkd.modes import probe_output

    probe_output(model, torch.zeros(2, *shape), what, hint="try another --input-shape (C,H,W of one example)")


def per_example(point) -> bool:
    """Whether a listed point is an activation a method can distil: a tensor computed from the input, not a
    size, an assert, a tuple (``shape`` None) or a parameter / buffer read (an fx ``get_attr`` node, no op)."""
    return point.shape is not None and not (point.kind == "node" and not point.op)


def show_groups(args: argparse.Namespace, model, shape: tuple[int, int, int]) -> int:
    from featkd.capture.groups import find_groups, format_groups, match_groups
    from featkd.errors import FeatkdError
    from featkd.models import create_model

    if not args.groups:
        raise FeatkdError("--student is only used with --groups")
    student = None
    if args.student:  # checked before anything is printed
        student = create_model(args.student, num_classes=args.num_classes, in_channels=shape[0])
        check_forward(student, shape, f"student {args.student!r}")
    groups = find_groups(model, shape)
    print(f"input {'x'.join(map(str, shape))}; candidates in brackets have another shape than the group output")
    print(format_groups(groups, f"{'teacher ' if args.student else ''}{args.model}"))
    if student is not None:
        s_groups = find_groups(student, shape)
        print(format_groups(s_groups, f"student {args.student}"))
        print("pairs (student group output <- teacher candidates):")
        for t, s in match_groups(groups, s_groups):
            print(f"  {s.output} {'x'.join(map(str, s.shape))} <- {', '.join(t.candidates)} "
                  f"{'x'.join(map(str, t.shape))}")
    return 0
