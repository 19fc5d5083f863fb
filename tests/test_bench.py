"""The benchmark runner: a real (tiny) grid, its results files, and resuming a half-finished grid."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "featkd", "bench", *args], capture_output=True, text=True,
                          env=ENV, cwd=ROOT, timeout=600)


@pytest.mark.slow
def test_bench_grid_results_and_resume(tmp_path):
    runs, results = tmp_path / "runs", tmp_path / "results"
    common = ["digits-smoke", "--runs-dir", str(runs), "--results-dir", str(results),
              "--set", "train.epochs=2", "--set", "train.eval_every=1"]
    first = bench(*common, "--jobs", "2")
    assert first.returncode == 0, first.stderr
    assert "0 of 4 cells already finished" in first.stdout
    data = json.loads((results / "digits-smoke.json").read_text())
    rows = {r["method"]: r for r in data["rows"]}
    assert set(rows) == {"none", "kd"}
    for r in rows.values():
        assert r["seeds"] == 2 and len(r["accs"]) == 2 and 0 < r["acc_mean"] <= 100
        assert {"acc_mean", "acc_se", "delta_vs_ce", "train_s"} <= set(r)
        assert r["step_time_ratio"] > 0
    assert rows["none"]["delta_vs_ce"] == 0
    assert rows["kd"]["step_time_ratio"] == pytest.approx(1.0)
    # paired columns in the plain table too: per-seed differences over the seeds both rows have
    assert rows["kd"]["seed_ids"] == rows["none"]["seed_ids"] == [0, 1]
    diffs = [a - b for a, b in zip(rows["kd"]["accs"], rows["none"]["accs"], strict=True)]
    assert rows["kd"]["paired"]["none"]["mean"] == pytest.approx(sum(diffs) / 2)
    assert set(rows["none"]["paired"]) == {"kd"} and "val_accs" not in rows["kd"]  # no validation split here
    table = (results / "digits-smoke.md").read_text()
    assert "| kd | 2 |" in table and "paired Δ vs none (± s.e., wins/losses) | paired Δ vs kd" in table
    # half-finished grid: one cell lost its summary -> only that cell runs again
    (runs / "kd" / "seed1" / "summary.json").unlink()
    report = bench(*common, "--no-timing", "--report")  # tables from what finished, nothing trained
    assert report.returncode == 0, report.stderr
    assert "running" not in report.stdout and not (runs / "kd" / "seed1" / "summary.json").exists()
    assert {r["method"]: r["seeds"] for r in json.loads((results / "digits-smoke.json").read_text())["rows"]} == {
        "none": 2, "kd": 1}
    second = bench(*common, "--no-timing")
    assert second.returncode == 0, second.stderr
    assert "3 of 4 cells already finished; running 1" in second.stdout
    bad = bench("data-limted")
    assert bad.returncode == 2 and "unknown protocol 'data-limted'" in bad.stderr


# --------------------------------------------------------------------------------------------------------
# featkd bench --tune (featkd/bench/tune.py) and the paired columns

def _final(out: Path, key: str) -> float:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1][key]


def _edit_final(out: Path, **values: float) -> None:
    """Overwrite keys of a run's final metrics.jsonl record (and test_acc in its summary.json)."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    records[-1].update(values)
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if "test_acc" in values:
        summary = json.loads((out / "summary.json").read_text())
        summary.update(test_acc=values["test_acc"], test_metric=values["test_acc"])
        (out / "summary.json").write_text(json.dumps(summary))


