"""The method-agnostic trainer: one CPU, one GPU, or many processes under ``torchrun`` (DDP).

It takes a run assembled by :func:`~featkd.engine.build.build_run` (data, task, teacher, student, the
configured :class:`~featkd.methods.base.Distiller`, captures), adds loader, optimiser and schedule, then runs::

    for epoch:  distiller.on_epoch_start
        for batch:  teacher forward (frozen, no_grad; or read from train.teacher_cache)
                    -> student forward (captures) -> distiller losses -> NaN/inf check -> backward
                    (/ N, scaled under fp16; every train.accumulate = N micro-batches, DDP's all-reduce on the last:)
                    -> unscale -> clip -> optimizer & per-step LR step
                    -> distiller.on_step_end
        distiller.on_epoch_end -> [last.pt, pending_eval] -> evaluate -> checkpoint (last/best, atomic) -> metrics

With ``train.amp: fp16`` the backward runs on the loss scaled by a ``torch.amp.GradScaler`` (unscaled before
clipping; a step whose gradients overflowed is skipped and the scale lowered); the scaler's state is in every
checkpoint, so a resumed run scales as the uninterrupted one. With ``train.accumulate: N`` an epoch's
``len(loader)`` micro-batches make ``ceil(len / N)`` optimiser steps (the last group may be shorter: its losses
are divided by its own size); mid-epoch checkpoints and stops fall on optimiser steps.

There is no method- or task-specific branch here: a method's needs go through the distiller's hooks, a
task's (logits of an output, training metric, evaluation) through :class:`~featkd.tasks.Task`.
Under DDP the *student and the distiller* are wrapped together, so the distiller's own parameters
(connectors, norms) are synchronised like the student's; the teacher runs outside DDP.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from featkd.config import ExperimentConfig, dump_yaml, optimizer_class
from featkd.distributed import gather_objects
from featkd.engine import checkpoint as ckpt
from featkd.engine import runfolder
from featkd.engine.build import build_run
from featkd.engine.logging import MetricsWriter, StepLines, bars_shown, format_epoch, progress, require_wandb
from featkd.engine.schedule import WARMUP_FIT, fitted_warmup, lr_factor
from featkd.engine.step import TrainStep, teacher_outputs
from featkd.engine.teacher_cache import open_teacher_cache
from featkd.engine.teacher_eval import teacher_test_metrics
from featkd.errors import ConfigError, DivergenceError, FeatkdError
from featkd.files import atomic_write_json
from featkd.methods.base import RunContext

#: signals that stop a run cleanly (SLURM sends SIGUSR1 before its kill when asked to, schedulers SIGTERM):
#: the step in progress finishes, a mid-epoch last.pt is written, one line is printed, and ``featkd train``
#: exits with 128 + the signal's number (143 for SIGTERM, 138 for SIGUSR1), as if killed by it
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1) if hasattr(signal, "SIGUSR1") else (signal.SIGTERM,)


class _Preempted(Exception):
    """Raised inside the loop once every rank agreed to stop at a step boundary (not a user error)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


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
    stop_signal: int | None = None  # status "preempted": the signal that stopped the run

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


def _warn(message: str) -> None:
    print(f"featkd: warning: {message}", file=sys.stderr, flush=True)


