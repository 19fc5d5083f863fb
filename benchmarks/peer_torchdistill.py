"""featkd beside torchdistill on the data-limited protocol (issue 16, "The peer side by side").

For Hinton KD and FitNets, and each seed, one process trains the same student twice, alternating epochs:

- **featkd**: :class:`~featkd.engine.trainer.Trainer` built from the protocol's config
  (``configs/fashion-mnist-{kd,fitnets}-resnet20-resnet8.yaml``), every batch through ``Trainer.train_step``
  (the step ``featkd train`` runs), with the distiller's epoch and step hooks;
- **torchdistill**: its ``DistillationBox`` (``torchdistill.core.distillation``) configured by a dict built here,
  stepped through its own ``forward_process`` / ``post_forward_process`` (its forward hooks, loss modules,
  optimiser and scheduler), as torchdistill's example training loop does.

Both arms get everything else from featkd's ``build_run(cfg)`` with the same seed: the zoo teacher
(``zoo:fashion-mnist-resnet20``), the student's initial weights, the 2,000-image class-stratified subset
(``subset_seed`` 0) and the loader, whose order and augmentation are a function of (seed, epoch), so both arms
see the same batches in the same order. The FitNets connector of the torchdistill arm starts from the weights
of featkd's connector (same shape, same PyTorch default initialisation). Both students are scored by the same
function (featkd's ``Run.evaluate``, top-1 on the 10k test split) after epochs 10, 20, 30, outside the timed
part. Throughput is the training images per second of each arm's epochs, timed around the epoch loop only;
the arms alternate epoch by epoch and swap which goes first every epoch, so drift hits both alike.

What differs beyond the loop code is ``DIFFERENCES`` below (also written to the JSON). The first step's loss
of both arms is recorded (same batch, same weights), so a different loss convention, temperature or weighting
would show there; ``--divergence STEPS`` measures how fast the two runs drift apart against a control (one
library against itself with its weights perturbed by about one rounding error).

    pip install -c constraints-dev.txt torchdistill     # or: pip install -c constraints-dev.txt -e '.[peer]'
    python benchmarks/peer_torchdistill.py [--methods kd,fitnets] [--seeds 3] \
        [--out benchmarks/results/peer_torchdistill.json]   # resumable per (method, seed): JSON after each pair
    python benchmarks/peer_torchdistill.py --divergence 30   # the drift check, into the same JSON
    python benchmarks/peer_torchdistill.py --report          # the README table (and peer_torchdistill.md)
    python benchmarks/peer_torchdistill.py --smoke           # digits, 1 epoch, 1 seed: runs/peer_torchdistill/
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL = ROOT / "benchmarks" / "protocols" / "data-limited.yaml"
SMOKE_CONFIGS = {"kd": ROOT / "configs" / "digits-kd-resnet20-resnet8.yaml",
                 "fitnets": ROOT / "configs" / "digits-fitnets-resnet20-resnet8.yaml"}
LIBRARIES = ("featkd", "torchdistill")
FORWARD = "forward_batch_only"  # torchdistill's forward_proc: model(x)
PERTURBATION = 3e-8  # the divergence control: about the weight difference float rounding leaves after one step
INSTALL = "pip install -c constraints-dev.txt torchdistill  (or pip install -c constraints-dev.txt -e '.[peer]')"

DIFFERENCES = {
    "kd": [
        "loss: torchdistill's KDLoss(temperature=4, alpha=0.5) = 0.5 * CE + 0.5 * T^2 * KLDivLoss(batchmean) of "
        "log_softmax(s/T) against softmax(t/T); featkd's ce_weight 0.5 * CE + kd_weight 0.5 * T^2 * "
        "kl_div(batchmean, log_target=True) of the two log_softmax: the same function, computed with a "
        "probability target instead of a log-probability target (first-step losses equal; the weights then "
        "differ by float rounding, which training amplifies like any perturbation: see 'divergence')",
    ],
    "fitnets": [
        "hint: the output of layer3 in both networks (64x7x7 after the last block's ReLU); torchdistill's forward "
        "hooks (teacher 'layer3', student 'student_model.layer3' inside its Connector4DAB wrapper) against "
        "featkd's capture point layer3",
        "connector: a 1x1 Conv2d with bias, no BatchNorm, no ReLU in both (torchdistill: Connector4DAB's "
        "conv2d_kwargs, bn2d_kwargs left out; featkd: connector conv1x1); torchdistill's starts from featkd's "
        "initial connector weights. torchdistill's own FitNets sample config instead uses ConvReg (conv + "
        "BatchNorm + ReLU) in a separate first hint stage with MSELoss(reduction='sum'), then KD: not run here",
        "loss: CE (weight 1) + MSELoss(reduction='mean') (weight 1) through torchdistill's WeightedSumLoss and "
        "SimpleLossWrapper; featkd: ce_weight 1 * CE + weight 1 * F.mse_loss (mean), trained jointly",
    ],
    "both": [
        "optimiser: SGD lr 0.05, momentum 0.9, Nesterov (featkd's optim.nesterov default; passed to "
        "torchdistill's SGD kwargs), weight decay 5e-4 on every parameter (connector included); featkd keeps "
        "the connector in a second parameter group with the same settings, torchdistill one group",
        "schedule: featkd's LambdaLR of 0.5 * (1 + cos(pi * it / total)), stepped per iteration; torchdistill's "
        "CosineAnnealingLR(T_max = total iterations, eta_min = 0) with scheduling_step 1 (its recursive form "
        "equals the closed form to float rounding; the largest learning-rate difference is recorded)",
        "per step: featkd checks the loss for NaN/inf (one .tolist() sync) and sets gradients to None; "
        "torchdistill's post_forward_process calls optimizer.zero_grad() after the step; the loop here calls "
        "loss.item() once per step, as torchdistill's example loop logs it",
        "teacher: the same eval-mode, frozen module from build_run; torchdistill runs it under torch.no_grad "
        "(requires_grad False), featkd under torch.no_grad",
    ],
}


def _git_commit() -> str | None:
    """HEAD, with " + uncommitted changes" when tracked files differ from it (None outside a clone)."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=ROOT, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = head.stdout.strip()
    return (commit + (" + uncommitted changes" if dirty.returncode == 1 else "")) if commit else None


