"""DFA: the spec's "What makes it testable" list, on real models and real digits (no mocks of PyTorch/data).

Covered: aggregated shape = candidate shape; alpha sums to 1; beta = 0 gives the mean and a large one-hot
beta gives "Last"; a weight step leaves beta unchanged; an architecture step changes only the searched
group's beta and leaves the student bit-identical (first and second order); the teacher never gets a
gradient; the weight and held-out index sets are disjoint parts of the training split; the alpha file
round-trips exactly and alpha is a frozen buffer in stage 2 (and in the checkpoint); ablations; resume.
"""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml

from featkd.capture.capture import CapturingModel
from featkd.cli import main
from featkd.config import build_config
from featkd.data import DataConfig, build_data
from featkd.engine.trainer import Trainer, train
from featkd.errors import ConfigError, FeatkdError
from featkd.methods.base import Batch, BuildContext
from featkd.methods.dfa.distiller import DFA, DFAConfig, build_pairs, fixed_alpha, write_alpha_outputs
from featkd.methods.dfa.search import (
    BridgeSearch,
    DFASearchConfig,
    IndexBatches,
    aggregate,
    alpha_record,
    load_alpha,
    save_alpha,
    save_heatmap,
    split_indices,
)
from featkd.methods.fitnets import FitNets, FitNetsConfig
from featkd.models import create_model

SHAPE = (1, 8, 8)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return build_data(DataConfig(dataset="digits", train_subset=64, batch_size=16))


@pytest.fixture(scope="module")
def batch(digits):
    x, y = next(iter(digits.train_eval_loader(16)))
    return x, y


def models(frozen_teacher: bool = True):
    torch.manual_seed(0)
    teacher = create_model("resnet20", num_classes=10, in_channels=1).eval()
    teacher.requires_grad_(not frozen_teacher)
    student = create_model("resnet8", num_classes=10, in_channels=1)
    return teacher, student


def capture_batch(teacher, student, distiller, x, y) -> Batch:
    """One forward of both nets with the distiller's capture points: the Batch its loss sees."""
    t_cap = CapturingModel(teacher, distiller.teacher_points, x[:2])
    s_cap = CapturingModel(student, distiller.student_points, x[:2])
    with torch.no_grad():
        t_logits, t_feats = t_cap(x)
    s_logits, s_feats = s_cap(x)
    return Batch(x, y, s_logits, s_feats, t_logits, t_feats)


def build_ctx(teacher, student) -> BuildContext:
    return BuildContext(teacher, student, SHAPE, 10, torch.device("cpu"))


def make_search(order: int = 1, frozen_teacher: bool = True, activation: type[torch.nn.Module] | None = None,
                **options):
    """A search on the ResNet-20 -> ResNet-8 pair; ``activation``: replaces every ReLU of the student."""
    teacher, student = models(frozen_teacher)
    if activation is not None:
        for module in list(student.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, torch.nn.ReLU):
                    setattr(module, name, activation())
    pairs = build_pairs(DFAConfig(), build_ctx(teacher, student))
    example = torch.zeros(2, *SHAPE)
    capture = CapturingModel(teacher, [c for p in pairs for c in p.teacher_candidates], example)
    cfg = DFASearchConfig(order=order, **options)
    engine = BridgeSearch(cfg, pairs, student, lambda x: capture(x)[1], example, steps_per_stage=10)
    return engine, teacher, student


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} changed"


# ---- aggregation ----------------------------------------------------------------------------------------


def test_aggregated_shape_equals_the_candidate_shape_and_hand_values():
    feats = [torch.full((2, 4, 3, 3), v) for v in (1.0, 2.0, 3.0)]
    out = aggregate(torch.tensor([0.2, 0.3, 0.5]), feats)
    assert out.shape == (2, 4, 3, 3)
    torch.testing.assert_close(out, torch.full((2, 4, 3, 3), 0.2 + 0.6 + 1.5))


