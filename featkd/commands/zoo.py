"""``featkd zoo list`` shows the shipped trained models; ``featkd zoo add RUN_DIR --name NAME`` adds one.

``add`` copies the run's exported ``student.pt`` to ``zoo/NAME.pt`` and its ``config.yaml`` to
``zoo/NAME.yaml``, and records in ``zoo/manifest.json`` the checksum, the measured test accuracy (from the
run's ``summary.json``) and the exact command (from the run's ``command.txt``).
"""

from __future__ import annotations

import argparse

HELP = "list the shipped trained models (or add a finished run to the zoo)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["list", "add"], nargs="?", default="list")
    p.add_argument("run_dir", nargs="?", help="with add: a finished run folder")
    p.add_argument("--name", help="with add: the zoo name, e.g. fashion-mnist-resnet20")
    p.add_argument("--zoo-dir", default="zoo", help="with add: the zoo folder (default ./zoo)")


def run(args: argparse.Namespace) -> int:
    from featkd.zoo import add_entry, entry_score, load_manifest

    if args.action == "add":
        from featkd.errors import FeatkdError

        if not args.run_dir or not args.name:
            raise FeatkdError("zoo add needs RUN_DIR and --name NAME")
        entry = add_entry(args.run_dir, args.name, args.zoo_dir)
        metric, value = entry_score(entry)
        print(f"added {entry['name']}: {entry['file']} (test_{metric} {value:.2f}, sha256 {entry['sha256'][:12]})")
        return 0
    entries = load_manifest()
    if not entries:
        print("no zoo entries found (zoo/manifest.json)")
        return 0
    print(f"{'name':<30} {'dataset':<14} {'model':<18} {'test metric':>16}  file")
    for name, e in sorted(entries.items()):
        metric, value = entry_score(e)
        print(f"{name:<30} {e['dataset']:<14} {e['model']:<18} {metric:>7} {value:>8.2f}  {e['path']}")
    return 0
