"""Retrieval metrics R@1/5/10, median and mean rank, with an explicit policy for exact ties.

Convention: ``sim`` is (Q, T), rows are queries, columns are the items searched. For text-to-video
``sim`` is (N_text, N_video); video-to-text uses its transpose.

The rank rule (one rank per query, 1-based)::

    best   = max score over the query's correct targets        (VSE++ convention: best-ranked target counts)
    above  = #(non-target items with score >  best)
    tied   = #(non-target items with score == best)
    rank   = 1 + above + tied        ties="pessimistic" (default)
           = 1 + above               ties="optimistic"
           = 1 + above + tied / 2    ties="mean"  (the average of the two, as scipy's rankdata "average")

Targets never count against each other: several correct targets tied with the best one do not push it
down. The pessimistic default means a collapsed model (all scores equal) gets rank T for every query,
R@1 = 0, instead of looking perfect.

Why not the official CLIP4Clip arithmetic (``compute_metrics`` in ArrowLuo/CLIP4Clip ``metrics.py``;
the identical copy in CryhanFang/CLIP2Video ``evaluation/metrics.py``)::

    sx = np.sort(-x, axis=1); d = np.diag(-x)[:, None]; ind = np.where(sx - d == 0)[1]
    R1 = 100 * mean(ind == 0); MR = median(ind) + 1; MeanR = mean(ind) + 1

It locates the diagonal score by *equality* in the sorted row, so a row where the target is tied with
k other items yields k + 1 entries in ``ind`` (one at each tied position): the query is counted several
times and the denominator ``len(ind)`` exceeds the number of queries (CLIP4Clip#80). With all scores equal
it reports R@1 = 100/N. This is not hypothetical: the MSR-VTT 1k-A test CSV has 1000 captions but only
995 distinct sentences, so identical captions get identical rows and video-to-text has real ties.
On tie-free matrices both give the same numbers.

Cost: counting comparisons against the best target score is O(Q*T), no sorting. Queries are processed
in chunks of ``chunk_size`` rows, so the extra memory is a few (chunk_size, T) temporaries, never a copy
of the whole matrix: numpy arrays, their transposes and CPU torch tensors are read in place (other devices
are copied to the CPU one chunk at a time). The module does not import torch, so a process that scores a
saved numpy matrix stays small. ``benchmarks/bench_metrics.py`` measures time and memory at
MSR-VTT full-test scale (59,800 x 2,990).
"""
from __future__ import annotations

import sys

import numpy as np

TIE_POLICIES = ("pessimistic", "optimistic", "mean")


def _torch_tensor(x) -> bool:
    """True for a torch tensor, without importing torch (a numpy-only process stays small)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _check_sim(sim):
    """Return ``sim`` as a 2-D numpy array or torch tensor (no copy of existing arrays)."""
    if _torch_tensor(sim):
        sim = sim.detach()
    elif not isinstance(sim, np.ndarray):
        sim = np.asarray(sim)
    if sim.ndim != 2 or sim.shape[0] == 0 or sim.shape[1] == 0:
        raise ValueError(f"sim must be a non-empty 2-D (queries, items) matrix, got shape {tuple(sim.shape)}")
    real = not sim.is_complex() if _torch_tensor(sim) else sim.dtype.kind in "fiu"
    if not real:
        raise ValueError(f"sim must hold real scores, got dtype {sim.dtype}")
    return sim


def _as_index_array(values, what: str) -> np.ndarray:
    arr = values.detach().cpu().numpy() if _torch_tensor(values) else np.asarray(values)
    if arr.size and arr.dtype.kind not in "iu":
        raise ValueError(f"{what} must hold integer indices, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _target_lists(query_targets, n_queries: int, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalise ``query_targets`` to CSR form: (offsets (Q+1,), cols (nnz,)), each query's targets unique.

    Accepts None (diagonal), a 1-D int array (one target per query), a 2-D int array (Q, k) or a
    sequence of per-query index sequences.
    """
    if query_targets is None:
        if n_queries != n_items:
            raise ValueError(
                f"sim has shape ({n_queries}, {n_items}), not square, so there is no diagonal ground truth: "
                "pass query_targets (one target index, or a sequence of target indices, per query row)"
            )
        return np.arange(n_queries + 1), np.arange(n_queries)
    if isinstance(query_targets, np.ndarray) or _torch_tensor(query_targets) or all(
        np.ndim(t) == 0 for t in query_targets
    ):
        arr = _as_index_array(query_targets, "query_targets")
        if arr.ndim not in (1, 2):
            raise ValueError(f"query_targets array must be 1-D (Q,) or 2-D (Q, k), got shape {arr.shape}")
        lengths = np.full(len(arr), 1 if arr.ndim == 1 else arr.shape[1])
        flat = arr.ravel()
    else:
        per_query = [_as_index_array(t, f"query_targets[{i}]").ravel() for i, t in enumerate(query_targets)]
        lengths = np.array([len(t) for t in per_query], dtype=np.int64)
        flat = np.concatenate(per_query) if per_query else np.zeros(0, np.int64)
    if len(lengths) != n_queries:
        raise ValueError(f"query_targets has {len(lengths)} entries but sim has {n_queries} query rows")
    if (lengths == 0).any():
        empty = np.flatnonzero(lengths == 0)
        raise ValueError(f"{len(empty)} queries have no target (first: query {empty[0]}); every query needs one")
    bad = (flat < 0) | (flat >= n_items)
    if bad.any():
        raise ValueError(
            f"query_targets holds {bad.sum()} indices outside [0, {n_items}) (e.g. {flat[bad][0]}); "
            f"sim has {n_items} columns"
        )
    # Sort by (query, target) and drop repeated targets of a query: targets are a set.
    keys = np.unique(np.repeat(np.arange(n_queries), lengths) * n_items + flat)
    rows, cols = np.divmod(keys, n_items)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n_queries))])
    return offsets, cols


