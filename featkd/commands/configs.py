"""``featkd configs list [PATTERN]`` / ``show NAME [--resolved]`` / ``copy NAME DIR``: the shipped example configs.

Every config of the repository's ``configs/`` ships with featkd, so a pip user starts from one:
``featkd configs copy digits-kd-resnet20-resnet8 my-exp`` writes ``my-exp/digits-kd-resnet20-resnet8.yaml``
and the ``my-exp/base/`` file it builds on, ready for ``featkd train my-exp/digits-kd-resnet20-resnet8.yaml``.
Nothing is overwritten. Names are the file names without ``.yaml``; shared files are ``base/NAME``.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

HELP = "list, show or copy the shipped example configs (start a new experiment from one)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    ls = sub.add_parser("list", help="the example configs: name, data set, method, teacher, student (default)")
    ls.add_argument("pattern", nargs="?", help="only names matching this regular expression")
    show = sub.add_parser("show", help="print one config file")
    show.add_argument("name", help="a name from `featkd configs list`, e.g. digits-kd-resnet20-resnet8")
    show.add_argument("--resolved", action="store_true",
                      help="print the full validated config (base merged, every default filled in)")
    copy = sub.add_parser("copy", help="copy a config and the base/ files it needs into a folder")
    copy.add_argument("name", help="a name from `featkd configs list`")
    copy.add_argument("dir", help="the folder to copy into (created if needed)")


def _describe(path: Path) -> list[str]:
    """data set, method, teacher and student of a config file (``?`` where the file does not say)."""
    from featkd.config import load_raw

    raw = load_raw(path)
    method = str((raw.get("method") or {}).get("name", "?"))
    teacher = "-" if method == "none" else str((raw.get("teacher") or {}).get("model", "-"))  # none uses none
    return [str((raw.get("data") or {}).get("dataset", "digits")), method, teacher,
            str((raw.get("student") or {}).get("model", "?"))]


def run(args: argparse.Namespace) -> int:
    import re

    from featkd import resources
    from featkd.errors import FeatkdError

    action = args.action or "list"
    if action == "show":
        path = resources.example_config(args.name)
        if args.resolved:
            from featkd.config import dump_yaml, load_config

            print(f"# {path}, resolved")
            print(dump_yaml(load_config(path)), end="")
        else:
            print(f"# {path}")
            print(path.read_text(), end="")
        return 0
    if action == "copy":
        from pathlib import Path

        written = resources.copy_example(args.name, args.dir)
        print(f"wrote {', '.join(map(str, written))}")
        source = resources.example_config(args.name)
        if source.parent.name != "base":
            print(f"train it: featkd train {Path(args.dir) / source.name}")
        return 0
    found = resources.example_configs()
    try:
        pattern = re.compile(getattr(args, "pattern", None) or "")
    except re.error as exc:
        raise FeatkdError(f"configs list: bad pattern {args.pattern!r} ({exc})") from None
    names = [n for n in found if not n.startswith("base/") and pattern.search(n)]
    rows = [[n, *_describe(found[n])] for n in names]
    head = ["name", "dataset", "method", "teacher", "student"]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    bases = [n for n in found if n.startswith("base/")]
    print(f"\n{len(rows)} config(s) in {resources.configs_dir()}; shared files: {', '.join(bases) or 'none'}")
    print("featkd configs show NAME | featkd configs copy NAME DIR")
    return 0
