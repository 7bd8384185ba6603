"""Plot helpers: each takes a matplotlib ``ax``, draws from results records, and returns ``ax``.

Figures are only ever drawn from results files (:func:`vidret_lib.results.read_results`,
:mod:`vidret_lib.tables`), never from a notebook's memory.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .distributed import is_main_process


def metric_bars(ax, summary, key: str = "t2v_R1", evaluation: str = "plain", checkpoint: str = "selected",
                queries: str = "all"):
    """Bars of one metric (mean ± std over seeds) for each variant of a :func:`vidret_lib.tables.summary_frame`.

    ``summary``: the rows of one notebook (variants in the order given); ``key``: ``"<direction>_<metric>"``;
    ``queries``: ``"all"`` captions or ``"first_per_video"`` (:data:`vidret_lib.tables.QUERY_VIEWS`).
    Raises ValueError when no row matches (names the key).
    """
    direction, metric = key.split("_", 1)
    rows = summary[(summary.direction == direction) & (summary.metric == metric) & (summary.evaluation == evaluation)
                   & (summary.checkpoint == checkpoint) & (summary.split == "test") & (summary.queries == queries)]
    if rows.empty:
        raise ValueError(f"no summary rows for {key} ({evaluation}, {checkpoint}); present: "
                         f"{sorted(set(summary.direction + '_' + summary.metric))}")
    x = np.arange(len(rows))
    ax.bar(x, rows["mean"], yerr=rows["std"], capsize=3, color="tab:blue")
    ax.set_xticks(x, rows["variant"], rotation=30, ha="right")
    ax.set_ylabel(f"{key} ({evaluation}, {checkpoint})")
    return ax


VERDICT_COLOURS = {"holds": "tab:green", "reversed": "tab:red", "no effect of the paper's size": "tab:blue",
                   "inconclusive": "tab:gray"}


def verdict_forest(ax, verdicts):
    """One line per claim of a :func:`vidret_lib.stats.verdict_table` (or :func:`vidret_lib.tables.verdicts_frame`):
    the estimate with its 95% CI (oriented so that right = the claim's direction), coloured by verdict, and the
    paper's effect marked with a red ``|``; a dashed line at 0. Rows are drawn top to bottom in the frame's order;
    use one ``ax`` per metric (units differ). Returns ``ax``.
    """
    y = np.arange(len(verdicts))[::-1]
    for yi, row in zip(y, verdicts.itertuples(index=False)):
        colour = VERDICT_COLOURS.get(row.verdict, "black")
        ax.errorbar(row.estimate, yi, xerr=[[row.estimate - row.ci_low], [row.ci_high - row.estimate]], fmt="o",
                    color=colour, capsize=3)
    ax.scatter(verdicts["paper's effect"], y, marker="|", s=200, color="tab:red", label="paper's effect", zorder=3)
    ax.axvline(0, color="grey", ls="--", lw=1)
    labels = [f"{c}\n{v} ({n} items, {s} seeds)" for c, v, n, s in
              zip(verdicts["comparison"], verdicts["verdict"], verdicts["n_items"], verdicts["seeds"])]
    ax.set_yticks(y, labels, fontsize="small")
    for outcome, colour in VERDICT_COLOURS.items():  # legend entries for the outcomes present
        if (verdicts["verdict"] == outcome).any():
            ax.plot([], [], "o", color=colour, label=outcome)
    ax.legend(fontsize="x-small", loc="best")
    return ax


def loss_curves(ax, records: Sequence[dict[str, Any]], labels: Sequence[str] | None = None):
    """Training loss per epoch (mean over seeds) for each record."""
    for r, label in zip(records, labels or [r["name"] for r in records]):
        losses = np.array([[h["loss"] for h in run["history"]] for run in r["metrics"]["runs"]])
        ax.plot(np.arange(1, losses.shape[1] + 1), losses.mean(0), label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    ax.legend(fontsize="small")
    return ax


def histograms(ax, samples: dict[str, Sequence[float]], bins: int = 40, xlabel: str = ""):
    """Overlaid density histograms of named samples (e.g. positive vs negative scores)."""
    for label, values in samples.items():
        ax.hist(np.asarray(values, dtype=float), bins=bins, density=True, alpha=0.5, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.legend(fontsize="small")
    return ax


def save(fig, figures_dir: str, name: str) -> Path:
    """Save ``fig`` as ``<figures_dir>/<name>.png`` and return the path; under torchrun only rank 0
    writes (:func:`vidret_lib.distributed.is_main_process`), the others return the path."""
    path = Path(figures_dir) / f"{name}.png"
    if not is_main_process():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path
