"""Results files as tables: every record of a results folder in one tidy pandas DataFrame.

Notebooks read numbers through :func:`results_frame` (one row per value, filter with ``query``)
instead of paths like ``r["metrics"]["summary"]["plain"]["selected"]["t2v_R1"]``, and the
per-query test ranks of a variant through :func:`query_ranks`, which feed
:func:`vidret_lib.stats.compare_ranks`::

    df = results_frame("results")
    df.query("notebook == '02_vsepp' and metric == 'R1' and direction == 't2v' and checkpoint == 'selected'")
    ci = stats.compare_ranks(query_ranks("results/02_vsepp/SH_m0.2.json"), query_ranks("results/02_vsepp/MH_m0.2.json"))

Two record shapes are read (both written by ``vidret_lib.experiment.load_or_run``):
``run_variant`` records (``metrics.runs[i].test[evaluation][checkpoint][direction][metric]``) and the
CIKM 2021 records of notebook 06 (``metrics.runs[i]`` with ``val``/``test`` Spearman and the test pairs'
predicted ``test_scores``). Other records (data statistics, gradient checks, verdicts) are listed in
``frame.attrs["skipped"]`` with the reason.

Each notebook keeps its verdict table (:func:`vidret_lib.stats.verdict_table`) with :func:`write_verdicts`;
notebook 07 gathers them with :func:`verdicts_frame`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from .experiment import load_or_run
from .results import read_results
from .stats import VERDICT_COLUMNS

VERDICTS = "verdicts"  # results/<notebook>/verdicts.json: the notebook's verdict table (write_verdicts)
ROW_KEYS = ("notebook", "variant", "seed", "checkpoint", "evaluation", "split", "direction", "metric")
_NOT_METRICS = ("n_queries", "ranks")


def results_frame(results_dir: str | os.PathLike, notebooks: Sequence[str] | None = None) -> pd.DataFrame:
    """Every results record under ``results_dir/<notebook>/<variant>.json`` as one tidy DataFrame
    (only the folders named in ``notebooks``, when given).

    One row per notebook x variant x seed x checkpoint x evaluation x split x direction x metric:

    * ``notebook``, ``variant`` (the folder and the record's name), ``file`` (path relative to
      ``results_dir``), ``seed`` (int);
    * ``checkpoint``: ``"selected"`` (chosen on val) or ``"last"`` (the CIKM records: ``"last"``, their
      protocol); ``evaluation``: ``"plain"``, ``"dsl"``, ... (CIKM: ``"plain"``); ``split``: ``"test"``
      (CIKM records also ``"val"``); ``direction``: ``"t2v"``/``"v2t"`` (CIKM: ``"pairs"``);
    * ``metric`` (``R1``, ``R5``, ``R10``, ``MdR``, ``MnR``; CIKM ``spearman``) and ``value`` (float64);
    * ``n_queries`` (queries scored in that direction; ``NaN`` when the record lacks it),
      ``chosen_epoch``; ``n_test_videos`` and ``n_excluded_videos`` from ``metrics.test_set`` (``NaN``
      for records written before it existed);
    * ``config.<field>``, ``protocol.<key>`` (nested keys joined by ``.``, e.g.
      ``protocol.identity.data_key``) and ``environment.<key>``; lists become tuples.

    ``frame.attrs["skipped"]`` maps each file that is not a per-seed metrics record to the reason.
    The per-seed ``ranks`` lists are not in the frame: read them with :func:`query_ranks`.

    Raises:
        FileNotFoundError: ``results_dir`` does not exist.
        ValueError: a file is not a vidret results file (from :func:`vidret_lib.results.read_results`).
    """
    root = Path(results_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"results folder {root} does not exist; run the notebooks (make reproduce) first")
    rows: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    for path in sorted(root.glob("*/*.json")):
        if notebooks is not None and path.parent.name not in notebooks:
            continue
        record = read_results(path)
        runs = record["metrics"].get("runs")
        if not runs:
            skipped[path.relative_to(root).as_posix()] = "no per-seed runs in metrics (not a training record)"
            continue
        common = {"notebook": path.parent.name, "variant": record["name"], "file": path.relative_to(root).as_posix(),
                  **_test_set_columns(record["metrics"]), **_flatten(record["config"], "config"),
                  **_flatten(record["protocol"], "protocol"), **_flatten(record["environment"], "environment")}
        for run in runs:
            if "test" in run and isinstance(run["test"], dict):
                rows += [{**common, **row} for row in _variant_rows(run)]
            elif isinstance(run.get("test"), float):
                rows += [{**common, **row} for row in _pair_rows(run, record["protocol"].get("select", "last"))]
            else:
                skipped[path.relative_to(root).as_posix()] = "runs hold neither test metrics nor a test Spearman"
                break
    frame = pd.DataFrame(rows)
    if not frame.empty:
        first = [*ROW_KEYS, "value", "n_queries", "chosen_epoch", "file", "n_test_videos", "n_excluded_videos"]
        frame = frame[[*first, *[c for c in frame.columns if c not in first]]]
        frame = frame.astype({"seed": "int64", "value": "float64"})
    frame.attrs["skipped"] = skipped
    return frame


def summary_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean, std (population, ``ddof=0``, as the records' ``summary``) and number of seeds of ``value``
    over seeds, per notebook x variant x checkpoint x evaluation x split x direction x metric.

    Example:
        >>> df = pd.DataFrame({"notebook": "nb", "variant": "v", "seed": [0, 1], "checkpoint": "selected",
        ...                    "evaluation": "plain", "split": "test", "direction": "t2v", "metric": "R1",
        ...                    "value": [10.0, 20.0]})
        >>> summary_frame(df)[["mean", "std", "n"]].iloc[0].tolist()
        [15.0, 5.0, 2.0]
    """
    keys = [k for k in ROW_KEYS if k != "seed"]
    grouped = frame.groupby(keys, sort=False)["value"]
    return grouped.agg(mean="mean", std=lambda v: float(np.std(v)), n="count").reset_index()


