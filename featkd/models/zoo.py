"""The model zoo: trained weights shipped with featkd (the repository's ``zoo/``, package data in a wheel).

``zoo/manifest.json`` holds one entry per file: ``name``, ``file``, ``sha256``, ``dataset``, ``model``,
``options``, ``test_acc`` (measured by the recorded command), ``config`` and ``command`` (how it was made).
A config refers to an entry as ``checkpoint: zoo:NAME``; the file's checksum is verified before use.

A *recipe* is an entry without ``file``: weights that are not shipped (too slow to train for the repository,
or not measured yet), with the ``config`` (in the zoo folder) and the ``command`` that makes them,
``featkd zoo build NAME`` (:func:`build_recipe`). Its ``test_acc`` is the accuracy a build must reach, within
``tolerance`` points (default :data:`DEFAULT_TOLERANCE`; null: not measured yet, the build records what it
measures). Built weights go to :func:`build_dir` (``$FEATKD_CACHE/zoo``, default ``~/.cache/featkd/zoo``:
outside the package, so an installed featkd builds them too) as ``NAME.pt`` beside ``NAME.json`` (its
sha256, the measured accuracy, the run folder); from then on ``zoo:NAME`` resolves to them. Until then
``zoo:NAME`` fails with the command to run.
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


# ---------------------------------------------------------------------------------------------------------
# recipes: entries whose weights are built locally by `featkd zoo build NAME`
# ---------------------------------------------------------------------------------------------------------

#: points of test accuracy a build may fall below the recipe's recorded value (a recipe may set its own)
DEFAULT_TOLERANCE = 1.0


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


def build_recipe(name: str, out_dir: str | Path | None = None, overrides: tuple[str, ...] | list[str] = (),
                 resume: bool = False, force: bool = False, log: Any = print) -> dict[str, Any]:
    """Train recipe ``name`` with its recorded config, check its accuracy, install the weights; the record.

    The run goes to ``out_dir`` (default ``runs/zoo/NAME``; ``resume`` continues it). The build passes when
    the final test accuracy is at least the recorded one minus the tolerance; otherwise nothing is installed
    (``force`` installs anyway) and :class:`FeatkdError` names both numbers and the run folder.
    """
    import shutil

    from featkd import __version__
    from featkd.config import load_config
    from featkd.engine.trainer import Trainer

    entry = zoo_entry(name)
    if not is_recipe(entry):
        raise FeatkdError(f"zoo entry {name!r} ships its weights ({entry['path']}); there is nothing to build")
    config = Path(entry["recipe_config"])
    cfg = load_config(config, list(overrides))
    out = Path(out_dir) if out_dir is not None else Path("runs") / "zoo" / name
    trainer = Trainer(cfg, out, resume=resume, log=log)
    with open(out / "command.txt", "a") as f:  # how the run was made, as `featkd train` records it
        f.write(f"featkd zoo build {name}" + (f" --out {out_dir}" if out_dir is not None else "")
                + "".join(f" --set {o}" for o in overrides) + (" --resume" if resume else "") + "\n")
    result = trainer.fit()
    if result.status != "finished" or result.test_metric is None:
        raise FeatkdError(f"zoo build {name}: the run in {out} did not finish (status {result.status})")
    metric, recorded = entry.get("metric", "acc"), entry.get(f"test_{entry.get('metric', 'acc')}")
    tolerance = float(entry.get("tolerance", DEFAULT_TOLERANCE))
    measured = float(result.test_metric)
    if recorded is not None and measured < recorded - tolerance and not force:
        raise FeatkdError(f"zoo build {name}: test_{metric} {measured:.2f} is more than {tolerance:g} points below "
                          f"the recorded {recorded:.2f}; weights not installed (run folder {out}; --force "
                          "installs them anyway)")
    folder = build_dir()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{name}.pt"
    tmp = folder / f".{name}.pt.tmp"
    shutil.copyfile(out / "student.pt", tmp)
    tmp.replace(target)
    record = {"name": name, "sha256": sha256_of(target), f"test_{metric}": measured, "recorded": recorded,
              "tolerance": tolerance, "passed": recorded is None or measured >= recorded - tolerance,
              "run": str(out.resolve()), "config": str(config), "overrides": list(overrides),
              "epochs": result.epochs, "train_seconds": round(result.train_seconds, 1), "featkd": __version__}
    tmp = folder / f".{name}.json.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(folder / f"{name}.json")
    return record
