"""``featkd search CONFIG --out DIR [--epochs N] [--set key=value ...]``: run DFA's search stage alone.

Builds everything ``featkd train`` would (data, teacher, student, the ``dfa`` method of CONFIG), runs the
search of the aggregation weights on the seeded split of the training set, and writes ``DIR/alpha.json``
(alpha and beta per group, the search's options, per-epoch history and wall time) and ``DIR/alpha.png``
(the group x candidate heatmap; needs matplotlib). Train with the result, without searching again::

    featkd train CONFIG --set method.alpha_file=DIR/alpha.json
"""

from __future__ import annotations

import argparse

HELP = "run DFA's aggregation-weight search alone and write alpha.json / alpha.png"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment YAML with method.name: dfa")
    p.add_argument("--out", required=True, help="folder for alpha.json and alpha.png (must not hold alpha.json)")
    p.add_argument("--epochs", type=int, help="search epochs per group (shortcut for --set method.search.epochs=N)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set method.search.gamma_st=0.5 (repeatable)")
    p.add_argument("--seed", type=int, help="shortcut for --set train.seed=N")
    p.add_argument("--device", help="shortcut for --set train.device=DEVICE")


def run(args: argparse.Namespace) -> int:
    import os
    from dataclasses import asdict
    from pathlib import Path

    from featkd.config import load_config
    from featkd.engine.build import build_run
    from featkd.errors import FeatkdError
    from featkd.methods.dfa.distiller import ALPHA_JSON, DFA, write_alpha_outputs

    overrides = list(args.overrides)
    if args.epochs is not None:
        if args.epochs < 0:
            raise FeatkdError(f"--epochs: must be >= 0, got {args.epochs}")
        overrides.append(f"method.search.epochs={args.epochs}")
    for flag, key in (("seed", "train.seed"), ("device", "train.device")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    cfg = load_config(args.config, overrides)
    if cfg.method_name != "dfa":
        raise FeatkdError(f"{args.config}: method.name is {cfg.method_name!r}; featkd search needs 'dfa'")
    if cfg.method.get("aggregation", "searched") != "searched" or cfg.method.get("alpha_file"):
        raise FeatkdError(f"{args.config}: method.aggregation must be 'searched' without alpha_file "
                          "for featkd search")
    out = Path(args.out)
    if (out / ALPHA_JSON).exists():
        raise FeatkdError(f"{out / ALPHA_JSON} already exists; choose another --out")
    main = os.environ.get("RANK", "0") == "0"
    log = print if main else (lambda _msg: None)
    run = build_run(cfg, log=log)  # builds and validates everything; writes nothing
    distiller = run.distiller
    assert isinstance(distiller, DFA)
    ctx = run.context()
    result = distiller.search(ctx)
    alphas = [a.to(run.device) for a in result.alphas]
    for a in alphas:  # as in training: every rank searched, rank 0's alpha is the result
        ctx.dist.broadcast(a, src=0)
    if main:
        meta = {"aggregation": "searched", "config": str(args.config), "teacher": cfg.teacher.model if cfg.teacher
                else None, "student": cfg.student.model, "seed": cfg.train.seed,
                "search": asdict(distiller.cfg.search), "search_seconds": result.seconds,
                "history": result.history}
        for path in write_alpha_outputs(out, distiller.pairs, [a.cpu() for a in alphas], result.betas, meta, log):
            log(f"wrote {path}")
        log(f"search took {result.seconds:.1f}s; train with: featkd train {args.config} "
            f"--set method.alpha_file={out / ALPHA_JSON}")
    return 0
