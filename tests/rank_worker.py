"""What every rank holds, for the torchrun tests (``test_ddp.py``, ``test_mgd_ddp.py``): one file per rank.

    python -m torch.distributed.run --standalone --nproc_per_node=2 -m tests.rank_worker CONFIG OUT \
        [--mgd-updates N] [--train]

``--mgd-updates N``: builds the run of an ``mgd`` CONFIG, solves its matching (``setup``, then N - 1 more
updates) and writes ``OUT/matching-rank{r}.json``: per update the statistics images and the distiller's
report (assignment, groups, mean cost, margins per stage), as this rank solved it (no DDP forward runs in
between, so no buffer is overwritten by rank 0's). ``--train``: trains CONFIG (``Trainer.fit``, run folder
``OUT/run``; rank 0 writes it) and writes ``OUT/state-rank{r}.pt``: this rank's student and distiller state
after the run. Without torchrun it runs as the single process of a world of one.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch


def matching_updates(cfg, updates: int) -> list[dict]:
    """The first ``updates`` matchings of ``cfg``'s run on this rank: ``[{"images": n, "rows": report}, ...]``."""
    from featkd.engine.build import build_run

    run = build_run(cfg, log=lambda _m: None)
    distiller, ctx = run.distiller, run.context(steps_per_epoch=1)
    found = []
    for u in range(updates):
        if u == 0:
            distiller.setup(ctx)  # margins from the loaded teacher, first solve
        else:
            distiller.update_matching(ctx)
        found.append({"images": distiller.metrics()["mgd_images"], "rows": distiller.report()})
    return found


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("out")
    p.add_argument("--mgd-updates", type=int, default=0)
    p.add_argument("--train", action="store_true")
    args = p.parse_args()

    from featkd.config import load_config
    from featkd.distributed import shutdown_distributed

    cfg = load_config(args.config)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    if args.mgd_updates:
        found = matching_updates(cfg, args.mgd_updates)
        (out / f"matching-rank{rank}.json").write_text(json.dumps(found))
    if args.train:
        from featkd.engine.trainer import Trainer

        trainer = Trainer(cfg, out / "run", log=print if rank == 0 else lambda _m: None)
        trainer.fit()
        torch.save({"student": trainer.student.state_dict(), "distiller": trainer.distiller.state_dict()},
                   out / f"state-rank{rank}.pt")
    shutdown_distributed()


if __name__ == "__main__":
    main()
