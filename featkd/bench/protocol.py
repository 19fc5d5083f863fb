"""The benchmark protocol format behind ``featkd bench PROTOCOL``: which method configs run on how many seeds.

A protocol is a YAML file in ``benchmarks/protocols/`` (shipped in the wheel: :mod:`featkd.resources`; see
``benchmarks/README.md``)::

    name: data-limited
    description: ...
    seeds: 3
    reference: none            # the row every delta is measured against (no distillation)
    timing_reference: kd       # step-time ratios are taken against this row (Hinton KD)
    methods:                   # row label -> experiment config (configs/...: the shipped example configs)
      none: configs/fashion-mnist-none-resnet8.yaml
      kd: configs/fashion-mnist-kd-resnet20-resnet8.yaml

``val_fraction: F`` in a protocol sets ``data.val_fraction`` in every cell (a seeded, class-stratified hold-out
of the training split, the same for every method and seed: :mod:`featkd.data.splits`). ``paired:`` names the
rows of the paired per-seed columns (:mod:`featkd.bench.stats`). A ``tune:`` section (:class:`TuneSpec`) makes
the protocol a tuned one, run with ``featkd bench PROTOCOL --tune`` (:mod:`featkd.bench.tune`).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from featkd import resources
from featkd.errors import FeatkdError, did_you_mean


@dataclass
class Published:
    """A protocol's published numbers (``published:``): what the paper or the official code reports for rows of
    the protocol, never featkd's own measurement."""

    metric: str  # e.g. "top-1 error (%)", "box AP", "mIoU"
    source: str  # the table or file, e.g. "KaiyuYue/mgd cls/README.md L169-173"
    rows: dict[str, float | None] = field(default_factory=dict)  # row label -> number (None: not published)
    gains: dict[str, float] = field(default_factory=dict)  # row label -> published gain over the paper's baseline
    # lower is better (an error rate): how a delta is read
    lower_is_better: bool = False


@dataclass
class Protocol:
    name: str
    # row label -> an experiment config file (configs/...), or (with ``base``) an inline mapping of the sections
    # the row sets over the base, e.g. ``{method: {name: kd, kd_weight: 0.9}}``
    methods: dict[str, Any]
    seeds: int = 3
    reference: str = "none"
    timing_reference: str = "kd"
    description: str = ""
    epoch_marks: list[int] = field(default_factory=list)  # also report test accuracy after these epochs
    # If set, every row keeps only the `method` section of its config and takes everything else (data,
    # teacher, student, optim, train) from this file: one set of method configs serves every protocol.
    base: str | None = None
    val_fraction: float | None = None  # data.val_fraction of every cell (a validation split: the same for all)
    paired: list[str] | None = None  # rows the paired per-seed differences are taken against (default below)
    tune: TuneSpec | None = None  # a tuned protocol (featkd bench --tune; featkd.bench.tune)
    # A paper's setting (benchmarks/protocols/paper-*.yaml): the citation, the published numbers, where each
    # hyper-parameter comes from, what could not be verified, the training-set size the estimate counts, and
    # the --set items of the smoke run (`featkd bench P --smoke`) where the real input size is too slow on a CPU
    paper: str | None = None
    published: Published | None = None
    sources: dict[str, str] = field(default_factory=dict)
    unverified: list[str] = field(default_factory=list)
    train_images: int | None = None
    # the config that trains the teacher first, where no published teacher checkpoint exists (its run folder is
    # the base's teacher.checkpoint); --estimate counts it
    teacher_recipe: str | None = None
    smoke: list[str] = field(default_factory=list)
    # YAML anchors shared by the inline rows (capture points of the pair); read by nothing else
    points: dict[str, Any] = field(default_factory=dict)

    def paired_baselines(self) -> list[str]:
        """The rows of the paired columns: ``paired:``, else the reference and ``kd`` (when it is a row)."""
        if self.paired is not None:
            return list(self.paired)
        return list(dict.fromkeys([self.reference, *(["kd"] if "kd" in self.methods else [])]))

    def overrides(self) -> list[str]:
        """``--set`` items every cell of the protocol gets (after the user's own ``--set``, so they win)."""
        return [] if self.val_fraction is None else [f"data.val_fraction={self.val_fraction!r}"]


def fixed_by_protocol(key: str) -> bool:
    """Config keys a trial may not set: the data (subset, validation split) and the seed are the protocol's,
    the same for every method."""
    return key.startswith("data.") or key == "train.seed"


