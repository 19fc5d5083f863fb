"""``featkd match CONFIG --out DIR``: compute the MGD channel matching of a teacher/student pair.

Builds the data, teacher and student of an ``mgd`` config exactly as ``featkd train`` would (checkpoints
loaded), runs one matching-statistics pass over the training split (eval transforms, ``method.stats_images``
images) and solves the assignment of every stage. Writes ``DIR/matching.json`` (one object per stage:
``stage``, ``teacher_channels``, ``student_channels``, ``assignment`` per teacher channel, ``mean_cost``, ...)
and, unless ``--no-plots``, ``DIR/stage{i}.png`` heatmaps of the cost matrix with the assignment overlaid.
Runs under ``torchrun`` too: every rank takes its shard, the sums are all-reduced, rank 0 writes.
"""

from __future__ import annotations

import argparse

HELP = "compute and plot the MGD channel matching of a teacher/student config"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment YAML whose method is mgd")
    p.add_argument("--out", required=True, help="folder for matching.json and the heatmaps")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set student.checkpoint=runs/x/student.pt (repeatable)")
    p.add_argument("--images", type=int, help="shortcut for --set method.stats_images=N")
    p.add_argument("--seed", type=int, help="shortcut for --set train.seed=N")
    p.add_argument("--device", help="shortcut for --set train.device=DEVICE")
    p.add_argument("--no-plots", action="store_true", help="write matching.json only (no matplotlib needed)")
    p.add_argument("--force", action="store_true", help="overwrite an existing DIR/matching.json")


def run(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from featkd.config import load_config
    from featkd.distributed import shutdown_distributed
    from featkd.engine.build import build_run
    from featkd.errors import FeatkdError
    from featkd.methods.mgd.distiller import MatchingGuidedDistiller
    from featkd.methods.mgd.report import HEATMAPS, write_report
    from featkd.plotting import require_pyplot

    overrides = list(args.overrides)
    for value, key in ((args.images, "method.stats_images"), (args.seed, "train.seed"),
                       (args.device, "train.device")):
        if value is not None:
            overrides.append(f"{key}={value}")
    cfg = load_config(args.config, overrides)
    if cfg.method_name != "mgd":
        raise FeatkdError(f"method.name: featkd match needs an mgd config, {args.config} uses "
                          f"{cfg.method_name!r}")
    out = Path(args.out)
    if (out / "matching.json").exists() and not args.force:
        raise FeatkdError(f"{out / 'matching.json'} exists; choose another --out or pass --force")
    if not args.no_plots:
        require_pyplot(HEATMAPS, "pass --no-plots")  # fail before the (long) statistics pass if matplotlib is missing
    main = os.environ.get("RANK", "0") == "0"
    run = build_run(cfg, log=print if main else (lambda _m: None))
    distiller = run.distiller
    assert isinstance(distiller, MatchingGuidedDistiller)
    ctx = run.context()
    distiller.refresh_bn_margins(run.teacher)
    rows = distiller.update_matching(ctx)
    if main:
        paths = write_report(out, distiller, plots=not args.no_plots)
        for row in rows:
            ignored = sum(a is None for a in row["assignment"])
            print(f"stage {row['stage']}: student {row['student_point']} ({row['student_channels']} ch) <- "
                  f"teacher {row['teacher_point']} ({row['teacher_channels']} ch): mean cost "
                  f"{row['mean_cost']:.4f}, {ignored} teacher channels ignored")
        print("wrote " + ", ".join(str(p) for p in paths))
    shutdown_distributed()
    return 0
