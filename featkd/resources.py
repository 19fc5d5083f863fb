"""The files featkd ships beside its code: the example configs, the benchmark protocols and the model zoo.

They are package data, ``featkd/_data/{configs,protocols,zoo}``, read through :mod:`importlib.resources`, so an
installed wheel has them wherever it is run from. There is one copy of each file: in a clone the three entries
are symbolic links to the repository's ``configs/``, ``benchmarks/protocols/`` and ``zoo/`` (developers edit
those), and building the wheel copies the files themselves into it. The functions return resolved folders:
the repository's in a clone, ``site-packages/featkd/_data/...`` in an installed wheel.

A config's ``base:`` is relative to the config file, so a shipped config and its ``base/`` files work as
they are; ``featkd configs copy`` copies both. Protocols name configs as ``configs/<name>.yaml``, relative
to :func:`data_root`.
"""

from __future__ import annotations

import os
import shutil
from importlib import resources
from pathlib import Path

from featkd.errors import FeatkdError, did_you_mean

KINDS = ("configs", "protocols", "zoo")


def data_root() -> Path:
    """The folder that holds ``configs/``, ``protocols/`` and ``zoo/`` (``featkd/_data``)."""
    root = resources.files("featkd") / "_data"
    if not isinstance(root, Path):  # a zip import: the configs' base files and the runs need real folders
        raise FeatkdError(f"featkd's data is not in a folder ({root}); install featkd as a wheel or from a clone")
    return root


def shipped(kind: str) -> Path:
    """The resolved folder of one kind of shipped files (``configs``, ``protocols`` or ``zoo``)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind of shipped files {kind!r} (known: {', '.join(KINDS)})")
    path = data_root() / kind
    if not path.is_dir():
        hint = ("a clone made without symbolic links (git config core.symlinks true, then check out again)"
                if path.is_symlink() or path.is_file() else "an incomplete installation")
        raise FeatkdError(f"featkd's shipped {kind} are missing ({path}): {hint}")
    return path.resolve()


def configs_dir() -> Path:
    """The example configs: ``$FEATKD_CONFIGS`` if set, else the shipped ones."""
    if os.environ.get("FEATKD_CONFIGS"):
        return Path(os.environ["FEATKD_CONFIGS"])
    return shipped("configs")


def protocols_dir() -> Path:
    """The benchmark protocols: ``$FEATKD_PROTOCOLS`` if set, else the shipped ones."""
    if os.environ.get("FEATKD_PROTOCOLS"):
        return Path(os.environ["FEATKD_PROTOCOLS"])
    return shipped("protocols")


def zoo_dir() -> Path:
    """The shipped model zoo (``manifest.json`` and the weights it lists)."""
    return shipped("zoo")


def example_configs() -> dict[str, Path]:
    """``{name: file}`` of the example configs (``NAME.yaml``), then their shared files (``base/NAME``)."""
    folder = configs_dir()
    found = {p.stem: p for p in sorted(folder.glob("*.yaml"))}
    found.update({f"base/{p.stem}": p for p in sorted(folder.glob("base/*.yaml"))})
    return found


def example_config(name: str) -> Path:
    """The example config called ``name`` (``digits-kd-resnet20-resnet8``; ``.yaml`` and ``configs/`` optional)."""
    key = name.removeprefix("configs/").removesuffix(".yaml")
    found = example_configs()
    if key not in found:
        raise FeatkdError(f"unknown example config {name!r}{did_you_mean(key, found)}; "
                          "`featkd configs list` shows them")
    return found[key]


def base_chain(path: Path) -> list[Path]:
    """The files that ``path``'s ``base:`` entries merge in, nearest first (each relative to its own file)."""
    from featkd.config import read_yaml

    chain: list[Path] = []
    while isinstance(base := read_yaml(path).get("base"), str):
        path = (path.parent / base).resolve()
        if path in chain:
            raise FeatkdError(f"{path}: 'base' files include each other in a loop")
        chain.append(path)
    return chain


def copy_example(name: str, dest: str | os.PathLike[str]) -> list[Path]:
    """Copy the example config ``name`` and the ``base/`` files it needs into ``dest``; the files written.

    The copy trains as it is (``featkd train DEST/NAME.yaml``). Nothing is overwritten: an existing
    ``DEST/NAME.yaml`` is an error, and so is an existing base file that differs from the shipped one (one
    that is the same is kept, so several examples can be copied into one folder). Checked before writing.
    """
    source = example_config(name)
    root = configs_dir().resolve()
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise FeatkdError(f"{dest} exists and is not a folder")
    plan = []
    for i, path in enumerate([source.resolve(), *base_chain(source.resolve())]):
        try:
            rel = path.relative_to(root)
        except ValueError:
            raise FeatkdError(f"{source}: base file {path} is outside {root}; copy it by hand") from None
        target = dest / rel
        if target.exists():
            if i == 0:
                raise FeatkdError(f"{target} exists; not overwritten (remove it or copy into another folder)")
            if target.read_bytes() != path.read_bytes():
                raise FeatkdError(f"{target} exists and differs from the shipped {rel}; not overwritten "
                                  "(remove it or copy into another folder)")
            continue
        plan.append((path, target))
    for path, target in plan:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return [target for _, target in plan]
