"""``featkd eval CHECKPOINT``: accuracy of a trained student on a split.

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
    import json
    from pathlib import Path

    import torch

    from featkd.config import apply_overrides, build_config, load_config
    from featkd.data import build_data
    from featkd.engine import checkpoint as ckpt
    from featkd.engine.distributed import select_device
    from featkd.errors import FeatkdError
    from featkd.models import create_model

    path = Path(args.checkpoint)
    if path.is_dir():
        path = path / ("best.pt" if args.best else "last.pt")
    state = ckpt.load_file(path)
    overrides = list(args.overrides) + ([f"data.data_dir={args.data_dir}"] if args.data_dir else [])
    if args.config:
        cfg = load_config(args.config, overrides)
    elif ckpt.is_training_checkpoint(state):
        cfg = build_config(apply_overrides(state["config"], overrides))
    else:
        raise FeatkdError(f"{path} is a plain state_dict: pass --config to say which model and data it is for")
    data = build_data(cfg.data)
    device = select_device(args.device)
    model = create_model(cfg.student.model, num_classes=data.num_classes, in_channels=data.input_shape[0],
                         **cfg.student.options)
    ckpt.load_model_weights(model, path, what="checkpoint")
    model.to(device).eval()
    loader = {"test": data.test_loader, "val": data.val_loader, "train": data.train_eval_loader}[args.split]
    batches = loader(cfg.data.eval_batch_size, device=device)
    if batches is None:
        raise FeatkdError("--split val: this config has no validation split (data.val_fraction is 0)")
    correct = total = 0
    loss = 0.0
    with torch.no_grad():
        for x, y in batches:
            logits = model(x)
            correct += int((logits.argmax(1) == y).sum())
            loss += float(torch.nn.functional.cross_entropy(logits.float(), y, reduction="sum"))
            total += y.numel()
    result = {"checkpoint": str(path), "split": args.split, "model": cfg.student.model,
              "dataset": cfg.data.dataset, "accuracy": 100.0 * correct / max(1, total),
              "loss": loss / max(1, total), "samples": total}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.split}_acc {result['accuracy']:.2f}  {args.split}_loss {result['loss']:.4f}  "
              f"(n={total}, {cfg.student.model} on {cfg.data.dataset}, {path})")
    return 0
