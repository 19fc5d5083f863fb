"""``featkd layers MODEL [--input-shape C,H,W]``: list capture points and their shapes."""

from __future__ import annotations

import argparse

HELP = "list a model's capture points with their output shapes"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="registry name, e.g. resnet20, mobilenetv2, torchvision:resnet18")
    p.add_argument("--input-shape", default="3,32,32", help="C,H,W of one example (default 3,32,32)")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--option", dest="options", action="append", default=[], metavar="KEY=VALUE",
                   help="model constructor option, e.g. --option width_mult=0.5 (repeatable)")
    p.add_argument("--filter", help="only names matching this regular expression")
    p.add_argument("--inputs", action="store_true", help="also list 'module:input' points")
    p.add_argument("--kind", choices=["all", "module", "node"], default="all")


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

    from featkd.config import parse_override
    from featkd.errors import FeatkdError
    from featkd.features import list_capture_points
    from featkd.models import create_model

    shape = parse_shape(args.input_shape)
    options = {}
    for item in args.options:
        keys, value = parse_override(item)
        options[".".join(keys)] = value
    model = create_model(args.model, num_classes=args.num_classes, in_channels=shape[0], **options)
    try:
        pattern = re.compile(args.filter) if args.filter else None
    except re.error as exc:
        raise FeatkdError(f"--filter {args.filter!r}: not a regular expression ({exc})") from None
    points = list_capture_points(model, shape, include_inputs=args.inputs)
    rows = [p for p in points if (args.kind == "all" or p.kind == args.kind)
            and (pattern is None or pattern.search(p.name))]
    width = max([len(p.name) for p in rows] + [4])
    print(f"{'name':<{width}}  {'kind':<6}  {'op':<18}  shape (per example, input {'x'.join(map(str, shape))})")
    for p in rows:
        dims = "x".join(map(str, p.shape)) if p.shape is not None else "-"
        print(f"{p.name:<{width}}  {p.kind:<6}  {p.op:<18}  {dims}")
    return 0
