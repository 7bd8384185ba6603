"""Run a training variant over several seeds, evaluate it, and keep the result in a results file.

``run_variant`` is what a notebook calls for each row of its table: it trains
``config`` once per seed with :func:`vidret_lib.train.train`, evaluates the selected and the
last-epoch weights on the test split (optionally re-ranked), writes
``<results_dir>/<notebook>/<name>.json`` and returns that record. A record whose config,
seeds, data and library code match is loaded instead of retrained ("load if present").
Numbers are reported as mean ± std over seeds (population std, ``ddof=0``).
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from .results import read_results, write_results
from .train import FeatureSplit, TrainConfig, evaluate, train

LIBRARY_DIR = Path(__file__).resolve().parent


def library_hash() -> str:
    """Short hash of the library's source: results computed by other code are not reused."""
    h = hashlib.sha256()
    for src in sorted(LIBRARY_DIR.rglob("*.py")):
        h.update(src.name.encode())
        h.update(src.read_bytes())
    return h.hexdigest()[:16]


def summarize(values: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Mean and std over seeds of ``{"t2v": {"R1": ..}, "v2t": {..}}`` dicts, flattened.

    Example:
        >>> s = summarize([{"t2v": {"R1": 10.0}}, {"t2v": {"R1": 20.0}}])
        >>> s["t2v_R1"]
        {'mean': 15.0, 'std': 5.0, 'n': 2}
    """
    keys = [(d, m) for d, ms in values[0].items() for m in ms if m != "n_queries"]
    out = {}
    for d, m in keys:
        arr = np.array([v[d][m] for v in values], dtype=float)
        out[f"{d}_{m}"] = {"mean": float(arr.mean()), "std": float(arr.std()), "n": len(arr)}
    return out


def run_variant(
    name: str,
    config: TrainConfig,
    seeds: list[int],
    train_split: FeatureSplit,
    val_split: FeatureSplit | None,
    test_split: FeatureSplit,
    results_dir: str,
    notebook: str,
    data_key: str,
    evals: dict[str, dict[str, Any]] | None = None,
    protocol: dict[str, Any] | None = None,
    encoder=None,
) -> dict[str, Any]:
    """Train ``config`` for each seed, evaluate, write and return the results record.

    ``evals`` names the evaluations of each trained model, each a dict of
    :func:`vidret_lib.train.evaluate` keyword arguments (default ``{"plain": {}}``), e.g.
    ``{"plain": {}, "dsl": {"rerank": "dsl"}, "qb_norm": {"rerank": "qb_norm", "prior": train_split}}``.
    ``data_key`` names the features (dataset + splits + encoder), part of the reuse check.
    ``encoder`` (optional) is passed to :func:`~vidret_lib.train.train`, so that seqTransf starts
    from the encoder's CLIP text layers when they fit (CLIP4Clip's init; random otherwise).
    The record's ``metrics`` hold ``runs`` (per seed: chosen epoch, loss history, test
    metrics of the selected and the last weights per evaluation) and ``summary``
    (``summary[eval][which]["t2v_R1"] = {"mean", "std", "n"}``).
    """
    evals = evals or {"plain": {}}
    path = Path(results_dir) / notebook / f"{name}.json"
    config_dict = dataclasses.asdict(config)
    identity = {"seeds": list(seeds), "data_key": data_key, "library": library_hash(), "evals": sorted(evals),
                "init_encoder": None if encoder is None else encoder.cache_id}
    if path.exists():
        old = read_results(path)
        if old["config"] == config_dict and old["protocol"].get("identity") == identity:
            return old
    runs = []
    for seed in seeds:
        result = train(dataclasses.replace(config, seed=seed), train_split, val_split, encoder=encoder)
        weights = {"selected": result.model, "last": result.model_at("last")}
        test = {
            e: {which: evaluate(model, test_split, **kw) for which, model in weights.items()}
            for e, kw in evals.items()
        }
        history = [{"epoch": h["epoch"], "loss": h["loss"], "val": h["val"]} for h in result.history]
        runs.append({"seed": seed, "chosen_epoch": result.chosen_epoch, "history": history, "test": test})
    summary = {
        e: {which: summarize([r["test"][e][which] for r in runs]) for which in ("selected", "last")}
        for e in evals
    }
    protocol = {"select": config.select, "false_negatives": config.false_negatives, **(protocol or {}), "identity": identity}
    write_results(path, name, {"runs": runs, "summary": summary}, config_dict, seed=list(seeds),
                  device=config.device, protocol=protocol)
    return read_results(path)


def fmt(stat: dict[str, float]) -> str:
    """``"12.3 ± 0.4"`` from a summary entry.

    Example:
        >>> fmt({"mean": 12.345, "std": 0.41, "n": 3})
        '12.3 ± 0.4'
    """
    return f"{stat['mean']:.1f} ± {stat['std']:.1f}"


def table(records: list[dict[str, Any]], metrics=("t2v_R1", "t2v_R5", "v2t_R1"), evaluation: str = "plain",
          which: str = "selected") -> str:
    """A Markdown table of ``records`` (rows) by ``metrics`` (mean ± std over seeds)."""
    head = "| variant | " + " | ".join(metrics) + " |\n|---|" + "---|" * len(metrics)
    rows = [
        f"| {r['name']} | " + " | ".join(fmt(r["metrics"]["summary"][evaluation][which][m]) for m in metrics) + " |"
        for r in records
    ]
    return "\n".join([head, *rows])
