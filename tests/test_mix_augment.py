"""Classification training augmentation: torchvision v2 policies (data.augment_policy) seeded per (seed, epoch,
sample), mixup / cutmix (data.mixup_alpha / cutmix_alpha) seeded per (seed, epoch, batch) with soft targets, and
the teacher cache, which replays such streams and refuses a loader that does not say it is replayable."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from featkd.config import build_config
from featkd.data import DataConfig, build_data
from featkd.data.augment import MixSpec, apply_policy, mix_batch, policy_transform, seeded_cpu_rng
from featkd.data.loaders import InMemoryTrainLoader
from featkd.engine.teacher_cache import stream_ingredients
from featkd.engine.trainer import Trainer
from featkd.errors import ConfigError
from featkd.tasks import ClassificationTask
from tests.test_streaming import write_jpegs

QUIET = lambda _m: None  # noqa: E731


def epoch_samples(loader, epoch: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """``{split index: (image, target)}`` of one epoch."""
    loader.set_epoch(epoch)
    out = {}
    for x, y in loader:
        out.update({i: (xi, yi) for i, xi, yi in zip(loader.batch_indices.tolist(), x, y, strict=True)})
    return out


# ---------------------------------------------------------------------------------------------------------
# data.augment_policy


def test_seeded_cpu_rng_draws_what_torch_manual_seed_draws_and_restores_the_global_generator():
    torch.manual_seed(7)
    expected_after = torch.rand(3)
    torch.manual_seed(7)
    with seeded_cpu_rng(123) as generator:
        first = torch.randint(0, 1000, (4,))
        generator.manual_seed(5)
        second = torch.rand(2)
    assert torch.equal(torch.rand(3), expected_after)  # the run's own stream is untouched
    torch.manual_seed(123)
    assert torch.equal(first, torch.randint(0, 1000, (4,)))
    torch.manual_seed(5)
    assert torch.equal(second, torch.rand(2))


def test_a_policy_depends_on_seed_epoch_and_sample_only_and_leaves_the_runs_rng_alone():
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    policy = policy_transform("randaugment")
    state = torch.get_rng_state()
    a = apply_policy(images, torch.arange(6), policy, seed=3, epoch=1)
    b = apply_policy(images.flip(0), torch.arange(6).flip(0), policy, seed=3, epoch=1).flip(0)  # other places
    assert torch.equal(torch.get_rng_state(), state)
    assert a.dtype == torch.uint8 and torch.equal(a, b)
    assert not torch.equal(a, apply_policy(images, torch.arange(6), policy, seed=3, epoch=2))
    assert not torch.equal(a, images)


def test_in_memory_batches_with_a_policy_are_the_same_for_every_rank_split_and_change_per_epoch():
    data = build_data(DataConfig(dataset="digits", train_subset=128, augment_policy="trivialaugment"))
    assert "TrivialAugmentWide" in data.augmentation
    single = epoch_samples(data.train_loader(32, seed=1), 1)
    ranks = [epoch_samples(data.train_loader(32, seed=1, rank=r, world_size=2), 1) for r in range(2)]
    assert len(single) == 128 and sorted(ranks[0] | ranks[1]) == sorted(single)
    for part in ranks:
        for i, (x, y) in part.items():
            assert torch.equal(x, single[i][0]) and torch.equal(y, single[i][1])
    again = epoch_samples(data.train_loader(32, seed=1), 1)  # a resumed epoch repeats it
    assert all(torch.equal(again[i][0], single[i][0]) for i in single)
    other = epoch_samples(data.train_loader(32, seed=1), 2)
    assert sum(not torch.equal(other[i][0], single[i][0]) for i in single) > 64
    plain = epoch_samples(build_data(DataConfig(dataset="digits", train_subset=128)).train_loader(32, seed=1), 1)
    assert sum(not torch.equal(plain[i][0], single[i][0]) for i in single) > 64  # the policy changed images
    assert all(torch.isfinite(x).all() for x, _ in single.values())


# ---------------------------------------------------------------------------------------------------------
# data.mixup_alpha / cutmix_alpha


def test_mixup_mixes_each_sample_with_the_one_before_it_with_a_seeded_lambda():
    x, y = torch.randn(8, 1, 6, 6), torch.arange(8) % 4
    spec = MixSpec(mixup_alpha=0.4, num_classes=4)
    mixed, soft = mix_batch(x, y, spec, seed=0, epoch=2, batch=5)
    assert soft.shape == (8, 4) and soft.dtype == torch.float32
    torch.testing.assert_close(soft.sum(1), torch.ones(8))
    lam = soft[0, y[0]].item()  # y[0] = 0 and the sample before it (y[7] = 3) differ
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.roll(1, 0))
    again, soft_again = mix_batch(x, y, spec, seed=0, epoch=2, batch=5)
    assert torch.equal(again, mixed) and torch.equal(soft_again, soft)
    other = mix_batch(x, y, spec, seed=0, epoch=2, batch=6)[1]
    assert not torch.equal(other, soft)


def test_cutmix_pastes_one_box_and_its_lambda_is_the_area_left():
    x, y = torch.randn(8, 3, 16, 16), torch.arange(8) % 4
    spec = MixSpec(cutmix_alpha=1.0, num_classes=4)
    boxes = 0
    for batch in range(5):
        mixed, soft = mix_batch(x, y, spec, seed=1, epoch=0, batch=batch)
        pasted = (mixed != x).any(1)  # (B, H, W): pixels taken from the previous sample
        assert (pasted == pasted[0]).all()  # one box for the whole batch
        boxes += bool(pasted[0].any())
        assert torch.equal(mixed[:, :, ~pasted[0]], x[:, :, ~pasted[0]])
        assert torch.equal(mixed[:, :, pasted[0]], x.roll(1, 0)[:, :, pasted[0]])
        assert soft[0, y[0]].item() == pytest.approx(1 - pasted[0].float().mean().item())
    assert boxes >= 3


def test_mixed_in_memory_batches_have_soft_targets_and_the_task_reads_them():
    data = build_data(DataConfig(dataset="digits", train_subset=128, mixup_alpha=0.2, cutmix_alpha=1.0))
    assert data.soft_targets and "mixup (alpha 0.2) or cutmix (alpha 1)" in data.augmentation
    loader = data.train_loader(32, seed=0)
    loader.set_epoch(0)
    x, y = next(iter(loader))
    assert y.shape == (32, 10) and y.dtype == torch.float32
    task = ClassificationTask(10)
    logits = torch.randn(32, 10)
    ids = y.argmax(1)
    torch.testing.assert_close(task.loss(logits, F.one_hot(ids, 10).float()), task.loss(logits, ids))
    torch.testing.assert_close(task.loss(logits, y), -(y * logits.log_softmax(1)).sum(1).mean())
    correct, seen = task.train_counts(logits, y)
    assert correct == (logits.argmax(1) == ids).sum() and seen == 32
    unmixed = data.train_loader(32, seed=0)  # the same batch, mixed the same way on a fresh loader
    unmixed.set_epoch(0)
    assert torch.equal(next(iter(unmixed))[0], x)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_streamed_imagefolder_takes_the_policy_and_mixing_with_the_same_batches_for_any_workers(tmp_path):
    write_jpegs(tmp_path, {"train": 8, "val": 2})

    def batches(workers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        data = build_data(DataConfig(dataset="imagefolder", data_dir=str(tmp_path), image_size=16,
                                     num_workers=workers, augment_policy="autoaugment", mixup_alpha=0.3))
        assert data.soft_targets and "AutoAugment" in data.augmentation
        loader = data.train_loader(8, seed=4)
        loader.set_epoch(1)
        return list(loader)

    ref = batches(0)
    assert len(ref) == 3 and ref[0][1].shape == (8, 3)
    for (xa, ya), (xb, yb) in zip(ref, batches(1), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_a_method_that_reads_class_ids_refuses_mixed_batches():
    cfg = build_config({"data": {"dataset": "digits", "mixup_alpha": 0.2},
                        "teacher": {"model": "resnet20", "checkpoint": "zoo:digits-resnet20"},
                        "student": {"model": "resnet8"}, "method": {"name": "dkd"},
                        "train": {"num_threads": 1, "progress": "off"}})
    with pytest.raises(ConfigError, match=r"^data\.mixup_alpha / cutmix_alpha: method 'dkd' .* reads the targets as "
                                          r"class ids"):
        Trainer(cfg, log=QUIET)


# ---------------------------------------------------------------------------------------------------------
# the teacher cache


def kd_config(cache: Path | None, **data: Any):
    return build_config({
        "name": "t", "data": {"dataset": "digits", "train_subset": 256, "batch_size": 64, **data},
        "teacher": {"model": "resnet20", "checkpoint": "zoo:digits-resnet20"}, "student": {"model": "resnet8"},
        "method": {"name": "kd", "ce_weight": 0.5, "kd_weight": 0.5}, "optim": {"lr": 0.05},
        "train": {"epochs": 2, "deterministic": True, "num_threads": 1, "progress": "off", "tensorboard": False,
                  "teacher_cache": str(cache) if cache else None},
    })


def test_a_stream_with_a_policy_and_mixup_is_cached_and_replayed_bit_for_bit(tmp_path, one_thread):
    recipe = {"augment_policy": "randaugment", "mixup_alpha": 0.2, "cutmix_alpha": 1.0}
    cache = tmp_path / "cache"
    for name, c in (("plain", None), ("first", cache), ("second", cache)):
        Trainer(kd_config(c, **recipe), tmp_path / name, log=QUIET).fit()
    first, second = (json.loads((tmp_path / n / "summary.json").read_text())["teacher_cache"]
                     for n in ("first", "second"))
    assert first["written_epochs"] == 2 and "off" not in first
    assert second["read_steps"] == 8 and second["teacher_steps"] == 0  # every input's fingerprint matched
    a, b, c = (torch.load(tmp_path / n / "student.pt", weights_only=True) for n in ("plain", "first", "second"))
    for key in a:
        assert torch.equal(a[key], b[key]) and torch.equal(a[key], c[key]), key
    (stream,) = cache.iterdir()
    key = json.loads((stream / "key.json").read_text())
    assert key["data"]["augment_policy"] == "randaugment" and key["data"]["mixup_alpha"] == 0.2
    assert "torchvision" in key["data"]


def test_the_cache_key_leaves_out_the_new_data_keys_at_their_defaults(one_thread):
    trainer = Trainer(kd_config(None), log=QUIET)
    data = stream_ingredients(trainer.run, trainer.batches_per_epoch)["data"]
    assert not {"augment_policy", "mixup_alpha", "cutmix_alpha", "torchvision"} & set(data)


def test_a_loader_that_does_not_say_it_is_replayable_turns_the_cache_off_with_one_line(tmp_path, monkeypatch,
                                                                                      one_thread):
    monkeypatch.setattr(InMemoryTrainLoader, "replayable", False)  # as a data set's own loader would be
    logs: list[str] = []
    cfg = kd_config(tmp_path / "cache")
    cfg.train.epochs = 1
    Trainer(cfg, tmp_path / "run", log=logs.append).fit()
    (line,) = [m for m in logs if m.startswith("teacher cache: off")]
    assert "training loader (InMemoryTrainLoader) does not say that its batches are a function of (seed, epoch)" \
        in line
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())["teacher_cache"]
    assert summary["written_epochs"] == 0 and summary["off"] and not (tmp_path / "cache").exists()
