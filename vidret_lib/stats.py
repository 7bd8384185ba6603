"""Paired bootstrap confidence intervals and verdicts for "variant b beats variant a".

Why: three training seeds resample the *training*, not the 200 test queries, so "the difference is
larger than the seed spread" says nothing about how much the numbers would move on other queries.
Here every comparison is a paired bootstrap over test queries (one level), or over seeds and then
queries (two levels) when the variants were trained with several seeds.

The resample (``n_resamples`` draws from ``numpy.random.default_rng(rng_seed)``, so a CI is the same
on every run):

* **one level** -- inputs ``(Q,)``: draw Q query indices with replacement, the same indices for both
  variants (paired), and take ``statistic(b) - statistic(a)`` on them;
* **two levels** -- inputs ``(S, Q)`` or ``{seed: (Q,)}``: draw S seeds with replacement, then Q query
  indices shared by every seed and both variants, and average the per-seed statistic over the drawn
  seeds. Seeds and queries are crossed (every seed scores the same queries), so each factor is resampled
  once per draw, as in Owen's "pigeonhole" bootstrap for crossed designs (Owen 2007, Ann. Appl. Stat.
  1(1):246-260). When both variants have the same seeds the seed draw is shared (paired by seed);
  otherwise each variant's seeds are drawn independently. With three seeds the seed level is coarse
  (3 seeds give 10 distinct draws) and, like every bootstrap of S values, narrows the seed variance by
  (S - 1) / S: read a two-level CI as slightly optimistic about the seeds;
* **videos (clusters)** -- ``clusters=``, a (Q,) int array naming each query's video
  (:func:`vidret_lib.tables.query_clusters`): the query draw becomes a draw of the C videos with
  replacement, each drawn video bringing all its queries (the cluster bootstrap: Davison & Hinkley 1997,
  *Bootstrap Methods and their Application*, sec. 3.8; Field & Welsh 2007, J. R. Stat. Soc. B
  69(3):369-390), in both the one- and the two-level resample. A resample's mean is over the queries it
  holds (their number varies when videos have different numbers of captions). The captions of one video
  are scored against the same video, so their hits are correlated; drawing them one by one treats them as
  independent and narrows the CI by about sqrt(design effect) (:func:`design_effect`). With one query per
  video (clusters ``0..Q-1``) the cluster draw is the query draw, number for number.

The 95% interval is the **percentile** interval (Efron & Tibshirani 1993, ch. 13): the 2.5% and 97.5%
quantiles (``numpy.quantile``, linear) of the resampled differences. Not BCa, because BCa's
acceleration is a jackknife over one i.i.d. sample and has no standard form for the crossed two-level
resample, and because the statistics here are means of bounded per-query values (or correlations) over
hundreds of queries, whose bootstrap distributions are close to symmetric: one-level BCa
(``scipy.stats.bootstrap(method="BCa")``) and percentile intervals agree to one step of the R@1 grid
on such data (measured: 200 queries, R@1 +10 with 14% discordant queries: percentile [+5.0, +15.0],
BCa [+5.5, +15.5]; mean rank: identical to 3 decimals). The one-level interval equals ``scipy.stats.bootstrap(..., paired=True,
method="percentile")`` on the same data (tests/test_stats.py checks it).

Cost: resamples are drawn as count vectors ((R, Q) draws, a bincount) and a mean is a matrix product,
so 10,000 resamples x 1,000 queries x 3 seeds x 2 variants take 0.85 s on a loaded 2-core machine;
Spearman uses the same counts (ranks of a resample from cumulative counts, no sorting per resample):
10,000 resamples x 2,136 pairs x 3 seeds x 2 models, 7.6 s there (1,000 resamples for a quick look).
A cluster draw costs no more: 10,000 resamples of 2,000 queries in 1,000 videos x 3 seeds x 2 variants,
1.1 s with ``clusters`` and 1.6 s without, on the same loaded machine.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Callable, Iterable, Mapping, Union

import numpy as np
import pandas as pd

N_RESAMPLES = 10_000
RNG_SEED = 0
LEVEL = 0.95
HOLDS, REVERSED, NO_EFFECT, INCONCLUSIVE = "holds", "reversed", "no effect of the paper's size", "inconclusive"
_CHUNK_ELEMENTS = 1 << 22  # resamples per chunk x items: bounds the memory of one chunk (~32 MB of float64)

SeedValues = Union[np.ndarray, Mapping[int, np.ndarray]]


@dataclass(frozen=True)
class Interval:
    """A bootstrap confidence interval for ``statistic(b) - statistic(a)``.

    ``estimate`` is the difference on the data as observed (for a mean over seeds and queries, the
    difference of the records' summary means); ``low``/``high`` the percentile interval at ``level``;
    ``n_items`` the queries (or pairs) resampled; ``n_seeds`` the seeds of (a, b) (1 for a one-level
    resample); ``paired_seeds`` whether the seed draw was shared; ``distribution`` the ``n_resamples``
    resampled differences (float64), for a histogram; ``n_clusters`` the videos drawn by a cluster
    bootstrap (None: queries were drawn one by one).
    """

    estimate: float
    low: float
    high: float
    level: float
    n_items: int
    n_seeds: tuple[int, int]
    paired_seeds: bool
    n_resamples: int
    rng_seed: int
    distribution: np.ndarray = field(repr=False, compare=False)
    n_clusters: int | None = None

    @property
    def half_width(self) -> float:
        """Half the interval's width, in the statistic's units."""
        return (self.high - self.low) / 2

    def __str__(self) -> str:
        items = f"{self.n_items} items" + (f" in {self.n_clusters} clusters" if self.n_clusters is not None else "")
        return (f"{self.estimate:+.4g} [{self.low:+.4g}, {self.high:+.4g}] ({100 * self.level:g}% paired bootstrap CI, "
                f"{items} x {self.n_seeds[0]}/{self.n_seeds[1]} seeds)")


@dataclass(frozen=True)
class Verdict:
    """The outcome of :func:`verdict`: one of ``HOLDS``, ``REVERSED``, ``NO_EFFECT``, ``INCONCLUSIVE``.

    ``needed_half_width``: the half-width below which an interval centred on the same estimate decides
    (excludes 0, or lies inside +-``delta``): ``max(|estimate|, delta - |estimate|)``. ``narrower_by``:
    how many times narrower the interval must be (about that factor squared in queries).
    """

    outcome: str
    interval: Interval
    delta: float
    higher_is_better: bool
    needed_half_width: float

    @property
    def gain(self) -> tuple[float, float]:
        """The interval oriented so that positive means b is better: (low, high)."""
        return _gain(self.interval, self.higher_is_better)

    @property
    def narrower_by(self) -> float:
        """``interval.half_width / needed_half_width`` (inf when nothing decides, e.g. estimate 0 and delta 0)."""
        return self.interval.half_width / self.needed_half_width if self.needed_half_width > 0 else float("inf")

    def __str__(self) -> str:
        ci = self.interval
        better = "higher" if self.higher_is_better else "lower"
        head = f"{self.outcome}: b - a = {ci}"
        if self.outcome == HOLDS:
            size = f", but by less than the paper's {self.delta:g}" if self.gain[1] < self.delta else ""
            return f"{head}; b is {better}{size}"
        if self.outcome == REVERSED:
            return f"{head}; b is worse, against the claim"
        if self.outcome == NO_EFFECT:
            return f"{head}; inside +-{self.delta:g}, the paper's gain"
        return (f"{head}; neither excludes 0 nor lies inside +-{self.delta:g}: deciding needs a half-width below "
                f"{self.needed_half_width:.4g} (now {ci.half_width:.4g}, {self.narrower_by:.2g}x too wide, "
                f"~{self.narrower_by ** 2:.2g}x the queries)")


def per_query(ranks, metric: str) -> np.ndarray:
    """Per-query values of ``metric`` from 1-based ranks: their mean is the summary metric.

    Args:
        ranks: array-like of 1-based ranks (any shape, e.g. (Q,) or (S, Q)), as stored by
            :func:`vidret_lib.metrics.both_directions` (``with_ranks=True``); ties="mean" ranks may be x.5.
        metric: ``"R<K>"`` (e.g. ``"R1"``): 100 for a hit at K, else 0 (percent, like the records' R@K);
            ``"rank"``: the rank itself (mean = MnR, lower is better); ``"RR"``: 1 / rank (mean = MRR).
    Returns:
        float64 array of ``ranks``' shape.
    Raises:
        ValueError: unknown ``metric``; a rank below 1 or not finite.

    Example:
        >>> per_query([1, 3, 12], "R5").tolist(), per_query([1, 4], "RR").tolist()
        ([100.0, 100.0, 0.0], [1.0, 0.25])
    """
    ranks = np.asarray(ranks, dtype=np.float64)
    if not np.all(np.isfinite(ranks)) or np.any(ranks < 1):
        raise ValueError("ranks must be finite and >= 1 (1-based ranks from vidret_lib.metrics); "
                         f"got min {np.nanmin(ranks) if ranks.size else 'n/a'}, {np.sum(~np.isfinite(ranks))} non-finite")
    hit_at = re.fullmatch(r"R(\d+)", metric)
    if hit_at:
        return 100.0 * (ranks <= int(hit_at.group(1)))
    if metric == "rank":
        return ranks
    if metric == "RR":
        return 1.0 / ranks
    raise ValueError(f"unknown per-query metric {metric!r}: use 'R<K>' (e.g. 'R1'), 'rank' or 'RR'")


def higher_is_better(metric: str) -> bool:
    """Orientation of a :func:`per_query` metric: False for ``"rank"``, True for ``"R<K>"`` and ``"RR"``.

    Example:
        >>> higher_is_better("R1"), higher_is_better("rank")
        (True, False)
    """
    per_query([1.0], metric)  # validates the name
    return metric != "rank"


def bootstrap_difference(a: SeedValues, b: SeedValues, *, clusters=None, n_resamples: int = N_RESAMPLES,
                         rng_seed: int = RNG_SEED, level: float = LEVEL) -> Interval:
    """Paired bootstrap CI of ``mean(b) - mean(a)`` of per-query values (see the module docstring).

    Args:
        a, b: per-query values of two variants on the same queries in the same order (e.g.
            :func:`per_query`), any real dtype (computed in float64). ``(Q,)``: one level (queries).
            ``(S, Q)``: two levels, row i of ``a`` and of ``b`` the same seed. ``{seed: (Q,)}`` (as
            :func:`vidret_lib.tables.query_ranks` gives): two levels, paired by seed when both have the same
            seeds, else each variant's seeds resampled on their own. The mean is over seeds of the
            per-seed mean over queries (the records' summary mean).
        clusters: optional (Q,) integer array, query i's video (any labels; clusters are numbered in
            the sorted order of their labels): resample videos, each with all its queries (the cluster
            bootstrap of the module docstring). None: resample queries.
        n_resamples, rng_seed, level: number of resamples, seed of the generator, CI level.
    Returns:
        :class:`Interval`.
    Raises:
        ValueError: different numbers of queries; NaN or inf; fewer than 2 queries; (S, Q) arrays with
            different S; a 1-D and a 2-D input; unpaired seeds with fewer than 2 seeds on a side;
            ``clusters`` not (Q,) integers, or naming fewer than 2 videos.

    Example:
        >>> ci = bootstrap_difference(np.zeros(50), np.full(50, 2.5))   # b is 2.5 better on every query
        >>> ci.estimate, ci.low, ci.high
        (2.5, 2.5, 2.5)
        >>> hits_a, hits_b = np.zeros(6), np.array([100.0, 100, 0, 0, 100, 100])  # 3 videos, 2 captions each
        >>> bootstrap_difference(hits_a, hits_b, clusters=[0, 0, 1, 1, 2, 2], n_resamples=2000).n_clusters
        3
    """
    return _bootstrap(_mean_statistic, a, b, None, n_resamples, rng_seed, level, clusters)


def compare_ranks(ranks_a: SeedValues, ranks_b: SeedValues, metric: str = "R1", **kwargs) -> Interval:
    """:func:`bootstrap_difference` of ``per_query(ranks, metric)``: e.g. the CI of the R@1 gain of b over a.

    ``ranks_a``/``ranks_b``: 1-based ranks, (Q,), (S, Q) or ``{seed: (Q,)}``; ``kwargs`` go to
    :func:`bootstrap_difference` (``clusters=`` for a video-level resample, e.g.
    ``clusters=tables.query_clusters(record)``). For ``metric="rank"`` lower is better: pass
    ``higher_is_better=False`` (:func:`higher_is_better`) to :func:`verdict`.

    Example:
        >>> a, b = {0: [1, 2, 1, 5], 1: [2, 2, 1, 1]}, {0: [1, 1, 1, 5], 1: [1, 2, 1, 1]}
        >>> compare_ranks(a, b, "R1").estimate   # R@1 50% -> 75% at both seeds
        25.0
    """
    return bootstrap_difference(_map_values(ranks_a, lambda r: per_query(r, metric)),
                                _map_values(ranks_b, lambda r: per_query(r, metric)), **kwargs)


def spearman_difference(scores_a: SeedValues, scores_b: SeedValues, labels, *, n_resamples: int = N_RESAMPLES,
                        rng_seed: int = RNG_SEED, level: float = LEVEL) -> Interval:
    """Paired bootstrap CI of ``Spearman(scores_b, labels) - Spearman(scores_a, labels)``, resampling pairs.

    The CIKM 2021 comparison (notebook 06): two models' predicted similarities of the same test pairs
    against the same graded labels. Spearman is Pearson's correlation of average ranks (ties share
    their mean rank, as ``scipy.stats.spearmanr``); a resample ranks its pairs with their multiplicities.
    Pairs are drawn one by one (no ``clusters``: a resample's ranks assume it holds P pairs).

    Args:
        scores_a, scores_b: predicted scores of the pairs, (P,), (S, P) or ``{seed: (P,)}`` as in
            :func:`bootstrap_difference` (the statistic of several seeds is their mean Spearman).
        labels: (P,) graded labels of the pairs, any real dtype.
    Returns:
        :class:`Interval`.
    Raises:
        ValueError: as :func:`bootstrap_difference`; labels of another length; constant labels or scores
            (Spearman undefined), also when a resample draws only tied pairs (too few pairs).

    Example:
        >>> y = np.arange(20.0)
        >>> ci = spearman_difference(-y, y, y, n_resamples=200)   # -1 -> +1 on every resample
        >>> ci.estimate, ci.low, ci.high
        (2.0, 2.0, 2.0)
    """
    labels = _finite(labels, "labels")
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D (P,); got shape {labels.shape}")
    return _bootstrap(_spearman_statistic(labels), scores_a, scores_b, len(labels), n_resamples, rng_seed, level)


def verdict(interval: Interval, delta: float, *, higher_is_better: bool) -> Verdict:
    """Decide a paper's claim "b improves on a by about ``delta``" from a CI of ``b - a``.

    Outcomes, on the difference oriented so that positive means b is better (``higher_is_better``;
    False for ranks, where b - a < 0 is an improvement): ``HOLDS`` the oriented CI lies above 0;
    ``REVERSED`` below 0; ``NO_EFFECT`` ("no effect of the paper's size") it contains 0 and lies inside
    (-delta, +delta); ``INCONCLUSIVE`` otherwise, with the half-width that would have decided
    (:class:`Verdict`). Bounds are strict: a CI touching 0 does not exclude it.

    Args:
        interval: from :func:`bootstrap_difference`, :func:`compare_ranks` or :func:`spearman_difference`.
        delta: the paper's reported gain, >= 0, in the interval's units (R@1 points for ``"R1"``).
        higher_is_better: keyword-only, deliberately without a default.
    Raises:
        ValueError: ``delta`` negative or not finite.

    Example:
        >>> ci = bootstrap_difference(np.zeros(40), np.r_[np.full(20, 100.0), np.zeros(20)], n_resamples=1000)
        >>> verdict(ci, 5.0, higher_is_better=True).outcome, verdict(ci, 5.0, higher_is_better=False).outcome
        ('holds', 'reversed')
    """
    if not np.isfinite(delta) or delta < 0:
        raise ValueError(f"delta (the paper's gain) must be finite and >= 0; got {delta}")
    low, high = _gain(interval, higher_is_better)
    if low > 0:
        outcome = HOLDS
    elif high < 0:
        outcome = REVERSED
    elif -delta < low and high < delta:
        outcome = NO_EFFECT
    else:
        outcome = INCONCLUSIVE
    e = abs(interval.estimate)
    return Verdict(outcome, interval, float(delta), higher_is_better, max(e, delta - e))


VERDICT_COLUMNS = ("claim", "comparison", "metric", "estimate", "95% CI", "paper's effect", "verdict", "scored")


def verdict_table(rows: Iterable[Mapping]) -> pd.DataFrame:
    """One row per decided claim: the table every notebook ends with, and what notebook 07 gathers.

    Args:
        rows: mappings with ``"claim"`` (the paper's claim, str), ``"comparison"`` ("a -> b", str),
            ``"metric"`` (name and units, e.g. ``"t2v R@1 (points)"``), ``"verdict"`` (a :class:`Verdict`)
            and optionally ``"scored"`` (what was scored, e.g. ``"200 test queries, 200 videos"``).
    Returns:
        DataFrame with the columns :data:`VERDICT_COLUMNS` -- ``estimate`` (float64) and the ``"95% CI"``
        (str) oriented so that positive means b is better (:attr:`Verdict.gain`; a rank difference is
        negated), ``"paper's effect"`` the verdict's ``delta`` (float64), ``verdict`` its outcome -- then
        ``ci_low``, ``ci_high`` (float64, the oriented CI, for plots), ``n_items`` (queries or pairs
        resampled), ``n_clusters`` (videos drawn by a cluster bootstrap; None when queries were drawn one
        by one) and ``seeds`` (``"3/3"``: seeds of a/b).
    Raises:
        ValueError: a row without one of the required keys (names it), a ``verdict`` that is not a
            :class:`Verdict`, or an interval whose level is not 0.95 (the column says 95%).

    Example:
        >>> ci = bootstrap_difference(np.zeros(40), np.r_[np.full(20, 100.0), np.zeros(20)], n_resamples=1000)
        >>> t = verdict_table([{"claim": "b beats a", "comparison": "a -> b", "metric": "R@1 (points)",
        ...                     "verdict": verdict(ci, 5.0, higher_is_better=True)}])
        >>> t[["estimate", "paper's effect", "verdict"]].to_dict("records")
        [{'estimate': 50.0, "paper's effect": 5.0, 'verdict': 'holds'}]
    """
    out = []
    for i, row in enumerate(rows):
        missing = [k for k in ("claim", "comparison", "metric", "verdict") if k not in row]
        if missing:
            raise ValueError(f"verdict_table row {i} ({row.get('claim', '?')!r}) lacks {missing}")
        v = row["verdict"]
        if not isinstance(v, Verdict):
            raise ValueError(f"verdict_table row {i} ({row['claim']!r}): 'verdict' must be a stats.Verdict "
                             f"(from stats.verdict); got {type(v).__name__}")
        if v.interval.level != 0.95:
            raise ValueError(f"verdict_table row {i} ({row['claim']!r}) has a {v.interval.level:g} interval; "
                             "the table shows 95% CIs: bootstrap with level=0.95")
        low, high = v.gain
        estimate = v.interval.estimate if v.higher_is_better else -v.interval.estimate
        out.append({"claim": row["claim"], "comparison": row["comparison"], "metric": row["metric"],
                    "estimate": estimate, "95% CI": f"[{low:+.3g}, {high:+.3g}]", "paper's effect": v.delta,
                    "verdict": v.outcome, "scored": row.get("scored", ""), "ci_low": low, "ci_high": high,
                    "n_items": v.interval.n_items, "n_clusters": v.interval.n_clusters,
                    "seeds": "/".join(map(str, v.interval.n_seeds))})
    columns = [*VERDICT_COLUMNS, "ci_low", "ci_high", "n_items", "n_clusters", "seeds"]
    frame = pd.DataFrame(out, columns=columns).astype({"estimate": "float64", "paper's effect": "float64",
                                                        "ci_low": "float64", "ci_high": "float64"})
    frame["n_clusters"] = pd.Series([row["n_clusters"] for row in out], index=frame.index, dtype=object)  # None, not NaN
    return frame


def _gain(interval: Interval, higher_is_better: bool) -> tuple[float, float]:
    """The CI of b - a as (low, high) of b's gain: negated and swapped when lower is better."""
    return (interval.low, interval.high) if higher_is_better else (-interval.high, -interval.low)


def discordance(ranks_a, ranks_b, k: int = 1) -> float:
    """Fraction of queries that exactly one of two variants gets right at K (hit@K differs).

    ``ranks_a``, ``ranks_b``: 1-based ranks of the same queries, same shape ((Q,) or (S, Q)).
    Raises ValueError on different shapes or invalid ranks (see :func:`per_query`).

    Example:
        >>> discordance([1, 1, 3, 2], [1, 2, 1, 4])
        0.5
    """
    hits_a, hits_b = per_query(ranks_a, f"R{k}"), per_query(ranks_b, f"R{k}")
    if hits_a.shape != hits_b.shape:
        raise ValueError(f"ranks_a and ranks_b must have the same shape; got {hits_a.shape} and {hits_b.shape}")
    return float(np.mean(hits_a != hits_b))


def design_effect(a: SeedValues, b: SeedValues, clusters) -> float:
    """How many times the variance of a paired mean difference grows when queries come in videos.

    ``deff = var_videos / var_queries`` for the per-query differences ``d = b - a`` (averaged over
    seeds first when several): ``var_queries = sum_i (d_i - dbar)^2 / Q^2`` is the bootstrap variance of
    ``dbar`` when queries are drawn one by one, and ``var_videos = sum_c (T_c - m_c dbar)^2 / Q^2`` (T_c
    the sum of video c's m_c differences) the variance under the cluster bootstrap (exact for equal m_c,
    the delta method otherwise; Cochran 1977, *Sampling Techniques*, ch. 9A). With m captions per video
    and intra-video correlation rho of the differences, ``deff ~ 1 + (m - 1) rho`` (Kish 1965, *Survey
    Sampling*, ch. 5): 1 for one query per video, m when a video's captions always agree. The video
    bootstrap CI is about ``sqrt(deff)`` times the query bootstrap CI; pass ``deff`` to
    :func:`r1_half_width` and :func:`min_detectable_difference`.

    Args:
        a, b: per-query values (e.g. :func:`per_query` hits), (Q,), (S, Q) or ``{seed: (Q,)}`` as in
            :func:`bootstrap_difference`; any real dtype (float64 inside).
        clusters: (Q,) integers, query i's video (:func:`vidret_lib.tables.query_clusters`).
    Returns:
        float, >= 0.
    Raises:
        ValueError: as :func:`bootstrap_difference`; ``d`` the same on every query (no variance).

    Example:
        >>> a, b = np.zeros(4), np.array([100.0, 100.0, 0.0, 0.0])  # 2 videos whose 2 captions agree
        >>> design_effect(a, b, [0, 0, 1, 1]), design_effect(a, b, [0, 1, 2, 3])
        (2.0, 1.0)
    """
    (_, xa), (_, xb) = _seed_matrix(a, "a"), _seed_matrix(b, "b")
    xa, xb = np.atleast_2d(xa), np.atleast_2d(xb)  # (S, Q)
    if xa.shape[1] != xb.shape[1] or xa.shape[1] < 2:
        raise ValueError(f"a and b need the same number (>= 2) of queries; got {xa.shape[1]} and {xb.shape[1]}")
    d = xb.mean(0) - xa.mean(0)  # (Q,) per-query difference, averaged over seeds
    groups = _cluster_index(clusters, len(d))
    centred = d - d.mean()
    var_queries = np.sum(centred ** 2)  # both variances share the factor 1 / Q^2
    if var_queries == 0:
        raise ValueError("b - a is the same on every query: no variance, so no design effect")
    var_videos = np.sum(np.bincount(groups, weights=centred) ** 2)  # T_c - m_c dbar = sum over c of (d_i - dbar)
    return float(var_videos / var_queries)


def r1_half_width(n_queries: int, discordance: float, level: float = LEVEL, *, deff: float = 1.0) -> float:
    """Expected half-width (R@1 points) of the paired CI of an R@1 difference near 0.

    The per-query difference of hits is +-100 on the discordant queries and 0 elsewhere, so with
    discordance rate p and no net difference its variance is 100^2 p, and the CI of the mean over n
    queries is about ``z * 100 * sqrt(p * deff / n)`` wide each side (normal approximation of a paired
    difference of proportions, as McNemar's test; ``z`` = 1.96 at 95%). ``deff`` (:func:`design_effect`)
    is 1 when queries are independent (one caption per video, or the query bootstrap) and about
    ``1 + (m - 1) rho`` for m correlated captions per video (the video bootstrap). A true difference
    smaller than this is unlikely to be detected (:func:`min_detectable_difference`). Example: n = 200,
    p = 0.2 -> +-6.2 points. The two-level CI is wider by the seed spread.

    Raises:
        ValueError: ``n_queries`` < 2, ``discordance`` outside [0, 1], ``level`` outside (0, 1), ``deff``
            not positive.

    Example:
        >>> round(r1_half_width(200, 0.2), 2), round(r1_half_width(2000, 0.2, deff=1.5), 2)
        (6.2, 2.4)
    """
    return float(_z(level) * _r1_standard_error(n_queries, discordance, deff))


def min_detectable_difference(n_queries: int, discordance: float, *, deff: float = 1.0, level: float = LEVEL,
                              power: float = 0.8) -> float:
    """The smallest true R@1 difference (points) that a paired CI at ``level`` excludes 0 for, with
    probability ``power``.

    With the standard error ``se = 100 sqrt(p * deff / n)`` of :func:`r1_half_width`, a true difference
    ``m`` gives an observed difference ~ N(m, se^2), which the CI separates from 0 when it exceeds
    ``z_(1+level)/2 * se``: probability ``Phi(m / se - z_(1+level)/2)`` (the far tail ignored). Solving for
    ``power``: ``m = (z_(1+level)/2 + z_power) * se`` -- 2.80 se at 95% and 80% power (the normal approximation
    for paired proportions of Connor 1987, Biometrics 43(1):207-211).
    The variance 100^2 p is taken at no difference; at ``m`` it is 100^2 p - m^2, a relative change of
    ``m^2 / (100^2 p)`` (0.5% for m = 3 points, p = 0.2).

    Args:
        n_queries: queries scored (Q, e.g. 2,000 = 1,000 videos x 2 captions).
        discordance: fraction of queries that exactly one variant gets right at 1 (:func:`discordance`).
        deff: design effect (:func:`design_effect`), 1 for independent queries.
        level, power: CI level and wanted power, in (0, 1).
    Returns:
        float, R@1 points.
    Raises:
        ValueError: as :func:`r1_half_width`; ``power`` outside (0, 1).

    Example:
        >>> round(min_detectable_difference(200, 0.2), 2), round(min_detectable_difference(2000, 0.2, deff=1.5), 2)
        (8.86, 3.43)
    """
    if not 0.0 < power < 1.0:
        raise ValueError(f"power must be in (0, 1), e.g. 0.8; got {power}")
    return float((_z(level) + NormalDist().inv_cdf(power)) * _r1_standard_error(n_queries, discordance, deff))


def _r1_standard_error(n_queries: int, discordance: float, deff: float) -> float:
    """100 sqrt(p deff / n): the standard error (R@1 points) of a paired R@1 difference near 0."""
    if n_queries < 2:
        raise ValueError(f"n_queries must be >= 2; got {n_queries}")
    if not 0.0 <= discordance <= 1.0:
        raise ValueError(f"discordance is a fraction of queries in [0, 1]; got {discordance}")
    if not (np.isfinite(deff) and deff > 0):
        raise ValueError(f"deff (the design effect, stats.design_effect) must be finite and > 0; got {deff}")
    return 100.0 * np.sqrt(discordance * deff / n_queries)


def _z(level: float) -> float:
    """The two-sided normal quantile of ``level`` (1.96 at 0.95)."""
    return NormalDist().inv_cdf(0.5 + _check_level(level) / 2)


# --- the resampling engine -----------------------------------------------------------------------------


Statistic = Callable[[list[np.ndarray], np.ndarray], list[np.ndarray]]


def _bootstrap(statistic: Statistic, a: SeedValues, b: SeedValues,
               n_items: int | None, n_resamples: int, rng_seed: int, level: float, clusters=None) -> Interval:
    """CI of mean_s statistic(b_s) - mean_s statistic(a_s), resampling seeds then items, or the items'
    clusters (module docstring).

    ``statistic([xa, xb], counts)``: xa (Sa, n) and xb (Sb, n) values, counts (R, n) float multiplicities
    of each item in R resamples -> [(R, Sa), (R, Sb)] statistic of every seed in every resample (both
    variants in one call, so what depends only on the counts, e.g. the labels' ranks, is computed once).
    """
    level = _check_level(level)
    if int(n_resamples) != n_resamples or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive integer; got {n_resamples}")
    (ids_a, xa), (ids_b, xb) = _seed_matrix(a, "a"), _seed_matrix(b, "b")
    if (ids_a is None) != (ids_b is None) or (xa.ndim != xb.ndim):
        raise ValueError("a and b must be of the same kind: both (Q,), both (S, Q) or both {seed: (Q,)} dicts")
    xa, xb = np.atleast_2d(xa), np.atleast_2d(xb)  # (S, n); a 1-D input is one "seed": queries only
    n = xa.shape[1]
    if xb.shape[1] != n or (n_items is not None and n != n_items):
        raise ValueError(f"length mismatch: a has {n} items (queries/pairs) per seed, b {xb.shape[1]}"
                         + (f", labels {n_items}" if n_items is not None else "") + "; pass the same items in the same order")
    if n < 2:
        raise ValueError(f"too few queries to resample: {n} (need >= 2)")
    groups = None if clusters is None else _cluster_index(clusters, n)  # (n,) each item's cluster, 0..C-1
    n_units = n if groups is None else int(groups.max()) + 1  # what one draw picks: items, or clusters
    if n_units < 2:
        raise ValueError(f"too few videos (clusters) to resample: {n_units} (need >= 2)")
    if ids_a is None:
        if xa.shape[0] != xb.shape[0]:
            raise ValueError(f"(S, Q) arrays are paired by row, but a has {xa.shape[0]} seeds and b {xb.shape[0]}; "
                             "pass {seed: values} dicts to pair by seed id or resample the seeds independently")
        paired = True
    else:
        paired = set(ids_a) == set(ids_b)
        if paired:
            xb = xb[[ids_b.index(s) for s in ids_a]]  # b's rows in a's seed order
        elif min(len(ids_a), len(ids_b)) < 2:
            raise ValueError(f"too few seeds: a has seeds {list(ids_a)}, b has {list(ids_b)}; seeds that differ are "
                             "resampled on their own, which needs >= 2 seeds per variant (or compare on a shared seed)")
    sa, sb = xa.shape[0], xb.shape[0]

    rng = np.random.default_rng(rng_seed)
    chunk = max(1, _CHUNK_ELEMENTS // n)
    diffs = []
    for start in range(0, n_resamples, chunk):
        size = min(chunk, n_resamples - start)
        units = _counts(rng, n_units, size)  # (R, n or C) multiplicity of each query (or video) in each resample
        items = units if groups is None else units[:, groups]  # a drawn video brings each of its queries
        seeds_a = _counts(rng, sa, size)  # (R, S) multiplicity of each seed
        seeds_b = seeds_a if paired else _counts(rng, sb, size)
        stat_a, stat_b = statistic([xa, xb], items)
        diffs.append((seeds_b * stat_b).sum(1) / sb - (seeds_a * stat_a).sum(1) / sa)
    dist = np.concatenate(diffs)
    if not np.all(np.isfinite(dist)):
        raise ValueError(f"{np.sum(~np.isfinite(dist))} of {n_resamples} resamples have an undefined statistic "
                         f"(e.g. all {n} resampled pairs tied): too few items for this bootstrap")
    stat_a, stat_b = statistic([xa, xb], np.ones((1, n)))  # the data as observed: every item once
    estimate = float(stat_b.mean() - stat_a.mean())
    low, high = np.quantile(dist, [(1 - level) / 2, (1 + level) / 2])
    return Interval(estimate, float(low), float(high), level, n, (sa, sb), paired, int(n_resamples), rng_seed, dist,
                    None if groups is None else n_units)


def _counts(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """(size, n) float64: how often each of n units is drawn in each of ``size`` draws of n with replacement."""
    idx = rng.integers(0, n, (size, n)) + n * np.arange(size)[:, None]
    return np.bincount(idx.ravel(), minlength=size * n).reshape(size, n).astype(np.float64)


def _mean_statistic(xs: list[np.ndarray], counts: np.ndarray) -> list[np.ndarray]:
    """(R, S) mean of each seed's values in each resample, for each x of ``xs``:
    sum_i counts[r, i] x[s, i] / sum_i counts[r, i] (the denominator is n for a draw of n items; a
    cluster draw holds a varying number of items)."""
    return [counts @ x.T / counts.sum(1, keepdims=True) for x in xs]


def _cluster_index(clusters, n: int) -> np.ndarray:
    """(n,) int64: each item's cluster numbered 0..C-1 in the sorted order of the labels in ``clusters``."""
    labels = np.asarray(clusters)
    if labels.shape != (n,):
        raise ValueError(f"clusters must be (Q,) = ({n},): one video index per query, in the queries' order "
                         f"(tables.query_clusters); got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"clusters must be integers (each query's video index, tables.query_clusters); got dtype "
                         f"{labels.dtype}")
    return np.unique(labels, return_inverse=True)[1].reshape(n)


def _spearman_statistic(labels: np.ndarray) -> Statistic:
    """``statistic(xs, counts)`` -> for each x (S, n) of ``xs``, the (R, S) Spearman of each seed's scores x[s]
    with ``labels`` in each resample.

    Spearman = Pearson of average ranks. The ranks of a resample of n items are centred (minus their mean
    (n + 1) / 2), so with weights w = counts: rho = sum w rx ry / sqrt(sum w rx^2 * sum w ry^2). Each term
    is a multiple of 1/4 below n^3, so below 2^53 each sum is exact in float64 whatever its order: the result
    depends on nothing but the counts. The counts and centred ranks (integers and half-integers below n) are
    exact in float32 for n < 2^22, which halves the memory traffic of the (R, n) gathers that dominate the
    cost; the products are summed in float64.
    """
    label_order = np.argsort(labels, kind="stable")
    label_starts = _tie_starts(labels[label_order], "labels")
    label_item = np.argsort(label_order)  # item i's position in label_order

    def statistic(xs: list[np.ndarray], counts: np.ndarray) -> list[np.ndarray]:
        w = counts.astype(np.float32 if counts.shape[1] < 2 ** 22 else np.float64)  # (R, n), exact
        ry = np.take(_sorted_ranks(np.take(w, label_order, axis=1), label_starts), label_item, axis=1)
        # (R, n) centred label ranks in item order, once for every x
        ryy = np.einsum("ij,ij,ij->i", w, ry, ry, dtype=np.float64)  # (R,) sum w ry^2
        out = []
        for x in xs:
            rho = np.empty((len(w), len(x)))
            for s, row in enumerate(x):
                order = np.argsort(row, kind="stable")
                w_sorted = np.take(w, order, axis=1)  # (R, n) in the scores' sorted order
                rx = _sorted_ranks(w_sorted, _tie_starts(row[order], "scores"))  # (R, n) centred score ranks
                rxy = np.einsum("ij,ij,ij->i", w_sorted, rx, np.take(ry, order, axis=1), dtype=np.float64)  # sum w rx ry
                rxx = np.einsum("ij,ij,ij->i", w_sorted, rx, rx, dtype=np.float64)  # sum w rx^2
                with np.errstate(invalid="ignore", divide="ignore"):  # a resample of tied items only: NaN, reported
                    rho[:, s] = rxy / np.sqrt(rxx * ryy)
            out.append(rho)
        return out

    return statistic


def _tie_starts(v_sorted: np.ndarray, name: str) -> np.ndarray:
    """The first position of each run of equal values in ascending ``v_sorted`` (n,). Raises ValueError
    naming ``name`` when it is constant (no ranking)."""
    starts = np.flatnonzero(np.r_[True, v_sorted[1:] != v_sorted[:-1]])
    if len(starts) < 2:
        raise ValueError(f"{name} are constant: Spearman's correlation is undefined")
    return starts


def _sorted_ranks(w_sorted: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """(R, n) average rank of each item within each resample, minus the mean rank (n + 1) / 2, the items
    in ascending order of their values: ``w_sorted`` (R, n) their copies in each resample, ``starts`` the
    first position of each tie group (:func:`_tie_starts`).

    With C the cumulative copies (C[-1] = 0), the copies of the tie group spanning sorted positions
    first..last take ranks C[first - 1] + 1 .. C[last]: average ``(C[first - 1] + C[last] + 1) / 2``, which for
    an untied item is ``C - (copies - 1) / 2``. Only the tied positions need the group's ends (few for scores).
    """
    n = w_sorted.shape[1]
    cum = np.cumsum(w_sorted, axis=1)  # (R, n) C
    ranks = cum - 0.5 * w_sorted
    ranks += 0.5 - (n + 1) / 2
    size = np.diff(np.r_[starts, n])
    tied = size > 1
    if tied.any():
        first, last = np.repeat(starts[tied], size[tied]), np.repeat((starts + size - 1)[tied], size[tied])
        positions = first + np.concatenate([np.arange(k) for k in size[tied]])
        before = np.take(cum, np.maximum(first - 1, 0), axis=1)  # (R, n_tied) C[first - 1]
        before[:, first == 0] = 0
        ranks[:, positions] = 0.5 * (before + np.take(cum, last, axis=1)) + 0.5 - (n + 1) / 2
    return ranks


def _seed_matrix(x: SeedValues, name: str) -> tuple[tuple[int, ...] | None, np.ndarray]:
    """(seed ids or None, float64 values): a dict becomes (sorted ids, (S, n)); arrays keep their shape."""
    if isinstance(x, Mapping):
        if not x:
            raise ValueError(f"{name} has no seeds (an empty dict)")
        ids = tuple(sorted(x))
        rows = [_finite(x[s], f"{name}[seed {s}]") for s in ids]
        if any(r.ndim != 1 or len(r) != len(rows[0]) for r in rows):
            raise ValueError(f"{name}: every seed needs a 1-D array of the same length; got shapes "
                             f"{[r.shape for r in rows]}")
        return ids, np.stack(rows)
    arr = _finite(x, name)
    if arr.ndim not in (1, 2):
        raise ValueError(f"{name} must be (Q,) or (S, Q); got shape {arr.shape}")
    return None, arr


def _map_values(x: SeedValues, fn: Callable) -> SeedValues:
    """``fn`` applied to an array, or to every seed's array of a dict."""
    return {s: fn(v) for s, v in x.items()} if isinstance(x, Mapping) else fn(x)


def _finite(x, name: str) -> np.ndarray:
    """float64 copy of ``x``; ValueError naming ``name`` when it holds NaN or inf."""
    arr = np.asarray(x, dtype=np.float64)
    bad = ~np.isfinite(arr)
    if bad.any():
        raise ValueError(f"{name} holds {bad.sum()} NaN/inf values (of {arr.size}); drop those queries from both variants")
    return arr


def _check_level(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), e.g. 0.95; got {level}")
    return float(level)
