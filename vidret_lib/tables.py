"""Results files as tables: every record of a results folder in one tidy pandas DataFrame.

Notebooks read numbers through :func:`results_frame` (one row per value, filter with ``query``)
instead of paths like ``r["metrics"]["summary"]["plain"]["selected"]["t2v_R1"]``, and the
per-query test ranks of a variant through :func:`query_ranks`, which feed
:func:`vidret_lib.stats.compare_ranks`::

    df = results_frame("results")
    df.query("notebook == '02_vsepp' and metric == 'R1' and direction == 't2v' and checkpoint == 'selected'")
    ci = stats.compare_ranks(query_ranks("results/02_vsepp/SH_m0.2.json"), query_ranks("results/02_vsepp/MH_m0.2.json"),
                             clusters=query_clusters("results/02_vsepp/SH_m0.2.json"))  # resample videos

Queries are viewed two ways (``queries``, :data:`QUERY_VIEWS`): ``"all"`` the split's captions, and
``"first_per_video"`` the first caption of each test video (as MSR-VTT's 1k-A is to its full test set),
read from the same stored ranks (``query_ranks(..., queries=...)``, ``results_frame(..., queries=QUERY_VIEWS)``);
see :func:`query_ranks` for when that view is exact.

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

from .experiment import load_or_run, scored_counts
from .metrics import summarize_ranks
from .results import read_results
from .stats import VERDICT_COLUMNS

VERDICTS = "verdicts"  # results/<notebook>/verdicts.json: the notebook's verdict table (write_verdicts)
ROW_KEYS = ("notebook", "variant", "seed", "checkpoint", "evaluation", "split", "direction", "queries", "metric")
QUERY_VIEWS = ("all", "first_per_video")  # every test caption; the first caption of each test video
_NOT_METRICS = ("n_queries", "ranks")


def results_frame(results_dir: str | os.PathLike, notebooks: Sequence[str] | None = None,
                  queries: Sequence[str] = ("all",)) -> pd.DataFrame:
    """Every results record under ``results_dir/<notebook>/<variant>.json`` as one tidy DataFrame
    (only the folders named in ``notebooks``, when given), in the query views named in ``queries``
    (:data:`QUERY_VIEWS`; ``queries=QUERY_VIEWS`` for both).

    One row per notebook x variant x seed x checkpoint x evaluation x split x direction x queries x metric:

    * ``notebook``, ``variant`` (the folder and the record's name), ``file`` (path relative to
      ``results_dir``), ``seed`` (int);
    * ``checkpoint``: ``"selected"`` (chosen on val) or ``"last"`` (the CIKM records: ``"last"``, their
      protocol); ``evaluation``: ``"plain"``, ``"dsl"``, ... (CIKM: ``"plain"``); ``split``: ``"test"``
      (CIKM records also ``"val"``); ``direction``: ``"t2v"``/``"v2t"`` (CIKM: ``"pairs"``);
    * ``queries``: ``"all"`` (the records' own metrics); with ``"first_per_video"`` in ``queries``, t2v rows
      also of the first caption of each video (metrics computed from the stored ranks, exact as
      :func:`query_ranks` says) for records that store each query's video
      (``metrics.test_set.caption_video``). Only ``"all"`` by default, so that a consumer that does not
      filter on ``queries`` never counts a query twice;
    * ``metric`` (``R1``, ``R5``, ``R10``, ``MdR``, ``MnR``; CIKM ``spearman``) and ``value`` (float64);
    * ``n_queries`` (queries scored in that direction and view; ``NaN`` when the record lacks it),
      ``chosen_epoch``; ``n_test_videos``, ``n_excluded_videos``, ``n_split_queries`` and
      ``n_split_videos`` (the split's full size) from ``metrics.test_set`` (``NaN`` for records written
      before a field existed);
    * ``config.<field>``, ``protocol.<key>`` (nested keys joined by ``.``, e.g.
      ``protocol.identity.data_key``) and ``environment.<key>``; lists become tuples.

    ``frame.attrs["skipped"]`` maps each file that is not a per-seed metrics record to the reason.
    The per-seed ``ranks`` lists are not in the frame: read them with :func:`query_ranks`.

    Raises:
        FileNotFoundError: ``results_dir`` does not exist.
        ValueError: a file is not a vidret results file (from :func:`vidret_lib.results.read_results`); a
            view in ``queries`` that is not in :data:`QUERY_VIEWS`.
    """
    if isinstance(queries, str) or not set(queries) <= set(QUERY_VIEWS):
        raise ValueError(f"queries must be a sequence of views from {QUERY_VIEWS}; got {queries!r}")
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
        caption_video = (record["metrics"].get("test_set") or {}).get("caption_video")
        first = None if caption_video is None or "first_per_video" not in queries else _first_per_video(caption_video)
        for run in runs:
            if "test" in run and isinstance(run["test"], dict):
                rows += [{**common, **row} for row in _variant_rows(run, first)]
            elif isinstance(run.get("test"), float):
                rows += [{**common, **row} for row in _pair_rows(run, record["protocol"].get("select", "last"))]
            else:
                skipped[path.relative_to(root).as_posix()] = "runs hold neither test metrics nor a test Spearman"
                break
    frame = pd.DataFrame(rows)
    if not frame.empty:
        first = [*ROW_KEYS, "value", "n_queries", "chosen_epoch", "file", "n_test_videos", "n_excluded_videos",
                 "n_split_queries", "n_split_videos"]
        frame = frame[[*first, *[c for c in frame.columns if c not in first]]]
        frame = frame.astype({"seed": "int64", "value": "float64"})
    frame.attrs["skipped"] = skipped
    return frame


def summary_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean, std (population, ``ddof=0``, as the records' ``summary``) and number of seeds of ``value``
    over seeds, per notebook x variant x checkpoint x evaluation x split x direction x queries x metric
    (:data:`ROW_KEYS`; filter ``queries`` for one view: ``"all"`` or ``"first_per_video"``).

    Example:
        >>> df = pd.DataFrame({"notebook": "nb", "variant": "v", "seed": [0, 1], "checkpoint": "selected",
        ...                    "evaluation": "plain", "split": "test", "direction": "t2v", "queries": "all",
        ...                    "metric": "R1", "value": [10.0, 20.0]})
        >>> summary_frame(df)[["mean", "std", "n"]].iloc[0].tolist()
        [15.0, 5.0, 2.0]
    """
    keys = [k for k in ROW_KEYS if k != "seed"]
    grouped = frame.groupby(keys, sort=False)["value"]
    return grouped.agg(mean="mean", std=lambda v: float(np.std(v)), n="count").reset_index()


def query_ranks(record: str | os.PathLike | dict[str, Any], evaluation: str = "plain", checkpoint: str = "selected",
                direction: str = "t2v", queries: str = "all") -> dict[int, np.ndarray]:
    """Per-query test ranks of a ``run_variant`` record: ``{seed: (Q,) float64 1-based ranks}``.

    Queries are in the test split's row order (captions for ``"t2v"``, videos for ``"v2t"``), the same
    in every seed and every variant evaluated on that split, so two variants' dicts can be passed to
    :func:`vidret_lib.stats.compare_ranks` as they are (paired by query and by seed), with
    ``clusters=query_clusters(record, direction, queries)`` to resample videos.

    ``queries="first_per_video"`` keeps the first caption of each test video, in row order (MSR-VTT's 1k-A
    view of a test set with several captions per video). This is exact for plain and re-rank-free
    evaluations, where a caption's t2v rank depends only on its own scores against the videos; with a
    querybank re-ranking (DSL, QB-Norm: evaluations with ``rerank``) the bank was the whole query set,
    so these are the ranks of that re-ranking over all captions, not those of an evaluation on one
    caption per video. t2v only: v2t queries are videos ranked against every caption of the split.

    Args:
        record: a results file path or a record already read (:func:`vidret_lib.results.read_results`).
        evaluation, checkpoint, direction: which ranks (``run["test"][evaluation][checkpoint][direction]``).
        queries: ``"all"`` or ``"first_per_video"`` (:data:`QUERY_VIEWS`).
    Raises:
        ValueError: the record has no runs, no such evaluation/checkpoint/direction (names the valid
            ones), or no ranks (written before ranks were stored: re-run its notebook); an unknown
            ``queries``, ``"first_per_video"`` for v2t or for a record without each query's video.
    """
    record, where = _record(record)
    keep = _query_view(record, where, direction, queries)
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
        ranks = np.asarray(node["ranks"], dtype=np.float64)
        out[int(run["seed"])] = ranks if keep is None else ranks[keep]
    return out


def query_clusters(record: str | os.PathLike | dict[str, Any], direction: str = "t2v", queries: str = "all") -> np.ndarray:
    """Each test query's video, in :func:`query_ranks`' order: (Q,) int64, the ``clusters`` of
    :func:`vidret_lib.stats.bootstrap_difference` (resample videos, not captions).

    t2v: ``metrics.test_set.caption_video`` (query i describes video ``caption_video[i]``), restricted
    like :func:`query_ranks` for ``queries="first_per_video"`` (one query per video: the cluster
    bootstrap is then the query bootstrap). v2t: the queries are the videos, ``arange(n_test_videos)``.

    Raises:
        ValueError: no ``metrics.test_set`` (not a run_variant record, or written before it existed),
            no ``caption_video`` for t2v (written before it was stored: re-run its notebook), an unknown
            ``direction`` or ``queries``.

    Example:
        >>> rec = {"name": "v", "metrics": {"test_set": {"n_test_videos": 3, "caption_video": [0, 0, 1, 2, 2]}}}
        >>> query_clusters(rec).tolist(), query_clusters(rec, queries="first_per_video").tolist()
        ([0, 0, 1, 2, 2], [0, 1, 2])
        >>> query_clusters(rec, "v2t").tolist()
        [0, 1, 2]
    """
    record, where = _record(record)
    keep = _query_view(record, where, direction, queries)
    if direction == "v2t":
        return np.arange(_test_set(record, where)["n_test_videos"], dtype=np.int64)
    if direction != "t2v":
        raise ValueError(f"{where}: unknown direction {direction!r}; use 't2v' or 'v2t'")
    clusters = np.asarray(_caption_video(record, where), dtype=np.int64)
    return clusters if keep is None else clusters[keep]


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
         checkpoint: str = "selected", split: str = "test", queries: str = "all") -> dict[str, float]:
    """One row of :func:`summary_frame` as ``{"mean", "std", "n"}`` (what :func:`vidret_lib.experiment.fmt` prints).

    ``key``: ``"<direction>_<metric>"`` (``"t2v_R1"``, ``"v2t_MnR"``; CIKM records ``"pairs_spearman"`` with
    ``checkpoint="last"`` and ``split`` ``"val"`` or ``"test"``); ``queries``: the view (:data:`QUERY_VIEWS`).
    Raises:
        ValueError: no row, or several rows (the frame spans notebooks that share a variant name: filter it).

    Example:
        >>> df = pd.DataFrame({"notebook": "nb", "variant": "v", "seed": [0, 1], "checkpoint": "selected",
        ...                    "evaluation": "plain", "split": "test", "direction": "t2v", "queries": "all",
        ...                    "metric": "R1", "value": [10.0, 20.0]})
        >>> stat(summary_frame(df), "v")
        {'mean': 15.0, 'std': 5.0, 'n': 2}
    """
    direction, metric = key.split("_", 1)
    rows = summary[(summary.variant == variant) & (summary.direction == direction) & (summary.metric == metric)
                   & (summary.evaluation == evaluation) & (summary.checkpoint == checkpoint) & (summary.split == split)
                   & (summary.queries == queries)]
    if len(rows) != 1:
        raise ValueError(f"{len(rows)} summary rows for variant {variant!r}, {key}, {evaluation}, {checkpoint}, {split}, "
                         f"queries {queries!r} "
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


def scored_on(record: str | os.PathLike | dict[str, Any], queries: str = "all") -> str:
    """What a record's test numbers were scored on, for tables and figure captions.

    ``run_variant`` records, from ``metrics.test_set`` (:func:`vidret_lib.experiment.scored_counts`):
    ``"2,000 test queries, 1,000 videos"`` for a complete split, ``"8 of 1,000 test queries, 8 of 1,000
    videos (992 excluded: incomplete split)"`` when videos of the split were not scored (records written
    before the split's size was stored: ``"200 test queries, 199 videos (1 excluded)"``, or no flag).
    ``queries="first_per_video"`` counts one query per video (:func:`query_ranks`):
    ``"1,000 test queries (one caption per video), 1,000 videos"``. CIKM records: ``"<P> test pairs"``.
    Raises:
        ValueError: neither ``metrics.test_set`` nor ``test_scores`` (written before they were stored: re-run);
            an unknown ``queries``.

    Example:
        >>> scored_on({"name": "v", "metrics": {"test_set": {"n_test_queries": 8, "n_test_videos": 8,
        ...            "excluded_videos": {}, "n_split_queries": 1000, "n_split_videos": 1000}}})
        '8 of 1,000 test queries, 8 of 1,000 videos (992 excluded: incomplete split)'
    """
    record, where = _record(record)
    if queries not in QUERY_VIEWS:
        raise ValueError(f"{where}: unknown queries {queries!r}; use one of {QUERY_VIEWS}")
    ts = record["metrics"].get("test_set")
    if ts is not None:
        one_per_video = queries == "first_per_video"
        if one_per_video:  # one query per video: the split's queries are its videos
            ts = {**ts, "n_test_queries": ts["n_test_videos"], "n_split_queries": ts.get("n_split_videos")}
        n_queries, n_videos, note = scored_counts(ts)
        return f"{n_queries} test queries{' (one caption per video)' if one_per_video else ''}, {n_videos} videos{note}"
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


def _variant_rows(run: dict[str, Any], first: np.ndarray | None) -> list[dict[str, Any]]:
    """Rows of one seed of a run_variant record: every evaluation x checkpoint x direction x queries x metric.

    ``first``: the t2v queries of the ``"first_per_video"`` view (:func:`_first_per_video`), or None
    (the record does not store each query's video: ``"all"`` only)."""
    rows = []
    for e, by_which in run["test"].items():
        for which, by_direction in by_which.items():
            for direction, metrics in by_direction.items():
                views = {"all": metrics}
                if first is not None and direction == "t2v" and "ranks" in metrics:
                    views["first_per_video"] = summarize_ranks(np.asarray(metrics["ranks"], dtype=np.float64)[first])
                rows += [{"seed": run["seed"], "checkpoint": which, "evaluation": e, "split": "test",
                          "direction": direction, "queries": view, "metric": metric, "value": value,
                          "n_queries": values.get("n_queries", np.nan), "chosen_epoch": run.get("chosen_epoch")}
                         for view, values in views.items()
                         for metric, value in values.items() if metric not in _NOT_METRICS]
    return rows


def _pair_rows(run: dict[str, Any], checkpoint: str) -> list[dict[str, Any]]:
    """Rows of one seed of a CIKM 2021 record: the val and test Spearman of the predicted pair scores."""
    n = len(run["test_scores"]) if "test_scores" in run else np.nan
    return [{"seed": run["seed"], "checkpoint": checkpoint, "evaluation": "plain", "split": split,
             "direction": "pairs", "queries": "all", "metric": "spearman", "value": run[split],
             "n_queries": n if split == "test" else np.nan, "chosen_epoch": None}
            for split in ("val", "test") if split in run]


def _test_set_columns(metrics: dict[str, Any]) -> dict[str, float]:
    """The frame's columns from ``metrics.test_set``: NaN for a field a record does not have (or holds None)."""
    test_set = metrics.get("test_set") or {}
    excluded = test_set.get("excluded_videos")
    columns = {key: test_set.get(key) for key in ("n_test_videos", "n_split_queries", "n_split_videos")}
    columns["n_excluded_videos"] = None if excluded is None else len(excluded)
    return {key: np.nan if value is None else value for key, value in columns.items()}


def _first_per_video(caption_video: Sequence[int]) -> np.ndarray:
    """Indices of the first caption of each video, in row order.

    Example:
        >>> _first_per_video([2, 2, 0, 1, 0]).tolist()
        [0, 2, 3]
    """
    return np.sort(np.unique(np.asarray(caption_video), return_index=True)[1])


def _query_view(record: dict[str, Any], where: str, direction: str, queries: str) -> np.ndarray | None:
    """The queries of view ``queries`` (:func:`query_ranks`): None for all of them, else their indices."""
    if queries not in QUERY_VIEWS:
        raise ValueError(f"{where}: unknown queries {queries!r}; use one of {QUERY_VIEWS}")
    if queries == "all":
        return None
    if direction != "t2v":
        raise ValueError(f"{where}: queries='first_per_video' is a t2v view; v2t queries are videos, ranked against "
                         "every caption of the split (one caption per video would change that gallery): use queries='all'")
    return _first_per_video(_caption_video(record, where))


def _test_set(record: dict[str, Any], where: str) -> dict[str, Any]:
    test_set = record["metrics"].get("test_set")
    if test_set is None:
        raise ValueError(f"{where} has no metrics.test_set (not a run_variant record, or written before it was "
                         "stored): re-run its notebook")
    return test_set


def _caption_video(record: dict[str, Any], where: str) -> list[int]:
    test_set = _test_set(record, where)
    if "caption_video" not in test_set:
        raise ValueError(f"{where} has no metrics.test_set.caption_video (each test query's video; written before it "
                         "was stored): re-run its notebook, or compare with queries='all' and no clusters")
    return test_set["caption_video"]


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
