"""CRD: the NCE loss and Z against plain formulas on a 4-sample bank with fixed negatives, the momentum update,
the bank in checkpoints (state_dict and a resumed run), the negatives, the indices plumbing and real runs."""

from __future__ import annotations

import dataclasses
import io
import math
import sys

import pytest
import torch
import yaml

from featkd.config import build_config, from_dict
from featkd.errors import FeatkdError
from featkd.methods import METHODS
from featkd.methods.crd import momentum_update, nce_scores
from tests.helpers import tiny_context

QUIET = lambda _m: None  # noqa: E731


def make(train_size: int = 4, **options):
    cls = METHODS.get("crd")
    ctx = dataclasses.replace(tiny_context(), train_size=train_size)
    return cls(from_dict(cls.Config, {"negatives": "uniform", **options}, "method"), ctx)


def dot(a, b) -> float:
    return sum(x * y for x, y in zip(a, b))


def unit(v):
    n = math.sqrt(dot(v, v))
    return [x / n for x in v]


BANK_S = [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.6, 0.8]]
BANK_T = [[0.8, 0.6], [0.0, -1.0], [0.6, -0.8], [-1.0, 0.0]]
V_S = [[1.0, 0.0], [0.6, 0.8]]
V_T = [[0.6, 0.8], [0.8, -0.6]]
IDX = [1, 3]
CONTRAST = [[1, 0, 2], [3, 2, 0]]  # column 0: the positive (the sample itself), then K = 2 fixed negatives


def test_nce_loss_z_and_bank_update_by_hand():
    n, k, temp, m = 4, 2, 0.5, 0.5
    d = make(feat_dim=2, nce_k=k, nce_t=temp, nce_m=m)
    d.bank_s.copy_(torch.tensor(BANK_S))
    d.bank_t.copy_(torch.tensor(BANK_T))
    v_s = torch.tensor(V_S, requires_grad=True)
    v_t = torch.tensor(V_T, requires_grad=True)
    loss = d.nce(v_s, v_t, torch.tensor(IDX), torch.tensor(CONTRAST))

    # plain formulas: e = exp(<memory row, anchor> / T); the student anchors against the teacher's memory
    e_s = [[math.exp(dot(BANK_T[j], V_S[b]) / temp) for j in CONTRAST[b]] for b in range(2)]
    e_t = [[math.exp(dot(BANK_S[j], V_T[b]) / temp) for j in CONTRAST[b]] for b in range(2)]
    z_s, z_t = (sum(map(sum, e)) / 6 * n for e in (e_s, e_t))  # first batch: mean of the 2 x 3 scores * N

    def nce(e, z):
        noise = k / n
        total = 0.0
        for row in e:
            p = [v / z for v in row]
            total += math.log(p[0] / (p[0] + noise + 1e-7))
            total += sum(math.log(noise / (q + noise + 1e-7)) for q in p[1:])
        return -total / len(e)

    assert d.z.tolist() == pytest.approx([z_s, z_t], rel=1e-6)
    assert loss.item() == pytest.approx(nce(e_s, z_s) + nce(e_t, z_t), rel=1e-5)
    loss.backward()
    assert v_s.grad.abs().sum() > 0 and v_t.grad.abs().sum() > 0

    # rows 1 and 3 moved halfway to the batch's embeddings and were renormalised; rows 0 and 2 untouched
    for bank, old, v in ((d.bank_s, BANK_S, V_S), (d.bank_t, BANK_T, V_T)):
        want = [list(r) for r in old]
        for b, i in enumerate(IDX):
            want[i] = unit([m * a + (1 - m) * c for a, c in zip(old[i], v[b])])
        torch.testing.assert_close(bank, torch.tensor(want))

    # Z is estimated once: a second batch keeps it
    d.nce(v_s.detach(), v_t.detach(), torch.tensor(IDX), torch.tensor(CONTRAST))
    assert d.z.tolist() == pytest.approx([z_s, z_t], rel=1e-6)


