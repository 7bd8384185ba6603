"""Run a training variant over several seeds, evaluate it, and keep the result in a results file.

``run_variant`` is what a notebook calls for each row of its table: it trains
``config`` once per seed with :func:`vidret_lib.train.train`, evaluates the selected and the
last-epoch weights on the test split (optionally re-ranked), writes
``<results_dir>/<notebook>/<name>.json`` and returns that record. A record whose config,
seeds, data and library code match is loaded instead of retrained ("load if present"):
:func:`load_or_run` is that rule for any results record a notebook computes.
Numbers are reported as mean ± std over seeds (population std, ``ddof=0``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import inspect
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import distributed
from .cache import atomic_write
from .datasets import Split
from .heads import RetrievalModel
from .results import read_results, write_results
from .train import FeatureSplit, RawSplit, TrainConfig, check_disjoint, evaluate, train

LIBRARY_DIR = Path(__file__).resolve().parent


def library_hash() -> str:
    """Short hash of the library's source: results computed by other code are not reused."""
    h = hashlib.sha256()
    for src in sorted(LIBRARY_DIR.rglob("*.py")):
        h.update(src.name.encode())
        h.update(src.read_bytes())
    return h.hexdigest()[:16]


NOT_SUMMARIZED = ("n_queries", "ranks")  # a count and the per-query ranks (for vidret_lib.stats), not metrics


