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
    """A checkpoint path for ``spec``: ``zoo:NAME`` (checksum verified; a published checkpoint is downloaded
    and converted on first use) or a file path."""
    if not spec.startswith(ZOO_PREFIX):
        return Path(spec)
    entry = zoo_entry(spec[len(ZOO_PREFIX):])
    if is_download(entry) and ("sha256" not in entry or not Path(entry["path"]).is_file()):
        entry = fetch(entry)
    problem = verify_entry(entry)
    if problem:
        raise FeatkdError(f"zoo entry {entry['name']!r}: {problem}")
    return Path(entry["path"])


def verify_entry(entry: dict[str, Any]) -> str | None:
    """None if the entry's file is there with the manifest's sha256, else what is wrong (one phrase).

    For a recipe: None once it is built (the built file's sha256 is the one its build recorded), else the
    command that builds it.
    """
    if is_download(entry) and "sha256" not in entry:
        return f"not downloaded yet: fetched from {entry['url']} on first use (needs a network)"
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
    """An entry whose weights are not shipped (no ``file``): built by ``featkd zoo build NAME``, or (with a
    ``url``) downloaded on first use."""
    return "file" not in entry


def is_download(entry: dict[str, Any]) -> bool:
    """A published checkpoint (``url``): fetched into :func:`build_dir` on first use (:func:`fetch`)."""
    return "url" in entry


def build_dir() -> Path:
    """Where ``featkd zoo build`` puts weights: ``$FEATKD_CACHE/zoo`` (default ``$XDG_CACHE_HOME/featkd``,
    else ``~/.cache/featkd``)."""
    root = os.environ.get("FEATKD_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "featkd"
    return Path(root).expanduser() / "zoo"


def _with_paths(item: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A manifest item with its resolved ``path`` (and, for a built recipe, the build's sha256 and record)."""
    if not is_recipe(item):
        return {**item, "path": str(folder / item["file"])}
    entry = {**item, "path": str(build_dir() / f"{item['name']}.pt")}
    if not is_download(item):
        entry["recipe_config"] = str(folder / item["config"])
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


# ---------------------------------------------------------------------------------------------------------
# published checkpoints: entries with a `url`, downloaded and converted on first use
# ---------------------------------------------------------------------------------------------------------


def convert_state(obj: Any, entry: dict[str, Any]) -> dict[str, Any]:
    """The state_dict inside a published checkpoint, in the model's own key names: ``obj[state_key]`` (e.g.
    RepDistiller's ``model``, KDA's ``state_dict``), a DataParallel ``module.`` prefix removed, then each
    ``rename`` rule ``[regex, replacement]`` applied to every key in order."""
    import re

    key = entry.get("state_key")
    if key is not None:
        if not isinstance(obj, dict) or key not in obj:
            found = ", ".join(map(str, list(obj)[:5])) if isinstance(obj, dict) else type(obj).__name__
            raise FeatkdError(f"zoo entry {entry['name']!r}: the download has no {key!r} (it holds {found})")
        obj = obj[key]
    state = {}
    for name, value in obj.items():
        name = name.removeprefix("module.")
        for pattern, replacement in entry.get("rename", []):
            name = re.sub(pattern, replacement, name)
        state[name] = value
    return state


def fetch(entry: dict[str, Any]) -> dict[str, Any]:
    """Download a published checkpoint once (``url``) into ``build_dir()/downloads``, check its sha256 (the
    manifest's ``sha256_download``, or torchvision's 8-hex ``sha256_prefix`` in its file name; an entry with
    neither is trusted on first use and its digest recorded, so a later different file is refused), convert it
    (:func:`convert_state`) to ``build_dir()/NAME.pt`` and record both digests in ``NAME.json``. Returns the
    entry with its ``sha256``. Offline: one line saying where to put the file."""
    import datetime
    import urllib.error

    import torch

    from featkd.files import atomic_file, atomic_write_json

    name, url = entry["name"], entry["url"]
    # the entry's name first: RepDistiller's files all share one name (ckpt_epoch_240.pth)
    raw = build_dir() / "downloads" / f"{name}-{url.rstrip('/').split('/')[-1]}"
    if not raw.is_file():
        raw.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(raw), progress=False)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or str(exc).splitlines()[0]
            raise FeatkdError(f"zoo entry {name!r}: cannot download {url} ({reason}); without a network, fetch it "
                              f"elsewhere and put it at {raw}") from None
    digest = sha256_of(raw)
    record_path = build_dir() / f"{name}.json"
    old = json.loads(record_path.read_text()) if record_path.is_file() else {}
    expected = entry.get("sha256_download") or old.get("sha256_download")
    prefix = entry.get("sha256_prefix")
    if (expected and digest != expected) or (prefix and not digest.startswith(prefix)):
        raise FeatkdError(f"zoo entry {name!r}: {raw} has sha256 {digest[:12]}..., expected "
                          f"{(expected or prefix)[:12]}...: a corrupt or different file (delete it to download "
                          "again)")
    from featkd.engine.checkpoint import load_file

    state = convert_state(load_file(raw, f"zoo entry {name!r} download"), entry)
    with atomic_file(entry["path"], "wb", fsync=True) as f:
        torch.save(state, f)
    record = {"sha256": sha256_of(entry["path"]), "sha256_download": digest, "url": url,
              "trusted_on_first_use": not (entry.get("sha256_download") or prefix),
              "fetched": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    atomic_write_json(record_path, record, indent=2)
    return {**entry, "sha256": record["sha256"], "built": record}