def query_ranks(record: str | os.PathLike | dict[str, Any], evaluation: str = "plain", checkpoint: str = "selected",
                direction: str = "t2v") -> dict[int, np.ndarray]:
    """Per-query test ranks of a ``run_variant`` record: ``{seed: (Q,) float64 1-based ranks}``.

    Queries are in the test split's row order (captions for ``"t2v"``, videos for ``"v2t"``), the same
    in every seed and every variant evaluated on that split, so two variants' dicts can be passed to
    :func:`vidret_lib.stats.compare_ranks` as they are (paired by query and by seed).

    Args:
        record: a results file path or a record already read (:func:`vidret_lib.results.read_results`).
        evaluation, checkpoint, direction: which ranks (``run["test"][evaluation][checkpoint][direction]``).
    Raises:
        ValueError: the record has no runs, no such evaluation/checkpoint/direction (names the valid
            ones), or no ranks (written before ranks were stored: re-run its notebook).
    """
    record, where = _record(record)
    runs = record["metrics"].get("runs") or []
    if not runs or not isinstance(runs[0].get("test"), dict):
        raise ValueError(f"{where} is not a run_variant record (no metrics.runs[i].test)")
    out = {}
    for run in runs:
        node: Any = run["test"]
        for level, key in (("evaluation", evaluation), ("checkpoint", checkpoint), ("direction", direction)):
            if key not in node:
                raise ValueError(f"{where}: no {level} {key!r} in seed {run['seed']}; valid: {sorted(node)}")
            node = node[key]
        if "ranks" not in node:
            raise ValueError(f"{where} has no per-query ranks (written before run_variant stored them); "
                             "re-run its notebook to get them")
        out[int(run["seed"])] = np.asarray(node["ranks"], dtype=np.float64)
    return out


def pair_scores(record: str | os.PathLike | dict[str, Any]) -> dict[int, np.ndarray]:
    """Predicted scores of the test pairs of a CIKM 2021 record (notebook 06): ``{seed: (P,) float64}``,
    in the pairs' order, for :func:`vidret_lib.stats.spearman_difference` (with the pairs' labels).

    Raises:
        ValueError: a run without ``test_scores``.
    """
    record, where = _record(record)
    runs = record["metrics"].get("runs") or []
    if not runs or any("test_scores" not in run for run in runs):
        raise ValueError(f"{where} has no metrics.runs[i].test_scores (not a notebook 06 pair-scoring record)")
    return {int(run["seed"]): np.asarray(run["test_scores"], dtype=np.float64) for run in runs}