def summarize(values: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Mean and std over seeds of ``{"t2v": {"R1": ..}, "v2t": {..}}`` dicts, flattened.

    ``n_queries`` and the per-query ``ranks`` lists (``evaluate(..., with_ranks=True)``) are skipped.

    Example:
        >>> s = summarize([{"t2v": {"R1": 10.0, "ranks": [1.0, 3.0]}}, {"t2v": {"R1": 20.0, "ranks": [1.0, 1.0]}}])
        >>> s
        {'t2v_R1': {'mean': 15.0, 'std': 5.0, 'n': 2}}
    """
    keys = [(d, m) for d, ms in values[0].items() for m in ms if m not in NOT_SUMMARIZED]
    out = {}
    for d, m in keys:
        arr = np.array([v[d][m] for v in values], dtype=float)
        out[f"{d}_{m}"] = {"mean": float(arr.mean()), "std": float(arr.std()), "n": len(arr)}
    return out


def _jsonable(value: Any) -> Any:
    """``value`` as it reads back from a JSON file (tuples become lists), for comparisons."""
    return json.loads(json.dumps(value))


def _argument_id(value: Any) -> Any:
    """An evaluation argument as it enters a record's identity: a split (the QB-Norm ``prior``)
    by a hash of its tensors, anything else as it is."""
    if isinstance(value, FeatureSplit):
        h = hashlib.sha256()
        for t in (value.text, value.video, value.mask, value.caption_video):
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return f"FeatureSplit-{h.hexdigest()[:16]}"
    if isinstance(value, RawSplit):
        return "RawSplit-" + hashlib.sha256(json.dumps(list(value.sentences)).encode()).hexdigest()[:16]
    return value


def source_id(fn: Callable) -> str:
    """Short hash of a function's source and of the same-module functions it calls, recursively.

    An analysis function is part of what produced a record, so editing it, or a helper it calls
    that is defined beside it (a notebook function), invalidates the record. Library code is
    covered by :func:`library_hash`; a function without source is named by its qualified name.

    Example:
        >>> source_id(len) == source_id(len), len(source_id(source_id))
        (True, 16)
    """
    h, seen, todo = hashlib.sha256(), set(), [fn]
    while todo:
        f = todo.pop()
        if id(f) in seen:
            continue
        seen.add(id(f))
        try:
            h.update(inspect.getsource(f).encode())
        except (OSError, TypeError):
            h.update(getattr(f, "__qualname__", repr(f)).encode())
        code = getattr(f, "__code__", None)
        if code is None:
            continue
        nested = [c for c in code.co_consts if inspect.iscode(c)]  # comprehensions, inner functions
        names = set(code.co_names).union(*(c.co_names for c in nested))
        for name in sorted(names, reverse=True):
            g = f.__globals__.get(name)
            if inspect.isfunction(g) and g.__module__ == f.__module__:
                todo.append(g)
    return h.hexdigest()[:16]


def load_or_run(
    results_dir: str | Path,
    notebook: str,
    name: str,
    config: Any,
    identity: dict[str, Any],
    compute: Callable[[], dict[str, Any]],
    seed: Any,
    device: str = "cpu",
    protocol: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The results record ``<results_dir>/<notebook>/<name>.json``: loaded if this checkout wrote
    it from the same ``config`` and ``identity`` (plus the library hash), else ``compute()``-d and written.

    ``config`` (dict or dataclass) and ``identity`` (seeds, data key, ...) say what produced the
    metrics; both are stored in the record (identity under ``protocol["identity"]``).
    "This checkout wrote it": the record's checksum is in :func:`ledger_path`, a git-ignored
    file beside it. Records that arrive with ``git clone`` have none, so a fresh clone computes
    every number again (and ``git diff results/`` shows how they compare with the committed ones).

    Under torchrun (a notebook kernel of ``torchrun ... -m vidret_lib.reproduce``) every process
    takes rank 0's decision (:func:`vidret_lib.distributed.from_main_process`): ranks whose configs
    differ (``device`` ``cuda:0`` / ``cuda:1``) or that see the folder at different moments would
    otherwise decide apart, and one that trains alone waits forever in training's collectives.
    Every process computes, only rank 0 writes the record and its ledger, and every process returns
    rank 0's record once it is on disk (a barrier), so later cells take the same branches everywhere.
    """
    path = Path(results_dir) / notebook / f"{name}.json"
    ledger = ledger_path(path)
    config = _jsonable(dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config)
    identity = _jsonable({**identity, "library": library_hash()})
    distributed.init_from_env(device)  # torchrun: the kernel joins its group here if no training did yet
    if distributed.from_main_process(_reusable(path, ledger, config, identity)):
        if distributed.is_main_process():
            os.utime(path)  # reused by this run: `reproduce` removes the records a run neither wrote nor reused
        return read_results(path)
    # every rank computes; rank 0 writes, and every rank waits for its record (write_results)
    write_results(path, name, compute(), config, seed=seed, device=device,
                  protocol={**(protocol or {}), "identity": identity})
    if distributed.is_main_process():
        digest = _sha256(path)
        atomic_write(ledger, lambda tmp: tmp.write_text(digest))
    return read_results(path)


def _reusable(path: Path, ledger: Path, config: Any, identity: dict[str, Any]) -> bool:
    """Whether record ``path`` was written by this checkout (:func:`ledger_path`) from ``config`` and ``identity``."""
    if not (path.exists() and ledger.exists() and ledger.read_text() == _sha256(path)):
        return False
    old = read_results(path)
    return old["config"] == config and old["protocol"].get("identity") == identity


def ledger_path(record: str | Path) -> Path:
    """Where the checksum of a results record written by this checkout is kept (git-ignored).

    Example:
        >>> ledger_path("results/01_clip4clip/meanP.json").as_posix()
        'results/01_clip4clip/.local/meanP.json.sha256'
    """
    record = Path(record)
    return record.parent / ".local" / f"{record.name}.sha256"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


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
    analyses: dict[str, Callable[[RetrievalModel], dict]] | None = None,
    full_test_split: Split | None = None,
) -> dict[str, Any]:
    """Train ``config`` for each seed, evaluate, write and return the results record.

    ``evals`` names the evaluations of each trained model, each a dict of
    :func:`vidret_lib.train.evaluate` keyword arguments (default ``{"plain": {}}``), e.g.
    ``{"plain": {}, "dsl": {"rerank": "dsl"}, "qb_norm": {"rerank": "qb_norm", "prior": train_split}}``.
    ``analyses`` (optional) names functions ``fn(model) -> dict`` (JSON-able) run on the selected
    and the last weights of every seed, so that a notebook looks inside its trained models without
    training them again; their source is part of the reuse check.
    ``data_key`` names the features (dataset + splits + encoder), part of the reuse check;
    so are the evaluations' arguments (a ``prior`` split by a hash of its tensors). Each seed's
    run is kept as it finishes (``.local/runs/`` beside the record, git-ignored), so a killed
    run resumes at the seed it stopped in and a longer seed list trains only the new seeds.
    ``encoder`` (optional) is passed to :func:`~vidret_lib.train.train`, so that seqTransf starts
    from the encoder's CLIP text layers when they fit (CLIP4Clip's init; random otherwise).
    The record's ``metrics`` hold ``runs`` (per seed: chosen epoch, loss history, test
    metrics of the selected and the last weights per evaluation -- with each query's rank,
    ``test[eval][which]["t2v"]["ranks"]``, one per caption (t2v) or video (v2t) in the split's order,
    for :mod:`vidret_lib.stats` -- and ``analyses[name]["selected" | "last"]``), ``summary``
    (``summary[eval][which]["t2v_R1"] = {"mean", "std", "n"}``, without the ranks) and ``test_set``
    (:func:`describe_test_set`: the queries and videos scored, each t2v query's video, and the split's full size).
    ``vidret_lib.tables`` reads records as a table.
    ``full_test_split`` (optional): the test split as the dataset defines it (``dataset.split(name)``,
    without ``present_only``), so that a record scored on the present or decodable part says how much of
    the split that was; without it the split's size is the scored part plus ``test_split.excluded``
    (videos that are missing from disk are then not counted).
    Raises ValueError (:func:`vidret_lib.train.check_disjoint`) if the train and test splits share
    videos, unless ``config.allow_split_overlap``; and (:func:`describe_test_set`) if ``full_test_split`` lacks a
    scored video.
    """
    evals = evals or {"plain": {}}
    analyses = analyses or {}
    check_disjoint(train_split, test_split, ("train", "test"), config.allow_split_overlap)
    scored = describe_test_set(test_split, full_test_split)
    seed_identity = {"data_key": data_key,
                     "evals": {e: {k: _argument_id(v) for k, v in sorted(kw.items())} for e, kw in sorted(evals.items())},
                     "init_encoder": None if encoder is None else encoder.cache_id,
                     "analyses": {a: source_id(fn) for a, fn in sorted(analyses.items())}}

    def one_seed(seed: int) -> dict[str, Any]:
        result = train(dataclasses.replace(config, seed=seed), train_split, val_split, encoder=encoder)

        def scored(model) -> tuple[dict, dict]:  # test metrics per evaluation, and the analyses, of one checkpoint
            return ({e: evaluate(model, test_split, with_ranks=True, **kw) for e, kw in evals.items()},
                    {a: fn(model) for a, fn in analyses.items()})

        selected = scored(result.model)
        # the last epoch's weights are the selected ones when the last epoch was chosen: scored once
        last = selected if result.chosen_epoch == result.config.epochs else scored(result.model_at("last"))
        by_which = {"selected": selected, "last": last}
        test = {e: {which: s[0][e] for which, s in by_which.items()} for e in evals}
        history = [{"epoch": h["epoch"], "loss": h["loss"], "val": h["val"]} for h in result.history]
        run = {"seed": seed, "chosen_epoch": result.chosen_epoch, "history": history, "test": test}
        if analyses:
            run["analyses"] = {a: {which: s[1][a] for which, s in by_which.items()} for a in analyses}
        return run

    def compute() -> dict[str, Any]:
        # each seed is its own record in the git-ignored .local/runs/ (this checkout's scratch): a run
        # killed at seed k keeps seeds before k, and adding a seed to the list trains only that seed
        scratch = Path(results_dir) / notebook / ".local"
        runs = [load_or_run(scratch, "runs", f"{name}.seed{seed}", config, {**seed_identity, "seed": seed},
                            lambda: one_seed(seed), seed=seed, device=config.device)["metrics"]
                for seed in seeds]
        summary = {
            e: {which: summarize([r["test"][e][which] for r in runs]) for which in ("selected", "last")}
            for e in evals
        }
        return {"runs": runs, "summary": summary, "test_set": scored}

    # the split's size is part of what a record says, so a record written without it is not reused
    identity = {"seeds": list(seeds), **seed_identity,
                "split_size": [scored["n_split_queries"], scored["n_split_videos"]]}
    protocol = {"select": config.select, "false_negatives": config.false_negatives, **(protocol or {})}
    return load_or_run(results_dir, notebook, name, config, identity, compute, seed=list(seeds),
                       device=config.device, protocol=protocol)