def test_alpha_sums_to_one_zero_beta_is_the_mean_and_large_one_hot_beta_is_last():
    engine, _, _ = make_search()
    torch.manual_seed(1)
    feats = [torch.randn(2, 16, 8, 8) for _ in range(3)]
    for g in range(3):
        assert torch.equal(engine.betas[g].detach(), torch.zeros(3))  # beta initialised to 0
        torch.testing.assert_close(engine.alpha(g).sum(), torch.tensor(1.0))
    torch.testing.assert_close(aggregate(engine.alpha(0), feats), torch.stack(feats).mean(0))
    with torch.no_grad():
        engine.betas[1].copy_(torch.randn(3) * 3)
        torch.testing.assert_close(engine.alpha(1).sum(), torch.tensor(1.0))
        engine.betas[0].copy_(torch.tensor([0.0, 0.0, 50.0]))  # "Last": one-hot on the group's last block
    torch.testing.assert_close(aggregate(engine.alpha(0), feats), feats[-1], rtol=0, atol=1e-6)


# ---- the bilevel steps ------------------------------------------------------------------------------------


def test_weight_step_changes_the_weights_but_not_beta(batch):
    engine, _, _ = make_search()
    with torch.no_grad():
        for b in engine.betas:
            b.copy_(torch.randn(3))
    betas = [b.detach().clone() for b in engine.betas]
    before = snapshot(engine.student)
    parts = engine.weight_step(*batch, groups=[0])
    assert set(parts) == {"ce", "ts0", "st0"}
    for b, old in zip(engine.betas, betas, strict=True):
        assert torch.equal(b.detach(), old)
    after = snapshot(engine.student)
    assert not torch.equal(after["conv1.weight"], before["conv1.weight"])
    assert not torch.equal(after["fc.weight"], before["fc.weight"])


@pytest.mark.parametrize("order", [1, 2])
def test_arch_step_changes_only_the_searched_groups_beta(batch, order):
    engine, _, student = make_search(order=order)
    engine.weight_step(*batch, groups=[1])  # non-trivial momentum/BN state first
    student_before = snapshot(engine.student)
    connectors_before = snapshot(engine.ts) | {f"st.{k}": v for k, v in snapshot(engine.st).items()}
    betas = [b.detach().clone() for b in engine.betas]
    grads_before = {k: None if p.grad is None else p.grad.clone() for k, p in engine.student.named_parameters()}
    engine.arch_step(*batch, groups=[1], train_batch=batch)
    assert not torch.equal(engine.betas[1].detach(), betas[1])
    assert torch.equal(engine.betas[0].detach(), betas[0]) and torch.equal(engine.betas[2].detach(), betas[2])
    assert_identical(snapshot(engine.student), student_before)  # parameters AND BatchNorm buffers
    assert_identical(snapshot(engine.ts) | {f"st.{k}": v for k, v in snapshot(engine.st).items()},
                     connectors_before)
    for k, p in engine.student.named_parameters():  # not even the gradients were touched
        assert (p.grad is None) == (grads_before[k] is None)
        if p.grad is not None:
            assert torch.equal(p.grad, grads_before[k])
    # the caller's student is never touched by the search (it works on a copy)
    assert engine.student is not student and all(p.grad is None for p in student.parameters())


class _Weights(torch.nn.Module):
    """The search's weights under one module, so ``torch.func.functional_call`` can substitute all of them."""

    def __init__(self, engine: BridgeSearch) -> None:
        super().__init__()
        self.student, self.ts, self.st = engine.student, engine.ts, engine.st

    def forward(self, fn, *args, **kwargs):
        return fn(*args, **kwargs)


def test_second_order_with_zero_inner_step_is_the_first_order_gradient(batch):
    engine, _, _ = make_search(order=2, lr=0.0)  # xi = lr = 0: w' = w and no Hessian term
    loss, _ = engine.held_out_loss(*batch, groups=[0])
    (first,) = torch.autograd.grad(loss, [engine.betas[0]])
    (second,), _ = engine._second_order_grads(*batch, groups=[0], train_batch=batch)
    torch.testing.assert_close(second, first)


