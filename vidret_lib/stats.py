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
  (S - 1) / S: read a two-level CI as slightly optimistic about the seeds.

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
    resampled differences (float64), for a histogram.
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

    @property
    def half_width(self) -> float:
        """Half the interval's width, in the statistic's units."""
        return (self.high - self.low) / 2

    def __str__(self) -> str:
        return (f"{self.estimate:+.4g} [{self.low:+.4g}, {self.high:+.4g}] ({100 * self.level:g}% paired bootstrap CI, "
                f"{self.n_items} items x {self.n_seeds[0]}/{self.n_seeds[1]} seeds)")


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


def bootstrap_difference(a: SeedValues, b: SeedValues, *, n_resamples: int = N_RESAMPLES,
                         rng_seed: int = RNG_SEED, level: float = LEVEL) -> Interval:
    """Paired bootstrap CI of ``mean(b) - mean(a)`` of per-query values (see the module docstring).

    Args:
        a, b: per-query values of two variants on the same queries in the same order (e.g.
            :func:`per_query`), any real dtype (computed in float64). ``(Q,)``: one level (queries).
            ``(S, Q)``: two levels, row i of ``a`` and of ``b`` the same seed. ``{seed: (Q,)}`` (as
            :func:`vidret_lib.tables.query_ranks` gives): two levels, paired by seed when both have the same
            seeds, else each variant's seeds resampled on their own. The mean is over seeds of the
            per-seed mean over queries (the records' summary mean).
        n_resamples, rng_seed, level: number of resamples, seed of the generator, CI level.
    Returns:
        :class:`Interval`.
    Raises:
        ValueError: different numbers of queries; NaN or inf; fewer than 2 queries; (S, Q) arrays with
            different S; a 1-D and a 2-D input; unpaired seeds with fewer than 2 seeds on a side.

    Example:
        >>> ci = bootstrap_difference(np.zeros(50), np.full(50, 2.5))   # b is 2.5 better on every query
        >>> ci.estimate, ci.low, ci.high
        (2.5, 2.5, 2.5)
    """
    return _bootstrap(_mean_statistic, a, b, None, n_resamples, rng_seed, level)


def compare_ranks(ranks_a: SeedValues, ranks_b: SeedValues, metric: str = "R1", **kwargs) -> Interval:
    """:func:`bootstrap_difference` of ``per_query(ranks, metric)``: e.g. the CI of the R@1 gain of b over a.

    ``ranks_a``/``ranks_b``: 1-based ranks, (Q,), (S, Q) or ``{seed: (Q,)}``; ``kwargs`` go to
    :func:`bootstrap_difference`. For ``metric="rank"`` lower is better: pass ``higher_is_better=False``
    (:func:`higher_is_better`) to :func:`verdict`.

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
        resampled) and ``seeds`` (``"3/3"``: seeds of a/b).
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
                    "n_items": v.interval.n_items, "seeds": "/".join(map(str, v.interval.n_seeds))})
    columns = [*VERDICT_COLUMNS, "ci_low", "ci_high", "n_items", "seeds"]
    return pd.DataFrame(out, columns=columns).astype({"estimate": "float64", "paper's effect": "float64",
                                                       "ci_low": "float64", "ci_high": "float64"})


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


def r1_half_width(n_queries: int, discordance: float, level: float = LEVEL) -> float:
    """Expected half-width (R@1 points) of the one-level paired CI of an R@1 difference near 0.

    The per-query difference of hits is +-100 on the discordant queries and 0 elsewhere, so with
    discordance rate p and no net difference its variance is 100^2 p, and the CI of the mean over n
    queries is about ``z * 100 * sqrt(p / n)`` wide each side (normal approximation; ``z`` = 1.96 at
    95%). A true difference smaller than this is unlikely to be detected. Example: n = 200, p = 0.2 ->
    +-6.2 points. The two-level CI is wider by the seed spread.

    Raises:
        ValueError: ``n_queries`` < 2, ``discordance`` outside [0, 1], ``level`` outside (0, 1).

    Example:
        >>> round(r1_half_width(200, 0.2), 2)
        6.2
    """
    if n_queries < 2:
        raise ValueError(f"n_queries must be >= 2; got {n_queries}")
    if not 0.0 <= discordance <= 1.0:
        raise ValueError(f"discordance is a fraction of queries in [0, 1]; got {discordance}")
    z = NormalDist().inv_cdf(0.5 + _check_level(level) / 2)
    return float(z * 100.0 * np.sqrt(discordance / n_queries))


# --- the resampling engine -----------------------------------------------------------------------------


def _bootstrap(statistic: Callable[[np.ndarray, np.ndarray], np.ndarray], a: SeedValues, b: SeedValues,
               n_items: int | None, n_resamples: int, rng_seed: int, level: float) -> Interval:
    """CI of mean_s statistic(b_s) - mean_s statistic(a_s), resampling seeds then items (module docstring).

    ``statistic(x, counts)``: x (S, n) values, counts (R, n) float multiplicities of each item in R
    resamples -> (R, S) statistic of every seed in every resample.
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
        items = _counts(rng, n, size)  # (R, n) multiplicity of each query in each resample
        seeds_a = _counts(rng, sa, size)  # (R, S) multiplicity of each seed
        seeds_b = seeds_a if paired else _counts(rng, sb, size)
        diffs.append((seeds_b * statistic(xb, items)).sum(1) / sb - (seeds_a * statistic(xa, items)).sum(1) / sa)
    dist = np.concatenate(diffs)
    if not np.all(np.isfinite(dist)):
        raise ValueError(f"{np.sum(~np.isfinite(dist))} of {n_resamples} resamples have an undefined statistic "
                         f"(e.g. all {n} resampled pairs tied): too few items for this bootstrap")
    observed = np.ones((1, n))
    estimate = float(statistic(xb, observed).mean() - statistic(xa, observed).mean())
    low, high = np.quantile(dist, [(1 - level) / 2, (1 + level) / 2])
    return Interval(estimate, float(low), float(high), level, n, (sa, sb), paired, int(n_resamples), rng_seed, dist)