def describe_test_set(test_split: FeatureSplit | RawSplit, full_test_split: Split | None = None) -> dict[str, Any]:
    """What a record's test numbers were scored on (``metrics.test_set`` of a :func:`run_variant` record).

    Returns:
        ``n_test_queries``, ``n_test_videos``: captions and videos scored; ``caption_video``: (Q,) list of
        int, t2v query i's video (its column in the split), the clusters of
        :func:`vidret_lib.stats.bootstrap_difference`; ``excluded_videos``: id -> reason, the videos
        the split dropped (e.g. undecodable); ``n_split_queries``, ``n_split_videos``: the split's full
        size, from ``full_test_split`` when given, else the scored part plus the excluded videos
        (``n_split_queries`` None when videos were excluded: their captions are not counted anywhere).
    Raises:
        ValueError: ``full_test_split`` lacks videos that were scored (another split was passed).

    Example:
        >>> from vidret_lib.datasets import Split
        >>> te = FeatureSplit(np.zeros((2, 4)), np.zeros((2, 1, 4)), np.ones((2, 1), bool), [0, 1], video_ids=("a", "c"))
        >>> full = Split("test", ["x", "y", "z", "w"], ["a", "b", "c", "d"])
        >>> {k: v for k, v in describe_test_set(te, full).items() if k.startswith("n_")}
        {'n_test_queries': 2, 'n_test_videos': 2, 'n_split_queries': 4, 'n_split_videos': 4}
    """
    excluded = dict(test_split.excluded)
    if full_test_split is not None:
        unknown = sorted(set(test_split.video_ids or ()) - set(full_test_split.video_ids))
        if unknown:
            raise ValueError(f"full_test_split {full_test_split.name!r} lacks {len(unknown)} scored test videos "
                             f"(e.g. {unknown[:3]}): pass the split the test features were built from")
        split_size = (len(full_test_split.sentences), len(full_test_split.video_ids))
    else:
        split_size = (None if excluded else test_split.num_texts, test_split.num_videos + len(excluded))
    return {"n_test_queries": test_split.num_texts, "n_test_videos": test_split.num_videos,
            "caption_video": test_split.caption_video.tolist(), "excluded_videos": excluded,
            "n_split_queries": split_size[0], "n_split_videos": split_size[1]}