def test_second_order_gradient_equals_the_double_backward_of_the_unrolled_loss(batch):
    """order 2 against the definition: d/dbeta L_val(w'(beta), beta), w' = w - xi dL_train(w, beta)/dw, by
    double backward (create_graph through the inner step; the held-out loss evaluated at w' with
    torch.func.functional_call). The student uses SiLU instead of ReLU: a ReLU's kinks make dL/dbeta jump
    as w moves, so the finite-difference Hessian term only matches a smooth loss (to its O(eps^2) error)."""
    xi = 0.5
    engine, _, _ = make_search(order=2, lr=xi, activation=torch.nn.SiLU)
    assert engine.w_opt.param_groups[0]["lr"] == xi
    (second,), _ = engine._second_order_grads(*batch, groups=[0], train_batch=batch)
    beta, weights = engine.betas[0], _Weights(engine)
    named = list(weights.named_parameters())
    assert len(named) == len(engine.weights) and all(p is w for (_, p), w in zip(named, engine.weights, strict=True))
    train_loss, _ = engine.training_loss(*batch, groups=[0], detach_alpha=False)
    grads = torch.autograd.grad(train_loss, engine.weights, create_graph=True, allow_unused=True)
    unrolled = {n: p if g is None else p - xi * g for (n, p), g in zip(named, grads, strict=True)}
    held_out, _ = torch.func.functional_call(weights, unrolled, (engine.held_out_loss, *batch),
                                             {"groups": [0], "grad_weights": True})
    (exact,) = torch.autograd.grad(held_out, [beta])
    loss, _ = engine.held_out_loss(*batch, groups=[0])
    (first,) = torch.autograd.grad(loss, [beta])
    assert (exact - first).abs().max() > 0.01  # the unrolled step matters here (measured 0.039)
    torch.testing.assert_close(second, exact, rtol=0, atol=1e-4)  # measured 1.9e-5


def test_joint_schedule_updates_every_beta(batch):
    engine, _, _ = make_search(schedule="joint")
    assert engine.stages() == [[0, 1, 2]]
    engine.arch_step(*batch, groups=[0, 1, 2])
    assert all(not torch.equal(b.detach(), torch.zeros(3)) for b in engine.betas)


def test_entropy_regulariser_sharpens_alpha(batch):
    plain, _, _ = make_search(gamma_ts=0.0, gamma_st=0.0, entropy_weight=1.0, beta_weight_decay=0.0)
    with torch.no_grad():
        plain.betas[0].copy_(torch.tensor([0.3, 0.0, -0.3]))
    h0 = -(plain.alpha(0) * plain.alpha(0).log()).sum().item()
    plain.arch_step(*batch, groups=[0])
    h1 = -(plain.alpha(0) * plain.alpha(0).log()).sum().item()
    assert h1 < h0


@pytest.mark.parametrize("order", [1, 2])
def test_the_teacher_never_gets_a_gradient(batch, order):
    engine, teacher, _ = make_search(order=order, frozen_teacher=False)  # even with requires_grad on
    before = snapshot(teacher)
    for g in range(3):
        engine.arch_step(*batch, groups=[g], train_batch=batch)
        engine.weight_step(*batch, groups=[g])
    assert all(p.grad is None for p in teacher.parameters())
    assert_identical(snapshot(teacher), before)


def test_weight_and_held_out_index_sets_are_disjoint_parts_of_the_training_split(digits):
    w, h = split_indices(300, 0.5, seed=0)
    assert len(w) == 150 and len(h) == 150
    assert set(w.tolist()).isdisjoint(h.tolist()) and set(w.tolist()) | set(h.tolist()) == set(range(300))
    w2, h2 = split_indices(300, 0.5, seed=0)
    assert torch.equal(w, w2) and torch.equal(h, h2)  # seeded
    assert not torch.equal(split_indices(300, 0.5, seed=1)[1], h)
    assert len(split_indices(10, 0.25, seed=0)[1]) == 2  # round(2.5) -> 2 held out (banker's rounding)
    # IndexBatches yields exactly those TRAINING samples (eval transform), never others
    w, h = split_indices(digits.train_size, 0.5, seed=0)
    xs, _ = next(iter(digits.train_eval_loader(digits.train_size)))  # the whole training split, in order
    batches = IndexBatches(digits, h, 8, torch.device("cpu"), seed=3)
    seen_x = torch.cat([x for x, _ in batches.epoch()])
    assert len(seen_x) == len(h)
    expected = {tuple(xs[i].flatten().tolist()) for i in h.tolist()}
    assert {tuple(x.flatten().tolist()) for x in seen_x} == expected


