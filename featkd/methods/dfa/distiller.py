"""DFA: Differentiable Feature Aggregation search for knowledge distillation (Guan, Zhao et al., ECCV 2020).

Multi-teacher distillation imitated with one teacher: every layer group (blocks of one spatial size) of
the teacher is aggregated into one target ``A_i = sum_j alpha_i^j T_i^j`` and the student's group output
regresses it through a 1x1 connector. Two stages, both run by ``featkd train``:

1. **search** (:mod:`featkd.methods.dfa.search`, in :meth:`DFA.setup` before the first epoch, or alone
   with ``featkd search``): alpha = softmax(beta) found by a DARTS-style bilevel search with the bridge
   loss on a seeded split of the training set.
2. **distillation** (:meth:`DFA.loss`): ``CE + weight * sum_i mean((connector_i(S_i) - A_i)^2)`` with the
   searched alpha frozen (a buffer, saved in every checkpoint), ``A_i`` detached, fresh connectors, and
   the optional Hinton term of the base class (``kd_weight``).

``aggregation`` switches to the paper's ablations without a search: ``last`` (one-hot on each group's
last block: FitNets on the group outputs), ``average`` (uniform alpha) and ``random`` (alpha drawn
uniformly from the simplex, seeded). ``alpha_file`` reuses a search written by ``featkd search``.

Groups are found automatically (:mod:`featkd.capture.groups`; ``featkd layers MODEL --groups`` shows them) or
given in ``teacher_groups`` / ``student_points``; teacher and student groups are paired in order (or by
spatial size when their counts differ).

Under DDP every rank runs the same search (same split, seed and data, each on the full search split) and
rank 0's alpha is then broadcast, so all ranks hold bit-identical alpha; only rank 0 writes
``alpha.json`` and ``alpha.png`` into the run folder. The search's wall time is logged and stored in
``alpha.json``; it is not part of the run's ``train_seconds``.

Choices the paper leaves open (the spec marks them *unverified*), each an option: continuous alpha in
stage 2 (``alpha_mode: argmax`` = the single best block), stage-2 ``weight`` 1.0 and plain 1x1
connectors (as featkd's FitNets), the search options of :class:`DFASearchConfig`. The search trains its
own copy of the student; stage 2 starts from the student's initial weights (like DARTS, which discards
the search network), so DFA's student gets the same number of stage-2 epochs as any other method.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from featkd.capture.groups import LayerGroup, find_groups, groups_from_points, match_groups
from featkd.errors import ConfigError, FeatkdError
from featkd.methods import register
from featkd.methods.base import Batch, BuildContext, Distiller, DistillerConfig, RunContext
from featkd.methods.common import check_spatial, conv1x1_connector, resize_like
from featkd.methods.dfa.search import (
    BridgeSearch,
    DFASearchConfig,
    GroupPair,
    IndexBatches,
    SearchResult,
    aggregate,
    alpha_record,
    load_alpha,
    save_alpha,
    save_heatmap,
    split_indices,
)

ALPHA_JSON = "alpha.json"
ALPHA_PNG = "alpha.png"


@dataclass
class DFAConfig(DistillerConfig):
    """Options of ``method: {name: dfa}``. Sources in brackets; see also :class:`DFASearchConfig`."""

    aggregation: Literal["searched", "last", "average", "random"] = "searched"  # [paper's method + ablations]
    alpha_mode: Literal["continuous", "argmax"] = "continuous"  # stage-2 use of alpha [spec: unverified]
    weight: float = 1.0  # lambda on the summed per-group L2 [ours: as featkd's FitNets]
    connector: Literal["conv1x1", "conv1x1-bn"] = "conv1x1"  # fresh stage-2 connectors [ours: as FitNets]
    teacher_groups: list[list[str]] = field(default_factory=list)  # candidates per group; [] = found [ours]
    student_points: list[str] = field(default_factory=list)  # the student's group outputs; [] = found [ours]
    resize_teacher: bool = False  # adaptive-avg-pool A_i to the student's size if they differ [ours]
    alpha_file: str = ""  # alpha.json of `featkd search`: skip the search and use it [ours]
    random_seed: int | None = None  # aggregation random: None = train.seed [ours]
    search: DFASearchConfig = field(default_factory=DFASearchConfig)

    def validate(self, path: str = "method") -> None:
        if self.weight < 0:
            raise ConfigError(f"{path}.weight: must be >= 0, got {self.weight}")
        if self.alpha_file and self.aggregation != "searched":
            raise ConfigError(f"{path}.alpha_file: only used with aggregation 'searched', "
                              f"not {self.aggregation!r}")


def build_pairs(cfg: DFAConfig, ctx: BuildContext) -> list[GroupPair]:
    """Match the teacher's and the student's layer groups (found from shapes, or given in the config)."""
    if ctx.teacher is None:
        raise FeatkdError("dfa needs a teacher")
    shape = ctx.input_shape
    t_groups: list[LayerGroup] = (
        groups_from_points(ctx.teacher, shape, cfg.teacher_groups, "method.teacher_groups")
        if cfg.teacher_groups else find_groups(ctx.teacher, shape))
    s_groups: list[LayerGroup] = (
        groups_from_points(ctx.student, shape, [[p] for p in cfg.student_points], "method.student_points")
        if cfg.student_points else find_groups(ctx.student, shape))
    if cfg.teacher_groups and cfg.student_points and len(t_groups) != len(s_groups):
        raise ConfigError(f"method.teacher_groups has {len(t_groups)} groups but method.student_points "
                          f"{len(s_groups)}; give one student point per teacher group")
    pairs = []
    for t, s in match_groups(t_groups, s_groups):
        check_spatial(s.output, s.shape, t.output, t.shape, cfg.resize_teacher, "method.resize_teacher")
        pairs.append(GroupPair(s.output, t.candidates, s.shape, t.shape))
    return pairs


def fixed_alpha(kind: str, n: int, generator: torch.Generator | None = None) -> Tensor:
    """Alpha (n,) of the ablations: ``last`` one-hot on the last, ``average`` 1/n, ``random`` ~ Dirichlet(1)."""
    if kind == "last":
        alpha = torch.zeros(n)
        alpha[-1] = 1.0
        return alpha
    if kind == "average":
        return torch.full((n,), 1.0 / n)
    if kind == "random":  # normalised i.i.d. exponentials = uniform on the simplex
        e = -torch.log(torch.rand(n, generator=generator, dtype=torch.float64).clamp_min(1e-300))
        return (e / e.sum()).float()
    raise ValueError(kind)


@register("dfa")
class DFA(Distiller):
    Config = DFAConfig
    tasks = ("classification",)
    task_reason = "its bridge loss runs the student's classifier tail"

    def __init__(self, cfg: DFAConfig, ctx: BuildContext) -> None:
        super().__init__(cfg, ctx)
        self.cfg: DFAConfig = cfg
        self.pairs = build_pairs(cfg, ctx)
        self.input_shape = ctx.input_shape
        self.student_points = tuple(p.student_point for p in self.pairs)
        # alpha_<i>: the frozen aggregation weights of group i; alpha_ready: set once they are final
        for i, p in enumerate(self.pairs):
            self.register_buffer(f"alpha_{i}", torch.full((len(p.teacher_candidates),),
                                                          1.0 / len(p.teacher_candidates)))
        self.register_buffer("alpha_ready", torch.tensor(False))
        self.alpha_source = ""
        self.search_seconds: float | None = None
        if cfg.aggregation in ("last", "average"):
            self.set_alphas([fixed_alpha(cfg.aggregation, len(p.teacher_candidates)) for p in self.pairs],
                            cfg.aggregation)
        elif cfg.alpha_file:
            self.set_alphas(load_alpha(cfg.alpha_file, self.pairs), f"file:{cfg.alpha_file}")
        # the candidates stage 2 reads per group: only the last one for `last` (= FitNets on the group
        # outputs, the other blocks are not even captured), all of them otherwise
        self.used = [(len(p.teacher_candidates) - 1,) if cfg.aggregation == "last"
                     else tuple(range(len(p.teacher_candidates))) for p in self.pairs]
        self.teacher_points = tuple(dict.fromkeys(
            p.teacher_candidates[j] for p, used in zip(self.pairs, self.used, strict=True) for j in used))
        bn = cfg.connector == "conv1x1-bn"
        self.connectors = nn.ModuleList(
            [conv1x1_connector(p.student_shape[0], p.teacher_shape[0], bn) for p in self.pairs])

    # ---- alpha ------------------------------------------------------------------------------------------
    def alphas(self) -> list[Tensor]:
        """The stored (searched / fixed) alpha of every group, (N_i,) each."""
        return [getattr(self, f"alpha_{i}") for i in range(len(self.pairs))]

    def effective_alphas(self) -> list[Tensor]:
        """What stage 2 uses: the stored alpha, or its one-hot argmax with ``alpha_mode: argmax``."""
        if self.cfg.alpha_mode == "continuous":
            return self.alphas()
        return [F.one_hot(a.argmax(), a.numel()).to(a.dtype) for a in self.alphas()]

    @torch.no_grad()
    def set_alphas(self, alphas: list[Tensor], source: str) -> None:
        """Freeze ``alphas`` (one (N_i,) vector per group, summing to 1) as the stage-2 weights."""
        for i, (p, a) in enumerate(zip(self.pairs, alphas, strict=True)):
            if a.shape != (len(p.teacher_candidates),):
                raise FeatkdError(f"alpha of group {i} has shape {tuple(a.shape)}, expected "
                                  f"({len(p.teacher_candidates)},)")
            getattr(self, f"alpha_{i}").copy_(a)
        self.alpha_ready.fill_(True)
        self.alpha_source = source

    def get_extra_state(self) -> dict[str, Any]:
        """Saved in every checkpoint: where alpha came from and the alpha file's content."""
        return {"alpha_source": self.alpha_source, "search_seconds": self.search_seconds,
                "alpha": alpha_record(self.pairs, self.alphas()) if bool(self.alpha_ready) else None}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.alpha_source = state.get("alpha_source", "")
        self.search_seconds = state.get("search_seconds")

    # ---- life cycle -------------------------------------------------------------------------------------
    def setup(self, ctx: RunContext) -> None:
        """Search (or draw) alpha before stage 2, unless a resumed checkpoint or the config fixes it."""
        if bool(self.alpha_ready):
            why = "restored from the checkpoint" if ctx.resumed else self.alpha_source
            self._log_alphas(ctx, f"dfa: alpha {why}")
            return
        if self.cfg.aggregation == "random":
            seed = ctx.seed if self.cfg.random_seed is None else self.cfg.random_seed
            g = torch.Generator().manual_seed(seed)
            alphas = [fixed_alpha("random", len(p.teacher_candidates), g) for p in self.pairs]
            self.set_alphas(alphas, f"random:{seed}")
            self._write_outputs(ctx, alphas, None, {"aggregation": "random", "random_seed": seed})
            self._log_alphas(ctx, f"dfa: random alpha (seed {seed})")
            return
        result = self.search(ctx)
        alphas = [a.to(ctx.device) for a in result.alphas]
        for a in alphas:  # every rank searched the same way; rank 0's copy is authoritative
            ctx.dist.broadcast(a, src=0)
        self.set_alphas(alphas, "search")
        self.search_seconds = result.seconds
        meta = {"aggregation": "searched", "search": asdict(self.cfg.search), "search_seconds": result.seconds,
                "history": result.history}
        self._write_outputs(ctx, [a.cpu() for a in alphas], result.betas, meta)
        self._log_alphas(ctx, f"dfa: searched alpha in {result.seconds:.1f}s")

    def search(self, ctx: RunContext) -> SearchResult:
        """Stage 1 on this process: the seeded split, a fresh :class:`BridgeSearch`, its loop.

        Runs in a forked RNG seeded from ``search.seed`` (or ``train.seed``), so it is reproducible and
        leaves the trainer's random state as it found it.
        """
        if ctx.teacher_capture is None:
            raise FeatkdError("dfa needs a teacher")
        scfg = self.cfg.search
        seed = ctx.seed if scfg.seed is None else scfg.seed
        weight_idx, held_idx = split_indices(ctx.data.train_size, scfg.held_out_fraction, seed)
        devices = [ctx.device] if ctx.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            weight = IndexBatches(ctx.data, weight_idx, scfg.batch_size, ctx.device, seed + 1)
            held = IndexBatches(ctx.data, held_idx, scfg.batch_size, ctx.device, seed + 2)
            example = torch.zeros(2, *self.input_shape, device=ctx.device)
            teacher_capture = ctx.teacher_capture

            def teacher_features(x: Tensor) -> dict[str, Tensor]:
                return teacher_capture(x)[1]

            t0 = time.perf_counter()
            engine = BridgeSearch(scfg, self.pairs, ctx.student, teacher_features, example,
                                  steps_per_stage=scfg.epochs * len(weight), autocast=ctx.autocast)
            ctx.log(f"dfa search: {len(self.pairs)} group(s), {scfg.schedule} schedule, {scfg.epochs} epoch(s) "
                    f"per stage; training split {ctx.data.train_size} -> {len(weight_idx)} weight / "
                    f"{len(held_idx)} held-out samples (seed {seed})")
            for i, p in enumerate(self.pairs):
                ctx.log(f"  group {i + 1}: student {p.student_point} {'x'.join(map(str, p.student_shape))} <- "
                        f"teacher {', '.join(p.teacher_candidates)} {'x'.join(map(str, p.teacher_shape))}")
            result = engine.run(weight, held, ctx.log)
            result.seconds = time.perf_counter() - t0
        return result

    def _write_outputs(self, ctx: RunContext, alphas: list[Tensor], betas: list[Tensor] | None,
                       meta: dict[str, Any]) -> None:
        if ctx.out_dir is None:  # only rank 0 of a run that writes has an out_dir
            return
        for path in write_alpha_outputs(ctx.out_dir, self.pairs, alphas, betas, meta, ctx.log):
            ctx.log(f"dfa: wrote {path}")

    def _log_alphas(self, ctx: RunContext, head: str) -> None:
        ctx.log(head + (" (stage 2 uses the argmax)" if self.cfg.alpha_mode == "argmax" else ""))
        for i, (p, a) in enumerate(zip(self.pairs, self.alphas(), strict=True)):
            weights = ", ".join(f"{c} {v:.3f}" for c, v in zip(p.teacher_candidates, a.tolist(), strict=True))
            ctx.log(f"  group {i + 1} ({p.student_point}): {weights}")

    # ---- stage 2 ------------------------------------------------------------------------------------------
    def loss(self, batch: Batch) -> dict[str, Tensor]:
        total = torch.zeros((), device=batch.student_logits.device)
        for p, used, alpha, connector in zip(self.pairs, self.used, self.effective_alphas(), self.connectors,
                                             strict=True):
            feats = [batch.teacher_features[p.teacher_candidates[j]] for j in used]
            target = aggregate(alpha[list(used)], feats) if len(used) < len(alpha) else aggregate(alpha, feats)
            fs = connector(batch.student_features[p.student_point])
            target = resize_like(target.detach(), fs.shape[-2:])
            total = total + F.mse_loss(fs.float(), target.float())
        return {"dfa": self.cfg.weight * total}


def write_alpha_outputs(out_dir: str | Path, pairs: list[GroupPair], alphas: list[Tensor],
                        betas: list[Tensor] | None, meta: dict[str, Any],
                        log: Callable[[str], None] = print) -> list[Path]:
    """Write ``alpha.json`` and, if matplotlib is installed, the heatmap ``alpha.png`` into ``out_dir``.

    A missing matplotlib is one warning line through ``log`` (naming ``pip install matplotlib``): the
    JSON is what stage 2 needs, so the run goes on.
    """
    out_dir = Path(out_dir)
    written = [save_alpha(out_dir / ALPHA_JSON, alpha_record(pairs, alphas, betas, **meta))]
    try:
        written.append(save_heatmap(out_dir / ALPHA_PNG, pairs, alphas,
                                    title=f"DFA alpha ({meta.get('aggregation', 'searched')})"))
    except FeatkdError as exc:
        log(f"warning: {exc}")
    return written
