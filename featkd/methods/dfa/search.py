"""DFA stage 1: the differentiable search of the teacher's feature aggregation weights (Guan et al. 2020).

For every layer group i the teacher's candidates T_i^1..T_i^N (block outputs of one shape) are mixed into
``A_i = sum_j alpha_i^j T_i^j`` with ``alpha_i = softmax(beta_i)``. beta is found DARTS-style by
alternating first-order updates on two disjoint, seeded parts of the TRAINING split (never the test set):

* weight step (the "weight" part): the search's own copy of the student and its connectors minimise
  ``ce_weight * CE(student(x), y) + bridge loss`` with alpha held fixed;
* architecture step (the "held-out" part): beta minimises the bridge loss (+ optional entropy regulariser)
  with every other tensor fixed; the student's parameters AND buffers (BatchNorm statistics) are restored
  bit for bit afterwards, so only beta changes.

The bridge loss of group i is ``gamma_ts * L_TS + gamma_st * L_ST``:

* L_TS (teacher -> student, expressivity): ``A_i`` -> 1x1 conv (C_t -> C_s) -> injected as the input of
  the student's group i+1 (:class:`featkd.capture.graph_tail.GraphTail` from the student's group-i output); the
  rest of the student runs; cross-entropy with the label. For the last group this is the student's
  pooling and classifier (spec: *unverified*).
* L_ST (student -> teacher, learnability): the student's group-i output -> 1x1 conv (C_s -> C_t) ->
  mean squared error to ``A_i`` (``st_normalize``: divided by ``mean(A_i^2)``, ours, off by default: the
  plain L2 also rewards aggregations of small magnitude, and block outputs grow with depth in a stage).

Schedule: ``group`` (the paper: group by group, the other groups' beta fixed; ``epochs`` epochs each) or
``joint`` (all groups' bridge losses summed, every beta updated together, ``epochs`` epochs in all).
``order: 2`` uses DARTS's second-order (unrolled, finite-difference) architecture gradient instead.

What is the paper's and what is ours (the paper's text was not available; see ``docs/methods/dfa.md``):
softmax over beta, beta initialised to 0, the bridge loss with its two paths, the held-out split of the
training set and the group-by-group schedule are the paper's (second-hand). gamma 1/1, first-order
updates, the entropy regulariser, the weight-step loss (CE + bridge), the optimisers and their settings
are *unverified* choices: options, with defaults documented field by field.

Images of the search split use the eval transform (no augmentation), as ``train_eval_loader`` does.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from featkd.capture.capture import CapturingModel
from featkd.capture.graph_tail import GraphTail
from featkd.errors import ConfigError, FeatkdError
from featkd.files import atomic_write_text
from featkd.methods.common import conv1x1_connector, resize_like
from featkd.plotting import require_pyplot

ALPHA_FORMAT = "featkd-dfa-alpha"
ALPHA_VERSION = 1


@dataclass
class DFASearchConfig:
    """Options of the search stage (``method.search`` in a config). Sources in brackets."""

    epochs: int = 4  # epochs per group (schedule group) or in all (joint) [ours: keeps the search <= stage 2]
    schedule: Literal["group", "joint"] = "group"  # [paper: group by group, other groups fixed]
    held_out_fraction: float = 0.5  # part of the training split for the beta updates [DARTS: 50/50]
    batch_size: int = 64  # per step, weight and held-out batches alike [ours: the protocol's batch]
    seed: int | None = None  # split, shuffling and connector init; None = train.seed [ours]
    gamma_ts: float = 1.0  # weight of the teacher-to-student CE path [spec: unverified, 1]
    gamma_st: float = 1.0  # weight of the student-to-teacher L2 path [spec: unverified, 1]
    st_normalize: bool = False  # L_ST / mean(A_i^2): no pull towards low-energy (shallow) blocks [ours]
    ce_weight: float = 1.0  # student's own CE in the weight step, besides the bridge loss [ours]
    order: Literal[1, 2] = 1  # 1: first-order alternating updates; 2: DARTS unrolled [spec: 1, unverified]
    beta_lr: float = 0.05  # Adam on beta [ours; DARTS uses 3e-4 over ~20k steps, we take ~100s of steps]
    beta_betas: tuple[float, float] = (0.5, 0.999)  # Adam betas for beta [DARTS]
    beta_weight_decay: float = 1e-3  # on beta [DARTS]
    entropy_weight: float = 0.0  # regulariser R(beta) = w * entropy(alpha); 0 = off [spec: form unknown]
    lr: float = 0.05  # SGD on the search student + connectors, cosine to 0 in each stage [ours ~ DARTS]
    momentum: float = 0.9  # [DARTS]
    weight_decay: float = 5e-4  # [ours: the protocol's; DARTS 3e-4]
    connector: Literal["conv1x1", "conv1x1-bn"] = "conv1x1"  # both bridge connectors [spec: 1x1 conv]

    def validate(self, path: str = "search") -> None:
        if self.epochs < 0:
            raise ConfigError(f"{path}.epochs: must be >= 0, got {self.epochs}")
        if not 0.0 < self.held_out_fraction < 1.0:
            raise ConfigError(f"{path}.held_out_fraction: must be in (0, 1), got {self.held_out_fraction}")
        if self.batch_size < 2:
            raise ConfigError(f"{path}.batch_size: must be >= 2 (BatchNorm), got {self.batch_size}")
        for name in ("gamma_ts", "gamma_st", "ce_weight", "beta_lr", "lr", "entropy_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{path}.{name}: must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class GroupPair:
    """One matched layer group: the student's group output and the teacher's candidates (one shape)."""

    student_point: str
    teacher_candidates: tuple[str, ...]
    student_shape: tuple[int, ...]  # (C_s, H, W)
    teacher_shape: tuple[int, ...]  # (C_t, H', W')


@dataclass
class SearchResult:
    """Searched ``alphas``/``betas`` (one float32 vector per group), per-epoch ``history``, wall ``seconds``."""

    alphas: list[Tensor]
    betas: list[Tensor]
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------------------
# small pure pieces
# ---------------------------------------------------------------------------------------------------------


def aggregate(alpha: Tensor, features: Sequence[Tensor]) -> Tensor:
    """``sum_j alpha[j] * features[j]``: N tensors of one shape (B, C, H, W) -> (B, C, H, W).

    Computed in the wider of the two dtypes (float32 for bf16 features under autocast and float32 alpha),
    with autocast off for the sum itself: CPU autocast would run ``tensordot`` in bf16.
    """
    if len(features) != alpha.numel():
        raise ValueError(f"{alpha.numel()} weights for {len(features)} features")
    dtype = torch.promote_types(alpha.dtype, features[0].dtype)
    if len(features) == 1:
        return alpha.to(dtype)[0] * features[0].to(dtype)
    stacked = torch.stack([f.to(dtype) for f in features], 0)  # (N, B, C, H, W)
    with torch.autocast(device_type=stacked.device.type, enabled=False):
        return torch.tensordot(alpha.to(dtype), stacked, dims=1)


def entropy(alpha: Tensor) -> Tensor:
    """Shannon entropy of a probability vector (N,) -> scalar (0 for one-hot, log N for uniform)."""
    return -(alpha * torch.log(alpha.clamp_min(1e-12))).sum()


def split_indices(n: int, held_out_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """A seeded split of ``range(n)`` into disjoint ``(weight, held_out)`` index sets (sorted, int64).

    ``round(held_out_fraction * n)`` samples (at least 1, at most n - 1) are held out.
    """
    if n < 2:
        raise FeatkdError(f"the DFA search needs at least 2 training samples, got {n}")
    k = min(n - 1, max(1, round(held_out_fraction * n)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[k:].sort().values, perm[:k].sort().values


class IndexBatches:
    """Batches ``(x, y)`` of training samples ``indices`` (eval transform), reshuffled per :meth:`epoch`.

    Built on the data bundle's evaluation loader over an index order (a seeded permutation per epoch);
    incomplete last batches are dropped unless there is only one batch (BatchNorm needs B >= 2).
    """

    def __init__(self, data: Any, indices: Tensor, batch_size: int, device: torch.device, seed: int) -> None:
        self.data, self.indices, self.device = data, indices, device
        self.batch_size = min(batch_size, len(indices))
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return max(1, len(self.indices) // self.batch_size)

    def epoch(self) -> Iterator[tuple[Tensor, Tensor]]:
        order = self.indices[torch.randperm(len(self.indices), generator=self.generator)]
        order = order[: len(self) * self.batch_size]
        yield from self.data.train_eval_loader(self.batch_size, indices=order, device=self.device)


@contextmanager
def preserved_buffers(module: nn.Module) -> Iterator[None]:
    """Restore every buffer of ``module`` (BatchNorm running statistics, counters) on exit."""
    saved = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)


# ---------------------------------------------------------------------------------------------------------
# the search
# ---------------------------------------------------------------------------------------------------------


class BridgeSearch:
    """The state of one DFA search: a copy of the student, two connectors per group, beta per group.

    Args:
        cfg: search options.
        pairs: the matched groups (student output point, teacher candidates, shapes).
        student: the student network; it is deep-copied (the caller's model is never touched).
        teacher_features: ``x -> {point: tensor}`` for every teacher candidate; called under no_grad.
        example: an input batch (B >= 2, on the device) to build the captures.
        steps_per_stage: weight steps of one stage: the weight optimiser's cosine schedule restarts at
            every stage (each group's fresh connectors get a full learning-rate cycle).
        autocast: a context manager factory (bf16 autocast on CUDA in the trainer).
    """

    def __init__(self, cfg: DFASearchConfig, pairs: Sequence[GroupPair], student: nn.Module,
                 teacher_features: Callable[[Tensor], dict[str, Tensor]], example: Tensor,
                 steps_per_stage: int = 1,
                 autocast: Callable[[], AbstractContextManager] = nullcontext) -> None:
        self.cfg, self.pairs, self.autocast = cfg, list(pairs), autocast
        self.teacher_features = teacher_features
        self.student = copy.deepcopy(student)  # captures hook a model only while they run: the copy has none
        self.student.train().requires_grad_(True)
        points = [p.student_point for p in self.pairs]
        self.capture = CapturingModel(self.student, points, example)
        self.tails = [GraphTail(self.student, p) for p in points]
        bn = cfg.connector == "conv1x1-bn"
        device = example.device
        self.ts = nn.ModuleList([conv1x1_connector(p.teacher_shape[0], p.student_shape[0], bn)
                                 for p in self.pairs]).to(device)
        self.st = nn.ModuleList([conv1x1_connector(p.student_shape[0], p.teacher_shape[0], bn)
                                 for p in self.pairs]).to(device)
        self.betas = nn.ParameterList(
            [nn.Parameter(torch.zeros(len(p.teacher_candidates), device=device)) for p in self.pairs]
        )
        self.weights = [*self.student.parameters(), *self.ts.parameters(), *self.st.parameters()]
        self.w_opt = torch.optim.SGD(self.weights, lr=cfg.lr, momentum=cfg.momentum,
                                     weight_decay=cfg.weight_decay)
        self.steps_per_stage = max(1, steps_per_stage)
        self.w_sched = self._cosine()
        self.b_opt = torch.optim.Adam(self.betas.parameters(), lr=cfg.beta_lr, betas=cfg.beta_betas,
                                      weight_decay=cfg.beta_weight_decay)

    def _cosine(self) -> torch.optim.lr_scheduler.LambdaLR:
        """Cosine from ``lr`` to 0 over one stage (a new scheduler restarts from ``lr``)."""
        total = self.steps_per_stage
        return torch.optim.lr_scheduler.LambdaLR(
            self.w_opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total) / total)))

    # ---- pieces -------------------------------------------------------------------------------------------
    def alpha(self, g: int) -> Tensor:
        """softmax(beta_g), shape (N_g,)."""
        return torch.softmax(self.betas[g], dim=0)

    def modules(self) -> list[nn.Module]:
        return [self.student, self.ts, self.st]

    def _train(self, mode: bool = True) -> None:
        for m in self.modules():
            m.train(mode)

    def _targets(self, g: int, t_feats: dict[str, Tensor], alpha: Tensor) -> Tensor:
        pair = self.pairs[g]
        a = aggregate(alpha, [t_feats[c] for c in pair.teacher_candidates])
        return resize_like(a, pair.student_shape[1:])

    def bridge(self, g: int, y: Tensor, t_feats: dict[str, Tensor], s_feat: Tensor,
               alpha: Tensor) -> tuple[Tensor, Tensor]:
        """(L_TS, L_ST) of group ``g``: CE of the tail fed with the connected A_g; L2 of connected S_g to A_g."""
        a = self._targets(g, t_feats, alpha)
        with self.autocast():
            logits = self.tails[g](self.ts[g](a))
            s_to_t = self.st[g](s_feat)
        ts = F.cross_entropy(logits.float(), y)
        st = F.mse_loss(s_to_t.float(), a.float())
        if self.cfg.st_normalize:  # relative error: scaling A_i (and the connector) changes nothing
            st = st / a.float().pow(2).mean().clamp_min(1e-12)
        return ts, st

    def _teacher(self, x: Tensor) -> dict[str, Tensor]:
        with torch.no_grad(), self.autocast():
            return {k: v.detach() for k, v in self.teacher_features(x).items()}

    def training_loss(self, x: Tensor, y: Tensor, groups: Sequence[int], detach_alpha: bool,
                      t_feats: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, float]]:
        """The weight-step objective ``ce_weight * CE + sum_g bridge_g`` on a batch, with its parts."""
        t_feats = self._teacher(x) if t_feats is None else t_feats
        with self.autocast():
            logits, s_feats = self.capture(x)
        ce = F.cross_entropy(logits.float(), y)
        loss = self.cfg.ce_weight * ce
        parts = {"ce": ce.item()}
        for g in groups:
            alpha = self.alpha(g).detach() if detach_alpha else self.alpha(g)
            ts, st = self.bridge(g, y, t_feats, s_feats[self.pairs[g].student_point], alpha)
            loss = loss + self.cfg.gamma_ts * ts + self.cfg.gamma_st * st
            parts[f"ts{g}"], parts[f"st{g}"] = ts.item(), st.item()
        return loss, parts

    def held_out_loss(self, x: Tensor, y: Tensor, groups: Sequence[int],
                      grad_weights: bool = False) -> tuple[Tensor, dict[str, float]]:
        """The architecture objective ``sum_g bridge_g + entropy_weight * H(alpha_g)`` on a batch.

        The student's group features are computed without grad unless ``grad_weights`` (``order: 2``).
        """
        t_feats = self._teacher(x)
        with torch.set_grad_enabled(grad_weights), self.autocast():
            _, s_feats = self.capture(x)
        loss = torch.zeros((), device=x.device)
        parts: dict[str, float] = {}
        for g in groups:
            alpha = self.alpha(g)
            ts, st = self.bridge(g, y, t_feats, s_feats[self.pairs[g].student_point], alpha)
            loss = loss + self.cfg.gamma_ts * ts + self.cfg.gamma_st * st
            if self.cfg.entropy_weight:
                loss = loss + self.cfg.entropy_weight * entropy(alpha)
            parts[f"ts{g}"], parts[f"st{g}"] = ts.item(), st.item()
        return loss, parts

    # ---- the two steps --------------------------------------------------------------------------------------
    def weight_step(self, x: Tensor, y: Tensor, groups: Sequence[int]) -> dict[str, float]:
        """One SGD step of the student copy and the connectors on a weight batch; beta is not touched."""
        self._train(True)
        loss, parts = self.training_loss(x, y, groups, detach_alpha=True)
        self.w_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.w_opt.step()
        self.w_sched.step()
        return parts

    def arch_step(self, x: Tensor, y: Tensor, groups: Sequence[int],
                  train_batch: tuple[Tensor, Tensor] | None = None) -> dict[str, float]:
        """One Adam step of beta of ``groups`` on a held-out batch; every other tensor is left bit-identical.

        The student runs in train mode (batch statistics, as in DARTS); its buffers are restored after.
        ``order: 2`` also needs ``train_batch`` (the weight batch) for the unrolled gradient.
        """
        self._train(True)
        betas = [self.betas[g] for g in groups]
        with preserved_buffers(self.student), preserved_buffers(self.ts), preserved_buffers(self.st):
            if self.cfg.order == 2:
                if train_batch is None:
                    raise ValueError("order 2 needs the weight batch")
                grads, parts = self._second_order_grads(x, y, groups, train_batch)
            else:
                loss, parts = self.held_out_loss(x, y, groups)
                grads = torch.autograd.grad(loss, betas)  # only beta: the weights' .grad stay untouched
        for b, gr in zip(betas, grads, strict=True):
            b.grad = gr
        self.b_opt.step()
        self.b_opt.zero_grad(set_to_none=True)
        return parts

    def _second_order_grads(self, x: Tensor, y: Tensor, groups: Sequence[int],
                            train_batch: tuple[Tensor, Tensor]) -> tuple[list[Tensor], dict[str, float]]:
        """DARTS's unrolled gradient: d/dbeta L_val(w - xi dL_train/dw) with a finite-difference Hessian term.

        xi is the weight optimiser's current learning rate (plain SGD step in the unrolled copy, as in
        DARTS's code without momentum). The weights are restored exactly.
        """
        xt, yt = train_batch
        betas = [self.betas[g] for g in groups]
        xi = self.w_opt.param_groups[0]["lr"]
        backup = [w.detach().clone() for w in self.weights]
        t_feats = self._teacher(xt)
        try:
            loss_t, _ = self.training_loss(xt, yt, groups, detach_alpha=True, t_feats=t_feats)
            g_w = torch.autograd.grad(loss_t, self.weights, allow_unused=True)
            with torch.no_grad():
                for w, gw in zip(self.weights, g_w, strict=True):
                    if gw is not None:
                        w.sub_(xi * gw)
            loss_v, parts = self.held_out_loss(x, y, groups, grad_weights=True)
            grads = torch.autograd.grad(loss_v, [*betas, *self.weights], allow_unused=True)
            d_beta, d_w = list(grads[: len(betas)]), grads[len(betas):]
            norm = torch.sqrt(sum((d * d).sum() for d in d_w if d is not None))
            eps = 0.01 / max(norm.item(), 1e-12)  # DARTS: r = 0.01 / ||dw||
            hess = []
            for sign in (1.0, -1.0):
                with torch.no_grad():
                    for w, b, d in zip(self.weights, backup, d_w, strict=True):
                        w.copy_(b if d is None else b + sign * eps * d)
                loss_s, _ = self.training_loss(xt, yt, groups, detach_alpha=False, t_feats=t_feats)
                hess.append(torch.autograd.grad(loss_s, betas))
            d_beta = [db - xi * (hp - hn) / (2 * eps)
                      for db, hp, hn in zip(d_beta, hess[0], hess[1], strict=True)]
        finally:
            with torch.no_grad():
                for w, b in zip(self.weights, backup, strict=True):
                    w.copy_(b)
        return d_beta, parts

    # ---- the loop -------------------------------------------------------------------------------------------
    def stages(self) -> list[list[int]]:
        """Groups searched together, in order: one per group (``group``) or all at once (``joint``)."""
        if self.cfg.schedule == "joint":
            return [list(range(len(self.pairs)))]
        return [[g] for g in range(len(self.pairs))]

    def run(self, weight_batches: IndexBatches, held_out_batches: IndexBatches,
            log: Callable[[str], None] = print) -> SearchResult:
        """Alternate architecture and weight steps (DARTS order) for ``epochs`` per stage; log each epoch."""
        history: list[dict[str, Any]] = []
        start = time.perf_counter()
        stages = self.stages()
        for si, groups in enumerate(stages):
            if si:
                self.w_sched = self._cosine()
            for epoch in range(self.cfg.epochs):
                t0 = time.perf_counter()
                sums: dict[str, float] = {}
                steps = 0
                held = iter(())
                for xw, yw in weight_batches.epoch():
                    try:
                        xh, yh = next(held)
                    except StopIteration:  # the held-out part is cycled if it is the shorter one
                        held = held_out_batches.epoch()
                        xh, yh = next(held)
                    for k, v in self.arch_step(xh, yh, groups, (xw, yw)).items():
                        sums["held_" + k] = sums.get("held_" + k, 0.0) + v
                    for k, v in self.weight_step(xw, yw, groups).items():
                        sums["train_" + k] = sums.get("train_" + k, 0.0) + v
                    steps += 1
                record: dict[str, Any] = {
                    "stage": si, "groups": groups, "epoch": epoch + 1,
                    "alpha": {g: [round(v, 4) for v in self.alpha(g).tolist()] for g in groups},
                    **{k: v / max(steps, 1) for k, v in sums.items()}, "seconds": time.perf_counter() - t0,
                }
                history.append(record)
                log(self.describe_epoch(record, len(stages)))
        alphas = [self.alpha(g).detach().float().cpu().clone() for g in range(len(self.pairs))]
        betas = [b.detach().float().cpu().clone() for b in self.betas]
        return SearchResult(alphas, betas, history, time.perf_counter() - start)

    def describe_epoch(self, record: dict[str, Any], n_stages: int) -> str:
        parts = []
        for g in record["groups"]:
            alpha = " ".join(f"{v:.3f}" for v in record["alpha"][g])
            ts, st = record.get(f"held_ts{g}", float("nan")), record.get(f"held_st{g}", float("nan"))
            parts.append(f"group {g + 1}/{len(self.pairs)} ({self.pairs[g].student_point}) alpha [{alpha}] "
                         f"held-out bridge ts {ts:.3f} st {st:.3f}")
        head = f"dfa search stage {record['stage'] + 1}/{n_stages} epoch {record['epoch']}/{self.cfg.epochs}"
        return f"{head}: {'; '.join(parts)}; train ce {record.get('train_ce', float('nan')):.3f} " \
               f"({record['seconds']:.1f}s)"


# ---------------------------------------------------------------------------------------------------------
# the alpha file and its heatmap
# ---------------------------------------------------------------------------------------------------------


def alpha_record(pairs: Sequence[GroupPair], alphas: Sequence[Tensor], betas: Sequence[Tensor] | None = None,
                 **meta: Any) -> dict[str, Any]:
    """The JSON-able content of an alpha file (floats are the float32 values, exactly)."""
    groups = []
    for i, (p, a) in enumerate(zip(pairs, alphas, strict=True)):
        entry: dict[str, Any] = {"index": i, "student_point": p.student_point,
                                 "teacher_candidates": list(p.teacher_candidates),
                                 "alpha": [float(v) for v in a.detach().float().cpu().tolist()]}
        if betas is not None:
            entry["beta"] = [float(v) for v in betas[i].detach().float().cpu().tolist()]
        groups.append(entry)
    return {"format": ALPHA_FORMAT, "version": ALPHA_VERSION, "groups": groups, **meta}


def save_alpha(path: str | Path, record: dict[str, Any]) -> Path:
    """Write an alpha record as JSON (atomically). Python floats round-trip exactly through JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=1) + "\n")
    return path