class Trainer:
    """Trains ``cfg.student`` with ``cfg.method``; see the module docstring for one step's data flow.

    Args:
        cfg: a validated experiment config.
        out_dir: where rank 0 writes checkpoints and metrics (``None``: write nothing).
        resume: continue from ``out_dir/last.pt`` exactly where it stopped (``last.prev.pt`` if ``last.pt`` is
            unreadable); ``"auto"``: the same when the folder holds a checkpoint, else start fresh.
        log: where progress lines go (rank 0 only).
    """

    def __init__(self, cfg: ExperimentConfig, out_dir: str | Path | None = None, resume: bool | str = False,
                 log: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        tc = cfg.train
        # ---- everything that can fail on bad input happens before anything is written -------------------
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self._lock = runfolder.RunLock(self.out_dir) if self.out_dir is not None else None
        self._resumed_from: Path | None = None
        self._rotate = True  # keep the previous last.pt as last.prev.pt (not when last.pt was found corrupt)
        self._partial: dict[str, Any] | None = None  # where a mid-epoch checkpoint stopped
        self._pending_eval = False  # resumed from a checkpoint written before its epoch's evaluation
        self._saved_at: str | None = None  # where the folder's last.pt stands (for error messages)
        self._stop_signal = 0  # set by a stop signal's handler (this rank)
        self._stop_agreed = False  # some rank got one: all-reduced with the finite check of every step
        main = os.environ.get("RANK", "0") == "0"  # no process group yet; rank 0 alone locks and warns
        found = runfolder.check_run_folder(self.out_dir, resume, cfg.to_dict(), self._lock if main else None,
                                           _warn if main else lambda _m: None)
        resume_state = None
        if found is not None:
            resume_state, self._resumed_from = found.state, found.path
            self._rotate, self._saved_at = found.rotate, found.saved_at
        self.run = run = build_run(cfg, log)
        self.log = run.log
        if tc.wandb is not None and self.out_dir is not None and run.dist.is_main:
            require_wandb()  # a missing package: one line, before the run folder is created
        self.dist, self.device, self.amp, self.data, self.task = run.dist, run.device, run.amp, run.data, run.task
        self.teacher, self.student, self.distiller = run.teacher, run.student, run.distiller
        self.teacher_capture, self.student_capture = run.teacher_capture, run.student_capture
        method_cls = run.method_cls

        self.train_loader = self.data.train_loader(
            cfg.data.batch_size, seed=tc.seed, rank=self.dist.rank, world_size=self.dist.world_size,
            device=self.device, drop_last=True,
        )
        self.batches_per_epoch = len(self.train_loader)  # forwards (micro-batches) per epoch
        if self.batches_per_epoch == 0:
            raise ConfigError(f"data.batch_size: {cfg.data.batch_size} is larger than the training split "
                              f"({self.data.train_size} samples); no full batch to train on")
        self.accumulate = tc.accumulate
        # optimiser steps per epoch: one per `accumulate` micro-batches, a shorter group last when they do not divide
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / self.accumulate)
        # a pass-through when off; it keeps one entry per forward
        self.teacher_cache = open_teacher_cache(run, self.batches_per_epoch, self.train_loader)
        self.module: nn.Module = TrainStep(self.student_capture, self.distiller)
        if tc.compile:
            self.module = torch.compile(self.module)
            if self.teacher_capture is not None:
                self.teacher_capture = torch.compile(self.teacher_capture)
        if self.dist.enabled:
            if method_cls.rank_local_buffers or method_cls.self_synced_buffers:
                names = [f"distiller.{b}" for b in (*method_cls.rank_local_buffers, *method_cls.self_synced_buffers)]
                DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.module, names)
            # a run without labels never uses the student's classifier head: DDP must not wait for its gradients
            unused = tc.find_unused_parameters or not getattr(self.task, "labelled", True)
            self.module = DistributedDataParallel(
                self.module, device_ids=[self.device] if self.device.type == "cuda" else None,
                find_unused_parameters=unused,
            )
        params = [p for p in self.student.parameters() if p.requires_grad]
        extra = [p for p in self.distiller.parameters() if p.requires_grad]
        self.optimizer = self._make_optimizer(params, extra)
        # fp16: the loss scaled against gradient underflow; a disabled scaler passes everything through
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=run.amp_dtype == torch.float16)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_factor(cfg.optim, tc.epochs, self.steps_per_epoch)
        )
        if self.dist.is_main:
            self._warn_short_warmups()
        self.start_epoch, self.global_step = 0, 0
        self.history: list[dict[str, Any]] = []
        self.best: float | None = None
        self.resumed = resume_state is not None
        if resume_state is not None:
            self._load_state(resume_state)
        self.writer: MetricsWriter | None = None
        if self.out_dir is not None and self.dist.is_main:
            self._lock.acquire(self.log)  # creates the folder; refuses if a live run took it meanwhile
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(dump_yaml(cfg))
            self.writer = MetricsWriter(self.out_dir, tc.tensorboard, self.log, wandb=tc.wandb, config=cfg.to_dict())

    # ---- set-up helpers ---------------------------------------------------------------------------------
    def _warn_short_warmups(self) -> None:
        """One warning line for each warm-up the run is too short for: the learning rate's (the schedule shortens
        it, :func:`~featkd.engine.schedule.fitted_warmup`) and a method's weight ramp (its ``warmup_note``)."""
        oc, epochs = self.cfg.optim, self.cfg.train.epochs
        used = fitted_warmup(oc, epochs)
        if used != oc.warmup_epochs:
            _warn(f"optim.warmup_epochs: {oc.warmup_epochs:g} is not shorter than the run ({epochs} epochs); "
                  f"warming up for {used:g} epochs instead ({WARMUP_FIT:.0%} of the run)")
        note = self.distiller.warmup_note(epochs)
        if note:
            _warn(note)

    def _make_optimizer(self, params: list, extra: list) -> torch.optim.Optimizer:
        """``optim.optimizer`` (any torch.optim class) over the student's and the distiller's parameters; values
        it refuses (betas out of range, parameters it cannot take) are one line."""
        oc = self.cfg.optim
        groups = [{"params": params}] + ([{"params": extra}] if extra else [])
        cls = optimizer_class(oc.optimizer)
        try:
            return cls(groups, **oc.optimizer_kwargs())
        except (ValueError, TypeError, RuntimeError) as exc:
            raise ConfigError(f"optim: {cls.__name__} refused its arguments ({' '.join(str(exc).split())})") from None

    def _load_state(self, state: dict) -> None:
        self.student.load_state_dict(state["student"])
        self.distiller.load_state_dict(state["distiller"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler.is_enabled() and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.start_epoch, self.global_step = int(state["epoch"]), int(state["step"])
        self.history = list(state["history"])
        self.best = state["best"]
        # written before the last epoch's evaluation, which did not finish: fit() evaluates that epoch first
        self._pending_eval = bool(state.get("pending_eval"))
        rng = state["rng"]
        if self.dist.rank < len(rng):
            ckpt.set_rng_state(rng[self.dist.rank])
        batch = int(state.get("batch", 0))
        if batch:  # a mid-epoch checkpoint: this rank's sums of the epoch so far and its rank-local buffers
            partial = state["partial"]
            if len(partial) != self.dist.world_size:
                raise FeatkdError(f"{self._resumed_from} was written mid-epoch by {len(partial)} process(es); "
                                  f"resume it with {len(partial)} (this run has {self.dist.world_size})")
            self._partial = {"epoch": self.start_epoch, "batch": batch, **partial[self.dist.rank]}
            for name, value in self._partial["rank_local"].items():
                self.distiller.get_buffer(name).copy_(value)
        where = f"at step {batch}/{self.batches_per_epoch} of epoch {self.start_epoch + 1}" if batch else \
            f"after epoch {self.start_epoch}"
        self.log(f"resumed from {self._resumed_from} {where}")

    def autocast(self) -> contextlib.AbstractContextManager:
        return self.run.autocast()

    def context(self) -> RunContext:
        return self.run.context(steps_per_epoch=self.steps_per_epoch, resumed=self.resumed, out_dir=self.out_dir)

    def evaluate(self, model: nn.Module, split: str = "test") -> dict[str, Any]:
        """The task's metrics of ``model`` on a split, summed over all ranks (see :meth:`Run.evaluate`)."""
        return self.run.evaluate(model, split)

    # ---- the loop ---------------------------------------------------------------------------------------
    def fit(self) -> RunResult:
        """Run the remaining epochs; returns the final numbers (rank 0's view).

        A stop signal (:data:`STOP_SIGNALS`) ends the run after the step in progress with a mid-epoch
        ``last.pt`` and status ``preempted``; the run folder's lock is released however the run ends.
        """
        handlers = self._install_stop_handlers()
        try:
            return self._fit()
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            if self._lock is not None:
                self._lock.release()

    def _install_stop_handlers(self) -> dict[int, Any]:
        """Stop signals set a flag that the loop reads at the next step. Repeats change nothing: under torchrun a
        worker often gets the scheduler's SIGTERM and then the agent's, and must still write its checkpoint
        (the agent waits 30 s before SIGKILL)."""
        if threading.current_thread() is not threading.main_thread():
            return {}  # signals reach the main thread only; a run in another thread is not preemptible

        def handler(signum: int, _frame: Any) -> None:
            self._stop_signal = self._stop_signal or signum

        return {s: signal.signal(s, handler) for s in STOP_SIGNALS}

    def _fit(self) -> RunResult:
        cfg, tc = self.cfg, self.cfg.train
        ctx = self.context()
        teacher_acc = None
        metric = self.task.metric
        end = min(tc.epochs, tc.stop_after) if tc.stop_after else tc.epochs
        if self.teacher is not None:  # once per teacher and evaluation data (train.teacher_eval), not every start
            teacher_metrics, cached = teacher_test_metrics(
                self.run, tc.teacher_eval, self.out_dir, lambda: self.evaluate(self.teacher),
                lookup_only=end <= self.start_epoch)  # nothing to train: a remembered number or none
            teacher_acc = teacher_metrics.get(metric) if teacher_metrics is not None else None
            if teacher_acc is not None:
                self.log(f"teacher {cfg.teacher_label}: test_{metric} {teacher_acc:.2f}{' (cached)' if cached else ''}")
        if tc.stop_after and end <= self.start_epoch < tc.epochs:
            self.log(f"train.stop_after={tc.stop_after}: {self.start_epoch} epochs are done already; nothing to train "
                     f"(leave it out to go on to train.epochs={tc.epochs})")
        self.distiller.setup(ctx)
        self.log(f"{self.data.describe()} | student {cfg.student.model} | method {cfg.method_name} | "
                 f"{self.dist.world_size} process(es) on {self.device}{f' {self.run.amp_name}' if self.amp else ''}")
        start = time.perf_counter()
        status = "finished"
        stop_signal = None
        # off a terminal (no bars): a line every train.log_every_s seconds inside each epoch
        every = tc.log_every_s if self.dist.is_main and not bars_shown(tc.progress, True) else 0.0
        self._step_lines = StepLines(every, self.log, epochs=tc.epochs, end=end, steps=self.batches_per_epoch,
                                     batch_size=cfg.data.batch_size)
        try:
            if self._pending_eval:
                self._pending_eval = False
                self.log(f"evaluating epoch {self.start_epoch}, trained before the run stopped")
                self._finish_epoch(self.start_epoch - 1, self.history.pop())
            for epoch in range(self.start_epoch, end):
                self._train_epoch(epoch, ctx)
                if self._stop_agreed and epoch + 1 < end:  # asked during the epoch's last step or after it
                    self._stop(epoch + 1, 0)
            if end < tc.epochs:
                status = "stopped"
        except _Preempted as exc:
            status, stop_signal = "preempted", exc.signum
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
        result.stop_signal = stop_signal
        if self.out_dir is not None and self.dist.is_main and stop_signal is None:
            self._save(ckpt.atomic_save, self.student.state_dict(), self.out_dir / "student.pt")
        return result

    def _train_epoch(self, epoch: int, ctx: RunContext) -> None:
        tc = self.cfg.train
        t0 = time.perf_counter()
        self.train_loader.set_epoch(epoch)
        partial, self._partial = self._partial, None  # set when resuming a mid-epoch checkpoint
        if partial is None:  # else the hook ran before that checkpoint (its effects are in the distiller state)
            self.distiller.on_epoch_start(epoch, ctx)
        self.student.train()
        sums: dict[str, Tensor] = {}
        correct = torch.zeros((), device=self.device)
        seen: Tensor | int = 0
        first = 0
        if partial is not None:
            first, sums, correct, seen, t0 = self._restore_partial(partial, t0)
        self.teacher_cache.begin_epoch(epoch, first)
        self._step_lines.start(epoch, first)
        # a mid-epoch resume replays the epoch's order and augmentation from its batch `first` on
        batches = progress(itertools.islice(self.train_loader, first, None), len(self.train_loader) - first,
                           f"epoch {epoch + 1}/{tc.epochs}", tc.progress, self.dist.is_main)
        needs_indices = self.run.method_cls.needs_indices
        for done, (x, y) in enumerate(batches, start=first + 1):
            indices = getattr(self.train_loader, "batch_indices", None) if needs_indices else None
            losses, s_logits = self.train_step(x, y, epoch, indices, batch=done - 1)
            micro, size = self._group(done - 1)
            if micro == size - 1:  # an optimiser step
                self.distiller.on_step_end(self.global_step - 1, ctx)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()
            counts = self.task.train_counts(s_logits, y)
            if counts is not None:  # a task without a training metric (detection) returns None
                correct += counts[0]
                seen += counts[1]
            self._step_lines.after(done, lambda: float(sum(sums.values())))  # this rank's sums so far
            if micro == size - 1:
                self._step_boundary(epoch, done, sums, correct, seen, t0)  # stop signal, checkpoint_every_steps
        self.teacher_cache.end_epoch(epoch)
        self.distiller.on_epoch_end(epoch, ctx)
        self._finish_epoch(epoch, self._epoch_record(epoch, sums, correct, seen, time.perf_counter() - t0))

    def _finish_epoch(self, epoch: int, record: dict[str, Any]) -> None:
        """Evaluate ``epoch``'s student when due, then checkpoint and log the epoch.

        Before an evaluation, ``last.pt`` takes the epoch's training (marked ``pending_eval``): a bad file that
        the evaluation meets stops the run without losing the epoch, and ``--resume`` evaluates it first."""
        tc = self.cfg.train
        if (epoch + 1) % tc.eval_every == 0 or epoch + 1 in (tc.epochs, tc.stop_after):
            self._checkpoint_before_eval(epoch, record)
            try:
                self._evaluate_into(record)
            except FeatkdError as exc:  # a bad evaluation file: say what is kept, in the same one line
                if self._saved_at is None:
                    raise
                raise type(exc)(f"{exc}; {self.out_dir / runfolder.LAST} ({self._saved_at}) keeps the epoch's "
                                "training, continue with --resume") from None
        self._write_skipped()  # after the epoch's evaluation: the files its loaders skipped too
        self.history.append(record)
        self._checkpoint(epoch, record)
        eval_metrics = tuple(m for m in self.task.logged_metrics if m != "loss")
        self.log(format_epoch(record, tc.epochs, self.task.train_metric, eval_metrics))

    def _write_skipped(self) -> None:
        """Append the bad files every rank's loaders skipped since the last call (``data.bad_files: skip``)
        to the run folder's skipped-files list; every rank calls it (the lists are gathered)."""
        mine = [*getattr(self.train_loader, "skipped", ()), *self.run.skipped_files]
        self.run.skipped_files.clear()
        if hasattr(self.train_loader, "skipped"):
            self.train_loader.skipped.clear()
        lines = [line for part in gather_objects(mine, self.dist) for line in part]
        if lines and self.out_dir is not None and self.dist.is_main:
            runfolder.append_skipped(self.out_dir, lines, self.log)

    def _group(self, batch: int) -> tuple[int, int]:
        """``(place, size)`` of the epoch's micro-batch ``batch`` (0-based) in its group of ``train.accumulate``
        (the epoch's last group holds what is left)."""
        start = batch - batch % self.accumulate
        return batch - start, min(self.accumulate, self.batches_per_epoch - start)

    def train_step(self, x: Tensor, y: Any, epoch: int, indices: Tensor | None = None, batch: int | None = None
                   ) -> tuple[dict[str, Tensor], Any]:
        """Forward both nets on batch ``(x, y)`` (``indices``: its training-split indices, for methods that need
        them), losses, checks, backward; then, on the last micro-batch of a ``train.accumulate`` group, the update.

        ``batch``: its index in the epoch (the loop's); None: one optimiser step on this batch alone (benchmarks).
        Returns the (weighted, undivided) loss terms and the student's logits. Distiller hooks are not called here.
        """
        step = self.global_step
        micro, size = (0, 1) if batch is None else self._group(batch)
        # the forward's index: the optimiser step without accumulation, else the micro-batch (Batch.step)
        forward = step if batch is None else epoch * self.batches_per_epoch + batch
        last = micro == size - 1
        with contextlib.ExitStack() as stack:
            if self.dist.enabled and not last:  # DDP all-reduces the group's summed gradients once, on its last
                stack.enter_context(self.module.no_sync())
            with self.autocast():
                x = self.run.prepare_input(x)
                t_logits, t_feats = None, {}
                if self.teacher_capture is not None:
                    t_logits, t_feats = self.teacher_cache.outputs(  # read from train.teacher_cache, or run
                        epoch, step - epoch * self.steps_per_epoch if batch is None else batch, x,
                        lambda: teacher_outputs(self.task, self.teacher_capture, x))
                losses, s_logits = self.module(x, y, t_logits, t_feats, epoch, forward, indices)
            total = sum(losses.values())
            self._check_finite(total, losses, epoch, step)
            if micro == 0:
                self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(total / size if size > 1 else total).backward()
        if not last:
            return losses, s_logits
        if self.cfg.optim.grad_clip:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients (nothing to do without fp16)
            nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                     self.cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)  # skipped when fp16 gradients overflowed (then the scale is lowered)
        self.scaler.update()
        with warnings.catch_warnings():  # a skipped first fp16 step makes torch warn about the order; it is meant
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step\\(\\)` before")
            self.scheduler.step()
        self.global_step += 1
        return losses, s_logits

    def _check_finite(self, total: Tensor, losses: dict[str, Tensor], epoch: int, step: int) -> None:
        # [loss, stop signal] in one all-reduce: every rank must stop together (on a NaN, or when any rank got a
        # stop signal), or the others wait forever in the next collective
        value = torch.stack([total.detach().float().reshape(()),
                             torch.tensor(float(self._stop_signal), device=total.device)])
        if self.dist.enabled:
            value = self.dist.all_reduce_sum(value)
        loss, stop = value.tolist()
        self._stop_agreed = stop > 0
        value = value[:1]
        if math.isfinite(loss):
            return
        bad = [k for k, v in losses.items() if not torch.isfinite(v).all()] or ["total"]
        where = f"epoch {epoch + 1}, step {step - epoch * self.steps_per_epoch + 1} (iteration {step + 1})"
        kept = ""
        if self.out_dir is not None and (self.out_dir / "last.pt").exists():
            kept = f"; the last good checkpoint {self.out_dir / 'last.pt'} ({self._saved_at}) is kept"
        raise DivergenceError(f"loss term {', '.join(repr(b) for b in bad)} became "
                              f"{'nan' if math.isnan(value.item()) else 'inf'} at {where}{kept}; "
                              "lower optim.lr or the method's weights, or set optim.grad_clip")

    def _epoch_record(self, epoch: int, sums: dict[str, Tensor], correct: Tensor, seen: Tensor | int,
                      seconds: float) -> dict[str, Any]:
        keys = sorted(sums)
        stats = torch.stack([*(sums[k] for k in keys), correct.float(),
                             torch.as_tensor(seen, dtype=torch.float32, device=self.device)]).double()
        self.dist.all_reduce_sum(stats)
        steps = self.batches_per_epoch * self.dist.world_size  # the terms are means over forwards
        record: dict[str, Any] = {"epoch": epoch + 1, "step": self.global_step,
                                  "lr": self.optimizer.param_groups[0]["lr"]}
        terms = {f"train_{k}": stats[i].item() / steps for i, k in enumerate(keys)}
        record["train_loss"] = sum(terms.values())
        record.update(terms)
        if self.task.train_metric is not None:
            record[f"train_{self.task.train_metric}"] = 100.0 * stats[-2].item() / max(1.0, stats[-1].item())
        record.update(self.distiller.metrics())
        record["epoch_time"] = seconds
        # every step takes one full global batch (drop_last); counted this way for every task (not metric counts)
        record["train_images_per_s"] = self.batches_per_epoch * self.cfg.data.batch_size / max(seconds, 1e-9)
        return record

    def _evaluate_into(self, record: dict[str, Any]) -> None:
        """Add the student's evaluation metrics (val and test, or test) and the method's own to ``record``."""
        self._sync_student_buffers()
        for split in ("val", "test") if self.data.val_size else ("test",):
            result = self.evaluate(self.student_capture.model, split)
            record.update({f"{split}_{k}": v for k, v in result.items() if k in self.task.logged_metrics})
        record.update(self.distiller.eval_metrics(self.context()))  # the method's own numbers, if any

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
        state = self._state(epoch + 1, rng)
        self._save_last(state)
        if improved and self.cfg.train.save_best:
            self._save(runfolder.save_checkpoint, state, self.out_dir / "best.pt")
        if self.writer is not None:
            self.writer.write(self.history)

    def _checkpoint_before_eval(self, epoch: int, record: dict[str, Any]) -> None:
        """``last.pt`` after ``epoch``'s training, its record not yet evaluated (collective: every rank takes
        part); ``best.pt`` and the metrics files wait for the evaluation."""
        rng = gather_objects(ckpt.rng_state(), self.dist)
        if self.out_dir is None or not self.dist.is_main:
            return
        state = self._state(epoch + 1, rng)
        state.update(history=[*self.history, record], pending_eval=True)
        self._save_last(state)

    def _state(self, epochs_done: int, rng: list) -> dict[str, Any]:
        return {
            "format": ckpt.FORMAT, "version": ckpt.VERSION, "epoch": epochs_done, "step": self.global_step,
            "batch": 0, "student": self.student.state_dict(), "distiller": self.distiller.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),  # {} unless fp16
            "rng": rng, "config": self.cfg.to_dict(), "history": self.history, "best": self.best,
        }

    def _save_last(self, state: dict[str, Any]) -> None:
        """``last.pt`` with checksum; the one it replaces becomes ``last.prev.pt`` (see :mod:`runfolder`)."""
        self._save(runfolder.save_checkpoint, state, self.out_dir / runfolder.LAST, keep_previous=self._rotate)
        self._rotate = True
        self._saved_at = runfolder.describe(state)

    def _save(self, save: Callable[..., None], obj: Any, path: Path, **kw: Any) -> None:
        """``save(obj, path)``; a write that fails (no space, a file-size limit) is one line naming what is kept."""
        try:
            save(obj, path, **kw)
        except OSError as exc:
            last = self.out_dir / runfolder.LAST
            kept = (f"{last} ({self._saved_at}) and the metrics are kept, continue with --resume"
                    if self._saved_at else "no checkpoint was written")
            raise FeatkdError(f"cannot write {path} ({exc.strerror or exc}); {kept}") from None

    # ---- mid-epoch checkpoints and stops ---------------------------------------------------------------
    def _step_boundary(self, epoch: int, done: int, sums: dict[str, Tensor], correct: Tensor,
                       seen: Tensor | int, t0: float) -> None:
        """After step ``done`` (1-based) of ``epoch``: a mid-epoch checkpoint when due (every
        ``train.checkpoint_every_steps`` steps, or a stop signal that every rank now knows of), then the stop.
        The epoch's last step is left to the epoch's own checkpoint (the stop follows it, in :meth:`fit`)."""
        if done >= self.batches_per_epoch:
            return
        every = self.cfg.train.checkpoint_every_steps
        if self._stop_agreed or (every > 0 and self.global_step % every == 0):
            self._checkpoint_mid_epoch(epoch, done, sums, correct, seen, time.perf_counter() - t0)
        if self._stop_agreed:
            self._stop(epoch, done)

    def _checkpoint_mid_epoch(self, epoch: int, done: int, sums: dict[str, Tensor], correct: Tensor,
                              seen: Tensor | int, seconds: float) -> None:
        """``last.pt`` after ``done`` steps of ``epoch``: the usual state plus, per rank, the epoch's sums so far,
        its elapsed time and the method's rank-local buffers (collectives: every rank takes part)."""
        local = {
            "sums": {k: v.detach().cpu() for k, v in sums.items()}, "correct": correct.detach().cpu(),
            "seen": seen.detach().cpu() if isinstance(seen, Tensor) else seen, "seconds": seconds,
            "rank_local": {b: self.distiller.get_buffer(b).detach().cpu()
                           for b in self.run.method_cls.rank_local_buffers},
        }
        partial = gather_objects(local, self.dist)
        rng = gather_objects(ckpt.rng_state(), self.dist)
        if self.out_dir is None or not self.dist.is_main:
            return
        state = self._state(epoch, rng)
        state.update(batch=done, partial=partial)
        self._save_last(state)

    def _restore_partial(self, partial: dict[str, Any], t0: float) -> tuple[int, dict[str, Tensor], Tensor,
                                                                           Tensor | int, float]:
        """The epoch accumulators of a mid-epoch checkpoint: (steps done, sums, correct, seen, shifted t0)."""
        seen = partial["seen"]
        return (int(partial["batch"]), {k: v.to(self.device) for k, v in partial["sums"].items()},
                partial["correct"].to(self.device), seen.to(self.device) if isinstance(seen, Tensor) else seen,
                t0 - float(partial["seconds"]))

    def _stop(self, epochs_done: int, batch: int) -> None:
        """Say where the run stopped and leave the loop (every rank reaches this at the same step)."""
        signum = self._stop_signal or int(signal.SIGTERM)  # a rank without a signal of its own follows the others
        where = (f"at step {batch}/{self.batches_per_epoch} of epoch {epochs_done + 1}" if batch
                 else f"after epoch {epochs_done}")
        saved = f"; {self.out_dir / runfolder.LAST} holds it, continue with --resume" if self.out_dir else ""
        self.log(f"stopped by {signal.Signals(signum).name} {where} (iteration {self.global_step}){saved}")
        raise _Preempted(signum)

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
                       "teacher": self.cfg.teacher_label,
                       "dataset": self.cfg.data.dataset, "seed": self.cfg.train.seed,
                       "world_size": self.dist.world_size}
            if message:
                summary["message"] = message
            if self.teacher_cache.summary() is not None:
                summary["teacher_cache"] = self.teacher_cache.summary()  # rank 0's reads and teacher steps
            atomic_write_json(self.out_dir / "summary.json", summary, indent=2)
        return result


def train(cfg: ExperimentConfig, out_dir: str | Path | None = None, resume: bool = False,
          log: Callable[[str], None] = print) -> RunResult:
    """Build a :class:`Trainer` for ``cfg`` and run it; the library's one-call entry point."""
    return Trainer(cfg, out_dir, resume=resume, log=log).fit()