@dataclass
class TuneSpec:
    """A protocol's ``tune:`` section (see :mod:`featkd.bench.tune` and benchmarks/README.md).

    ``grid``: method label -> its trials, either ``{key: [values, ...], ...}`` (every combination, the last
    key varying fastest) or a list of ``{key: value, ...}`` (one trial each, in ladder order: the keys move
    together); keys are config paths (``method.kd_weight``). ``{}`` (or no knobs at all): one trial, the config
    as it is. Every method with knobs must have the same number of trials. ``extend``: rounds of grid
    extension at most (the same for every method); ``teacher_cache``: tuning trials share the teacher's outputs.
    """

    grid: dict[str, Any]
    seed: int = 100  # the tuning seed: every trial trains with it
    # False: report seeds are 0..N-1 and must not include the tuning seed (selection and report use different
    # inits and data orders). True: the tuning seed must be one of 0..N-1, and the selected trial's run is that
    # seed's report run (one run fewer per method, but one reported seed is the one the setting was picked on).
    reuse_seed: bool = False
    # Converging grids (featkd.bench.tune.extension_settings): while a method's pick sits at an end of a numeric
    # axis of its grid, add the next value beyond that end (the grid's own ratio) and tune again, at most this
    # many rounds per method (the same bound for every method). 0: the grid as written.
    extend: int = 0
    # Tuning trials read the teacher's outputs from a cache in RUNS/teacher-cache (trials of one method share a
    # stream: same teacher, capture points, data and seed), so the teacher runs once per method, not per trial.
    teacher_cache: bool = True

    def validate(self, path: str) -> None:
        if self.seed < 0:
            raise FeatkdError(f"{path}.seed: expected a seed >= 0, got {self.seed}")
        if self.extend < 0:
            raise FeatkdError(f"{path}.extend: expected a number of rounds >= 0, got {self.extend}")


def trial_settings(entry: Any, where: str) -> list[dict[str, Any]]:
    """The trials of one ``tune.grid`` entry (see :class:`TuneSpec`): a list of {config key: value}."""
    if entry is None or entry == {} or entry == []:
        return [{}]
    if isinstance(entry, dict):
        for key, values in entry.items():
            if not isinstance(values, list) or not values:
                raise FeatkdError(f"{where}.{key}: expected a non-empty list of values, got {values!r}")
        keys = list(entry)
        trials = [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*entry.values())]
    elif isinstance(entry, list) and all(isinstance(t, dict) for t in entry):
        trials = [dict(t) for t in entry]
    else:
        raise FeatkdError(f"{where}: expected {{key: [values]}} or a list of {{key: value}}, got {entry!r}")
    for i, trial in enumerate(trials):
        for key in trial:
            if not isinstance(key, str) or not key or key.startswith(".") or key.endswith("."):
                raise FeatkdError(f"{where}: {key!r} is not a config key (e.g. method.kd_weight)")
            if fixed_by_protocol(key):
                raise FeatkdError(f"{where}: {key} cannot be tuned (the data and the seed are the protocol's, "
                                  "the same for every method)")
        if trial in trials[:i]:
            raise FeatkdError(f"{where}: trial {i} repeats trial {trials.index(trial)} ({trial})")
    return trials


def trial_overrides(setting: dict[str, Any]) -> list[str]:
    """A trial's setting as ``--set`` items (values as JSON, which ``--set`` reads back as YAML: "1e4" stays a
    string, 1e4 a number)."""
    return [f"{key}={yaml_number_text(value)}" for key, value in setting.items()]