# ---- alpha file, stage 2 ----------------------------------------------------------------------------------


def test_exported_alpha_round_trips_exactly(tmp_path):
    teacher, student = models()
    pairs = build_pairs(DFAConfig(), build_ctx(teacher, student))
    torch.manual_seed(3)
    betas = [torch.randn(3) * 2 for _ in pairs]
    alphas = [torch.softmax(b, 0) for b in betas]
    path = save_alpha(tmp_path / "alpha.json", alpha_record(pairs, alphas, betas))
    loaded = load_alpha(path, pairs)
    for a, b in zip(alphas, loaded, strict=True):
        assert b.dtype == torch.float32 and torch.equal(a, b)
    other = build_pairs(DFAConfig(teacher_groups=[["layer1.1", "layer1.2"], ["layer2.2"], ["layer3.2"]]),
                        build_ctx(teacher, student))
    with pytest.raises(ConfigError, match=r"group 0 of .*alpha.json is 'layer1' <- \['layer1.0'"):
        load_alpha(path, other)
    with pytest.raises(ConfigError, match="not found"):
        load_alpha(tmp_path / "missing.json", pairs)


def test_stage2_alpha_is_a_frozen_buffer_and_the_loss_by_hand(tmp_path, batch):
    teacher, student = models()
    ctx = build_ctx(teacher, student)
    alphas = [torch.tensor([0.2, 0.3, 0.5]), torch.tensor([0.6, 0.3, 0.1]), torch.tensor([0.0, 0.0, 1.0])]
    pairs = build_pairs(DFAConfig(), ctx)
    path = save_alpha(tmp_path / "alpha.json", alpha_record(pairs, alphas))
    dfa = DFA(DFAConfig(alpha_file=str(path), weight=2.0), ctx)
    buffers, params = dict(dfa.named_buffers()), dict(dfa.named_parameters())
    assert "alpha_0" in buffers and not any(k.startswith("alpha") for k in params)
    assert bool(dfa.alpha_ready) and all(not a.requires_grad for a in dfa.alphas())
    assert dfa.teacher_points == tuple(c for p in pairs for c in p.teacher_candidates)
    x, y = batch
    b = capture_batch(teacher, student, dfa, x, y)
    s_logits, s_feats, t_feats = b.student_logits, b.student_features, b.teacher_features
    losses = dfa(b)
    expected = 0.0
    for p, a, conn in zip(pairs, alphas, dfa.connectors, strict=True):
        target = sum(w * t_feats[c] for w, c in zip(a.tolist(), p.teacher_candidates, strict=True))
        expected = expected + ((conn(s_feats[p.student_point]) - target) ** 2).mean()
    torch.testing.assert_close(losses["dfa"], 2.0 * expected)
    torch.testing.assert_close(losses["ce"], F.cross_entropy(s_logits, y))
    # a training step moves the connectors, not alpha
    opt = torch.optim.SGD([*dfa.parameters(), *student.parameters()], lr=0.1)
    sum(losses.values()).backward()
    opt.step()
    for a, b in zip(dfa.alphas(), alphas, strict=True):
        assert torch.equal(a, b)
    # the state dict (what every checkpoint holds) carries alpha exactly and restores it
    state = dfa.state_dict()
    fresh = DFA(DFAConfig(), ctx)
    assert not bool(fresh.alpha_ready)
    fresh.load_state_dict(state)
    assert bool(fresh.alpha_ready) and fresh.alpha_source == f"file:{path}"
    for a, b in zip(fresh.alphas(), alphas, strict=True):
        assert torch.equal(a, b)
    record = state["_extra_state"]["alpha"]
    assert [g["alpha"] for g in record["groups"]] == [a.tolist() for a in alphas]