def test_scores_by_gather_and_by_matmul_agree_with_loops():
    g = torch.Generator().manual_seed(0)
    bank, anchor = torch.randn(50, 4, generator=g), torch.randn(3, 4, generator=g)
    for k1 in (5, 30):  # 2 (K+1) < N: RepDistiller's gather of the rows; otherwise matmul then gather
        rows = torch.randint(0, 50, (3, k1), generator=g)
        want = torch.tensor([[math.exp(dot(bank[j].tolist(), anchor[b].tolist()) / 0.07) for j in rows[b].tolist()]
                             for b in range(3)])
        torch.testing.assert_close(nce_scores(anchor, bank, rows, 0.07), want, rtol=1e-4, atol=0)


def test_momentum_update_keeps_the_first_of_repeated_indices():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    v = torch.tensor([[0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])
    momentum_update(bank, torch.tensor([2, 0, 2]), v, 0.0)  # momentum 0: the row becomes the embedding
    torch.testing.assert_close(bank, torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]))


def test_bank_and_z_round_trip_through_state_dict():
    d = make(train_size=10, feat_dim=3, nce_k=4)
    v = torch.nn.functional.normalize(torch.randn(2, 3), dim=1)
    d.nce(v, v, torch.tensor([0, 7]), torch.tensor([[0, 1, 2, 3, 4], [7, 5, 6, 8, 9]]))
    buf = io.BytesIO()
    torch.save(d.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert {"bank_s", "bank_t", "z"} <= set(state) and state["bank_s"].shape == (10, 3)
    torch.manual_seed(1)
    other = make(train_size=10, feat_dim=3, nce_k=4)
    assert not torch.equal(other.bank_s, d.bank_s) and other.z.tolist() == [-1.0, -1.0]
    other.load_state_dict(state)
    for name, value in d.state_dict().items():
        assert torch.equal(other.state_dict()[name], value), name


def test_options_checked_and_k_capped_at_n_minus_1():
    assert make(train_size=10).k == 9  # nce_k 16384 (RepDistiller) > N - 1
    cfg = make().cfg
    assert (cfg.weight, cfg.feat_dim, cfg.nce_k, cfg.nce_t, cfg.nce_m) == (0.8, 128, 16384, 0.07, 0.5)
    for key, value in (("nce_m", 1.0), ("nce_t", 0.0), ("negatives", "hard")):
        with pytest.raises(FeatkdError, match=rf"method\.{key}"):
            make(**{key: value})
    with pytest.raises(FeatkdError, match="training split's size"):
        make(train_size=None)


def digits_config(train: dict | None = None, **method):
    return build_config({
        "name": "crd", "data": {"dataset": "digits", "train_subset": 120, "batch_size": 32},
        "teacher": {"model": "resnet20", "checkpoint": "zoo:digits-resnet20"}, "student": {"model": "resnet8"},
        "method": {"name": "crd", **method}, "optim": {"lr": 0.05, "schedule": "cosine"},
        "train": {"epochs": 2, "deterministic": True, "num_threads": 1, "progress": "off", "tensorboard": False,
                  **(train or {})},
    })


def test_other_class_negatives_are_seeded_by_step_and_of_other_classes():
    from featkd.engine.build import build_run

    run = build_run(digits_config(nce_k=40), QUIET)
    d = run.distiller
    d.setup(run.context())
    loader = run.data.train_loader(32, seed=0, device="cpu")
    _x, y = next(iter(loader))
    idx = loader.batch_indices
    labels = torch.cat([yy for _, yy in run.data.train_eval_loader(500)])  # the eval view, in index order
    a, b, c = d.draw_contrast(idx, y, 5), d.draw_contrast(idx, y, 5), d.draw_contrast(idx, y, 6)
    assert a.shape == (32, 41) and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[:, 0], idx) and torch.equal(labels[idx], y)
    assert (labels[a[:, 1:]] != y.unsqueeze(1)).all()  # negatives: other classes only (RepDistiller's exact mode)
    assert all(len(set(row)) == 40 for row in a[:, 1:].tolist())  # 40 <= ~108 others: without replacement
    many = build_run(digits_config(), QUIET).distiller  # K = 119 > the ~108 other-class samples: with replacement
    many.setup(run.context())
    neg = many.draw_contrast(idx, y, 0)[:, 1:]
    assert neg.shape == (32, 119) and (labels[neg] != y.unsqueeze(1)).all()


