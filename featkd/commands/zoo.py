"""``featkd zoo list`` shows the shipped trained models, each file's sha256 checked against the manifest
(exit status 1 if one is missing or differs); ``featkd zoo add RUN_DIR --name NAME`` adds one.

Recipes (entries whose weights are not shipped) are listed with the command that builds them:
``featkd zoo build NAME`` trains one with its recorded config (``runs/zoo/NAME``), checks that its test
accuracy reaches the recorded one within the entry's tolerance, and installs the weights where ``zoo:NAME``
finds them (:func:`featkd.models.zoo.build_dir`). See :mod:`featkd.models.zoo` (looking up) and
:mod:`featkd.apps.zoo_build` (building, adding).

``add`` copies the run's exported ``student.pt`` to ``zoo/NAME.pt`` and its ``config.yaml`` to
``zoo/NAME.yaml``, and records in ``zoo/manifest.json`` the checksum, the measured test accuracy (from the
run's ``summary.json``) and the exact command (from the run's ``command.txt``).
"""

from __future__ import annotations

import argparse

HELP = "list the shipped trained models (add a finished run to the zoo, or build a recipe's weights)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["list", "add", "build"], nargs="?", default="list")
    p.add_argument("run_dir", nargs="?", help="with add: a finished run folder; with build: the recipe's NAME")
    p.add_argument("--name", help="with add: the zoo name, e.g. fashion-mnist-resnet20")
    p.add_argument("--zoo-dir", default="zoo", help="with add: the zoo folder (default ./zoo)")
    p.add_argument("--out", help="with build: the run folder (default runs/zoo/NAME)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="with build: override the recipe's config (e.g. train.device=cuda); the check stays")
    p.add_argument("--resume", action="store_true", help="with build: continue the run in --out")
    p.add_argument("--force", action="store_true", help="with build: install the weights even if the check fails")


def run(args: argparse.Namespace) -> int:
    import sys

    from featkd.models.zoo import entry_score, is_download, is_recipe, load_manifest, verify_entry, zoo_dirs

    if args.action == "add":
        from featkd.apps.zoo_build import add_entry
        from featkd.errors import FeatkdError

        if not args.run_dir or not args.name:
            raise FeatkdError("zoo add needs RUN_DIR and --name NAME")
        entry = add_entry(args.run_dir, args.name, args.zoo_dir)
        metric, value = entry_score(entry)
        print(f"added {entry['name']}: {entry['file']} (test_{metric} {value:.2f}, sha256 {entry['sha256'][:12]})")
        return 0
    if args.action == "build":
        return build(args)
    entries = load_manifest()
    if not entries:
        print(f"no zoo entries found (no manifest.json in {', '.join(map(str, zoo_dirs()))})")
        return 0
    width = max(30, *map(len, entries))
    print(f"{'name':<{width}} {'dataset':<14} {'model':<18} {'test metric':>16}  {'sha256':<8} file")
    problems = []
    for name, e in sorted(entries.items()):
        metric, value = entry_score(e)
        problem = verify_entry(e)
        status, where = ("BAD" if problem else "ok"), e["path"]
        if is_download(e) and "sha256" not in e:  # published weights, fetched on first use
            status, where = "download", e["url"]
        elif is_recipe(e) and "sha256" not in e:  # not shipped and not built here: the command that builds it
            status, where = "recipe", f"featkd zoo build {name}"
        elif problem:
            problems.append(f"zoo entry {name!r}: {problem}")
        shown = f"{value:>8.2f}" if value is not None else f"{'-':>8}"
        print(f"{name:<{width}} {e['dataset']:<14} {e['model']:<18} {metric:>7} {shown}  {status:<8} {where}")
    for line in problems:
        print(line, file=sys.stderr)
    return 1 if problems else 0


def build(args: argparse.Namespace) -> int:
    """``featkd zoo build NAME``: train the recipe, check its accuracy, install the weights."""
    from featkd.apps.zoo_build import build_recipe
    from featkd.errors import FeatkdError

    if not args.run_dir:
        raise FeatkdError("zoo build needs the recipe's NAME (`featkd zoo list` shows recipes)")
    record = build_recipe(args.run_dir, args.out, args.overrides, resume=args.resume, force=args.force)
    metric = next(k for k in record if k.startswith("test_"))
    recorded = record["recorded"]
    check = (f"recorded {recorded:.2f}, tolerance {record['tolerance']:g}: {'ok' if record['passed'] else 'FAILED'}"
             if recorded is not None else "no recorded value to check against")
    print(f"built {record['name']}: {metric} {record[metric]:.2f} ({check}); weights in "
          f"{record['run']}/student.pt installed as zoo:{record['name']} (sha256 {record['sha256'][:12]})")
    return 0