def yaml_number_text(value: Any) -> str:
    """``value`` as JSON that YAML 1.1 reads back as the same value: a float's exponent form gets a dot in its
    mantissa (PyYAML reads ``9e-05``, what ``json.dumps`` writes for 9e-05, as a string; ``9.0e-05`` as a float)."""
    if isinstance(value, float) and "e" in (text := json.dumps(value)):
        mantissa, exponent = text.split("e")
        return f"{mantissa if '.' in mantissa else mantissa + '.0'}e{exponent}"
    if isinstance(value, list):
        return "[" + ", ".join(yaml_number_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {yaml_number_text(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def check_tune(protocol: Protocol) -> dict[str, list[dict[str, Any]]]:
    """Every method's trials, after checking the ``tune:`` section against the methods (one-line errors)."""
    assert protocol.tune is not None
    where = f"protocol {protocol.name}: tune.grid"
    grid = protocol.tune.grid
    for label in protocol.methods:
        if label not in grid:
            raise FeatkdError(f"{where}: no entry for method {label!r} (give `{label}: {{}}` if it has no knobs)")
    for label in grid:
        if label not in protocol.methods:
            raise FeatkdError(f"{where}.{label}: not one of the protocol's methods"
                              f"{did_you_mean(label, protocol.methods)}")
    trials = {label: trial_settings(grid[label], f"{where}.{label}") for label in protocol.methods}
    sized = {label: len(t) for label, t in trials.items() if t != [{}]}
    if len(set(sized.values())) > 1:
        first = next(iter(sized))
        other = next(label for label, n in sized.items() if n != sized[first])
        raise FeatkdError(f"{where}: {other} has {sized[other]} trials, {first} has {sized[first]}: every method "
                          "with knobs needs the same number (one without knobs has 1)")
    return trials


def protocols_dir() -> Path:
    """$FEATKD_PROTOCOLS, else the shipped protocols (the repository's benchmarks/protocols/ in a clone)."""
    return resources.protocols_dir()


def tuned_protocols() -> list[str]:
    """The shipped protocols that have a ``tune:`` section."""
    from featkd.config import read_yaml

    return sorted(p.stem for p in protocols_dir().glob("*.yaml") if "tune" in read_yaml(p))


def protocol_file(ref: str, shipped: bool) -> Path | None:
    """The resolved config file a protocol names, or None if there is none.

    Paths are relative to featkd's shipped data (``configs/NAME.yaml``: the example configs, from a clone or
    an installed wheel alike); a protocol given as a file (``shipped`` False) may also name files relative to
    the current folder, which are looked for first.
    """
    path = Path(ref).expanduser()
    if path.is_absolute():
        candidates = [path]
    else:
        candidates = ([] if shipped else [Path.cwd() / path]) + [resources.data_root() / path]
    return next((c.resolve() for c in candidates if c.is_file()), None)


def load_protocol(name_or_path: str) -> Protocol:
    """A protocol by name (``benchmarks/protocols/<name>.yaml``) or path, with its config files resolved."""
    from featkd.config import from_dict, read_yaml

    path = Path(name_or_path)
    shipped = not path.suffix
    if shipped:
        folder = protocols_dir()
        path = folder / f"{name_or_path}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in folder.glob("*.yaml"))
            raise FeatkdError(f"unknown protocol {name_or_path!r}{did_you_mean(name_or_path, known)}; "
                              f"available: {', '.join(known) or 'none'} (in {folder})")
    protocol = from_dict(Protocol, read_yaml(path), "protocol")
    where = "in featkd's shipped data" if shipped else "in the current folder or featkd's shipped data"
    if protocol.tune is not None:
        check_tune(protocol)  # the grid first: a wrong trial count is an error even before the configs exist
    if protocol.val_fraction is not None and not 0.0 < protocol.val_fraction < 1.0:
        raise FeatkdError(f"protocol {protocol.name}: val_fraction: expected a number in (0, 1), "
                          f"got {protocol.val_fraction}")
    for label in protocol.paired or []:
        if label not in protocol.methods:
            raise FeatkdError(f"protocol {protocol.name}: paired: {label!r} is not one of its methods"
                              f"{did_you_mean(label, protocol.methods)}")
    if protocol.base:
        base = protocol_file(protocol.base, shipped)
        if base is None:
            raise FeatkdError(f"protocol {protocol.name}: base {protocol.base} not found ({where})")
        protocol.base = str(base)
    if protocol.teacher_recipe:
        recipe = protocol_file(protocol.teacher_recipe, shipped)
        if recipe is None:
            raise FeatkdError(f"protocol {protocol.name}: teacher_recipe {protocol.teacher_recipe} not found ({where})")
        protocol.teacher_recipe = str(recipe)
    if protocol.published is not None:
        for label in [*protocol.published.rows, *protocol.published.gains]:
            if label not in protocol.methods:
                raise FeatkdError(f"protocol {protocol.name}: published.rows: {label!r} is not one of its methods"
                                  f"{did_you_mean(label, protocol.methods)}")
    for label, cfg in protocol.methods.items():
        if isinstance(cfg, dict):
            if not protocol.base:
                raise FeatkdError(f"protocol {protocol.name}: methods.{label}: an inline row needs a base: config")
            if not isinstance(cfg.get("method"), dict):
                raise FeatkdError(f"protocol {protocol.name}: methods.{label}: an inline row needs a method: "
                                  "mapping (e.g. {method: {name: kd}})")
            continue
        found = protocol_file(cfg, shipped)
        if found is None:
            raise FeatkdError(f"protocol {protocol.name}: methods.{label}: config {cfg} not found ({where})")
        protocol.methods[label] = str(found)
    if protocol.reference not in protocol.methods:
        raise FeatkdError(f"protocol {protocol.name}: reference {protocol.reference!r} is not one of its methods")
    return protocol