def test_digits_run_is_finite_fills_the_bank_and_resumes_exactly(tmp_path):
    from featkd.engine.trainer import train

    full = train(digits_config(), tmp_path / "full", log=QUIET)
    assert full.status == "finished" and math.isfinite(full.history[-1]["train_crd"])
    state = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["distiller"]
    assert state["bank_s"].shape == (120, 128) and (state["z"] > 0).all()
    # every sample was in a batch (drop_last keeps 96 of 120 per epoch; two epochs, two orders): unit rows
    seen = (state["bank_s"].norm(dim=1) - 1).abs() < 1e-5
    assert seen.sum() >= 96

    assert train(digits_config({"stop_after": 1}), tmp_path / "split", log=QUIET).status == "stopped"
    train(digits_config(), tmp_path / "split", resume=True, log=QUIET)
    resumed = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    for part in ("student", "distiller"):
        for key, value in torch.load(tmp_path / "full" / "last.pt", weights_only=True)[part].items():
            assert torch.equal(resumed[part][key], value), f"{part}.{key} differs after resume"


def test_the_step_timer_passes_each_batch_its_indices():
    """featkd bench's side-by-side step timing (timing.trainer_step) runs CRD, which needs Batch.indices."""
    from featkd.bench.timing import trainer_step
    from featkd.engine.trainer import Trainer

    trainer = Trainer(digits_config(), None, log=QUIET)
    trainer.distiller.setup(trainer.context())  # the other-class negatives' label table, as bench does
    before = trainer.distiller.bank_s.clone()
    step = trainer_step(trainer, batches=2)
    step()
    step()
    assert not torch.equal(trainer.distiller.bank_s, before)  # both batches wrote their samples' rows


def test_plain_loop_api_takes_indices():
    from featkd import Distillation
    from featkd.models import create_model

    torch.manual_seed(0)
    teacher, student = create_model("resnet8", num_classes=3, in_channels=1), create_model("resnet8", num_classes=3,
                                                                                          in_channels=1)
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    kd = Distillation(teacher, student, "crd", {"negatives": "uniform", "feat_dim": 8}, example_input=x,
                      train_size=20)
    losses = kd(x, y, indices=torch.tensor([3, 9, 0, 17]))
    assert set(losses) == {"ce", "crd"} and torch.isfinite(losses["crd"])
    with pytest.raises(FeatkdError, match="indices"):
        kd(x, y)
    with pytest.raises(FeatkdError, match="train_size"):
        Distillation(teacher, student, "crd", example_input=x)


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
SCRIPT = """
import sys, torch, yaml
from featkd.config import build_config
from featkd.engine.trainer import Trainer
t = Trainer(build_config(yaml.safe_load(open(sys.argv[1]))), None, log=lambda _m: None)
t.fit()
ignored = set(getattr(t.module.module, "_ddp_params_and_buffers_to_ignore", ()))
d = t.distiller
torch.save({"bank_s": d.bank_s, "bank_t": d.bank_t, "z": d.z, "ignored": sorted(ignored)},
           sys.argv[2] + f"/rank{t.dist.rank}.pt")
"""


@pytest.mark.slow
def test_two_process_banks_stay_identical(tmp_path):
    """Under torchrun (gloo) each rank sees its shard; the all-gathered update keeps both banks equal, with
    DDP told not to broadcast them (so equality is the update's doing)."""
    from tests.test_ddp import run  # one thread per process, the repository as working directory

    cfg = digits_config().to_dict()
    cfg["data"]["train_subset"] = 126  # 63 per rank, 16 a batch: 3 steps an epoch
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "crd_ddp.py").write_text(SCRIPT)
    run([*TORCHRUN, str(tmp_path / "crd_ddp.py"), str(tmp_path / "cfg.yaml"), str(tmp_path)])
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert {"distiller.bank_s", "distiller.bank_t", "distiller.z"} <= set(r0["ignored"])
    initial = (r0["bank_s"].norm(dim=1) - 1).abs() > 1e-5  # rows never updated keep their random start
    assert (~initial).sum() >= 96  # 2 epochs x 3 steps x 32 samples (both ranks' halves) of the 126
    for key in ("bank_s", "bank_t", "z"):
        assert torch.equal(r0[key], r1[key]), key
