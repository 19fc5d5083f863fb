"""``featkd env``: the environment in one line per item, to paste into a bug report.

featkd, Python, torch, torchvision, CUDA and the GPUs, the core and optional packages, where each data set
is found, the shipped configs and protocols, and the zoo's files checked against their sha256. Exit status
1 if something is wrong (a missing dependency, torch too old, a zoo file missing or changed), listed last.
"""

from __future__ import annotations

import argparse

HELP = "report featkd, Python, torch, CUDA/GPUs, optional packages, data sets and the zoo's checksums"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the report as JSON ({item: text, ...})")


def run(args: argparse.Namespace) -> int:
    import json

    from featkd.apps.environment import report

    lines = report()
    problems = [item for item, _, ok in lines if not ok]
    if args.json:
        print(json.dumps({"items": {item: text for item, text, _ in lines}, "problems": problems}, indent=2))
    else:
        width = max(len(item) for item, _, _ in lines)
        for item, text, _ in lines:
            print(f"{item:<{width}}  {text}")
        if problems:
            print(f"problems: {', '.join(problems)}")
    return 1 if problems else 0
