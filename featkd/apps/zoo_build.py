"""Writing the zoo: ``featkd zoo build NAME`` trains a recipe and installs its weights, ``featkd zoo add``
records a finished run in a zoo folder.

Looking entries up (manifest, checksums, ``zoo:NAME``) is :mod:`featkd.models.zoo`, which model building
needs; training lives here, above the engine, so that looking up never imports the trainer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from featkd import __version__
from featkd.config import load_config, load_raw
from featkd.engine.trainer import Trainer
from featkd.errors import FeatkdError
from featkd.files import atomic_copy, atomic_write_json
from featkd.models.zoo import build_dir, fetch, is_download, is_recipe, sha256_of, zoo_entry

__all__ = ["DEFAULT_TOLERANCE", "add_entry", "build_recipe"]

#: points of test accuracy a build may fall below the recipe's recorded value (a recipe may set its own)
DEFAULT_TOLERANCE = 1.0


def build_recipe(name: str, out_dir: str | Path | None = None, overrides: tuple[str, ...] | list[str] = (),
                 resume: bool = False, force: bool = False, log: Any = print) -> dict[str, Any]:
    """Train recipe ``name`` with its recorded config, check its accuracy, install the weights; the record.

    The run goes to ``out_dir`` (default ``runs/zoo/NAME``; ``resume`` continues it). The build passes when
    the final test accuracy is at least the recorded one minus the tolerance (default
    :data:`DEFAULT_TOLERANCE`); otherwise nothing is installed (``force`` installs anyway) and
    :class:`FeatkdError` names both numbers and the run folder. The weights and ``NAME.json`` (the record: sha256,
    measured accuracy, run folder) go to :func:`featkd.models.zoo.build_dir`, where ``zoo:NAME`` finds them.
    """
    entry = zoo_entry(name)
    if not is_recipe(entry):
        raise FeatkdError(f"zoo entry {name!r} ships its weights ({entry['path']}); there is nothing to build")
    if is_download(entry):  # published weights: building them is fetching them
        fetched = fetch(entry)
        log(f"zoo:{name}: {entry['url']} -> {fetched['path']} (sha256 {fetched['sha256'][:12]})")
        return fetched["built"]
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
    target = folder / f"{name}.pt"
    atomic_copy(out / "student.pt", target)
    record = {"name": name, "sha256": sha256_of(target), f"test_{metric}": measured, "recorded": recorded,
              "tolerance": tolerance, "passed": recorded is None or measured >= recorded - tolerance,
              "run": str(out.resolve()), "config": str(config), "overrides": list(overrides),
              "epochs": result.epochs, "train_seconds": round(result.train_seconds, 1), "featkd": __version__}
    atomic_write_json(folder / f"{name}.json", record, indent=2)
    return record


def add_entry(run_dir: str | Path, name: str, zoo_dir: str | Path = "zoo") -> dict[str, Any]:
    """Copy a finished run's student into the zoo and record it in the manifest (see ``featkd zoo add``)."""
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
    atomic_copy(run_dir / "student.pt", zoo_dir / f"{name}.pt")
    atomic_copy(run_dir / "config.yaml", zoo_dir / f"{name}.yaml")
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
    atomic_write_json(manifest, sorted(items, key=lambda e: e["name"]), indent=2)
    return entry


def _measured(summary: dict[str, Any]) -> dict[str, Any]:
    """The run's final test metric as the manifest records it: ``test_acc`` for classifiers (every entry has
    had it), ``metric`` + ``test_<metric>`` for other tasks (``test_miou`` for segmenters)."""
    metric = summary.get("metric", "acc")
    value = summary.get("test_metric", summary.get("test_acc"))
    return {"test_acc": value} if metric == "acc" else {"metric": metric, f"test_{metric}": value}
