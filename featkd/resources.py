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


def missing_config_hint(path: Path) -> str:
    """What to add to "config file PATH not found": how to get the file from the shipped examples.

    ``featkd train configs/NAME.yaml`` after a pip install, in a folder without the repository's ``configs/``,
    is the usual case: when NAME is a shipped config the hint is the ``featkd configs copy`` command that writes
    exactly PATH (with its base/ files); a near name is suggested the same way; anything else points at
    ``featkd configs list``. Empty when the shipped configs cannot be read, or for a run's ``config.yaml``.
    """
    if path.name == "config.yaml":  # a run folder's (featkd train --resume --out RUN): not an example
        return ""
    try:
        found = [n for n in example_configs() if not n.startswith("base/")]
    except FeatkdError:
        return ""
    stem = path.name.removesuffix(".yaml").removesuffix(".yml")
    dest = str(path.parent) if str(path.parent) not in ("", ".") else "."
    if path.parent.name == "base" and f"base/{stem}" in example_configs():
        return (f"; it is a shipped base file: `featkd configs copy NAME {path.parent.parent}` writes a config "
                "together with the base/ files it needs")
    if stem in found:
        return (f"; it is one of featkd's shipped configs: `featkd configs copy {stem} {dest}` writes it there "
                "(with the base/ files it needs)")
    close = did_you_mean(stem, found, limit=1)
    if close:
        name = close.split("'")[1]
        return (f"; the nearest shipped config is {name!r}: `featkd configs copy {name} {dest}` writes "
                f"{Path(dest) / (name + '.yaml')}")
    return "; `featkd configs list` shows the shipped configs, `featkd configs copy NAME .` copies one here"


def base_chain(path: Path) -> list[Path]:
    """The files that ``path``'s ``base:`` entries merge in, nearest first (each relative to its own file)."""
    import yaml  # a shipped config (resources sits below featkd.config, which reads the user's files)

    chain: list[Path] = []
    while isinstance(base := (yaml.safe_load(path.read_text()) or {}).get("base"), str):
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
