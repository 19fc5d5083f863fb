"""Write the README's result tables from ``benchmarks/results/*.json`` and check that no number is typed by hand.

A table in a Markdown file is a block between two comments; the first names the results file and how to show
it, the generator rewrites the lines in between::

    <!-- results-table scenes-det
    columns: [test, delta, paired:none]     # optional; also: seeds, val, selected, trials, train_s, step_ratio
    bold: [mgd-amp]                         # rows whose value columns are bold
    rows:                                   # row key in the JSON -> label shown (the order shown)
      none: no distillation
      mgd-amp: MGD-AMP (pre-ReLU trunk stages)
    -->
    | method | test box AP | ...
    <!-- /results-table -->

``<!-- results-md scenes-det -->`` ... ``<!-- /results-md -->`` copies the table of
``benchmarks/results/scenes-det.md`` (what ``featkd bench`` wrote) as it is (``<!-- results-md NAME table: 2 -->``:
its second table), and
``<!-- results-demo demo -->`` ... ``<!-- /results-demo -->`` writes what ``featkd demo --json
benchmarks/results/demo.json`` printed.

The audit (``--check``) reads README.md outside its command transcripts (fenced ``console``/``bash``/``yaml``
blocks: what a command printed once, reproduced by running it) and fails on a two-decimal number that no
JSON file under ``benchmarks/results/`` holds; version numbers (``torch 2.14.1``, ``Python 3.11``) are not
results and are skipped.

    python benchmarks/readme_tables.py            # rewrite README.md and benchmarks/README.md in place
    python benchmarks/readme_tables.py --check    # exit 1 when a table is stale or README.md holds a number
                                                  # (x.yy) that no results file holds (tests/test_readme_tables.py)
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from featkd.bench.report import METRIC_LABELS, format_mean_se, format_paired
from featkd.bench.tune import setting_text

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOCS = [ROOT / "README.md", ROOT / "benchmarks" / "README.md"]

BLOCK = re.compile(r"(<!-- results-(table|md|demo) ([\w.-]+)(.*?)-->\n)(.*?)(<!-- /results-\2 -->)", re.S)
TWO_DECIMALS = re.compile(r"(?<![\w.])[+-]?\d+\.\d\d(?![\d])")
VERSION = re.compile(r"(?:Python|torch|torchvision|onnxruntime|version|>=)\s*\d+\.\d+|\d+\.\d+\.\d+")
FENCE = re.compile(r"^```(\w*)")
TRANSCRIPTS = {"console", "bash", "yaml", "python", "sh"}


class TableError(ValueError):
    """A block that names a missing results file or row, or an unknown column."""


def metric_of(rows: list[dict[str, Any]]) -> str:
    """The task metric of a results file's rows: ``acc``, ``miou`` or ``ap`` (the key with ``<metric>_mean``)."""
    for key in rows[0]:
        if key.endswith("_mean") and key[: -len("_mean")] in METRIC_LABELS:
            return key[: -len("_mean")]
    raise TableError(f"rows of {rows[0].get('method')!r} have no acc_mean / miou_mean / ap_mean")


def _bold(text: str) -> str:
    return f"**{text}**" if text else text


def header(column: str, metric: str, reference: str) -> str:
    if column.startswith("paired:"):
        return f"paired Δ vs {column.split(':', 1)[1]} (wins/losses)"
    names = {"seeds": "seeds", "test": METRIC_LABELS[metric], "val": f"val {metric}",
             "delta": f"Δ vs {reference}", "selected": "selected on validation", "trials": "trials",
             "train_s": "train time / run", "step_ratio": "step time ratio"}
    if column not in names:
        raise TableError(f"unknown column {column!r} (known: {', '.join(names)}, paired:<row>)")
    return names[column]


def cell(row: dict[str, Any], column: str, metric: str) -> str:
    """One table cell of a results row (the same formatting as the tables ``featkd bench`` writes)."""
    if column.startswith("paired:"):
        return format_paired(row.get("paired", {}).get(column.split(":", 1)[1]))
    if column == "seeds":
        return str(row["seeds"])
    if column == "test":
        return format_mean_se(row[f"{metric}_mean"], row[f"{metric}_se"])
    if column == "val":
        return format_mean_se(row.get(f"val_{metric}_mean"), row.get(f"val_{metric}_se"))
    if column == "delta":
        return "" if row["delta_vs_ce"] == 0 and row["delta_se"] == 0 else format_mean_se(
            row["delta_vs_ce"], row["delta_se"], sign=True)
    if column == "selected":
        return setting_text(row.get("selected_setting") or {})
    if column == "trials":
        return str(len(row.get("trials", [])))
    if column == "train_s":
        return f"{row['train_s']:.0f} s"
    if column == "step_ratio":
        ratio = row.get("step_time_ratio")
        return "" if ratio is None else f"{ratio:.2f}"
    raise TableError(f"unknown column {column!r}")


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def load_results(name: str) -> dict[str, Any]:
    path = RESULTS / (name if name.endswith(".json") else f"{name}.json")
    if not path.is_file():
        raise TableError(f"results file {_shown(path)} does not exist")
    return json.loads(path.read_text())


