"""``featkd eval CHECKPOINT``: the task's metrics of a trained student on a split (accuracy; mIoU,
pixel accuracy and per-class IoU for segmentation; COCO box AP, AP50, AP75, AP small / medium / large, the
same for masks when the detector predicts them, and per-class AP for detection).

CHECKPOINT is a run folder (its ``last.pt``, or ``best.pt`` with ``--best``), a featkd training
checkpoint (which records its config), or a plain state_dict together with ``--config``.
"""

from __future__ import annotations

import argparse

HELP = "evaluate a checkpoint or run folder on a data split"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="run folder, last.pt/best.pt, or a plain state_dict (with --config)")
    p.add_argument("--config", help="experiment YAML (required for a plain state_dict)")
    p.add_argument("--best", action="store_true", help="with a run folder: use best.pt instead of last.pt")
    p.add_argument("--split", choices=["test", "val", "train"], default="test")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--data-dir", help="override data.data_dir")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import json
    from pathlib import Path

    from featkd.config import apply_overrides, build_config, load_config
    from featkd.engine import checkpoint as ckpt
    from featkd.engine.build import build_run
    from featkd.errors import FeatkdError

    path = Path(args.checkpoint)
    if path.is_dir():
        path = path / ("best.pt" if args.best else "last.pt")
    state = ckpt.load_file(path)
    overrides = [*args.overrides, f"train.device={args.device}"]
    if args.data_dir:
        overrides.append(f"data.data_dir={args.data_dir}")
    if args.config:
        cfg = load_config(args.config, overrides)
    elif ckpt.is_training_checkpoint(state):
        cfg = build_config(apply_overrides(state["config"], overrides))
    else:
        raise FeatkdError(f"{path} is a plain state_dict: pass --config to say which model and data it is for")
    # the student alone: no method, so no teacher is built or needed
    run = build_run(dataclasses.replace(cfg, method={"name": "none"}), log=lambda _m: None,
                    student_checkpoint=path)
    result = run.evaluate(run.student, args.split)
    report = {"checkpoint": str(path), "split": args.split, "model": cfg.student.model,
              "dataset": cfg.data.dataset, "task": run.task.name, **result}
    if run.task.metric == "acc":
        report["accuracy"] = result["acc"]  # the key of earlier featkd versions
    if args.json:
        print(json.dumps(report))
        return 0
    metrics = "  ".join(f"{args.split}_{k} {result[k]:.{4 if k == 'loss' else 2}f}" for k in run.task.logged_metrics
                        if k in result)
    count = result.get("samples", result.get("pixels", result.get("images")))
    print(f"{metrics}  (n={count}, {cfg.student.model} on {cfg.data.dataset}, {path})")
    if "per_class_ap" in result:
        names = result["class_names"] or [str(i + 1) for i in range(len(result["per_class_ap"]))]
        width = max(len(n) for n in names)
        print(f"{'class':<{width}}  box AP" + ("  mask AP" if "mask_per_class_ap" in result else ""))
        for i, name in enumerate(names):
            row = [result["per_class_ap"][i], *([result["mask_per_class_ap"][i]] if "mask_per_class_ap" in result
                                              else [])]
            print(f"{name:<{width}}  " + "  ".join("   n/a" if v is None else f"{v:6.2f}" for v in row))
    if "iou_per_class" in result:
        names = result["class_names"] or [str(i) for i in range(len(result["iou_per_class"]))]
        width = max(len(n) for n in names)
        print(f"{'class':<{width}}  IoU")
        for name, iou in zip(names, result["iou_per_class"], strict=True):
            print(f"{name:<{width}}  {'  n/a' if iou is None else f'{iou:5.2f}'}")
    return 0