def _torchdistill_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("torchdistill")
    except metadata.PackageNotFoundError:
        return None


def method_configs(smoke: bool) -> dict[str, Path]:
    """Method name -> config file: the data-limited protocol's rows (digits configs with ``--smoke``)."""
    if smoke:
        return dict(SMOKE_CONFIGS)
    from featkd.config import read_yaml

    protocol = read_yaml(PROTOCOL)
    return {m: ROOT / protocol["methods"][m] for m in ("kd", "fitnets")}


def load_cfg(path: Path, seed: int, args: argparse.Namespace):
    from featkd.config import load_config

    overrides = [f"train.seed={seed}", f"train.num_threads={args.threads}", f"train.device={args.device}",
                 "train.progress=off", "train.tensorboard=false"]
    if args.epochs:
        overrides += [f"train.epochs={args.epochs}"]
    return load_config(path, overrides)


def eval_epochs(cfg) -> set[int]:
    """1-based epochs after which both students are scored (featkd's eval_every rule)."""
    tc = cfg.train
    return {e for e in range(1, tc.epochs + 1) if e % tc.eval_every == 0 or e == tc.epochs}


class FeatkdArm:
    """featkd's Trainer: every batch through ``train_step``, the distiller's hooks around it."""

    library = "featkd"

    def __init__(self, cfg) -> None:
        from featkd.engine.trainer import Trainer

        self.trainer = Trainer(cfg, out_dir=None, log=lambda _m: None)
        self.ctx = self.trainer.context()
        self.trainer.distiller.setup(self.ctx)
        self.steps_per_epoch = self.trainer.steps_per_epoch
        self.first_loss: float | None = None

    @property
    def student(self) -> nn.Module:
        return self.trainer.student

    def lr(self) -> float:
        return self.trainer.optimizer.param_groups[0]["lr"]

    def train_epoch(self, epoch: int) -> None:
        t = self.trainer
        t.train_loader.set_epoch(epoch)
        t.distiller.on_epoch_start(epoch, self.ctx)
        t.student.train()
        for x, y in t.train_loader:
            losses, _ = t.train_step(x, y, epoch)  # includes the finite check (one sync with the loss value)
            t.distiller.on_step_end(t.global_step - 1, self.ctx)
            if self.first_loss is None:
                self.first_loss = float(sum(v.detach() for v in losses.values()))
        t.distiller.on_epoch_end(epoch, self.ctx)