def render_table(name: str, spec_text: str) -> str:
    """The Markdown table (with its trailing newline) of results file ``name`` as the block's spec asks."""
    spec = yaml.safe_load(spec_text) or {}
    results = load_results(name)
    by_key = {r["method"]: r for r in results["rows"]}
    labels: dict[str, str] = spec.get("rows") or {k: k for k in by_key}
    missing = [k for k in labels if k not in by_key]
    if missing:
        raise TableError(f"results-table {name}: no row {', '.join(missing)} in benchmarks/results/{name}.json")
    rows = [by_key[k] for k in labels]
    metric = metric_of(rows)
    reference = spec.get("reference", rows[0]["method"])
    columns = spec.get("columns", ["test", "delta"])
    bold = set(spec.get("bold", []))
    head = spec.get("head") or [spec.get("first", "method"), *(header(c, metric, reference) for c in columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in labels:
        row = by_key[key]
        texts = [cell(row, c, metric) for c in columns]
        if key in bold:
            texts = [_bold(t) if c in ("test", "delta") else t for c, t in zip(columns, texts, strict=True)]
        label = labels[key]
        lines.append("| " + " | ".join([_bold(label) if key in bold else label, *texts]) + " |")
    return "\n".join(lines) + "\n"


def md_table(name: str, spec_text: str = "") -> str:
    """Table ``table:`` (1-based, default 1) of ``benchmarks/results/<name>.md`` (the file ``featkd bench``
    writes; a tuned protocol's has the selection table, then the trials)."""
    path = RESULTS / f"{name}.md"
    if not path.is_file():
        raise TableError(f"results file {_shown(path)} does not exist")
    index = int((yaml.safe_load(spec_text) or {}).get("table", 1))
    tables, current = [], []
    for line in [*path.read_text().splitlines(), ""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    if not 1 <= index <= len(tables):
        raise TableError(f"results-md {name}: table {index} asked, {path.name} has {len(tables)}")
    return "\n".join(tables[index - 1]) + "\n"


def demo_text(name: str) -> str:
    """What ``featkd demo`` printed for the results file ``name`` (a fenced text block)."""
    from featkd.apps.demo import format_table

    results = load_results(name)
    rows = results["rows"]
    teacher = next((r["teacher_test_acc"] for r in rows if r["teacher_test_acc"] is not None), None)
    lines = ["```text", *([f"teacher test accuracy: {teacher:.2f}"] if teacher is not None else []),
             format_table(rows), "", f"total time {results['total_seconds']:.0f}s", "```"]
    return "\n".join(lines) + "\n"


def regenerate(text: str) -> str:
    """``text`` with every results block's table rewritten from its results file."""
    render = {"table": render_table, "md": md_table, "demo": lambda name, _: demo_text(name)}

    def replace(m: re.Match[str]) -> str:
        kind, name, spec = m.group(2), m.group(3), m.group(4)
        table = render[kind](name, spec)
        return m.group(1) + table + m.group(6)
    return BLOCK.sub(replace, text)


def _numbers(value: Any) -> set[str]:
    """Every number in a JSON value, formatted with two decimals (with and without its sign)."""
    if isinstance(value, dict):
        return set().union(*map(_numbers, value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*map(_numbers, value)) if value else set()
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return set()
    text = f"{value:.2f}"
    return {text, text.lstrip("-"), f"{abs(value):.2f}"}


def known_numbers() -> set[str]:
    """Every number the results files hold, as two-decimal text (JSON files; Markdown tables they wrote)."""
    found: set[str] = set()
    for path in sorted(RESULTS.rglob("*.json")):
        found |= _numbers(json.loads(path.read_text()))
    return found


def audited_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of ``text`` outside command transcripts, version numbers blanked."""
    out, fence = [], None
    for i, line in enumerate(text.splitlines(), 1):
        if m := FENCE.match(line):
            fence = None if fence is not None else m.group(1)
            continue
        if fence not in TRANSCRIPTS:
            out.append((i, VERSION.sub("", line)))
    return out


def untraced_numbers(text: str, known: set[str]) -> list[tuple[int, str]]:
    """(line, number) for each two-decimal number of ``text`` (outside transcripts) that no results file holds."""
    return [(i, n.lstrip("+-")) for i, line in audited_lines(text)
            for n in TWO_DECIMALS.findall(line) if n.lstrip("+-") not in known]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 when a table is stale or a README number is untraced")
    args = parser.parse_args(argv)
    failed = False
    for doc in DOCS:
        text = doc.read_text()
        try:
            new = regenerate(text)
        except TableError as e:
            print(f"{doc.relative_to(ROOT)}: {e}", file=sys.stderr)
            return 2
        if new != text:
            if args.check:
                print(f"{doc.relative_to(ROOT)}: a results table is stale (run python benchmarks/readme_tables.py)")
                failed = True
            else:
                doc.write_text(new)
                print(f"rewrote {doc.relative_to(ROOT)}")
    untraced = untraced_numbers(DOCS[0].read_text(), known_numbers())
    for line, number in untraced:
        print(f"README.md:{line}: {number} is in no file under benchmarks/results/")
    return 1 if failed or untraced else 0


if __name__ == "__main__":
    sys.exit(main())
