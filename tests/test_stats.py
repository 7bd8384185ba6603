"""vidret_lib.stats: paired bootstrap CIs against scipy and exact enumeration, verdicts, power helper."""
from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
import scipy.stats

from vidret_lib import stats
from vidret_lib.stats import (HOLDS, INCONCLUSIVE, NO_EFFECT, REVERSED, bootstrap_difference, compare_ranks,
                              design_effect, discordance, min_detectable_difference, per_query, r1_half_width,
                              spearman_difference, verdict)

DTYPES = [np.float32, np.float64]


def _exact_distribution(a: np.ndarray, b: np.ndarray, seeds_a: int, seeds_b: int, paired: bool) -> dict[float, float]:
    """Every equally likely draw (seeds, then queries shared by all seeds) of mean(b) - mean(a), enumerated."""
    q = a.shape[1]
    pmf: dict[float, float] = {}
    seed_draws_a = list(itertools.product(range(seeds_a), repeat=seeds_a))
    seed_draws_b = [None] if paired else list(itertools.product(range(seeds_b), repeat=seeds_b))
    draws = list(itertools.product(seed_draws_a, seed_draws_b, itertools.product(range(q), repeat=q)))
    for sa, sb, qs in draws:
        sb = sa if paired else sb
        d = np.mean([b[s, list(qs)].mean() for s in sb]) - np.mean([a[s, list(qs)].mean() for s in sa])
        key = round(float(d), 9)
        pmf[key] = pmf.get(key, 0.0) + 1.0 / len(draws)
    return pmf


def _empirical(dist: np.ndarray) -> dict[float, float]:
    keys, counts = np.unique(np.round(dist, 9), return_counts=True)
    return dict(zip(keys.tolist(), (counts / len(dist)).tolist()))


