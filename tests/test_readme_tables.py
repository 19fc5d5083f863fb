"""The README's result tables are generated from benchmarks/results/ and hold no number typed by hand."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tables():
    spec = importlib.util.spec_from_file_location("readme_tables", ROOT / "benchmarks" / "readme_tables.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["readme_tables"] = module
    spec.loader.exec_module(module)
    return module


def test_the_readmes_tables_are_current_and_every_number_is_in_a_results_file(tables, capsys):
    assert tables.main(["--check"]) == 0, capsys.readouterr().out


def test_a_hand_typed_number_is_found_outside_transcripts_only(tables):
    text = "\n".join([
        "| kd | 86.53 ± 0.11 |",            # line 1: known (both numbers)
        "KD gains 2.99 points here.",        # line 2: untraced
        "```console",
        "epoch 1/30  train_acc 18.75",       # a transcript: skipped
        "```",
        "needs torch 2.14.1 and Python 3.11.",  # versions: skipped
    ])
    assert tables.untraced_numbers(text, {"86.53", "0.11"}) == [(2, "2.99")]


def test_a_table_rendered_from_results_rows(tables, monkeypatch, tmp_path):
    (tmp_path / "p.json").write_text("""{"rows": [
      {"method": "none", "seeds": 2, "acc_mean": 80.0, "acc_se": 0.5, "delta_vs_ce": 0.0, "delta_se": 0.0},
      {"method": "kd", "seeds": 2, "acc_mean": 82.25, "acc_se": 0.25, "delta_vs_ce": 2.25, "delta_se": 0.56,
       "paired": {"none": {"mean": 2.25, "se": 0.1, "wins": 2, "losses": 0}}}]}""")
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    text = tables.render_table("p", "columns: [test, delta, 'paired:none']\nbold: [kd]\nrows: {none: CE, kd: KD}")
    assert text.splitlines() == [
        "| method | test acc | Δ vs none | paired Δ vs none (wins/losses) |",
        "|---|---|---|---|",
        "| CE | 80.00 ± 0.50 |  |  |",
        "| **KD** | **82.25 ± 0.25** | **+2.25 ± 0.56** | +2.25 ± 0.10 (2/0) |",
    ]
    with pytest.raises(tables.TableError, match="no row dkd"):
        tables.render_table("p", "rows: {none: CE, dkd: DKD}")
