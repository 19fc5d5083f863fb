"""Label-free classification: training reads no labels, evaluation scores the representation.

A run is label-free when its data is (``data.labels: ignore`` on any classification set, or ``dataset:
unlabelled``): the training targets are -1 and :class:`LabelFreeTask` replaces :class:`ClassificationTask`.
It keeps the task's name (``classification``: the models are classifiers, and methods defined for
classification stay usable), and changes three things:

* **no task loss**: :meth:`LabelFreeTask.loss_terms` is empty, so ``method.ce_weight`` is *implied* off (it is
  not refused: a base protocol's ``ce_weight: 1`` means nothing here). A method that reads the targets as class
  ids (``class_targets``: DKD, CRD's other-class negatives, KDA's class-mean landmarks) is refused at build time.
  The Hinton term (``kd_weight``, method ``kd``) needs no labels and is allowed.
* **no training metric** (``train_metric`` None).
* **evaluation** (:meth:`LabelFreeTask.evaluate`, on every rank): on the labelled ``probe`` set
  (``data.probe``, by default the data set itself with its labels), the student's *pooled features* -- the
  input of the linear layer that produces the model's output (``fc:input``; for an ensemble teacher, its first
  member's) -- of the probe's training split (eval transforms; this rank's shard, then gathered: the bank) and
  of its test split (the queries, this rank's shard):

  - ``knn_acc``: weighted k-NN, k = 20, cosine similarity, votes ``exp(sim / 0.07)`` (the protocol of
    Wu et al. 2018 / DINO);
  - ``probe_acc``: a linear probe -- multinomial logistic regression on the bank's features standardised by the
    bank's mean / std, L2 ``1e-4`` on the weights, fitted by full-batch L-BFGS (100 iterations) from zeros in
    float64 on the CPU, the same on every rank (the gathered bank is the same) -- scored on the queries.

  Both are cheap next to an epoch (the probe fits in seconds on 50,000 x 512 features), so both are measured at
  every evaluation, the last one included. Without a probe set (``dataset: unlabelled`` and no ``data.probe``)
  the task reports nothing and the method's own numbers (agreement) are what the run logs.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from featkd.distributed import gather_objects
from featkd.errors import FeatkdError
from featkd.modes import eval_mode
from featkd.tasks.classification import ClassificationTask

if TYPE_CHECKING:
    from featkd.data import DataBundle
    from featkd.distributed import DistInfo

KNN_K = 20
KNN_TEMPERATURE = 0.07
PROBE_ITERATIONS = 100
PROBE_L2 = 1e-4


def pooled_features(model: nn.Module, x: Tensor) -> Tensor:
    """(B, D) float32: the input of the ``nn.Linear`` whose output ``model(x)`` returns (a classifier's
    ``fc:input``), else of the last ``nn.Linear`` run on a (B, D) input; a one-line error for a model with none."""
    seen: list[tuple[Tensor, Tensor]] = []

    def hook(_m: nn.Module, args: tuple, out: Any) -> None:
        if args and isinstance(args[0], Tensor) and args[0].ndim == 2 and isinstance(out, Tensor):
            seen.append((args[0], out))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        output = model(x)
    finally:
        for h in handles:
            h.remove()
    for inp, out in seen:
        if out is output:
            return inp.float()
    if not seen:
        raise FeatkdError(f"{type(model).__name__}: no nn.Linear on pooled (B, D) features; a label-free run's "
                          "k-NN and linear probe read the classifier's input")
    return seen[-1][0].float()


def knn_predict(bank: Tensor, bank_labels: Tensor, queries: Tensor, num_classes: int, k: int = KNN_K,
                temperature: float = KNN_TEMPERATURE) -> Tensor:
    """Class ids (Q,) of ``queries`` (Q, D) by weighted k-NN over ``bank`` (N, D) with ``bank_labels`` (N,):
    cosine similarity, the k nearest vote with weight ``exp(sim / temperature)``."""
    sims = F.normalize(queries.float(), dim=1) @ F.normalize(bank.float(), dim=1).T
    top, idx = sims.topk(min(k, bank.shape[0]), dim=1)
    votes = torch.zeros(queries.shape[0], num_classes, device=queries.device, dtype=torch.float32)
    votes.scatter_add_(1, bank_labels[idx], (top / temperature).exp())
    return votes.argmax(1)


def linear_probe(features: Tensor, labels: Tensor, num_classes: int, iterations: int = PROBE_ITERATIONS,
                 l2: float = PROBE_L2) -> Callable[[Tensor], Tensor]:
    """Fit multinomial logistic regression on ``features`` (N, D) (standardised by their own mean / std) with
    L-BFGS; returns a function from (Q, D) features to class ids (Q,). Deterministic (float64, zero init, CPU)."""
    f = features.double().cpu()
    mean, std = f.mean(0), f.std(0).clamp_min(1e-6)
    f = (f - mean) / std
    y = labels.cpu()
    weight = torch.zeros(f.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(f @ weight + bias, y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w, b = weight.detach(), bias.detach()
    return lambda q: (((q.double().cpu() - mean) / std) @ w + b).argmax(1)


class LabelFreeTask(ClassificationTask):
    """Classification models trained without labels; see the module docstring."""

    metric = "knn_acc"
    logged_metrics = ("knn_acc", "probe_acc")
    train_metric: ClassVar[str | None] = None
    labelled: ClassVar[bool] = False

    def __init__(self, num_classes: int, probe: DataBundle | None = None) -> None:
        super().__init__(num_classes)
        self.probe = probe

    @classmethod
    def from_data(cls, data: DataBundle) -> LabelFreeTask:
        return cls(data.num_classes, data.probe)

    def loss_terms(self, logits: Any, targets: Any, model_losses: dict[str, Tensor] | None) -> dict[str, Tensor]:
        return {}

    def train_counts(self, logits: Tensor, targets: Tensor) -> None:
        return None

    @torch.no_grad()
    def _features(self, model: nn.Module, loader: Any, autocast: Callable[[], AbstractContextManager]
                  ) -> tuple[Tensor, Tensor]:
        feats, labels = [], []
        for x, y in loader:
            with autocast():
                feats.append(pooled_features(model, x).float())
            labels.append(y)
        if not feats:
            return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
        return torch.cat(feats), torch.cat(labels).long()

    def evaluate(self, model: nn.Module, split: str, *, batch_size: int, dist: DistInfo, device: torch.device,
                 autocast: Callable[[], AbstractContextManager]) -> dict[str, Any]:
        """``{"knn_acc", "probe_acc", "samples"}`` of ``model`` on the probe set's ``split`` (test or val; {} when
        the probe set has no such split, or there is no probe set). A collective: every rank calls it."""
        probe = self.probe
        if probe is None or split == "train":
            return {}
        kw = {"rank": dist.rank, "world_size": dist.world_size, "device": device}
        query_loader = probe.test_loader(batch_size, **kw) if split == "test" else probe.val_loader(batch_size, **kw)
        if query_loader is None:
            return {}
        with eval_mode(model):
            bank, bank_labels = self._features(model, probe.train_eval_loader(batch_size, **kw), autocast)
            queries, query_labels = self._features(model, query_loader, autocast)
        parts = gather_objects((bank.cpu(), bank_labels.cpu()), dist)  # the whole bank, in rank order, everywhere
        bank = torch.cat([p[0] for p in parts if p[0].numel()]).to(device)
        bank_labels = torch.cat([p[1] for p in parts if p[1].numel()]).to(device)
        counts = torch.zeros(3, dtype=torch.float64, device=device)
        if queries.numel():
            counts[0] = (knn_predict(bank, bank_labels, queries, probe.num_classes) == query_labels).sum()
        classify = linear_probe(bank, bank_labels, probe.num_classes)
        if queries.numel():
            counts[1] = (classify(queries) == query_labels.cpu()).sum()
        counts[2] = query_labels.numel()
        dist.all_reduce_sum(counts)
        n = max(1.0, counts[2].item())
        return {"knn_acc": 100.0 * counts[0].item() / n, "probe_acc": 100.0 * counts[1].item() / n,
                "samples": int(counts[2].item())}
