"""The model zoo: trained weights shipped with featkd (the repository's ``zoo/``, package data in a wheel).

``zoo/manifest.json`` holds one entry per file: ``name``, ``file``, ``sha256``, ``dataset``, ``model``,
``options``, ``test_acc`` (measured by the recorded command), ``config`` and ``command`` (how it was made).
A config refers to an entry as ``checkpoint: zoo:NAME``; the file's checksum is verified before use.

A *recipe* is an entry without ``file``: weights that are not shipped (too slow to train for the repository,
or not measured yet), with the ``config`` (in the zoo folder) and the ``command`` that makes them,
``featkd zoo build NAME`` (:func:`featkd.apps.zoo_build.build_recipe`). Its ``test_acc`` is the accuracy a
build must reach, within ``tolerance`` points (default :data:`featkd.apps.zoo_build.DEFAULT_TOLERANCE`; null:
not measured yet, the build records what it measures). Built weights go to :func:`build_dir`
(``$FEATKD_CACHE/zoo``, default ``~/.cache/featkd/zoo``: outside the package, so an installed featkd builds
them too) as ``NAME.pt`` beside ``NAME.json`` (its sha256, the measured accuracy, the run folder); from then
on ``zoo:NAME`` resolves to them. Until then ``zoo:NAME`` fails with the command to run.

This module only looks entries up (model building needs it); writing the zoo, ``featkd zoo build`` and
``featkd zoo add``, is :mod:`featkd.apps.zoo_build` (it trains, so it sits above the engine).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from featkd.errors import FeatkdError, did_you_mean

ZOO_PREFIX = "zoo:"


def zoo_dirs() -> list[Path]:
    """Where zoo manifests are looked for: $FEATKD_ZOO, the shipped zoo (the repository's zoo/ in a clone), ./zoo."""
    from featkd.resources import zoo_dir

    dirs = []
    if os.environ.get("FEATKD_ZOO"):
        dirs.append(Path(os.environ["FEATKD_ZOO"]).resolve())
    dirs.append(zoo_dir())
    dirs.append((Path.cwd() / "zoo").resolve())
    return [d for i, d in enumerate(dirs) if d not in dirs[:i]]


def load_manifest() -> dict[str, dict[str, Any]]:
    """All zoo entries by name (first folder wins), each with its resolved ``path``."""
    entries: dict[str, dict[str, Any]] = {}
    for folder in zoo_dirs():
        manifest = folder / "manifest.json"
        if not manifest.is_file():
            continue
        try:
            items = json.loads(manifest.read_text())
        except json.JSONDecodeError as exc:
            raise FeatkdError(f"{manifest}: not valid JSON ({exc})") from None
        for item in items:
            entries.setdefault(item["name"], _with_paths(item, folder))
    return entries


def sha256_of(path: str | Path) -> str:
    """The hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def zoo_entry(name: str) -> dict[str, Any]:
    entries = load_manifest()
    if name not in entries:
        raise FeatkdError(
            f"unknown zoo entry {name!r}{did_you_mean(name, entries)}; `featkd zoo list` shows "
            f"{', '.join(sorted(entries)) or 'none (no zoo/manifest.json found)'}"
        )
    return entries[name]


def resolve_weights(spec: str) -> Path:
    """A checkpoint path for ``spec``: ``zoo:NAME`` (checksum verified) or a file path."""
    if not spec.startswith(ZOO_PREFIX):
        return Path(spec)
    entry = zoo_entry(spec[len(ZOO_PREFIX):])
    problem = verify_entry(entry)
    if problem:
        raise FeatkdError(f"zoo entry {entry['name']!r}: {problem}")
    return Path(entry["path"])


def verify_entry(entry: dict[str, Any]) -> str | None:
    """None if the entry's file is there with the manifest's sha256, else what is wrong (one phrase).

    For a recipe: None once it is built (the built file's sha256 is the one its build recorded), else the
    command that builds it.
    """
    if is_recipe(entry) and "sha256" not in entry:
        return recipe_hint(entry)
    path = Path(entry["path"])
    if not path.is_file():
        return f"file {path} is missing"
    digest = sha256_of(path)
    if digest != entry["sha256"]:
        return (f"{path} has sha256 {digest[:12]}..., manifest says {entry['sha256'][:12]}...; "
                "the file is corrupt or was replaced")
    return None


def entry_score(entry: dict[str, Any]) -> tuple[str, float]:
    """(metric name, measured test value) of a manifest entry."""
    metric = entry.get("metric", "acc")
    return metric, entry[f"test_{metric}"]


# ---------------------------------------------------------------------------------------------------------
# recipes: entries whose weights are built locally by `featkd zoo build NAME`
# ---------------------------------------------------------------------------------------------------------


def is_recipe(entry: dict[str, Any]) -> bool:
    """An entry whose weights are not shipped (no ``file``): built by ``featkd zoo build NAME``."""
    return "file" not in entry


def build_dir() -> Path:
    """Where ``featkd zoo build`` puts weights: ``$FEATKD_CACHE/zoo`` (default ``$XDG_CACHE_HOME/featkd``,
    else ``~/.cache/featkd``)."""
    root = os.environ.get("FEATKD_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "featkd"
    return Path(root).expanduser() / "zoo"


def _with_paths(item: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A manifest item with its resolved ``path`` (and, for a built recipe, the build's sha256 and record)."""
    if not is_recipe(item):
        return {**item, "path": str(folder / item["file"])}
    entry = {**item, "path": str(build_dir() / f"{item['name']}.pt"), "recipe_config": str(folder / item["config"])}
    record = build_dir() / f"{item['name']}.json"
    if record.is_file():
        try:
            built = json.loads(record.read_text())
        except json.JSONDecodeError:
            built = {}
        if isinstance(built, dict) and "sha256" in built:
            entry.update(sha256=built["sha256"], built=built)
    return entry


def recipe_hint(entry: dict[str, Any]) -> str:
    """What to run for an unbuilt recipe (one phrase, with what it trains and the recorded accuracy)."""
    metric, value = entry.get("metric", "acc"), entry.get(f"test_{entry.get('metric', 'acc')}")
    recorded = f"recorded test_{metric} {value:.2f}" if value is not None else f"test_{metric} not recorded yet"
    took = f", {entry['train_seconds'] / 60:.0f} min on one CPU core" if entry.get("train_seconds") else ""
    return (f"a recipe whose weights are not built yet: run `featkd zoo build {entry['name']}` (trains "
            f"{entry['model']} on {entry['dataset']}{took}; {recorded})")