@pytest.mark.slow
def test_tuned_protocol_selects_on_val_resumes_and_pairs(tmp_path, capsys):
    """digits-smoke-tuned: none (no knobs, 1 trial) and kd (2 trials) on tuning seed 100, then seeds 0 and 1."""
    from featkd.cli import main

    runs, results = tmp_path / "runs", tmp_path / "results"
    common = ["digits-smoke-tuned", "--tune", "--runs-dir", str(runs), "--results-dir", str(results),
              "--set", "train.epochs=1", "--no-timing"]
    first = bench(*common, "--jobs", "2")
    assert first.returncode == 0, first.stderr
    assert "0 of 3 cells already finished" in first.stdout and "0 of 4 cells already finished" in first.stdout
    data = json.loads((results / "digits-smoke-tuned.json").read_text())
    rows = {r["method"]: r for r in data["rows"]}
    assert set(rows) == {"none", "kd"} and data["report_seeds"] == [0, 1] and data["tuning_seed"] == 100
    assert "val_acc" in data["selection_rule"] and data["val_fraction"] == 0.3
    kd = rows["kd"]
    # a 2-value grid: the first pick is an end, so one extension round (extend: 1) adds the next value beyond it
    # at the grid's own ratio (x4): kd_weight 8 beyond 2, or 0.125 before 0.5
    first_pick = [_final(runs / "kd" / f"trial{i}", "val_acc") for i in range(2)]
    beyond = 8.0 if first_pick[1] > first_pick[0] else 0.125
    assert kd["extensions"] == [{"trial": 2, "setting": {"method.kd_weight": beyond}, "axis": "method.kd_weight",
                                 "end": "high" if beyond == 8.0 else "low", "round": 1}]
    assert "adding trial 2 (kd_weight=" in first.stdout and kd["extension_bound"] == 1
    assert kd["final_grid"] == [{"method.kd_weight": 0.5}, {"method.kd_weight": 2.0}, {"method.kd_weight": beyond}]
    # every trial's value is the final-epoch val_acc of its run; the selection is their argmax (ties: first)
    vals = [_final(runs / "kd" / f"trial{i}", "val_acc") for i in range(3)]
    assert [t["val_acc"] for t in kd["trials"]] == vals
    assert kd["selected_trial"] == vals.index(max(vals)) and kd["selection_val"] == max(vals)
    assert kd["open_edge"] == ([] if kd["selected_trial"] != 2 else ["method.kd_weight"])  # the bound: 1 round
    assert len(rows["none"]["trials"]) == 1 and rows["none"]["selected_setting"] == {}
    # the teacher ran once for kd's 3 trials: trial 0 wrote the cache, the later trials read every step
    caches = [json.loads((runs / "kd" / f"trial{i}" / "summary.json").read_text())["teacher_cache"] for i in range(3)]
    assert caches[0]["written_epochs"] == 1 and caches[0]["read_steps"] == 0
    assert all(c["read_steps"] > 0 and c["teacher_steps"] == 0 for c in caches[1:])
    assert data["cost"]["per_method"]["kd"]["cache_reads"] == 2 and data["cost"]["per_method"]["kd"]["extensions"] == 1
    # report runs: the selected setting on seeds 0, 1; one data section (subset, validation split) for all
    configs = {p.parent.relative_to(runs).as_posix(): yaml.safe_load(p.read_text())
               for p in runs.glob("*/*/config.yaml")}
    assert set(configs) == {"none/trial0", "none/seed0", "none/seed1", "kd/trial0", "kd/trial1", "kd/trial2",
                            "kd/seed0", "kd/seed1"}
    assert configs["kd/seed0"]["train"]["teacher_cache"] is None  # report runs: one stream each, not cached
    assert len({json.dumps(c["data"], sort_keys=True) for c in configs.values()}) == 1
    assert configs["kd/seed1"]["data"]["val_fraction"] == 0.3
    assert configs["kd/seed1"]["method"]["kd_weight"] == kd["selected_setting"]["method.kd_weight"]
    assert [configs[f"kd/seed{s}"]["train"]["seed"] for s in (0, 1)] == [0, 1]
    assert configs["kd/trial0"]["train"]["seed"] == 100
    assert kd["seed_ids"] == [0, 1] and kd["accs"] == [_final(runs / "kd" / f"seed{s}", "test_acc") for s in (0, 1)]
    assert kd["val_accs"] == [_final(runs / "kd" / f"seed{s}", "val_acc") for s in (0, 1)]
    # paired: the per-seed differences, by hand
    diffs = [a - b for a, b in zip(kd["accs"], rows["none"]["accs"], strict=True)]
    paired = kd["paired"]["none"]
    assert paired["mean"] == pytest.approx(sum(diffs) / 2)
    assert paired["se"] == pytest.approx(abs(diffs[0] - diffs[1]) / 2)  # stdev of two / sqrt(2)
    assert (paired["wins"], paired["losses"]) == (sum(d > 0 for d in diffs), sum(d < 0 for d in diffs))
    assert rows["none"]["paired"]["kd"]["mean"] == pytest.approx(-paired["mean"])
    summaries = [json.loads(p.read_text()) for p in runs.glob("*/*/summary.json")]
    assert data["cost"]["cells"] == 8 and data["cost"]["cell_seconds"] == pytest.approx(
        sum(s["train_seconds"] for s in summaries))
    table = (results / "digits-smoke-tuned.md").read_text()
    assert "paired Δ vs none (± s.e., wins/losses)" in table and "| kd | 3 | kd_weight=" in table

    # the test split is not read: make the other trial the best on test -> nothing changes, nothing trains
    # (other: the first round's loser, so that no edit below moves the first round's pick and its extension)
    first_round = first_pick.index(max(first_pick))
    chosen, other = kd["selected_trial"], 1 - first_round
    _edit_final(runs / "kd" / f"trial{other}", test_acc=100.0)
    _edit_final(runs / "kd" / f"trial{chosen}", test_acc=0.0)
    assert main(["bench", *common, "--jobs", "2"]) == 0
    out = capsys.readouterr().out
    assert "4 of 4 cells already finished; running 0" in out and "running 0" in out and "running 1" not in out
    again = {r["method"]: r for r in json.loads((results / "digits-smoke-tuned.json").read_text())["rows"]}
    assert again["kd"]["selected_trial"] == chosen and again["kd"]["accs"] == kd["accs"]
    # a diverged trial is recorded and never selected (nor run again)
    summary_path = runs / "kd" / f"trial{other}" / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary_path.write_text(json.dumps({**summary, "status": "diverged"}))
    assert main(["bench", *common, "--report"]) == 0
    capsys.readouterr()
    trials = next(r for r in json.loads((results / "digits-smoke-tuned.json").read_text())["rows"]
                  if r["method"] == "kd")["trials"]
    assert trials[other]["status"] == "diverged" and trials[other]["val_acc"] is None
    assert trials[chosen]["status"] == "finished" and trials[chosen]["val_acc"] == max(vals)
    summary_path.write_text(json.dumps(summary))
    # ...but the validation split is: another trial best on val -> the finished report runs no longer match
    _edit_final(runs / "kd" / f"trial{first_round if chosen == 2 else 2}", val_acc=max(vals) + 1.0)
    assert main(["bench", *common, "--report"]) == 2
    err = capsys.readouterr().err
    assert "kd/seed0 was trained with method.kd_weight=" in err and "use a fresh --runs-dir" in err


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_tuned_protocol_errors(tmp_path, capsys):
    from featkd.bench import tune as bench_tune
    from featkd.bench.protocol import check_tune, load_protocol
    from featkd.cli import main
    from featkd.errors import FeatkdError

    head = ("name: t\nval_fraction: 0.3\nseeds: 2\nmethods: {none: configs/digits-none-resnet8.yaml, "
            "kd: configs/digits-kd-resnet20-resnet8.yaml, fitnets: configs/digits-fitnets-resnet20-resnet8.yaml}\n")
    grids = {
        "counts": ("tune: {grid: {none: {}, kd: {method.kd_weight: [1, 2]}, fitnets: {method.weight: [1, 2, 3]}}}",
                   "tune.grid: fitnets has 3 trials, kd has 2: every method with knobs needs the same number"),
        "missing": ("tune: {grid: {none: {}, kd: {method.kd_weight: [1, 2]}}}",
                    "tune.grid: no entry for method 'fitnets' (give `fitnets: {}` if it has no knobs)"),
        "data": ("tune: {grid: {none: {}, kd: {data.train_subset: [100, 200]}, fitnets: {method.weight: [1, 2]}}}",
                 "data.train_subset cannot be tuned"),
        "repeat": ("tune: {grid: {none: {}, kd: [{method.kd_weight: 1}, {method.kd_weight: 1}], fitnets: {}}}",
                   "tune.grid.kd: trial 1 repeats trial 0"),
    }
    for name, (tune, message) in grids.items():
        with pytest.raises(FeatkdError, match=re.escape(message)):
            load_protocol(_write(tmp_path / f"{name}.yaml", head + tune + "\n"))
    # every combination, the last key fastest; knob-less methods have 1 trial
    ok = load_protocol(_write(tmp_path / "ok.yaml", head + "tune: {grid: {none: {}, fitnets: {method.weight: [1, 2, "
                              "3, 4]}, kd: {method.kd_temperature: [2, 4], method.kd_weight: [0.5, 2]}}}\n"))
    assert check_tune(ok)["kd"] == [
        {"method.kd_temperature": 2, "method.kd_weight": 0.5}, {"method.kd_temperature": 2, "method.kd_weight": 2},
        {"method.kd_temperature": 4, "method.kd_weight": 0.5}, {"method.kd_temperature": 4, "method.kd_weight": 2}]
    assert bench_tune.report_seeds(ok, 3) == [0, 1, 2]  # tuning seed 100 by default
    ok.tune.seed = 1
    with pytest.raises(FeatkdError, match=r"tune\.seed 1 is also a report seed"):
        bench_tune.report_seeds(ok, 3)
    ok.tune.reuse_seed = True  # the tuning seed's report run is the selected trial's own folder
    trials = bench_tune.tuning_cells(ok, ["kd"], tmp_path / "runs")["kd"]
    picked = bench_tune.Selection(trial=2, setting={}, val=0.0, trials=[])
    report = bench_tune.report_cells(trials, picked, bench_tune.report_seeds(ok, 3), tmp_path / "runs")
    assert [c.out.name for c in report] == ["seed0", "trial2", "seed2"]
    assert report[0].overrides == trials[2].overrides == ("data.val_fraction=0.3", "method.kd_temperature=4",
                                                          "method.kd_weight=0.5")
    noval = load_protocol(_write(tmp_path / "noval.yaml", head.replace("val_fraction: 0.3\n", "")
                                 + "tune: {grid: {none: {}, kd: {}, fitnets: {}}}\n"))
    with pytest.raises(FeatkdError, match="has no validation split to select on"):
        bench_tune.tuning_cells(noval, ["none"], tmp_path / "runs")
    assert main(["bench", "digits-smoke", "--tune"]) == 2
    assert "has no tune: section to run with --tune (tuned protocols: " in capsys.readouterr().err
    assert main(["bench", "digits-smoke-tuned"]) == 2
    assert "is a tuned protocol (it has a tune: section): run it with --tune" in capsys.readouterr().err