def test_last_is_fitnets_on_the_group_outputs_and_other_ablations(batch):
    teacher, student = models()
    ctx = build_ctx(teacher, student)
    last = DFA(DFAConfig(aggregation="last"), ctx)
    assert last.teacher_points == ("layer1.2", "layer2.2", "layer3.2")  # nothing else is even captured
    assert [a.tolist() for a in last.alphas()] == [[0.0, 0.0, 1.0]] * 3
    fit = FitNets(FitNetsConfig(pairs=[["layer1", "layer1.2"], ["layer2", "layer2.2"], ["layer3", "layer3.2"]]),
                  ctx)
    fit.connectors.load_state_dict(last.connectors.state_dict())
    b = capture_batch(teacher, student, last, *batch)
    torch.testing.assert_close(last(b)["dfa"], fit(b)["fitnets"], rtol=0, atol=0)

    average = DFA(DFAConfig(aggregation="average"), ctx)
    assert all(torch.equal(a, torch.full((3,), 1 / 3)) for a in average.alphas()) and bool(average.alpha_ready)
    r1 = fixed_alpha("random", 5, torch.Generator().manual_seed(4))
    r2 = fixed_alpha("random", 5, torch.Generator().manual_seed(4))
    assert torch.equal(r1, r2) and (r1 > 0).all()
    torch.testing.assert_close(r1.sum(), torch.tensor(1.0))
    assert not torch.equal(r1, fixed_alpha("random", 5, torch.Generator().manual_seed(5)))
    arg = DFA(DFAConfig(aggregation="average", alpha_mode="argmax"), ctx)
    arg.set_alphas([torch.tensor([0.2, 0.5, 0.3])] * 3, "test")
    assert [a.tolist() for a in arg.effective_alphas()] == [[0.0, 1.0, 0.0]] * 3
    with pytest.raises(ConfigError, match="alpha_file: only used with aggregation 'searched'"):
        DFAConfig(aggregation="last", alpha_file="x.json").validate()


def test_missing_matplotlib_is_one_warning_line_and_the_json_is_still_written(tmp_path, monkeypatch):
    teacher, student = models()
    pairs = build_pairs(DFAConfig(), build_ctx(teacher, student))
    alphas = [torch.tensor([0.2, 0.3, 0.5])] * 3
    assert save_heatmap(tmp_path / "ok.png", pairs, alphas).stat().st_size > 0
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(FeatkdError, match="pip install matplotlib"):
        save_heatmap(tmp_path / "a.png", pairs, alphas)
    lines: list[str] = []
    written = write_alpha_outputs(tmp_path, pairs, alphas, None, {}, lines.append)
    assert [p.name for p in written] == ["alpha.json"] and len(lines) == 1 and "pip install matplotlib" in lines[0]


# ---- real short trainings ---------------------------------------------------------------------------------


def raw_config(**method) -> dict:
    return {
        "name": "dfa-test",
        "data": {"dataset": "digits", "train_subset": 100, "batch_size": 20},
        "teacher": {"model": "resnet20", "checkpoint": "zoo:digits-resnet20"},
        "student": {"model": "resnet8"},
        "method": {"name": "dfa", "search": {"epochs": 1, "batch_size": 20}, **method},
        "optim": {"lr": 0.05, "schedule": "cosine"},
        "train": {"epochs": 2, "num_threads": 1, "progress": "off", "tensorboard": False, "deterministic": True},
    }