def load_alpha(path: str | Path, pairs: Sequence[GroupPair] | None = None,
               key: str = "method.alpha_file") -> list[Tensor]:
    """The float32 alpha vectors of an alpha file; with ``pairs``, check they describe the same groups."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{key}: {path} not found (write one with `featkd search CONFIG --out DIR`)") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{key}: cannot read {path} ({exc})") from None
    if not isinstance(record, dict) or record.get("format") != ALPHA_FORMAT:
        raise ConfigError(f"{key}: {path} is not a featkd DFA alpha file")
    groups = record.get("groups", [])
    alphas = [torch.tensor(g["alpha"], dtype=torch.float32) for g in groups]
    if pairs is not None:
        if len(groups) != len(pairs):
            raise ConfigError(f"{key}: {path} has {len(groups)} groups, this teacher/student pair has {len(pairs)}")
        for i, (g, p) in enumerate(zip(groups, pairs, strict=True)):
            if g.get("student_point") != p.student_point or tuple(g.get("teacher_candidates", ())) != \
                    p.teacher_candidates:
                raise ConfigError(
                    f"{key}: group {i} of {path} is {g.get('student_point')!r} <- {g.get('teacher_candidates')}, "
                    f"but this pair's is {p.student_point!r} <- {list(p.teacher_candidates)}"
                )
            if len(g["alpha"]) != len(p.teacher_candidates):
                raise ConfigError(f"{key}: group {i} of {path} has {len(g['alpha'])} weights")
    return alphas


def save_heatmap(path: str | Path, pairs: Sequence[GroupPair], alphas: Sequence[Tensor], title: str = "") -> Path:
    """The paper's figure: alpha as a (group x candidate) heatmap PNG. Needs matplotlib (optional)."""
    plt = require_pyplot("the alpha heatmaps")
    n = max(len(a) for a in alphas)
    grid = torch.full((len(alphas), n), float("nan"))
    for i, a in enumerate(alphas):
        grid[i, : len(a)] = a.float()
    fig, ax = plt.subplots(figsize=(2.8 + 0.9 * n, 1.2 + 0.6 * len(alphas)))
    im = ax.imshow(grid.numpy(), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    for i, a in enumerate(alphas):
        for j, v in enumerate(a.tolist()):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.6 else "black", fontsize=8)
    ax.set_xticks(range(n), [f"T{j + 1}" for j in range(n)])
    ax.set_yticks(range(len(alphas)), [f"group {i + 1} ({p.student_point})" for i, p in enumerate(pairs)])
    ax.set_xlabel("teacher candidate (block order in the group)")
    ax.set_title(title or "DFA aggregation weights alpha", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