def test_paired_delta_by_hand():
    from featkd.bench.stats import paired_delta

    d = paired_delta({0: 85.0, 1: 86.0, 2: 84.0, 3: 90.0}, {0: 84.0, 1: 86.5, 2: 82.0})  # seed 3: no partner
    assert d["seeds"] == [0, 1, 2] and d["n"] == 3 and (d["wins"], d["losses"]) == (2, 1)
    assert d["mean"] == pytest.approx((1.0 - 0.5 + 2.0) / 3)
    assert d["se"] == pytest.approx(statistics.stdev([1.0, -0.5, 2.0]) / 3**0.5)
    assert paired_delta({0: 1.0}, {1: 1.0}) is None


def test_one_seed_is_one_student_init_data_order_and_val_split_for_every_method():
    """What the paired columns rely on: none (no teacher is built) starts where the distillation methods do."""
    import torch

    from featkd.config import load_config
    from featkd.engine.build import build_run

    def state(config: str):
        cfg = load_config(ROOT / "configs" / config, ["train.seed=3", "data.val_fraction=0.3"])
        run = build_run(cfg, log=lambda _m: None)
        loader = run.data.train_loader(32, seed=3)
        loader.set_epoch(1)
        val = torch.cat([x for x, _ in run.data.val_loader(256)])
        return run.student.state_dict(), next(iter(loader))[1], val

    none, kd, fitnets = (state(c) for c in ("digits-none-resnet8.yaml", "digits-kd-resnet20-resnet8.yaml",
                                            "digits-fitnets-resnet20-resnet8.yaml"))
    for other in (kd, fitnets):
        assert all(torch.equal(none[0][k], other[0][k]) for k in none[0])
        assert torch.equal(none[1], other[1]) and torch.equal(none[2], other[2])