def test_training_searches_logs_writes_and_resumes_without_searching_again(tmp_path):
    full_log: list[str] = []
    full = train(build_config(raw_config()), tmp_path / "full", log=full_log.append)
    assert full.status == "finished"
    text = "\n".join(full_log)
    assert "dfa search stage 1/3 epoch 1/1: group 1/3 (layer1) alpha [" in text  # progress: group + alpha
    assert "dfa: searched alpha in" in text
    record = json.loads((tmp_path / "full" / "alpha.json").read_text())
    assert (tmp_path / "full" / "alpha.png").stat().st_size > 0
    assert record["groups"][0]["teacher_candidates"] == ["layer1.0", "layer1.1", "layer1.2"]
    assert record["search_seconds"] > 0 and len(record["history"]) == 3
    ckpt = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    for i, g in enumerate(record["groups"]):  # the checkpoint holds exactly the exported alpha
        assert torch.equal(ckpt["distiller"][f"alpha_{i}"], torch.tensor(g["alpha"], dtype=torch.float32))
        torch.testing.assert_close(ckpt["distiller"][f"alpha_{i}"].sum(), torch.tensor(1.0))
    assert ckpt["distiller"]["_extra_state"]["alpha_source"] == "search"

    stop = raw_config()
    stop["train"]["stop_after"] = 1
    first = train(build_config(stop), tmp_path / "split", log=lambda _m: None)
    assert first.status == "stopped"
    resumed_log: list[str] = []
    train(build_config(raw_config()), tmp_path / "split", resume=True, log=resumed_log.append)
    assert not any("dfa search" in line for line in resumed_log)
    assert any("alpha restored from the checkpoint" in line for line in resumed_log)
    a = torch.load(tmp_path / "full" / "student.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "student.pt", weights_only=True)
    for k in a:  # the search runs in a forked RNG: resuming (no search) reproduces the run bit for bit
        assert torch.equal(a[k], b[k]), k


def test_search_command_then_training_from_the_alpha_file(tmp_path, capsys):
    cfg = tmp_path / "dfa.yaml"
    cfg.write_text(yaml.safe_dump(raw_config()))
    out = tmp_path / "search"
    assert main(["search", str(cfg), "--out", str(out), "--epochs", "1"]) == 0
    printed = capsys.readouterr().out
    assert "group 3/3 (layer3) alpha [" in printed and f"method.alpha_file={out / 'alpha.json'}" in printed
    alphas = [torch.tensor(g["alpha"]) for g in json.loads((out / "alpha.json").read_text())["groups"]]
    assert (out / "alpha.png").is_file()
    # nothing already written is overwritten
    assert main(["search", str(cfg), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    raw = raw_config(alpha_file=str(out / "alpha.json"))
    trainer = Trainer(build_config(raw), None, log=lambda _m: None)
    assert bool(trainer.distiller.alpha_ready)
    for a, b in zip(trainer.distiller.alphas(), alphas, strict=True):
        assert torch.equal(a, b)
    fit = copy.deepcopy(raw_config())
    fit["method"] = {"name": "fitnets", "pairs": [["layer3", "layer3"]]}
    cfg.write_text(yaml.safe_dump(fit))
    assert main(["search", str(cfg), "--out", str(tmp_path / "s2")]) == 2
    assert "featkd search needs 'dfa'" in capsys.readouterr().err


def test_random_ablation_is_seeded_by_the_training_seed(tmp_path):
    alphas = []
    for seed in (0, 0, 1):
        raw = raw_config(aggregation="random")
        raw["train"].update(seed=seed, epochs=1)
        log: list[str] = []
        trainer = Trainer(build_config(raw), None, log=log.append)
        trainer.distiller.setup(trainer.context())
        assert any(f"random alpha (seed {seed})" in line for line in log)
        alphas.append([a.clone() for a in trainer.distiller.alphas()])
    assert all(torch.equal(a, b) for a, b in zip(alphas[0], alphas[1], strict=True))
    assert not torch.equal(alphas[0][0], alphas[2][0])


@pytest.mark.slow
def test_two_process_run_searches_identically_and_writes_once(tmp_path):
    import os
    import subprocess

    cfg = tmp_path / "dfa.yaml"
    cfg.write_text(yaml.safe_dump(raw_config()))
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "featkd", "train", str(cfg), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("dfa: searched alpha in") == 1  # rank 0 logs and writes
    record = json.loads((out / "alpha.json").read_text())
    ckpt = torch.load(out / "last.pt", weights_only=True)
    for i, g in enumerate(record["groups"]):
        assert torch.equal(ckpt["distiller"][f"alpha_{i}"], torch.tensor(g["alpha"], dtype=torch.float32))
    # every rank searched on the same split with the same seed: a single-process search gives the same alpha
    single = tmp_path / "single"
    assert main(["search", str(cfg), "--out", str(single)]) == 0
    one = json.loads((single / "alpha.json").read_text())
    for g, h in zip(record["groups"], one["groups"], strict=True):
        torch.testing.assert_close(torch.tensor(g["alpha"]), torch.tensor(h["alpha"]), rtol=0, atol=1e-6)