def torchdistill_train_config(method: str, cfg, run, total_steps: int) -> dict[str, Any]:
    """torchdistill's single-stage training config (the dict its YAML files describe), built in Python."""
    oc = cfg.optim
    if oc.optimizer != "sgd" or oc.schedule != "cosine" or oc.warmup_epochs or oc.grad_clip:
        raise SystemExit("peer_torchdistill: the torchdistill arm mirrors SGD + cosine without warm-up or clipping")
    optimizer = {"key": "SGD", "kwargs": {"lr": oc.lr, "momentum": oc.momentum, "weight_decay": oc.weight_decay,
                                          "nesterov": bool(oc.nesterov and oc.momentum > 0)}}
    scheduler = {"key": "CosineAnnealingLR", "kwargs": {"T_max": total_steps, "eta_min": oc.min_lr},
                 "scheduling_step": 1}
    common = {"num_epochs": cfg.train.epochs, "optimizer": optimizer, "scheduler": scheduler}
    opts = run.options
    if method == "kd":
        kd = {"student_module_path": ".", "student_module_io": "output", "teacher_module_path": ".",
              "teacher_module_io": "output", "temperature": opts.kd_temperature, "alpha": opts.ce_weight,
              "beta": opts.kd_weight, "reduction": "batchmean"}
        return {**common,
                "teacher": {"forward_proc": FORWARD, "requires_grad": False},
                "student": {"forward_proc": FORWARD, "requires_grad": True},
                "criterion": {"key": "WeightedSumLoss",
                              "kwargs": {"sub_terms": {"kd": {"criterion": {"key": "KDLoss", "kwargs": kd},
                                                              "weight": 1.0}}}}}
    if method == "fitnets":
        if opts.kd_weight or opts.connector != "conv1x1" or opts.resize_teacher or len(opts.pairs) != 1:
            raise SystemExit("peer_torchdistill: the FitNets arm mirrors one pair, conv1x1, no KD term")
        s_point, t_point = opts.pairs[0]
        conv = run.distiller.connectors[0]
        connector = {"io": "output", "path": f"student_model.{s_point}",
                     "conv2d_kwargs": {"in_channels": conv.in_channels, "out_channels": conv.out_channels,
                                       "kernel_size": 1, "bias": conv.bias is not None}}
        ce = {"criterion": {"key": "CrossEntropyLoss", "kwargs": {"reduction": "mean"}},
              "criterion_wrapper": {"key": "SimpleLossWrapper", "kwargs": {
                  "input": {"is_from_teacher": False, "module_path": ".", "io": "output"},
                  "target": {"uses_label": True}}},
              "weight": opts.ce_weight}
        hint = {"criterion": {"key": "MSELoss", "kwargs": {"reduction": "mean"}},
                "criterion_wrapper": {"key": "SimpleLossWrapper", "kwargs": {
                    "input": {"is_from_teacher": False, "module_path": "connector_dict.hint", "io": "output"},
                    "target": {"is_from_teacher": True, "module_path": t_point, "io": "output"}}},
                "weight": opts.weight}
        return {**common,
                "teacher": {"forward_proc": FORWARD, "forward_hook": {"input": [], "output": [t_point]},
                            "requires_grad": False},
                "student": {"forward_proc": FORWARD,
                            "auxiliary_model_wrapper": {"key": "Connector4DAB",
                                                        "kwargs": {"connectors": {"hint": connector}}},
                            "forward_hook": {"input": [], "output": [f"student_model.{s_point}",
                                                                     "connector_dict.hint"]},
                            "requires_grad": True},
                "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"ce": ce, "hint": hint}}}}
    raise SystemExit(f"peer_torchdistill: no torchdistill arm for method {method!r}")


class TorchdistillArm:
    """torchdistill's DistillationBox on a second build_run of the same config (same teacher, student init,
    subset and loader); featkd's own captures hook those models only while they run, so only torchdistill's
    hooks run."""

    library = "torchdistill"

    def __init__(self, cfg, method: str) -> None:
        from torchdistill.core.distillation import get_distillation_box

        from featkd.engine.build import build_run

        self.run = run = build_run(cfg, log=lambda _m: None)
        self.loader = run.data.train_loader(cfg.data.batch_size, seed=cfg.train.seed, device=run.device,
                                            drop_last=True)
        self.steps_per_epoch = len(self.loader)
        train_config = torchdistill_train_config(method, cfg, run, cfg.train.epochs * self.steps_per_epoch)
        self.box = get_distillation_box(run.teacher, run.student, {}, train_config, run.device, None, False, 1)
        if method == "fitnets":  # the same initial connector as featkd's (both PyTorch's default Conv2d init)
            self.box.student_model.connector_dict["hint"][0].load_state_dict(run.distiller.connectors[0].state_dict())
        self.first_loss: float | None = None

    @property
    def student(self) -> nn.Module:
        return self.run.student

    def lr(self) -> float:
        return self.box.optimizer.param_groups[0]["lr"]

    def train_epoch(self, epoch: int) -> None:
        box = self.box
        self.loader.set_epoch(epoch)
        box.pre_epoch_process(epoch=epoch)
        for x, y in self.loader:
            loss = box.forward_process(x, y, supp_dict=None)
            box.post_forward_process(loss=loss)
            value = loss.item()  # torchdistill's example loop logs the loss of every step
            if not math.isfinite(value):
                raise SystemExit(f"torchdistill arm: loss became {value} in epoch {epoch + 1}")
            if self.first_loss is None:
                self.first_loss = value
        box.post_epoch_process()


def run_pair(method: str, seed: int, args: argparse.Namespace, configs: dict[str, Path]) -> dict[str, dict]:
    """Both libraries on (method, seed), epochs interleaved; returns {library: cell}."""
    cfg = load_cfg(configs[method], seed, args)
    torch.set_num_threads(args.threads)
    arms = [FeatkdArm(cfg), TorchdistillArm(cfg, method)]
    assert arms[0].steps_per_epoch == arms[1].steps_per_epoch
    evaluate = arms[0].trainer.evaluate  # one scoring function for both students
    when = eval_epochs(cfg)
    seconds = {a.library: [] for a in arms}
    accs: dict[str, dict[int, float]] = {a.library: {} for a in arms}
    lr_diff = 0.0
    wall = time.perf_counter()
    for epoch in range(cfg.train.epochs):
        for arm in arms if epoch % 2 == 0 else arms[::-1]:  # swap who goes first every epoch
            t0 = time.perf_counter()
            arm.train_epoch(epoch)
            seconds[arm.library].append(time.perf_counter() - t0)
        lr_diff = max(lr_diff, abs(arms[0].lr() - arms[1].lr()))
        if epoch + 1 in when:
            for arm in arms:
                accs[arm.library][epoch + 1] = evaluate(arm.student)["acc"]
        if args.verbose:
            print(f"  {method} seed {seed} epoch {epoch + 1}/{cfg.train.epochs}: "
                  + ", ".join(f"{a.library} {seconds[a.library][-1]:.1f} s" for a in arms)
                  + "".join(f"; test acc {a.library} {accs[a.library][epoch + 1]:.2f}" for a in arms
                            if epoch + 1 in accs[a.library]), flush=True)
    images = arms[0].steps_per_epoch * cfg.data.batch_size
    cells = {}
    for arm in arms:
        s = seconds[arm.library]
        cells[arm.library] = {
            "library": arm.library, "method": method, "seed": seed, "config": str(configs[method].relative_to(ROOT)),
            "test_acc": accs[arm.library][cfg.train.epochs],
            "test_acc_by_epoch": {str(k): v for k, v in sorted(accs[arm.library].items())},
            "train_seconds": sum(s), "images_per_s": images * len(s) / sum(s),
            "epoch_images_per_s_median": statistics.median(images / x for x in s),
            "epoch_seconds": s, "first_step_loss": arm.first_loss,
            "epochs": cfg.train.epochs, "steps_per_epoch": arm.steps_per_epoch, "batch_size": cfg.data.batch_size,
        }
    for cell in cells.values():
        cell["max_lr_difference"] = lr_diff
        cell["pair_wall_seconds"] = time.perf_counter() - wall
    return cells


def _max_param_difference(a: nn.Module, b: nn.Module) -> float:
    return max((u - v).abs().max().item() for u, v in zip(a.state_dict().values(), b.state_dict().values(),
                                                          strict=True) if u.is_floating_point())


def divergence(method: str, seed: int, steps: int, args: argparse.Namespace, configs: dict[str, Path]) -> dict:
    """How fast the two libraries' runs drift apart, against a control: the first ``steps`` steps of epoch 0 of
    featkd and torchdistill (the largest difference of any student weight or BatchNorm statistic after each
    step), and of torchdistill against itself with every student weight moved by N(0, PERTURBATION^2) first.
    Equal growth says the two runs differ by float rounding only, amplified by training like any perturbation."""
    cfg = load_cfg(configs[method], seed, args)
    torch.set_num_threads(args.threads)
    f, t, control = FeatkdArm(cfg), TorchdistillArm(cfg, method), TorchdistillArm(cfg, method)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for q in control.student.parameters():
            q.add_(torch.randn(q.shape, generator=g) * PERTURBATION)
    f.trainer.train_loader.set_epoch(0)
    f.student.train()
    for arm in (t, control):
        arm.loader.set_epoch(0)
        arm.box.pre_epoch_process(epoch=0)
    start = _max_param_difference(t.student, control.student)
    out = {"steps": steps, "perturbation": PERTURBATION, "control_start": start, "featkd_vs_torchdistill": [],
           "torchdistill_vs_perturbed": [], "loss_featkd_minus_torchdistill": []}
    for i, ((xf, yf), (xt, yt), (xc, yc)) in enumerate(zip(f.trainer.train_loader, t.loader, control.loader)):
        if i >= steps:
            break
        if not (torch.equal(xf, xt) and torch.equal(yf, yt) and torch.equal(xt, xc)):
            raise SystemExit(f"peer_torchdistill: the arms' loaders gave different batches at step {i}")
        losses, _ = f.trainer.train_step(xf, yf, 0)
        lt = []
        for arm, x, y in ((t, xt, yt), (control, xc, yc)):
            loss = arm.box.forward_process(x, y, supp_dict=None)
            arm.box.post_forward_process(loss=loss)
            lt.append(loss.item())
        out["loss_featkd_minus_torchdistill"].append(float(sum(v.detach() for v in losses.values())) - lt[0])
        out["featkd_vs_torchdistill"].append(_max_param_difference(f.student, t.student))
        out["torchdistill_vs_perturbed"].append(_max_param_difference(t.student, control.student))
    return out


def _se(values: list[float]) -> float:
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0


def summarise(cells: dict[str, dict]) -> list[dict]:
    """One row per (method, library): per-seed accuracies, mean +- s.e., images/s and its ratio to featkd's
    (per seed, the two arms of one interleaved run), and the first-step loss difference."""
    rows = []
    methods = sorted({c["method"] for c in cells.values()}, key=lambda m: ("kd", "fitnets").index(m)
                     if m in ("kd", "fitnets") else 9)
    for method in methods:
        seeds = sorted({c["seed"] for c in cells.values() if c["method"] == method
                        and all(f"{lib}/{method}/{c['seed']}" in cells for lib in LIBRARIES)})
        for lib in LIBRARIES:
            mine = [cells[f"{lib}/{method}/{s}"] for s in seeds]
            ref = [cells[f"featkd/{method}/{s}"] for s in seeds]
            if not mine:
                continue
            accs = [c["test_acc"] for c in mine]
            ratios = [c["images_per_s"] / r["images_per_s"] for c, r in zip(mine, ref)]
            # each epoch of one library was timed next to the same epoch of the other: a ratio per epoch pair
            pairs = [a / b for c, r in zip(mine, ref) for a, b in zip(r["epoch_seconds"], c["epoch_seconds"])]
            rows.append({
                "method": method, "library": lib, "seeds": seeds, "accs": accs,
                "acc_mean": statistics.mean(accs), "acc_se": _se(accs),
                "images_per_s": [c["images_per_s"] for c in mine],
                "images_per_s_mean": statistics.mean(c["images_per_s"] for c in mine),
                "images_per_s_ratio_vs_featkd": statistics.mean(ratios), "ratio_se": _se(ratios),
                "ratio_per_seed": ratios, "epoch_pair_ratio_median": statistics.median(pairs),
                "first_step_loss_abs_diff": max(abs(c["first_step_loss"] - r["first_step_loss"])
                                                for c, r in zip(mine, ref)),
            })
    return rows


def markdown(result: dict) -> str:
    head = ("| method | library | seeds | test acc per seed | test acc (mean ± s.e.) | train images/s per seed | "
            "images/s / featkd's per seed | mean ± s.e. | median epoch pair |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in summarise(result["cells"]):
        lines.append(f"| {r['method']} | {r['library']} | {len(r['seeds'])} | "
                     f"{', '.join(f'{a:.2f}' for a in r['accs'])} | {r['acc_mean']:.2f} ± {r['acc_se']:.2f} | "
                     f"{', '.join(f'{v:.0f}' for v in r['images_per_s'])} | "
                     f"{', '.join(f'{v:.3f}' for v in r['ratio_per_seed'])} | "
                     f"{r['images_per_s_ratio_vs_featkd']:.3f} ± {r['ratio_se']:.3f} | "
                     f"{r['epoch_pair_ratio_median']:.3f} |")
    env = result.get("environment", {})
    foot = (f"\nCommand: `{result.get('command')}`; featkd {result['featkd']}, torchdistill {result['torchdistill']}, "
            f"torch {env.get('torch')}, {env.get('torch_threads')} thread(s), {env.get('cpu_count')} CPU(s), "
            f"{env.get('date')}.\n")
    for method, d in result.get("divergence", {}).items():
        at = [i for i in (1, 2, 3, 5, 10, 20, 30) if i <= d["steps"]]
        peer, control = (", ".join(f"{d[k][i - 1]:.1e}" for i in at)
                         for k in ("featkd_vs_torchdistill", "torchdistill_vs_perturbed"))
        foot += (f"\n{method}, largest student weight difference after steps {', '.join(map(str, at))}: featkd vs "
                 f"torchdistill {peer}; torchdistill vs itself with its weights moved by "
                 f"N(0, {d['perturbation']:.0e}^2) {control} (`{d['command']}`).\n")
    return head + "\n".join(lines) + "\n" + foot


def write(path: Path, result: dict) -> None:
    result["rows"] = summarise(result["cells"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="kd,fitnets", help="comma-separated: kd, fitnets")
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default: the protocol's, 3)")
    parser.add_argument("--epochs", type=int, default=None, help="override train.epochs (default: the config's)")
    parser.add_argument("--smoke", action="store_true", help="digits configs, 1 epoch, 1 seed (seconds)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="default benchmarks/results/peer_torchdistill.json "
                                                    "(runs/peer_torchdistill/smoke.json with --smoke)")
    parser.add_argument("--report", action="store_true", help="print the table of an existing JSON and exit")
    parser.add_argument("--verbose", action="store_true", help="one line per epoch")
    parser.add_argument("--divergence", type=int, default=0, metavar="STEPS",
                        help="instead of training: the first STEPS steps of featkd vs torchdistill, and of "
                             "torchdistill vs itself perturbed (seed 0; stored under 'divergence' in the JSON)")
    args = parser.parse_args(argv)
    out = Path(args.out or (ROOT / "runs" / "peer_torchdistill" / "smoke.json" if args.smoke
                            else ROOT / "benchmarks" / "results" / "peer_torchdistill.json"))
    if args.report:
        result = json.loads(out.read_text())
        text = markdown(result)
        out.with_suffix(".md").write_text(text)
        print(text, end="")
        return 0
    version = _torchdistill_version()
    if version is None:
        print(f"peer_torchdistill: torchdistill is not installed; {INSTALL}", file=sys.stderr)
        return 2
    if args.smoke:
        args.epochs = args.epochs or 1
        args.seeds = args.seeds or 1
    import featkd
    from featkd.bench.timing import environment
    from featkd.config import read_yaml

    torch.set_num_threads(args.threads)
    configs = method_configs(args.smoke)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(configs))
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)} (choose from {', '.join(configs)})")
    seeds = range(args.seeds if args.seeds is not None else int(read_yaml(PROTOCOL)["seeds"]))
    command = "python benchmarks/peer_torchdistill.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result: dict[str, Any] = {"cells": {}}
    if out.exists():
        result = json.loads(out.read_text())
    result.update({"benchmark": "peer_torchdistill", "protocol": "digits (smoke)" if args.smoke else "data-limited",
                   "featkd": featkd.__version__, "torchdistill": version, "differences": DIFFERENCES})
    commit = _git_commit()  # at the start: the code this process imported
    if args.divergence:
        for method in methods:
            d = divergence(method, 0, args.divergence, args, configs)
            d.update(command=command.strip(), git_commit=commit, environment=environment())
            result.setdefault("divergence", {})[method] = d
            print(f"{method}: largest weight difference after steps 1..{args.divergence}: featkd vs torchdistill "
                  + " ".join(f"{v:.1e}" for v in d["featkd_vs_torchdistill"]) + "; torchdistill vs perturbed "
                  + " ".join(f"{v:.1e}" for v in d["torchdistill_vs_perturbed"]), flush=True)
        seeds = range(0)  # no training in this mode
    for seed in seeds:  # seed-major: a partial run covers every method
        for method in methods:
            keys = [f"{lib}/{method}/{seed}" for lib in LIBRARIES]
            if all(k in result["cells"] for k in keys):
                print(f"{method} seed {seed}: done, skipped", flush=True)
                continue
            result["command"] = command.strip()  # the command and code that trained (the latest) cells
            result["git_commit"] = commit
            cells = run_pair(method, seed, args, configs)
            for lib, cell in cells.items():
                result["cells"][f"{lib}/{method}/{seed}"] = cell
            result["environment"] = environment()
            write(out, result)
            f, t = cells["featkd"], cells["torchdistill"]
            print(f"{method} seed {seed}: test acc featkd {f['test_acc']:.2f}, torchdistill {t['test_acc']:.2f}; "
                  f"images/s featkd {f['images_per_s']:.0f}, torchdistill {t['images_per_s']:.0f} "
                  f"(ratio {t['images_per_s'] / f['images_per_s']:.3f}); first-step loss "
                  f"{f['first_step_loss']:.6f} vs {t['first_step_loss']:.6f}", flush=True)
    write(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
