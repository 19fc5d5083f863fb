"""The model zoo: trained weights shipped in the repository's ``zoo/`` folder, listed in its manifest.

``zoo/manifest.json`` holds one entry per file: ``name``, ``file``, ``sha256``, ``dataset``, ``model``,
``options``, ``test_acc`` (measured by the recorded command), ``config`` and ``command`` (how it was made).
A config refers to an entry as ``checkpoint: zoo:NAME``; the file's checksum is verified before use.
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
    """Where zoo manifests are looked for: $FEATKD_ZOO, the repository's zoo/, ./zoo."""
    dirs = []
    if os.environ.get("FEATKD_ZOO"):
        dirs.append(Path(os.environ["FEATKD_ZOO"]))
    dirs.append(Path(__file__).resolve().parents[1] / "zoo")
    dirs.append(Path.cwd() / "zoo")
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
            entries.setdefault(item["name"], {**item, "path": str(folder / item["file"])})
    return entries


def sha256_of(path: str | Path) -> str:
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
    path = Path(entry["path"])
    if not path.is_file():
        raise FeatkdError(f"zoo entry {entry['name']!r}: file {path} is missing")
    digest = sha256_of(path)
    if digest != entry["sha256"]:
        raise FeatkdError(f"zoo entry {entry['name']!r}: {path} has sha256 {digest[:12]}..., "
                          f"manifest says {entry['sha256'][:12]}...; the file is corrupt or was replaced")
    return path


def _measured(summary: dict[str, Any]) -> dict[str, Any]:
    """The run's final test metric as the manifest records it: ``test_acc`` for classifiers (every entry has
    had it), ``metric`` + ``test_<metric>`` for other tasks (``test_miou`` for segmenters)."""
    metric = summary.get("metric", "acc")
    value = summary.get("test_metric", summary.get("test_acc"))
    return {"test_acc": value} if metric == "acc" else {"metric": metric, f"test_{metric}": value}


def entry_score(entry: dict[str, Any]) -> tuple[str, float]:
    """(metric name, measured test value) of a manifest entry."""
    metric = entry.get("metric", "acc")
    return metric, entry[f"test_{metric}"]


def add_entry(run_dir: str | Path, name: str, zoo_dir: str | Path = "zoo") -> dict[str, Any]:
    """Copy a finished run's student into the zoo and record it in the manifest (see ``featkd zoo add``)."""
    import shutil

    from featkd.config import load_raw

    run_dir, zoo_dir = Path(run_dir), Path(zoo_dir)
    summary_path = run_dir / "summary.json"
    for required in ("student.pt", "config.yaml", "summary.json"):
        if not (run_dir / required).is_file():
            raise FeatkdError(f"{run_dir / required} not found: zoo add needs a finished run folder")
    summary = json.loads(summary_path.read_text())
    if summary.get("status") != "finished":
        raise FeatkdError(f"{run_dir} did not finish (status {summary.get('status')!r})")
    config = load_raw(run_dir / "config.yaml")
    command = (run_dir / "command.txt").read_text().strip() if (run_dir / "command.txt").is_file() else ""
    zoo_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run_dir / "student.pt", zoo_dir / f"{name}.pt")
    shutil.copyfile(run_dir / "config.yaml", zoo_dir / f"{name}.yaml")
    entry = {
        "name": name, "file": f"{name}.pt", "sha256": sha256_of(zoo_dir / f"{name}.pt"),
        "dataset": config["data"]["dataset"], "model": config["student"]["model"],
        "options": config["student"].get("options", {}), **_measured(summary),
        "epochs": summary["epochs"], "train_seconds": round(summary["train_seconds"], 1),
        "config": f"{name}.yaml", "command": command,
    }
    manifest = zoo_dir / "manifest.json"
    items = json.loads(manifest.read_text()) if manifest.is_file() else []
    items = [e for e in items if e["name"] != name] + [entry]
    tmp = manifest.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(sorted(items, key=lambda e: e["name"]), indent=2) + "\n")
    tmp.replace(manifest)
    return entry