@pytest.mark.parametrize("name", ["data-limited-tuned", "scenes-seg-tuned", "scenes-det-tuned", "digits-smoke-tuned"])
def test_every_shipped_tuned_protocol_builds_its_trials(name, tmp_path):
    """Each trial's config (the method's file with the protocol's and the trial's --set items) validates, every
    method with knobs has the same number of trials, and the validation split is set."""
    from featkd.bench import tune as bench_tune
    from featkd.bench.protocol import load_protocol, tuned_protocols

    assert name in tuned_protocols()
    protocol = load_protocol(name)
    cells = bench_tune.tuning_cells(protocol, list(protocol.methods), tmp_path)
    sizes = {len(c) for label, c in cells.items() if protocol.tune.grid[label]}
    assert sizes == {4} or name == "digits-smoke-tuned"


def test_a_method_that_cannot_be_timed_leaves_the_tables_to_be_written(monkeypatch, capsys):
    """The step-time measurement comes after every run: its failure is reported (exit 1), not a lost table."""
    from featkd.bench import runner
    from featkd.commands.bench import add_step_ratios
    from featkd.errors import FeatkdError

    rows = [{"method": "none"}, {"method": "kd"}]

    def broken(*_a, **_k):
        raise FeatkdError("method 'x' needs something the timer lacks")

    monkeypatch.setattr(runner, "step_time_ratios", broken)
    assert add_step_ratios(None, rows, Path(".")) == [("step-time measurement",
                                                      "method 'x' needs something the timer lacks")]
    assert all("step_time_ratio" not in r for r in rows)
    monkeypatch.setattr(runner, "step_time_ratios", lambda *_a, **_k: {"none": 0.5, "kd": 1.0})
    assert add_step_ratios(None, rows, Path("."), settings={"kd": []}) == []
    assert [r["step_time_ratio"] for r in rows] == [0.5, 1.0]
    assert "(the selected settings)" in capsys.readouterr().out