def stat(summary: pd.DataFrame, variant: str, key: str = "t2v_R1", evaluation: str = "plain",
         checkpoint: str = "selected", split: str = "test") -> dict[str, float]:
    """One row of :func:`summary_frame` as ``{"mean", "std", "n"}`` (what :func:`vidret_lib.experiment.fmt` prints).

    ``key``: ``"<direction>_<metric>"`` (``"t2v_R1"``, ``"v2t_MnR"``; CIKM records ``"pairs_spearman"`` with
    ``checkpoint="last"`` and ``split`` ``"val"`` or ``"test"``).
    Raises:
        ValueError: no row, or several rows (the frame spans notebooks that share a variant name: filter it).

    Example:
        >>> df = pd.DataFrame({"notebook": "nb", "variant": "v", "seed": [0, 1], "checkpoint": "selected",
        ...                    "evaluation": "plain", "split": "test", "direction": "t2v", "metric": "R1",
        ...                    "value": [10.0, 20.0]})
        >>> stat(summary_frame(df), "v")
        {'mean': 15.0, 'std': 5.0, 'n': 2}
    """
    direction, metric = key.split("_", 1)
    rows = summary[(summary.variant == variant) & (summary.direction == direction) & (summary.metric == metric)
                   & (summary.evaluation == evaluation) & (summary.checkpoint == checkpoint) & (summary.split == split)]
    if len(rows) != 1:
        raise ValueError(f"{len(rows)} summary rows for variant {variant!r}, {key}, {evaluation}, {checkpoint}, {split} "
                         f"(variants present: {sorted(summary.variant.unique())}); filter the frame to one notebook")
    row = rows.iloc[0]
    return {"mean": float(row["mean"]), "std": float(row["std"]), "n": int(row["n"])}


def val_curves(record: str | os.PathLike | dict[str, Any], key: str = "t2v_R1") -> np.ndarray:
    """Validation metric per seed and epoch of a ``run_variant`` record: (S, E) float64, seeds in the record's order.

    ``key``: ``"<direction>_<metric>"`` of ``run["history"][epoch]["val"]``. Model selection reads these
    curves (best over epochs = what ``select="val"`` keeps); test numbers never enter them.
    Raises:
        ValueError: a run without a val history (trained without a val split) or with another epoch count.
    """
    record, where = _record(record)
    direction, metric = key.split("_", 1)
    curves = []
    for run in record["metrics"].get("runs") or []:
        if not run.get("history") or not all(h.get("val") for h in run["history"]):
            raise ValueError(f"{where}: seed {run.get('seed')} has no val metric at every epoch (no val split?)")
        curves.append([h["val"][direction][metric] for h in run["history"]])
    if not curves or len({len(c) for c in curves}) != 1:
        raise ValueError(f"{where}: needs runs with the same number of epochs; got {[len(c) for c in curves]}")
    return np.asarray(curves, dtype=np.float64)


def scored_on(record: str | os.PathLike | dict[str, Any]) -> str:
    """What a record's test numbers were scored on, for tables and figure captions.

    ``run_variant`` records: ``"<Q> test queries, <V> videos"`` (``", <k> excluded"`` when the split dropped
    videos), from ``metrics.test_set``; CIKM records: ``"<P> test pairs"``.
    Raises:
        ValueError: neither ``metrics.test_set`` nor ``test_scores`` (written before they were stored: re-run).

    Example:
        >>> scored_on({"name": "v", "metrics": {"test_set": {"n_test_queries": 200, "n_test_videos": 199,
        ...                "excluded_videos": {"v7": "no frames"}}}})
        '200 test queries, 199 videos (1 excluded)'
    """
    record, where = _record(record)
    ts = record["metrics"].get("test_set")
    if ts is not None:
        excluded = f" ({len(ts['excluded_videos'])} excluded)" if ts["excluded_videos"] else ""
        return f"{ts['n_test_queries']} test queries, {ts['n_test_videos']} videos{excluded}"
    runs = record["metrics"].get("runs") or []
    if runs and "test_scores" in runs[0]:
        return f"{len(runs[0]['test_scores'])} test pairs"
    raise ValueError(f"{where} has no metrics.test_set nor test_scores: written before they were stored; re-run its notebook")