def _assert_same_pmf(empirical: dict, exact: dict, n: int):
    assert set(empirical) <= set(exact), "a resampled value that no draw can produce"
    tol = 5 * np.sqrt(0.25 / n)  # 5 binomial standard errors at worst
    worst = max(abs(empirical.get(k, 0.0) - p) for k, p in exact.items())
    assert worst < tol, f"resample frequencies differ from the enumerated ones by {worst:.4f}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_three_queries_resample_exactly_as_enumerated(dtype):
    d = np.array([0.0, 1.0, 2.0], dtype=dtype)
    ci = bootstrap_difference(np.zeros(3, dtype), d, n_resamples=20_000)
    exact = _exact_distribution(np.zeros((1, 3)), d[None].astype(float), 1, 1, True)
    _assert_same_pmf(_empirical(ci.distribution), exact, 20_000)
    # P(mean = 0) = P(mean = 2) = 1/27 > 2.5%: both percentiles sit exactly on the extreme atoms
    assert (ci.estimate, ci.low, ci.high) == (1.0, 0.0, 2.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_two_level_paired_seeds_resample_as_enumerated(dtype):
    g = np.random.default_rng(0)
    a, b = (g.integers(0, 4, (2, 3)).astype(dtype) for _ in range(2))
    ci = bootstrap_difference(a, b, n_resamples=20_000, rng_seed=1)
    assert ci.paired_seeds and ci.n_seeds == (2, 2)
    _assert_same_pmf(_empirical(ci.distribution), _exact_distribution(a.astype(float), b.astype(float), 2, 2, True), 20_000)
    assert ci.estimate == pytest.approx(b.astype(float).mean() - a.astype(float).mean())


def test_two_level_unpaired_seeds_resample_each_variant_on_its_own():
    g = np.random.default_rng(1)
    a, b = g.integers(0, 3, (2, 2)).astype(float), g.integers(0, 3, (3, 2)).astype(float)
    ci = bootstrap_difference({0: a[0], 1: a[1]}, {5: b[0], 6: b[1], 7: b[2]}, n_resamples=20_000)
    assert not ci.paired_seeds and ci.n_seeds == (2, 3)
    _assert_same_pmf(_empirical(ci.distribution), _exact_distribution(a, b, 2, 3, False), 20_000)


def test_seed_dicts_are_paired_by_seed_id_not_by_position():
    g = np.random.default_rng(2)
    a = {s: g.integers(1, 30, 50).astype(float) for s in (0, 1, 2)}
    b = {s: v + 1.0 for s, v in a.items()}  # rank + 1 at every seed: paired by seed, MnR rises by exactly 1
    b_shuffled = {s: b[s] for s in (2, 0, 1)}
    ci = compare_ranks(a, b_shuffled, "rank", n_resamples=2000)
    assert ci.paired_seeds
    assert ci.low == pytest.approx(1.0) and ci.high == pytest.approx(1.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_constant_difference_has_that_constant_as_its_interval(dtype):
    g = np.random.default_rng(3)
    a = g.standard_normal((3, 200)).astype(dtype)
    ci = bootstrap_difference(a, a + dtype(0.25), n_resamples=3000)
    for value in (ci.estimate, ci.low, ci.high):
        assert value == pytest.approx(0.25, abs=1e-6 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_level_interval_matches_scipy_paired_percentile_bootstrap(dtype):
    g = np.random.default_rng(4)
    a = g.standard_normal(400)
    b = a + 0.1 + 0.5 * g.standard_normal(400)  # strongly correlated: an unpaired resample would be ~2x wider
    a, b = a.astype(dtype), b.astype(dtype)
    ours = bootstrap_difference(a, b, n_resamples=20_000, rng_seed=5)
    ref = scipy.stats.bootstrap((a.astype(float), b.astype(float)), lambda x, y, axis: np.mean(y - x, axis=axis),
                                paired=True, vectorized=True, n_resamples=20_000, method="percentile",
                                rng=np.random.default_rng(6)).confidence_interval
    se = np.std(b.astype(float) - a.astype(float)) / np.sqrt(400)
    # Monte-Carlo sd of a 2.5% percentile at 20k resamples ~ 0.02 se per estimate: 0.15 se is > 5 sd
    assert ours.low == pytest.approx(ref.low, abs=0.15 * se)
    assert ours.high == pytest.approx(ref.high, abs=0.15 * se)
    assert ours.estimate == pytest.approx(float(np.mean(b.astype(float) - a.astype(float))))


@pytest.mark.slow
def test_spearman_difference_matches_scipy_bootstrap_of_spearmanr():
    g = np.random.default_rng(7)
    y = g.integers(0, 5, 80).astype(float)  # graded labels: many ties
    sa, sb = y + 2.0 * g.standard_normal(80), y + 1.2 * g.standard_normal(80)

    def diff(x_a, x_b, labels, axis=-1):  # scipy passes (batch, n) resamples
        return np.array([scipy.stats.spearmanr(xb, yy).statistic - scipy.stats.spearmanr(xa, yy).statistic
                         for xa, xb, yy in zip(np.atleast_2d(x_a), np.atleast_2d(x_b), np.atleast_2d(labels))])

    ref = scipy.stats.bootstrap((sa, sb, y), diff, paired=True, vectorized=True, n_resamples=1500,
                                method="percentile", rng=np.random.default_rng(8))
    ours = spearman_difference(sa, sb, y, n_resamples=5000)
    assert ours.estimate == pytest.approx(diff(sa, sb, y)[0], abs=1e-12)
    se = ref.standard_error  # Monte-Carlo sd of the 1500-resample percentile ~ 0.07 se, of ours ~ 0.04 se
    assert ours.low == pytest.approx(ref.confidence_interval.low, abs=0.4 * se)
    assert ours.high == pytest.approx(ref.confidence_interval.high, abs=0.4 * se)


@pytest.mark.parametrize("dtype", DTYPES)
def test_resampled_spearman_equals_scipy_on_the_expanded_resample(dtype):
    g = np.random.default_rng(9)
    n = 40
    y = g.integers(0, 6, n).astype(dtype)
    x = np.stack([y + g.standard_normal(n).astype(dtype), np.round(g.standard_normal(n), 1).astype(dtype)])  # ties in x too
    counts = stats._counts(g, n, 25)
    got, = stats._spearman_statistic(y.astype(float))([x.astype(float)], counts)
    for r, c in enumerate(counts.astype(int)):
        for s in range(2):
            want = scipy.stats.spearmanr(np.repeat(x[s], c), np.repeat(y, c)).statistic  # naive: materialise the resample
            assert got[r, s] == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_two_level_spearman_distribution_equals_a_naive_loop_over_the_same_draws(dtype):
    # the draws of _bootstrap (one chunk): item counts (R, n), then the shared seed draw (R, S), from one rng
    g = np.random.default_rng(12)
    n, seeds, resamples = 30, 3, 400
    y = g.integers(0, 5, n).astype(dtype)  # graded labels: many ties
    a = {s: np.round(y + g.standard_normal(n), 1).astype(dtype) for s in range(seeds)}  # ties in the scores too
    b = {s: np.round(y + 0.5 * g.standard_normal(n), 1).astype(dtype) for s in range(seeds)}
    ours = spearman_difference(a, b, y, n_resamples=resamples, rng_seed=3)
    rng = np.random.default_rng(3)
    items = rng.integers(0, n, (resamples, n))
    seed_draws = rng.integers(0, seeds, (resamples, seeds))
    rho = lambda x, i: scipy.stats.spearmanr(x[i], y[i]).statistic  # naive: the resample itself, ranked by scipy
    want = [np.mean([rho(b[s], i) for s in d]) - np.mean([rho(a[s], i) for s in d]) for i, d in zip(items, seed_draws)]
    np.testing.assert_allclose(ours.distribution, want, rtol=0, atol=1e-12)
    assert ours.estimate == pytest.approx(np.mean([rho(b[s], np.arange(n)) - rho(a[s], np.arange(n)) for s in a]),
                                          abs=1e-12)


def test_the_interval_is_reproducible_and_depends_on_the_rng_seed():
    g = np.random.default_rng(10)
    a, b = g.integers(1, 20, (3, 200)), g.integers(1, 20, (3, 200))
    first, again = compare_ranks(a, b, n_resamples=2000), compare_ranks(a, b, n_resamples=2000)
    assert (first.low, first.high) == (again.low, again.high)
    np.testing.assert_array_equal(first.distribution, again.distribution)
    assert not np.array_equal(first.distribution, compare_ranks(a, b, n_resamples=2000, rng_seed=1).distribution)


def test_ten_thousand_resamples_of_a_thousand_queries_and_three_seeds_are_fast():
    g = np.random.default_rng(11)
    a, b = ({s: g.integers(1, 50, 1000).astype(float) for s in range(3)} for _ in range(2))
    compare_ranks(a, b, n_resamples=100)  # warm-up
    start = time.perf_counter()
    compare_ranks(a, b, "R1")
    assert time.perf_counter() - start < 5.0, "10k x 1000 x 3 must stay vectorised (~0.3 s unloaded)"


@pytest.mark.parametrize("metric, want", [("R1", [100, 0, 0, 0]), ("R5", [100, 100, 100, 0]),
                                          ("rank", [1, 2, 4.5, 11]), ("RR", [1, 0.5, 1 / 4.5, 1 / 11])])
def test_per_query_values_average_to_the_summary_metrics(metric, want):
    np.testing.assert_allclose(per_query(np.array([1, 2, 4.5, 11], np.float32), metric), want)


def test_verdict_outcomes_and_orientation():
    def ci(low, high, estimate=None):
        estimate = (low + high) / 2 if estimate is None else estimate
        return stats.Interval(estimate, low, high, 0.95, 200, (3, 3), True, 1000, 0, np.array([]))

    assert verdict(ci(0.5, 3.0), 8.8, higher_is_better=True).outcome == HOLDS
    assert verdict(ci(-3.0, -0.5), 8.8, higher_is_better=True).outcome == REVERSED
    assert verdict(ci(-3.0, -0.5), 8.8, higher_is_better=False).outcome == HOLDS  # rank fell: b is better
    assert verdict(ci(0.5, 3.0), 8.8, higher_is_better=False).outcome == REVERSED
    assert verdict(ci(-2.0, 3.0), 8.8, higher_is_better=True).outcome == NO_EFFECT
    assert verdict(ci(0.0, 3.0), 8.8, higher_is_better=True).outcome == NO_EFFECT, "touching 0 does not exclude it"
    v = verdict(ci(-2.0, 10.0, estimate=4.0), 8.8, higher_is_better=True)
    assert v.outcome == INCONCLUSIVE
    # centred on 4.0: excluding 0 needs a half-width < 4.0, fitting inside +-8.8 needs < 4.8: the easier wins
    assert v.needed_half_width == pytest.approx(4.8)
    assert v.narrower_by == pytest.approx(6.0 / 4.8)
    assert "4.8" in str(v) and "inconclusive" in str(v)
    assert "less than the paper's 8.8" in str(verdict(ci(0.5, 3.0), 8.8, higher_is_better=True))


def test_verdict_on_a_real_bootstrap_of_ranks():
    g = np.random.default_rng(12)
    a = g.integers(1, 6, 400).astype(float)
    b = np.where(g.random(400) < 0.3, 1.0, a)  # b ranks 30% of the queries first: R@1 up, mean rank down
    assert verdict(compare_ranks(a, b, "R1"), 5.0, higher_is_better=True).outcome == HOLDS
    assert verdict(compare_ranks(a, b, "rank"), 1.0, higher_is_better=stats.higher_is_better("rank")).outcome == HOLDS


@pytest.mark.parametrize("dtype", DTYPES)
def test_cluster_bootstrap_draws_videos_as_enumerated(dtype):
    # 3 videos with 2, 1 and 1 captions: a draw of 3 videos holds 3 to 6 captions, and its mean is over them
    clusters = np.array([7, 7, 2, 5])
    d = np.array([0.0, 3.0, 1.0, 5.0], dtype=dtype)
    ci = bootstrap_difference(np.zeros(4, dtype), d, clusters=clusters, n_resamples=20_000)
    members = [np.flatnonzero(clusters == c) for c in np.unique(clusters)]
    exact: dict[float, float] = {}
    for draw in itertools.product(range(3), repeat=3):  # every equally likely draw of 3 videos
        key = round(float(np.concatenate([d.astype(float)[members[c]] for c in draw]).mean()), 9)
        exact[key] = exact.get(key, 0.0) + 1 / 27
    _assert_same_pmf(_empirical(ci.distribution), exact, 20_000)
    assert ci.estimate == pytest.approx(2.25) and ci.n_items == 4 and ci.n_clusters == 3
    assert "4 items in 3 clusters" in str(ci)


def _naive_cluster_bootstrap(a, b, clusters, n_resamples, rng_seed):
    """Loop over resamples: draw videos, then seeds (shared by a and b), with the generator calls the
    module documents (one chunk: (R, C) video draws, then (R, S) seed draws); concatenate the drawn videos'
    queries and average each drawn seed's mean over them."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    labels = np.unique(clusters)
    members = [np.flatnonzero(clusters == c) for c in labels]  # videos numbered in sorted label order
    rng = np.random.default_rng(rng_seed)
    videos = rng.integers(0, len(labels), (n_resamples, len(labels)))
    seeds = rng.integers(0, a.shape[0], (n_resamples, a.shape[0]))
    out = []
    for r in range(n_resamples):
        queries = np.concatenate([members[c] for c in videos[r]])
        out.append(np.mean([b[s, queries].mean() for s in seeds[r]]) - np.mean([a[s, queries].mean() for s in seeds[r]]))
    return np.array(out)


@pytest.mark.parametrize("dtype", DTYPES)
def test_two_level_cluster_bootstrap_equals_a_naive_loop(dtype):
    g = np.random.default_rng(20)
    clusters = np.array([5, 5, 2, 9, 2, 2, 7, 9])  # 4 videos of 2, 3, 1 and 2 captions, labels out of order
    a, b = g.integers(1, 5, (3, 8)).astype(dtype), g.integers(1, 5, (3, 8)).astype(dtype)
    ci = compare_ranks(a, b, "RR", clusters=clusters, n_resamples=400, rng_seed=3)
    want = _naive_cluster_bootstrap(per_query(a, "RR"), per_query(b, "RR"), clusters, 400, 3)
    np.testing.assert_allclose(ci.distribution, want, rtol=0, atol=1e-12)
    assert ci.paired_seeds and ci.n_seeds == (3, 3) and ci.n_clusters == 4


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_query_per_cluster_is_the_query_bootstrap(dtype):
    g = np.random.default_rng(21)
    a, b = g.integers(1, 9, (2, 60)).astype(dtype), g.integers(1, 9, (2, 60)).astype(dtype)
    plain = compare_ranks(a, b, "R1", n_resamples=3000)
    for clusters in (np.arange(60), 10 + 3 * np.arange(60, dtype=np.int32)):  # any increasing distinct labels
        clustered = compare_ranks(a, b, "R1", clusters=clusters, n_resamples=3000)
        np.testing.assert_array_equal(clustered.distribution, plain.distribution)
        assert (clustered.low, clustered.high, clustered.estimate) == (plain.low, plain.high, plain.estimate)
    assert plain.n_clusters is None and clustered.n_clusters == 60


@pytest.mark.parametrize("dtype", DTYPES)
def test_design_effect_is_the_ratio_of_the_two_bootstrap_variances(dtype):
    g = np.random.default_rng(22)
    videos, m = 400, 3
    clusters = np.repeat(np.arange(videos), m)
    shared = np.repeat(g.random(videos) < 0.5, m)  # half of the videos: their 3 captions share one outcome
    outcome = np.where(shared, np.repeat(g.integers(-1, 2, videos), m), g.integers(-1, 2, videos * m))
    a, b = (100.0 * (outcome < 0)).astype(dtype), (100.0 * (outcome > 0)).astype(dtype)
    deff = design_effect(a, b, clusters)
    assert design_effect(a, b, np.arange(videos * m)) == pytest.approx(1.0, rel=1e-12)
    d = b.astype(np.float64) - a.astype(np.float64)  # naive: sum over videos of (T_c - m dbar)^2 over sum of (d_i - dbar)^2
    totals = np.array([d[clusters == c].sum() for c in range(videos)])
    assert deff == pytest.approx(np.sum((totals - m * d.mean()) ** 2) / np.sum((d - d.mean()) ** 2), rel=1e-12)
    assert deff == pytest.approx(1 + (m - 1) * 0.5, rel=0.15)  # rho = 0.5 by construction
    by_query = bootstrap_difference(a, b, n_resamples=4000)
    by_video = bootstrap_difference(a, b, clusters=clusters, n_resamples=4000)
    assert by_video.half_width / by_query.half_width == pytest.approx(np.sqrt(deff), rel=0.08)
    assert by_video.half_width == pytest.approx(r1_half_width(videos * m, float(np.mean(d != 0)), deff=deff), rel=0.08)


def _simulated_differences(g, true_difference, videos, m, p, rho, sims):
    """(sims, videos * m) per-query R@1 differences b - a in {+100, 0, -100} of ``sims`` simulated studies:
    discordance p, mean ``true_difference``; with probability rho all captions of a video share one outcome,
    else each draws its own (intra-video correlation rho, so deff = 1 + (m - 1) rho)."""
    win, lose = p / 2 + true_difference / 200, p / 2 - true_difference / 200

    def outcome(shape):
        u = g.random(shape)
        return np.where(u < win, 100.0, np.where(u < win + lose, -100.0, 0.0))

    shared = g.random((sims, videos, 1)) < rho
    return np.where(shared, outcome((sims, videos, 1)), outcome((sims, videos, m))).reshape(sims, videos * m)


def test_min_detectable_difference_is_detected_with_the_stated_power_in_a_simulation():
    videos, m, p, rho, sims = 500, 2, 0.2, 0.5, 4000
    n, deff = videos * m, 1 + (m - 1) * rho
    z, z_power = 1.959964, 0.841621  # 95% two-sided, 80% power
    mdd = min_detectable_difference(n, p, deff=deff)
    assert mdd == pytest.approx((z + z_power) * 100 * np.sqrt(p * deff / n), rel=1e-6)
    assert r1_half_width(n, p, deff=deff) == pytest.approx(z * 100 * np.sqrt(p * deff / n), rel=1e-6)
    g = np.random.default_rng(23)
    null = _simulated_differences(g, 0.0, videos, m, p, rho, sims).mean(1)
    # Monte-Carlo sd of a standard deviation over 4,000 studies: 1.1%; 5% is > 4 sd
    assert null.std() == pytest.approx(100 * np.sqrt(p * deff / n), rel=0.05)

    def power(true_difference):  # share of studies whose 95% video-level normal CI excludes 0
        d = _simulated_differences(g, true_difference, videos, m, p, rho, sims)
        dbar = d.mean(1)
        totals = d.reshape(sims, videos, m).sum(2)
        se = np.sqrt(np.sum((totals - m * dbar[:, None]) ** 2, 1)) / n  # sqrt(var_videos), as design_effect
        return np.mean(np.abs(dbar) > z * se)

    # Monte-Carlo sd of a power of 0.8 over 4,000 studies: 0.006; 0.03 is 5 sd (the variance at mdd is 1% smaller)
    assert power(mdd) == pytest.approx(0.8, abs=0.03)
    assert power(min_detectable_difference(n, p)) < 0.7, "ignoring the design effect overstates the power"


def test_r1_half_width_predicts_the_bootstrap_half_width():
    assert r1_half_width(200, 0.2) == pytest.approx(1.959964 * 100 * np.sqrt(0.2 / 200), rel=1e-6)
    g = np.random.default_rng(13)
    n, p = 1000, 0.2
    ranks_a = np.ones(n)
    flip = g.random(n) < p  # discordant queries, half won by each variant
    ranks_b = np.where(flip, 2.0, 1.0)
    ranks_a = np.where(flip & (g.random(n) < 0.5), 2.0, 1.0)
    ranks_b = np.where(flip & (ranks_a == 2.0), 1.0, ranks_b)
    observed = discordance(ranks_a, ranks_b)
    assert observed == pytest.approx(flip.mean())
    boot = compare_ranks(ranks_a, ranks_b, "R1", n_resamples=5000)
    assert boot.half_width == pytest.approx(r1_half_width(n, observed), rel=0.1)


@pytest.mark.parametrize("call, message", [
    (lambda: bootstrap_difference(np.zeros(5), np.zeros(6)), "length mismatch"),
    (lambda: bootstrap_difference(np.zeros(5), np.array([0, 1, np.nan, 0, 0])), "NaN"),
    (lambda: bootstrap_difference(np.zeros(1), np.zeros(1)), "too few queries"),
    (lambda: bootstrap_difference({0: np.zeros(5)}, {1: np.zeros(5), 2: np.zeros(5)}), "too few seeds"),
    (lambda: bootstrap_difference(np.zeros((2, 5)), np.zeros((3, 5))), "paired by row"),
    (lambda: bootstrap_difference(np.zeros(5), np.zeros((2, 5))), "same kind"),
    (lambda: bootstrap_difference(np.zeros(5), np.zeros(5), level=95), "level"),
    (lambda: spearman_difference(np.arange(5.0), np.arange(5.0), np.arange(6.0)), "length mismatch"),
    (lambda: spearman_difference(np.arange(5.0), np.arange(5.0), np.ones(5)), "labels are constant"),
    (lambda: per_query([0, 1], "R1"), ">= 1"),
    (lambda: per_query([1, 2], "MdR"), "unknown per-query metric"),
    (lambda: r1_half_width(200, 1.5), "discordance"),
    (lambda: r1_half_width(200, 0.2, deff=0.0), "deff"),
    (lambda: min_detectable_difference(200, 0.2, power=80), "power"),
    (lambda: bootstrap_difference(np.zeros(4), np.ones(4), clusters=[0, 0, 1]), r"clusters must be \(Q,\) = \(4,\)"),
    (lambda: bootstrap_difference(np.zeros(4), np.ones(4), clusters=[0.0, 0, 1, 1]), "clusters must be integers"),
    (lambda: bootstrap_difference(np.zeros(4), np.ones(4), clusters=[3, 3, 3, 3]), "too few videos"),
    (lambda: design_effect(np.zeros(4), np.ones(4), [0, 0, 1, 1]), "no variance"),
    (lambda: design_effect(np.zeros(4), np.ones(5), [0, 0, 1, 1]), "same number"),
])
def test_bad_input_is_refused_by_name(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_verdict_refuses_a_negative_delta():
    ci = bootstrap_difference(np.zeros(5), np.ones(5), n_resamples=10)
    with pytest.raises(ValueError, match="delta"):
        verdict(ci, -1.0, higher_is_better=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_verdict_table_orients_every_row_so_that_positive_means_b_is_better(dtype):
    g = np.random.default_rng(14)
    a = g.integers(1, 6, 300).astype(dtype)
    b = np.where(g.random(300) < 0.3, 1.0, a).astype(dtype)  # b ranks 30% of the queries first
    r1 = verdict(compare_ranks(a, b, "R1", n_resamples=2000), 5.0, higher_is_better=True)
    rank = verdict(compare_ranks(a, b, "rank", clusters=np.arange(300) // 2, n_resamples=2000), 0.5,
                   higher_is_better=False)
    table = stats.verdict_table([
        {"claim": "b beats a", "comparison": "a -> b", "metric": "R@1", "verdict": r1, "scored": "300 queries"},
        {"claim": "b ranks higher", "comparison": "a -> b", "metric": "mean rank", "verdict": rank}])
    assert list(table.columns[:len(stats.VERDICT_COLUMNS)]) == list(stats.VERDICT_COLUMNS)
    naive_r1 = 100 * (np.mean(b == 1) - np.mean(a == 1))  # the R@1 gain on the observed queries
    naive_rank = np.mean(a.astype(np.float64)) - np.mean(b.astype(np.float64))  # mean rank fell by this much
    assert table.loc[0, "estimate"] == pytest.approx(naive_r1)
    assert table.loc[1, "estimate"] == pytest.approx(naive_rank) and naive_rank > 0
    assert (table.loc[1, "ci_low"], table.loc[1, "ci_high"]) == (-rank.interval.high, -rank.interval.low)
    assert table.loc[0, "95% CI"] == f"[{r1.interval.low:+.3g}, {r1.interval.high:+.3g}]"
    assert table["verdict"].tolist() == [r1.outcome, rank.outcome] == [HOLDS, HOLDS]
    assert table["paper's effect"].tolist() == [5.0, 0.5]
    assert table["scored"].tolist() == ["300 queries", ""]
    assert table["n_items"].tolist() == [300, 300] and table["seeds"].tolist() == ["1/1", "1/1"]
    assert table["n_clusters"].tolist() == [None, 150]


@pytest.mark.parametrize("row, message", [
    ({"claim": "c", "comparison": "a -> b", "metric": "R@1"}, r"lacks \['verdict'\]"),
    ({"claim": "c", "comparison": "a -> b", "metric": "R@1", "verdict": "holds"}, "must be a stats.Verdict"),
    ({"claim": "c", "comparison": "a -> b", "metric": "R@1",
      "verdict": verdict(bootstrap_difference(np.zeros(5), np.ones(5), n_resamples=10, level=0.9), 1.0,
                         higher_is_better=True)}, "95% CIs"),
])
def test_verdict_table_refuses_a_bad_row_by_name(row, message):
    with pytest.raises(ValueError, match=message):
        stats.verdict_table([row])