def test_grid_extension_steps_beyond_the_end_the_pick_sits_at():
    """The converging-grid rule (featkd/bench/tune.py) on each grid form, without training."""
    from featkd.bench.tune import Extension, extension_settings, step_beyond

    assert step_beyond(10.0, 3.0) == pytest.approx(33.3333) and step_beyond(0.3, 1.0) == 0.09
    assert step_beyond(2, 4) == 1 and isinstance(step_beyond(2, 4), int)  # ints stay ints when whole
    assert step_beyond(0.0, 1.0) == -1.0  # no common sign: a step of the same size
    one = {"method.weight": [0.3, 1.0, 3.0, 10.0]}
    grid = [{"method.weight": w} for w in one["method.weight"]]
    assert extension_settings(one, grid, [], {"method.weight": 3.0}) == []  # inside: nothing to add
    assert extension_settings(one, grid, [], {"method.weight": 10.0}) == [
        ("method.weight", "high", {"method.weight": 33.3333})]
    # MGD's normalizer grid is written strongest-last: the ends are its smallest and largest values all the same
    mgd = {"method.normalizer": [2083.3, 625.0, 208.3, 62.5]}
    mgd_grid = [{"method.normalizer": v} for v in mgd["method.normalizer"]]
    assert extension_settings(mgd, mgd_grid, [], {"method.normalizer": 62.5})[0][2] == {"method.normalizer": 18.753}
    # after an extension the line includes it: the old end is inside, the new one is the end
    ext = [Extension(4, {"method.weight": 33.3333}, "method.weight", "high", 1)]
    assert extension_settings(one, grid, ext, {"method.weight": 10.0}) == []
    assert extension_settings(one, grid, ext, {"method.weight": 33.3333})[0][2] == {"method.weight": 111.111}
    # two keys: each key's line through the pick; a pick at a corner extends both, one at a time
    two = {"method.kd_temperature": [2, 4], "method.kd_weight": [0.5, 2.0]}
    two_grid = [{"method.kd_temperature": t, "method.kd_weight": w} for t in (2, 4) for w in (0.5, 2.0)]
    assert extension_settings(two, two_grid, [], {"method.kd_temperature": 4, "method.kd_weight": 2.0}) == [
        ("method.kd_temperature", "high", {"method.kd_temperature": 8, "method.kd_weight": 2.0}),
        ("method.kd_weight", "high", {"method.kd_temperature": 4, "method.kd_weight": 8.0})]
    # a list grid is a ladder: every key moves at its own ratio; the low end is before the first entry
    ladder = [{"method.distance_weight": d, "method.angle_weight": 2 * d} for d in (7.5, 25.0, 75.0, 250.0)]
    assert extension_settings(ladder, ladder, [], ladder[0]) == [
        ("*", "low", {"method.distance_weight": 2.25, "method.angle_weight": 4.5})]
    low = [Extension(4, {"method.distance_weight": 2.25, "method.angle_weight": 4.5}, "*", "low", 1)]
    assert extension_settings(ladder, ladder, low, ladder[0]) == []  # no longer an end
    # a categorical key is never extended; a one-trial method has no axis
    assert extension_settings({"method.reducer": ["amp", "rd"]}, [{"method.reducer": "amp"},
                                                                  {"method.reducer": "rd"}], [],
                              {"method.reducer": "rd"}) == []
    assert extension_settings({}, [{}], [], {}) == []