def _rows(sim, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) as a numpy array: a view for numpy and CPU tensors, a chunk copy otherwise."""
    block = sim[start:stop]
    if _torch_tensor(block):
        if block.dtype == sys.modules["torch"].bfloat16:
            block = block.float()  # numpy has no bfloat16
        block = block.cpu().numpy()
    return block


def query_ranks(sim, query_targets=None, ties: str = "pessimistic", chunk_size: int = 256) -> np.ndarray:
    """1-based rank of each query's best-ranked correct target, ties broken by ``ties``.

    See the module docstring for the rank rule. Returns a float64 array of shape (Q,)
    (integer-valued unless ``ties="mean"``). Arguments as in :func:`retrieval_metrics`.

    Example:
        >>> sim = np.array([[0.9, 0.1, 0.3],
        ...                 [0.2, 0.8, 0.8],
        ...                 [0.5, 0.4, 0.1]])
        >>> query_ranks(sim).tolist()                       # query 1: target tied with item 2
        [1.0, 2.0, 3.0]
        >>> query_ranks(sim, ties="optimistic").tolist()
        [1.0, 1.0, 3.0]
        >>> query_ranks(sim, query_targets=[[0], [1, 2], [2, 0]]).tolist()   # several targets each
        [1.0, 1.0, 1.0]
    """
    if ties not in TIE_POLICIES:
        raise ValueError(f"ties={ties!r} is not one of {TIE_POLICIES}")
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive number of query rows, got {chunk_size}")
    chunk_size = int(chunk_size)
    sim = _check_sim(sim)
    n_queries, n_items = sim.shape
    offsets, cols = _target_lists(query_targets, n_queries, n_items)

    ranks = np.empty(n_queries, dtype=np.float64)
    n_nan = 0
    for start in range(0, n_queries, chunk_size):
        stop = min(start + chunk_size, n_queries)
        block = _rows(sim, start, stop)  # (n, T) scores of queries start..stop-1
        if block.dtype.kind == "f" and np.isnan(block.max()):  # max propagates NaN: one cheap pass
            n_nan += int(np.count_nonzero(np.isnan(block)))
        lo, hi = offsets[start], offsets[stop]
        counts = np.diff(offsets[start : stop + 1])  # (n,) targets per query, all >= 1
        rows = np.repeat(np.arange(stop - start), counts)  # (nnz,) local query of each target
        target_scores = block[rows, cols[lo:hi]]  # (nnz,)
        seg = offsets[start:stop] - lo  # start of each query's segment in target_scores
        best = np.maximum.reduceat(target_scores, seg)  # (n,) best target score per query
        # Targets tied with the best one (at least the best itself) are not competitors.
        targets_at_best = np.add.reduceat(target_scores == best[rows], seg, dtype=np.int64)  # (n,)
        above = np.count_nonzero(block > best[:, None], axis=1)  # (n,) no target is above the best
        if ties == "optimistic":
            rank = 1 + above
        else:  # non-target items tied with the best target
            tied = np.count_nonzero(block >= best[:, None], axis=1) - above - targets_at_best
            rank = 1 + above + (tied if ties == "pessimistic" else tied / 2)
        ranks[start:stop] = rank
    if n_nan:
        raise ValueError(
            f"sim contains {n_nan} NaN scores (of {n_queries * n_items}); ranks are undefined. "
            "Fix the embeddings (a normalised zero vector gives NaN) or give masked scores -inf"
        )
    return ranks


def summarize_ranks(ranks) -> dict:
    """R@1/5/10 (percent of queries with rank <= K), median and mean rank, from 1-based ranks.

    Example:
        >>> summarize_ranks([1, 2, 7, 30])
        {'R1': 25.0, 'R5': 50.0, 'R10': 75.0, 'MdR': 4.5, 'MnR': 10.0, 'n_queries': 4}
    """
    ranks = np.asarray(ranks, dtype=np.float64)
    return {
        "R1": float(100.0 * np.mean(ranks <= 1)),
        "R5": float(100.0 * np.mean(ranks <= 5)),
        "R10": float(100.0 * np.mean(ranks <= 10)),
        "MdR": float(np.median(ranks)),
        "MnR": float(np.mean(ranks)),
        "n_queries": int(ranks.size),
    }


def retrieval_metrics(sim, query_targets=None, ties: str = "pessimistic", chunk_size: int = 256) -> dict:
    """Recall@1/5/10 (percent), median and mean rank (1-based) of a (Q, T) score matrix.

    Args:
        sim: (Q, T) torch tensor (any device) or numpy array; rows are queries, higher = better.
            NaN scores raise a ValueError.
        query_targets: ground truth. None: the diagonal (needs Q == T). A 1-D int array of length Q:
            one target column per query. A sequence of Q index sequences (or a (Q, k) int array):
            several correct targets per query, the best-ranked one counts (VSE++ convention; e.g.
            video-to-text on MSR-VTT full test, 20 captions per video).
        ties: how a target tied with non-target items is ranked: "pessimistic" (after all of them,
            default), "optimistic" (before them) or "mean" (the average of the two). Every query gets
            exactly one rank; R@K counts ranks <= K, so under "mean" a rank of 1.5 is not a hit at 1.
        chunk_size: query rows processed at once; extra memory is a few (chunk_size, T) temporaries.

    Returns:
        {"R1", "R5", "R10", "MdR", "MnR": float, "n_queries": int}

    Example:
        >>> sim = np.array([[0.9, 0.1, 0.3],
        ...                 [0.2, 0.8, 0.8],
        ...                 [0.5, 0.4, 0.1]])
        >>> m = retrieval_metrics(sim)                     # ranks 1, 2 (tie lost), 3
        >>> m["R1"], m["MdR"], m["MnR"], m["n_queries"]
        (33.33, 2.0, 2.0, 3)
        >>> retrieval_metrics(sim, ties="mean")["MnR"]      # ranks 1, 1.5, 3
        1.8333
        >>> retrieval_metrics(np.ones((4, 4)))["R1"]       # a collapsed model never looks perfect
        0.0
    """
    return summarize_ranks(query_ranks(sim, query_targets, ties=ties, chunk_size=chunk_size))


def _captions_per_video(cv: np.ndarray, n_text: int, n_video: int) -> list[np.ndarray]:
    """caption_video (N_text,) -> for each video the array of its caption indices."""
    if cv.shape != (n_text,):
        raise ValueError(f"caption_video must have shape ({n_text},) (one video index per text row), got {cv.shape}")
    if cv.min() < 0 or cv.max() >= n_video:
        raise ValueError(f"caption_video holds video indices outside [0, {n_video})")
    counts = np.bincount(cv, minlength=n_video)
    if (counts == 0).any():
        missing = np.flatnonzero(counts == 0)
        raise ValueError(
            f"{len(missing)} videos have no caption in caption_video (first: video {missing[0]}); "
            "drop those columns from sim or fix caption_video"
        )
    order = np.argsort(cv, kind="stable")
    return np.split(order, np.cumsum(counts)[:-1])


def both_directions(sim, caption_video=None, ties: str = "pessimistic", chunk_size: int = 256,
                    with_ranks: bool = False) -> dict:
    """Text-to-video and video-to-text metrics of a (N_text, N_video) text->video score matrix.

    ``caption_video[i]`` is the video of caption i (default: the diagonal, square ``sim``). t2v ranks each
    caption's video; v2t ranks, for each video, the best of all its captions in ``sim.T``.
    ``with_ranks=True`` adds each query's 1-based rank (``"ranks"``: a list of floats, one per query,
    in row order) to each direction, for paired statistics over queries (:mod:`vidret_lib.stats`).

    Example:
        >>> sim = np.array([[0.9, 0.1], [0.7, 0.2], [0.3, 0.6]])   # captions 0, 1 -> video 0
        >>> r = both_directions(sim, caption_video=[0, 0, 1])
        >>> r["t2v"]["R1"], r["v2t"]["R1"], r["v2t"]["n_queries"]
        (100.0, 100.0, 2)
    """
    sim = _check_sim(sim)
    n_text, n_video = sim.shape
    if caption_video is None:
        t2v_targets = v2t_targets = None
    else:
        t2v_targets = _as_index_array(caption_video, "caption_video")
        v2t_targets = _captions_per_video(t2v_targets, n_text, n_video)
    out = {}
    for direction, scores, targets in (("t2v", sim, t2v_targets), ("v2t", sim.T, v2t_targets)):
        ranks = query_ranks(scores, targets, ties=ties, chunk_size=chunk_size)
        out[direction] = summarize_ranks(ranks) | ({"ranks": ranks.tolist()} if with_ranks else {})
    return out


def flatten_metrics(by_direction: dict) -> dict:
    """{"t2v": {"R1": ..}, ..} -> {"t2v_R1": .., ..} for tables and results files.

    Example:
        >>> flatten_metrics({"t2v": {"R1": 50.0}, "v2t": {"R1": 25.0}})
        {'t2v_R1': 50.0, 'v2t_R1': 25.0}
    """
    return {f"{direction}_{k}": v for direction, metrics in by_direction.items() for k, v in metrics.items()}