def scored_counts(test_set: dict[str, Any]) -> tuple[str, str, str]:
    """(queries, videos, note) describing ``metrics.test_set``, for :func:`table` and
    :func:`vidret_lib.tables.scored_on`.

    A complete split: ``("2,000", "1,000", "")``. An incomplete one (fewer videos scored than the split
    has): ``("8 of 1,000", "8 of 1,000", " (992 excluded: incomplete split)")``. Records written before
    the split's size was stored: ``("24", "12", " (1 excluded)")`` when the split dropped videos.

    Example:
        >>> scored_counts({"n_test_queries": 8, "n_test_videos": 8, "excluded_videos": {},
        ...                "n_split_queries": 1000, "n_split_videos": 1000})
        ('8 of 1,000', '8 of 1,000', ' (992 excluded: incomplete split)')
    """
    q, v = test_set["n_test_queries"], test_set["n_test_videos"]
    if "n_split_videos" not in test_set:  # written before the split's size was stored: no flag
        excluded = len(test_set["excluded_videos"])
        return f"{q:,}", f"{v:,}", f" ({excluded:,} excluded)" if excluded else ""
    split_q, split_v = test_set["n_split_queries"], test_set["n_split_videos"]
    queries = f"{q:,} of {split_q:,}" if split_q is not None and split_q != q else f"{q:,}"
    if split_v == v:
        return queries, f"{v:,}", ""
    return queries, f"{v:,} of {split_v:,}", f" ({split_v - v:,} excluded: incomplete split)"


def fmt(stat: dict[str, float]) -> str:
    """``"12.3 ± 0.4"`` from a summary entry.

    Example:
        >>> fmt({"mean": 12.345, "std": 0.41, "n": 3})
        '12.3 ± 0.4'
    """
    return f"{stat['mean']:.1f} ± {stat['std']:.1f}"


def table(records: list[dict[str, Any]], metrics=("t2v_R1", "t2v_R5", "v2t_R1"), evaluation: str = "plain",
          which: str = "selected") -> str:
    """A Markdown table of ``records`` (rows) by ``metrics`` (mean ± std over seeds), with the test
    queries and videos each was scored on, flagging an incomplete split (:func:`scored_counts`).

    Raises ValueError for a record without ``metrics.test_set`` (written before the counts were
    recorded): re-run its notebook.

    Example:
        >>> rec = {"name": "meanP", "metrics": {"summary": {"plain": {"selected": {"t2v_R1": {"mean": 12.0, "std": 1.0, "n": 3}}}},
        ...        "test_set": {"n_test_queries": 8, "n_test_videos": 8, "excluded_videos": {},
        ...                     "n_split_queries": 1000, "n_split_videos": 1000}}}
        >>> print(table([rec], ["t2v_R1"]))
        | variant | t2v_R1 | queries | videos |
        |---|---|---|---|
        | meanP | 12.0 ± 1.0 | 8 of 1,000 | 8 of 1,000 (992 excluded: incomplete split) |
    """
    head = "| variant | " + " | ".join(metrics) + " | queries | videos |\n|---|" + "---|" * (len(metrics) + 2)
    rows = []
    for r in records:
        if "test_set" not in r["metrics"]:
            raise ValueError(f"record {r['name']!r} has no metrics.test_set (query and video counts): it was written "
                             "before they were recorded; re-run its notebook")
        queries, videos, note = scored_counts(r["metrics"]["test_set"])
        cells = [fmt(r["metrics"]["summary"][evaluation][which][m]) for m in metrics]
        rows.append(f"| {r['name']} | " + " | ".join(cells) + f" | {queries} | {videos}{note} |")
    return "\n".join([head, *rows])