def _counts(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """(size, n) float64: how often each of n units is drawn in each of ``size`` draws of n with replacement."""
    idx = rng.integers(0, n, (size, n)) + n * np.arange(size)[:, None]
    return np.bincount(idx.ravel(), minlength=size * n).reshape(size, n).astype(np.float64)


def _mean_statistic(x: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(R, S) mean of each seed's values in each resample: sum_i counts[r, i] x[s, i] / n."""
    return counts @ x.T / x.shape[1]


def _spearman_statistic(labels: np.ndarray) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """``statistic(x, counts)`` -> (R, S) Spearman of each seed's scores x[s] with ``labels`` in each resample."""
    label_groups = _tie_groups(labels, "labels")

    def statistic(x: np.ndarray, counts: np.ndarray) -> np.ndarray:
        # Spearman = Pearson of average ranks. _resample_ranks subtracts the mean rank (n + 1) / 2 of a resample
        # of n items, so with weights w = counts: rho = sum w rx ry / sqrt(sum w rx^2 * sum w ry^2)
        ry = _resample_ranks(counts, label_groups)
        ryy = np.einsum("ij,ij,ij->i", counts, ry, ry)
        out = np.empty((counts.shape[0], x.shape[0]))
        for s, row in enumerate(x):
            rx = _resample_ranks(counts, _tie_groups(row, "scores"))
            with np.errstate(invalid="ignore", divide="ignore"):  # a resample of tied items only: NaN, reported
                out[:, s] = np.einsum("ij,ij,ij->i", counts, rx, ry) / np.sqrt(np.einsum("ij,ij,ij->i", counts, rx, rx) * ryy)
        return out

    return statistic


def _tie_groups(v: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order, starts, group): argsort of v, first sorted position of each run of equal values, and the
    group (run) of every item in v's order. Raises ValueError when v is constant (no ranking)."""
    order = np.argsort(v, kind="stable")
    new = np.r_[True, v[order][1:] != v[order][:-1]]
    if new.sum() < 2:
        raise ValueError(f"{name} are constant: Spearman's correlation is undefined")
    group = np.empty(len(v), dtype=np.int64)
    group[order] = np.cumsum(new) - 1
    return order, np.flatnonzero(new), group


def _resample_ranks(counts: np.ndarray, groups: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """(R, n) average rank of each item within each resample, minus the mean rank (n + 1) / 2.

    The copies of an item's tie group in a resample take the ranks after the ``below`` copies of smaller
    values: average rank ``below + (copies + 1) / 2 = cumulative copies - (copies - 1) / 2``.
    """
    order, starts, group = groups
    n = counts.shape[1]
    copies = np.take(counts, order, axis=1)  # (R, n) in sorted order: one column per tie group when there are no ties
    if len(starts) < n:
        copies = np.add.reduceat(copies, starts, axis=1)  # (R, G) copies of each tie group
    ranks = np.cumsum(copies, axis=1)
    ranks -= 0.5 * copies
    ranks += 0.5 - (n + 1) / 2
    return np.take(ranks, group, axis=1)  # np.take: several times faster than ranks[:, group] here


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
