"""The method-agnostic trainer: one CPU, one GPU, or many processes under ``torchrun`` (DDP).

It takes a run assembled by :func:`~featkd.engine.build.build_run` (data, task, teacher, student, the
configured :class:`~featkd.methods.base.Distiller`, captures), adds loader, optimiser and schedule, then runs::

    for epoch:  distiller.on_epoch_start
        for batch:  teacher forward (frozen, no_grad) -> student forward (captures) -> distiller losses
                    -> NaN/inf check -> backward -> clip -> optimizer & per-iteration LR step
                    -> distiller.on_step_end
        distiller.on_epoch_end -> evaluate -> checkpoint (last/best, atomic) -> metrics

There is no method- or task-specific branch here: a method's needs go through the distiller's hooks, a
task's (logits of an output, training metric, evaluation) through :class:`~featkd.tasks.Task`.
Under DDP the *student and the distiller* are wrapped together, so the distiller's own parameters
(connectors, norms) are synchronised like the student's; the teacher runs outside DDP.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from featkd.config import ExperimentConfig, dump_yaml
from featkd.engine import checkpoint as ckpt
from featkd.engine.build import build_run
from featkd.engine.distributed import gather_objects
from featkd.engine.logging import MetricsWriter, format_epoch, progress, write_json
from featkd.engine.schedule import lr_factor
from featkd.errors import ConfigError, DivergenceError, FeatkdError
from featkd.features import CapturingModel
from featkd.methods.base import Batch, Distiller, RunContext

#: config keys that may change when a run is resumed (everything else must match the checkpoint)
RESUMABLE_CHANGES = {
    "train.epochs", "train.stop_after", "train.progress", "train.tensorboard", "train.device", "train.num_threads",
    "train.eval_every", "data.num_workers", "data.data_dir", "data.eval_batch_size", "name",
}


class TrainStep(nn.Module):
    """Student capture + distiller as one module, so DDP synchronises both."""

    def __init__(self, student: CapturingModel, distiller: Distiller) -> None:
        super().__init__()
        self.student = student
        self.distiller = distiller

    def forward(
        self, x: Tensor, y: Tensor, t_logits: Tensor | None, t_feats: dict[str, Tensor], epoch: int, step: int
    ) -> tuple[dict[str, Tensor], Tensor]:
        s_out, s_feats = self.student(x)
        s_logits = self.distiller.task.logits(s_out)
        batch = Batch(inputs=x, targets=y, student_logits=s_logits, student_features=s_feats,
                      teacher_logits=t_logits, teacher_features=t_feats, epoch=epoch, step=step)
        return self.distiller(batch), s_logits


@dataclass
class RunResult:
    """What a finished run reports (also written to ``summary.json``).

    ``metric`` is the task's headline metric (``acc`` for classification, ``miou`` for segmentation);
    ``test_metric`` its final test value, ``best_metric`` the best monitored one (validation if held out).
    """

    status: str
    epochs: int
    metric: str
    test_metric: float | None
    best_metric: float | None
    teacher_test_metric: float | None
    train_seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    out_dir: Path | None = None

    def _if_acc(self, value: float | None) -> float | None:
        return value if self.metric == "acc" else None

    @property
    def test_acc(self) -> float | None:
        return self._if_acc(self.test_metric)

    @property
    def best_acc(self) -> float | None:
        return self._if_acc(self.best_metric)

    @property
    def teacher_test_acc(self) -> float | None:
        return self._if_acc(self.teacher_test_metric)

    def to_dict(self) -> dict[str, Any]:
        out = {"status": self.status, "epochs": self.epochs, "metric": self.metric,
               "test_metric": self.test_metric, "best_metric": self.best_metric,
               "teacher_test_metric": self.teacher_test_metric, "train_seconds": self.train_seconds}
        if self.metric == "acc":  # the classification keys every earlier summary.json has
            out.update(test_acc=self.test_acc, best_acc=self.best_acc, teacher_test_acc=self.teacher_test_acc)
        return out


def _config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        path = f"{prefix}{k}"
        if isinstance(a, dict) and isinstance(b, dict) and k != "method":
            keys += _config_differences(a, b, path + ".")
        elif a != b:
            keys.append(path)
    return keys


class Trainer:
    """Trains ``cfg.student`` with ``cfg.method``; see the module docstring for one step's data flow.

    Args:
        cfg: a validated experiment config.
        out_dir: where rank 0 writes checkpoints and metrics (``None``: write nothing).
        resume: continue from ``out_dir/last.pt`` exactly where it stopped.
        log: where progress lines go (rank 0 only).
    """

    def __init__(self, cfg: ExperimentConfig, out_dir: str | Path | None = None, resume: bool = False,
                 log: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        tc = cfg.train
        # ---- everything that can fail on bad input happens before anything is written -------------------
        self.out_dir = Path(out_dir) if out_dir is not None else None
        resume_state = self._check_out_dir(resume)
        self.run = run = build_run(cfg, log)
        self.log = run.log
        self.dist, self.device, self.amp, self.data, self.task = run.dist, run.device, run.amp, run.data, run.task
        self.teacher, self.student, self.distiller = run.teacher, run.student, run.distiller
        self.teacher_capture, self.student_capture = run.teacher_capture, run.student_capture
        method_cls = run.method_cls

        self.train_loader = self.data.train_loader(
            cfg.data.batch_size, seed=tc.seed, rank=self.dist.rank, world_size=self.dist.world_size,
            device=self.device, drop_last=True,
        )
        self.steps_per_epoch = len(self.train_loader)
        if self.steps_per_epoch == 0:
            raise ConfigError(f"data.batch_size: {cfg.data.batch_size} is larger than the training split "
                              f"({self.data.train_size} samples); no full batch to train on")
        self.module: nn.Module = TrainStep(self.student_capture, self.distiller)
        if tc.compile:
            self.module = torch.compile(self.module)
            if self.teacher_capture is not None:
                self.teacher_capture = torch.compile(self.teacher_capture)
        if self.dist.enabled:
            if method_cls.rank_local_buffers:
                names = [f"distiller.{b}" for b in method_cls.rank_local_buffers]
                DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.module, names)
            self.module = DistributedDataParallel(
                self.module, device_ids=[self.device] if self.device.type == "cuda" else None,
                find_unused_parameters=tc.find_unused_parameters,
            )
        params = [p for p in self.student.parameters() if p.requires_grad]
        extra = [p for p in self.distiller.parameters() if p.requires_grad]
        self.optimizer = self._make_optimizer(params, extra)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_factor(cfg.optim, tc.epochs, self.steps_per_epoch)
        )
        self.start_epoch, self.global_step = 0, 0
        self.history: list[dict[str, Any]] = []
        self.best: float | None = None
        self.resumed = resume_state is not None
        if resume_state is not None:
            self._load_state(resume_state)
        self.writer: MetricsWriter | None = None
        if self.out_dir is not None and self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(dump_yaml(cfg))
            self.writer = MetricsWriter(self.out_dir, tc.tensorboard, self.log)

    # ---- set-up helpers ---------------------------------------------------------------------------------
    def _check_out_dir(self, resume: bool) -> dict | None:
        if self.out_dir is None:
            if resume:
                raise FeatkdError("--resume needs --out DIR (the run folder holding last.pt)")
            return None
        last = self.out_dir / "last.pt"
        if resume:
            if not last.is_file():
                raise FeatkdError(f"cannot resume: {last} not found")
            state = ckpt.load_file(last)
            if not ckpt.is_training_checkpoint(state):
                raise FeatkdError(f"cannot resume: {last} is not a featkd training checkpoint")
            changed = [k for k in _config_differences(state["config"], self.cfg.to_dict())
                       if k not in RESUMABLE_CHANGES]
            if changed:
                raise ConfigError(f"cannot resume {last}: the config differs in {', '.join(changed[:5])}")
            return state
        if last.exists():
            raise FeatkdError(f"{self.out_dir} already holds a run (last.pt); pass --resume to continue it "
                              "or choose another --out")
        return None

    def _make_optimizer(self, params: list, extra: list) -> torch.optim.Optimizer:
        oc = self.cfg.optim
        groups = [{"params": params}] + ([{"params": extra}] if extra else [])
        if oc.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=oc.lr, momentum=oc.momentum, nesterov=oc.nesterov and oc.momentum > 0,
                                   weight_decay=oc.weight_decay)
        return torch.optim.AdamW(groups, lr=oc.lr, weight_decay=oc.weight_decay)

    def _load_state(self, state: dict) -> None:
        self.student.load_state_dict(state["student"])
        self.distiller.load_state_dict(state["distiller"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.start_epoch, self.global_step = int(state["epoch"]), int(state["step"])
        self.history = list(state["history"])
        self.best = state["best"]
        rng = state["rng"]
        if self.dist.rank < len(rng):
            ckpt.set_rng_state(rng[self.dist.rank])
        self.log(f"resumed from {self.out_dir / 'last.pt'} after epoch {self.start_epoch}")

    def autocast(self) -> contextlib.AbstractContextManager:
        return self.run.autocast()

    def context(self) -> RunContext:
        return self.run.context(steps_per_epoch=self.steps_per_epoch, resumed=self.resumed, out_dir=self.out_dir)

    def evaluate(self, model: nn.Module, split: str = "test") -> dict[str, Any]:
        """The task's metrics of ``model`` on a split, summed over all ranks (see :meth:`Run.evaluate`)."""
        return self.run.evaluate(model, split)

    # ---- the loop ---------------------------------------------------------------------------------------
    def fit(self) -> RunResult:
        """Run the remaining epochs; returns the final numbers (rank 0's view)."""
        cfg, tc = self.cfg, self.cfg.train
        ctx = self.context()
        teacher_acc = None
        metric = self.task.metric
        if self.teacher is not None and tc.epochs > self.start_epoch:
            teacher_acc = self.evaluate(self.teacher)[metric]
            self.log(f"teacher {cfg.teacher.model}: test_{metric} {teacher_acc:.2f}")
        self.distiller.setup(ctx)
        self.log(f"{self.data.describe()} | student {cfg.student.model} | method {cfg.method_name} | "
                 f"{self.dist.world_size} process(es) on {self.device}{' bf16' if self.amp else ''}")
        start = time.perf_counter()
        status = "finished"
        end = min(tc.epochs, tc.stop_after) if tc.stop_after else tc.epochs
        try:
            for epoch in range(self.start_epoch, end):
                self._train_epoch(epoch, ctx)
            if end < tc.epochs:
                status = "stopped"
        except DivergenceError as exc:
            status = "diverged"
            self._write_summary(status, teacher_acc, time.perf_counter() - start, str(exc))
            raise
        finally:
            if self.writer is not None:
                self.writer.close()
        train_seconds = time.perf_counter() - start + sum(
            r.get("epoch_time", 0.0) for r in self.history[: self.start_epoch])
        result = self._write_summary(status, teacher_acc, train_seconds)
        if self.out_dir is not None and self.dist.is_main:
            ckpt.atomic_save(self.student.state_dict(), self.out_dir / "student.pt")
        return result

    def _train_epoch(self, epoch: int, ctx: RunContext) -> None:
        tc = self.cfg.train
        t0 = time.perf_counter()
        self.train_loader.set_epoch(epoch)
        self.distiller.on_epoch_start(epoch, ctx)
        self.student.train()
        sums: dict[str, Tensor] = {}
        correct = torch.zeros((), device=self.device)
        seen: Tensor | int = 0
        batches = progress(self.train_loader, len(self.train_loader), f"epoch {epoch + 1}/{tc.epochs}",
                           tc.progress, self.dist.is_main)
        for x, y in batches:
            losses, s_logits = self.train_step(x, y, epoch)
            self.distiller.on_step_end(self.global_step - 1, ctx)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()
            hits, counted = self.task.train_counts(s_logits, y)
            correct += hits
            seen += counted
        self.distiller.on_epoch_end(epoch, ctx)
        record = self._epoch_record(epoch, sums, correct, seen, time.perf_counter() - t0)
        self.history.append(record)
        self._checkpoint(epoch, record)
        eval_metrics = tuple(m for m in self.task.logged_metrics if m != "loss")
        self.log(format_epoch(record, tc.epochs, self.task.train_metric, eval_metrics))

    def train_step(self, x: Tensor, y: Tensor, epoch: int) -> tuple[dict[str, Tensor], Tensor]:
        """One optimiser step on batch ``(x, y)``: forward both nets, losses, checks, backward, update.

        Returns the (weighted) loss terms and the student's logits. Distiller hooks are not called here.
        """
        step = self.global_step
        with self.autocast():
            x = self.run.prepare_input(x)
            t_logits, t_feats = None, {}
            if self.teacher_capture is not None:
                with torch.no_grad():
                    t_out, t_feats = self.teacher_capture(x)
                    t_logits = self.task.logits(t_out)
            losses, s_logits = self.module(x, y, t_logits, t_feats, epoch, step)
        total = sum(losses.values())
        self._check_finite(total, losses, epoch, step)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if self.cfg.optim.grad_clip:
            nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                     self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.global_step += 1
        return losses, s_logits

    def _check_finite(self, total: Tensor, losses: dict[str, Tensor], epoch: int, step: int) -> None:
        value = total.detach().float().reshape(1)
        if self.dist.enabled:  # every rank must stop together, or the others wait forever in all-reduce
            value = self.dist.all_reduce_sum(value.clone())
        if math.isfinite(value.item()):
            return
        bad = [k for k, v in losses.items() if not torch.isfinite(v).all()] or ["total"]
        where = f"epoch {epoch + 1}, step {step - epoch * self.steps_per_epoch + 1} (iteration {step + 1})"
        kept = ""
        if self.out_dir is not None and (self.out_dir / "last.pt").exists():
            kept = f"; the last good checkpoint {self.out_dir / 'last.pt'} (epoch {len(self.history)}) is kept"
        raise DivergenceError(f"loss term {', '.join(repr(b) for b in bad)} became "
                              f"{'nan' if math.isnan(value.item()) else 'inf'} at {where}{kept}; "
                              "lower optim.lr or the method's weights, or set optim.grad_clip")

    def _epoch_record(self, epoch: int, sums: dict[str, Tensor], correct: Tensor, seen: Tensor | int,
                      seconds: float) -> dict[str, Any]:
        keys = sorted(sums)
        stats = torch.stack([*(sums[k] for k in keys), correct.float(),
                             torch.as_tensor(seen, dtype=torch.float32, device=self.device)]).double()
        self.dist.all_reduce_sum(stats)
        steps = self.steps_per_epoch * self.dist.world_size
        record: dict[str, Any] = {"epoch": epoch + 1, "step": self.global_step,
                                  "lr": self.optimizer.param_groups[0]["lr"]}
        terms = {f"train_{k}": stats[i].item() / steps for i, k in enumerate(keys)}
        record["train_loss"] = sum(terms.values())
        record.update(terms)
        record[f"train_{self.task.train_metric}"] = 100.0 * stats[-2].item() / max(1.0, stats[-1].item())
        tc = self.cfg.train
        if (epoch + 1) % tc.eval_every == 0 or epoch + 1 in (tc.epochs, tc.stop_after):
            self._sync_student_buffers()
            for split in ("val", "test") if self.data.val_size else ("test",):
                result = self.evaluate(self.student_capture.model, split)
                record.update({f"{split}_{k}": v for k, v in result.items() if k in self.task.logged_metrics})
        record.update(self.distiller.metrics())
        record["epoch_time"] = seconds
        record["train_images_per_s"] = stats[-1].item() / max(seconds, 1e-9)
        return record

    def _sync_student_buffers(self) -> None:
        """Give every rank rank 0's BatchNorm statistics before evaluating: DDP broadcasts buffers at the
        start of each forward, so after the last step each rank holds its own batch's update, and the
        shards would be scored with different models than the one rank 0 saves."""
        if self.dist.enabled:
            for buffer in self.student.buffers():
                self.dist.broadcast(buffer, src=0)

    def _checkpoint(self, epoch: int, record: dict[str, Any]) -> None:
        rng = gather_objects(ckpt.rng_state(), self.dist)  # collective: every rank takes part
        if self.out_dir is None or not self.dist.is_main:
            return
        metric = self.task.metric
        monitor = record.get(f"val_{metric}", record.get(f"test_{metric}"))
        improved = monitor is not None and (self.best is None or monitor > self.best)
        if improved:
            self.best = monitor
        state = {
            "format": ckpt.FORMAT, "version": ckpt.VERSION, "epoch": epoch + 1, "step": self.global_step,
            "student": self.student.state_dict(), "distiller": self.distiller.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "rng": rng, "config": self.cfg.to_dict(), "history": self.history, "best": self.best,
        }
        ckpt.atomic_save(state, self.out_dir / "last.pt")
        if improved and self.cfg.train.save_best:
            ckpt.atomic_save(state, self.out_dir / "best.pt")
        if self.writer is not None:
            self.writer.write(self.history)

    def _write_summary(self, status: str, teacher_acc: float | None, seconds: float,
                       message: str = "") -> RunResult:
        last = self.history[-1] if self.history else {}
        metric = self.task.metric
        result = RunResult(status=status, epochs=len(self.history), metric=metric,
                           test_metric=last.get(f"test_{metric}"), best_metric=self.best,
                           teacher_test_metric=teacher_acc, train_seconds=seconds,
                           history=self.history, out_dir=self.out_dir)
        if self.out_dir is not None and self.dist.is_main:
            summary = {**result.to_dict(), "method": self.cfg.method_name, "student": self.cfg.student.model,
                       "teacher": self.cfg.teacher.model if self.cfg.teacher else None,
                       "dataset": self.cfg.data.dataset, "seed": self.cfg.train.seed,
                       "world_size": self.dist.world_size}
            if message:
                summary["message"] = message
            write_json(self.out_dir / "summary.json", summary)
        return result


def train(cfg: ExperimentConfig, out_dir: str | Path | None = None, resume: bool = False,
          log: Callable[[str], None] = print) -> RunResult:
    """Build a :class:`Trainer` for ``cfg`` and run it; the library's one-call entry point."""
    return Trainer(cfg, out_dir, resume=resume, log=log).fit()
