"""Plot helpers: each takes a matplotlib ``ax``, draws from results records, and returns ``ax``.

Figures are only ever drawn from results files (:func:`vidret_lib.results.read_results`),
never from a notebook's memory.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np


def metric_bars(ax, records: Sequence[dict[str, Any]], metric: str = "t2v_R1", evaluation: str = "plain",
                which: str = "selected", labels: Sequence[str] | None = None):
    """Bars of ``metric`` (mean ± std over seeds) for each record."""
    stats = [r["metrics"]["summary"][evaluation][which][metric] for r in records]
    x = np.arange(len(records))
    ax.bar(x, [s["mean"] for s in stats], yerr=[s["std"] for s in stats], capsize=3, color="tab:blue")
    ax.set_xticks(x, labels or [r["name"] for r in records], rotation=30, ha="right")
    ax.set_ylabel(f"{metric} ({evaluation}, {which})")
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
    """Save ``fig`` as ``<figures_dir>/<name>.png`` and return the path."""
    path = Path(figures_dir) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path