def write_verdicts(verdicts: pd.DataFrame, results_dir: str | os.PathLike, notebook: str, seeds: Any,
                   device: str = "cpu") -> dict[str, Any]:
    """Keep a notebook's verdict table (:func:`vidret_lib.stats.verdict_table`) in
    ``<results_dir>/<notebook>/verdicts.json``, where notebook 07 reads it (:func:`verdicts_frame`).

    Written through :func:`vidret_lib.experiment.load_or_run` with the table as its config: an unchanged
    table leaves the file (and its checksum) as it is. Returns the record.
    Raises:
        ValueError: ``verdicts`` lacks a column of :data:`vidret_lib.stats.VERDICT_COLUMNS`.
    """
    missing = [c for c in VERDICT_COLUMNS if c not in verdicts.columns]
    if missing:
        raise ValueError(f"the verdict table of {notebook} lacks columns {missing}: build it with stats.verdict_table")
    rows = verdicts.to_dict("records")
    return load_or_run(results_dir, notebook, VERDICTS, {"verdicts": rows}, {"seeds": seeds},
                       lambda: {"verdicts": rows}, seed=seeds, device=device,
                       protocol={"verdicts": "paired bootstrap CIs (vidret_lib.stats), verdict per claim"})


def verdicts_frame(results_dir: str | os.PathLike) -> pd.DataFrame:
    """Every notebook's verdict table (``<results_dir>/*/verdicts.json``) in one DataFrame, a ``notebook``
    column first, notebooks in name order (an empty frame with the columns when there is none).

    Raises:
        FileNotFoundError: ``results_dir`` does not exist.
    """
    root = Path(results_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"results folder {root} does not exist; run the notebooks (make reproduce) first")
    frames = [pd.DataFrame(read_results(path)["metrics"]["verdicts"]).assign(notebook=path.parent.name)
              for path in sorted(root.glob(f"*/{VERDICTS}.json"))]
    if not frames:
        return pd.DataFrame(columns=["notebook", *VERDICT_COLUMNS])
    frame = pd.concat(frames, ignore_index=True)
    return frame[["notebook", *[c for c in frame.columns if c != "notebook"]]]


def _variant_rows(run: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of one seed of a run_variant record: every evaluation x checkpoint x direction x metric."""
    return [
        {"seed": run["seed"], "checkpoint": which, "evaluation": e, "split": "test", "direction": direction,
         "metric": metric, "value": value, "n_queries": metrics.get("n_queries", np.nan),
         "chosen_epoch": run.get("chosen_epoch")}
        for e, by_which in run["test"].items()
        for which, by_direction in by_which.items()
        for direction, metrics in by_direction.items()
        for metric, value in metrics.items() if metric not in _NOT_METRICS
    ]


def _pair_rows(run: dict[str, Any], checkpoint: str) -> list[dict[str, Any]]:
    """Rows of one seed of a CIKM 2021 record: the val and test Spearman of the predicted pair scores."""
    n = len(run["test_scores"]) if "test_scores" in run else np.nan
    return [{"seed": run["seed"], "checkpoint": checkpoint, "evaluation": "plain", "split": split,
             "direction": "pairs", "metric": "spearman", "value": run[split],
             "n_queries": n if split == "test" else np.nan, "chosen_epoch": None}
            for split in ("val", "test") if split in run]


def _test_set_columns(metrics: dict[str, Any]) -> dict[str, float]:
    test_set = metrics.get("test_set")
    if test_set is None:
        return {"n_test_videos": np.nan, "n_excluded_videos": np.nan}
    return {"n_test_videos": test_set["n_test_videos"], "n_excluded_videos": len(test_set["excluded_videos"])}


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [1, 2]}`` -> ``{"<prefix>.a.b": 1, "<prefix>.c": (1, 2)}`` (tuples: hashable cells)."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(_flatten(sub, f"{prefix}.{key}"))
        return out
    return {prefix: _to_tuple(value) if isinstance(value, list) else value}


def _to_tuple(value: list) -> tuple:
    return tuple(_to_tuple(v) if isinstance(v, list) else v for v in value)


def _record(record: str | os.PathLike | dict[str, Any]) -> tuple[dict[str, Any], str]:
    """(record, how to name it in an error)."""
    if isinstance(record, dict):
        return record, f"record {record.get('name', '?')!r}"
    return read_results(record), str(record)