def test_a_shortened_protocol_scales_every_method_schedule_in_epochs():
    """data-limited-tuned runs 12 of the configs' 30 epochs: warm-ups and re-matching periods scale by 0.4."""
    from featkd.bench.protocol import load_protocol
    from featkd.bench.runner import cell_config, scaled_schedule
    from featkd.config import load_raw
    from featkd.methods.base import scaled_epoch_count

    protocol = load_protocol("data-limited-tuned")
    base = load_raw(protocol.base)
    scaled = {label: scaled_schedule(load_raw(cfg), base) for label, cfg in protocol.methods.items()}
    assert scaled["kda"] == {"warmup_epochs": (5, 2)} and scaled["dkd"] == {"warmup": (3, 1)}
    assert scaled["mgd-amp"] == {"update_every": (5, 2)}
    assert all(not v for k, v in scaled.items() if k not in ("kda", "dkd", "mgd-amp"))
    assert scaled_epoch_count(1, 0.1) == 1 and scaled_epoch_count(0, 0.4) == 0  # on stays on, off stays off
    import tempfile

    with tempfile.TemporaryDirectory() as runs:
        written = load_raw(cell_config(protocol, "kda", Path(runs)))
    assert written["method"]["warmup_epochs"] == 2 and written["train"]["epochs"] == 12
    full = load_protocol("data-limited")  # the same length as its configs: nothing changes
    assert all(not scaled_schedule(load_raw(c), load_raw(full.base)) for c in full.methods.values()) \
        if full.base else True


def test_a_trials_values_go_to_set_as_yaml_reads_them_back_exponent_floats_included():
    """An extension below 1e-4 prints as 9e-05, which PyYAML reads as a string: the cwt trial of scenes-det-tuned
    stopped with "method.alpha: expected a number, got '9e-05'"."""
    from featkd.bench.protocol import trial_overrides
    from featkd.config import parse_override

    for value in (9e-05, 3.0e-4, 1e20, 2.5e-10, 0.1, 5, True, None, "1e4", [1e-05, 0.5, 3], {"a": 1e-06, "b": "x"}):
        item = trial_overrides({"method.alpha": value})[0]
        back = parse_override(item)[1]
        assert back == value and type(back) is type(value), item
