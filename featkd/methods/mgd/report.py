"""Inspection output of Matching Guided Distillation: ``matching.json`` and one heatmap PNG per stage.

Written by ``featkd match CONFIG --out DIR`` and, with ``method.plots: true``, at every matching update of a
training run (``OUT/matching/update-N/``). ``matching.json`` is a list with one object per stage::

    {"stage": 0, "student_point": "layer1.0.add", "teacher_point": "layer1.2.add",
     "teacher_channels": 16, "student_channels": 12,
     "assignment": [3, 0, null, ...],   # per teacher channel: its student channel, null if ignored
                                        # (or a list of student channels under wide_student: share)
     "mean_cost": 0.71,                 # mean cost of the assigned pairs
     "groups": [[1], [0, 5], ...],      # per student channel: its teacher channels
     "reducer": "amp", "margin_source": "layer1.2.bn2", "margins": [...]}

matplotlib is optional: it is imported only to draw the heatmaps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from featkd.files import atomic_write_text
from featkd.methods.mgd.matching import Matching
from featkd.plotting import require_pyplot

HEATMAPS = "the matching heatmaps"  # what needs matplotlib here

if TYPE_CHECKING:
    from featkd.methods.mgd.distiller import MatchingGuidedDistiller


def plot_matching(cost: np.ndarray, matching: Matching, path: str | Path, title: str = "") -> Path:
    """Heatmap of the (sc, tc) cost matrix with the assigned pairs overlaid as dots; returns ``path``.

    Teacher channels (columns) are ordered by their student channel so the groups appear as runs along
    the diagonal; the tick labels keep the original indices for small matrices.
    """
    plt = require_pyplot(HEATMAPS, "pass --no-plots")
    sc, tc = cost.shape
    s_idx, t_idx = matching.pairs()
    owner = np.full(tc, sc, dtype=np.int64)  # ignored teacher channels go last
    owner[t_idx] = np.minimum(owner[t_idx], s_idx)
    order = np.lexsort((np.arange(tc), owner))
    position = np.empty(tc, dtype=np.int64)
    position[order] = np.arange(tc)
    width = min(16.0, 3.0 + 0.12 * tc)
    height = min(12.0, 2.5 + 0.12 * sc)
    fig, ax = plt.subplots(figsize=(width, height))
    try:
        im = ax.imshow(cost[:, order], aspect="auto", cmap="viridis", interpolation="nearest")
        ax.scatter(position[t_idx], s_idx, s=max(4.0, 200.0 / max(sc, tc)), c="red", marker="o",
                   label="assigned")
        ax.set_xlabel("teacher channel (ordered by assigned student channel)")
        ax.set_ylabel("student channel")
        if tc <= 64:
            ax.set_xticks(range(tc), [str(int(t)) for t in order], fontsize=6, rotation=90)
        if sc <= 64:
            ax.set_yticks(range(sc), [str(s) for s in range(sc)], fontsize=6)
        ax.set_title(title or "MGD matching", fontsize=9)
        fig.colorbar(im, ax=ax, label="mean 2 - 2 cos")
        ax.legend(loc="upper right", fontsize=7)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path


def write_report(out_dir: str | Path, distiller: MatchingGuidedDistiller, plots: bool = True) -> list[Path]:
    """Write ``out_dir/matching.json`` and (if ``plots``) ``out_dir/stage{i}.png``; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = distiller.report()
    written = []
    if plots:
        for i, row in enumerate(rows):
            cost = distiller.costs[i].double().numpy()
            title = (f"stage {i}: student {row['student_point']} ({row['student_channels']} ch) <- teacher "
                     f"{row['teacher_point']} ({row['teacher_channels']} ch), {row['reducer']}, "
                     f"mean cost {row['mean_cost']:.4f}")
            written.append(plot_matching(cost, distiller.matching(i), out / f"stage{i}.png", title))
    path = out / "matching.json"
    atomic_write_text(path, "[\n" + ",\n".join(json.dumps(row) for row in rows) + "\n]\n")  # a line a stage
    written.insert(0, path)
    return written
