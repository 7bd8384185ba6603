"""vidret_lib.tables: results files as a tidy DataFrame, per-query ranks for vidret_lib.stats."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from vidret_lib import stats
from vidret_lib.experiment import summarize
from vidret_lib.metrics import summarize_ranks
from vidret_lib.results import read_results, write_results
from vidret_lib.tables import (QUERY_VIEWS, pair_scores, query_clusters, query_ranks, results_frame, stat,
                               summary_frame, scored_on, val_curves, verdicts_frame, write_verdicts)

COMMITTED = Path(__file__).resolve().parents[1] / "results"
EVALS, CHECKPOINTS, DIRECTIONS = ("plain", "dsl"), ("selected", "last"), {"t2v": 30, "v2t": 10}
METRICS = ("R1", "R5", "R10", "MdR", "MnR")


def _variant_metrics(seed_offset: int, seeds=(0, 1, 2)) -> dict:
    """A run_variant-shaped ``metrics``: per seed, evaluation, checkpoint and direction, ranks + their summary."""
    runs = []
    for seed in seeds:
        g = np.random.default_rng(100 * seed_offset + seed)
        test = {e: {w: {d: {**summarize_ranks(r), "ranks": r.tolist()}
                        for d, n in DIRECTIONS.items() for r in [g.integers(1, 8, n).astype(float)]}
                    for w in CHECKPOINTS} for e in EVALS}
        runs.append({"seed": seed, "chosen_epoch": 3, "history": [], "test": test})
    summary = {e: {w: summarize([r["test"][e][w] for r in runs]) for w in CHECKPOINTS} for e in EVALS}
    return {"runs": runs, "summary": summary,
            "test_set": {"n_test_queries": 30, "n_test_videos": 10, "excluded_videos": {"v7": "no frames"}}}


@pytest.fixture
def results_dir(tmp_path):
    write_results(tmp_path / "02_vsepp" / "SH.json", "SH", _variant_metrics(0), {"loss": "vsepp", "margin": 0.2},
                  seed=[0, 1, 2], protocol={"select": "val", "identity": {"seeds": [0, 1, 2], "data_key": "d1"}})
    write_results(tmp_path / "02_vsepp" / "MH.json", "MH", _variant_metrics(1), {"loss": "vsepp", "margin": 0.2},
                  seed=[0, 1, 2], protocol={"select": "val"})
    cikm = {"runs": [{"seed": s, "val": (0.5, 0.51)[s], "test": (0.4, 0.41)[s], "history": [],
                      "test_scores": [0.1 * s, 0.2, 0.3]} for s in (0, 1)], "summary": {}}
    write_results(tmp_path / "06_cikm_lbpc" / "mse.json", "mse", cikm, {"loss": "mse"}, seed=[0, 1],
                  protocol={"select": "last"})
    write_results(tmp_path / "00_data" / "stats.json", "stats", {"splits": {"test": 200}}, {}, seed=0)
    return tmp_path


def test_results_frame_has_one_row_per_value_of_the_json_files(results_dir):
    df = results_frame(results_dir)
    assert df.attrs["skipped"] == {"00_data/stats.json": "no per-seed runs in metrics (not a training record)"}
    variants = df[df.notebook == "02_vsepp"]
    assert len(variants) == 2 * 3 * len(EVALS) * len(CHECKPOINTS) * len(DIRECTIONS) * len(METRICS)
    assert not variants.duplicated(["variant", "seed", "checkpoint", "evaluation", "split", "direction", "metric"]).any()
    for name in ("SH", "MH"):
        record = read_results(results_dir / "02_vsepp" / f"{name}.json")
        for run in record["metrics"]["runs"]:
            for e in EVALS:
                for w in CHECKPOINTS:
                    for d, n in DIRECTIONS.items():
                        rows = variants.query("variant == @name and seed == @run['seed'] and evaluation == @e "
                                              "and checkpoint == @w and direction == @d").set_index("metric")
                        assert rows["value"].to_dict() == {m: run["test"][e][w][d][m] for m in METRICS}
                        assert (rows["n_queries"] == n).all()
    row = variants.iloc[0]
    assert (row["file"], row["config.margin"], row["protocol.select"]) == ("02_vsepp/MH.json", 0.2, "val")
    assert (row["n_test_videos"], row["n_excluded_videos"]) == (10, 1)
    assert df[df.variant == "SH"]["protocol.identity.seeds"].iloc[0] == (0, 1, 2), "lists become hashable tuples"
    cikm = df[df.notebook == "06_cikm_lbpc"].set_index(["seed", "split"])["value"].to_dict()
    assert cikm == {(0, "val"): 0.5, (0, "test"): 0.4, (1, "val"): 0.51, (1, "test"): 0.41}


def test_summary_frame_reproduces_the_records_summaries(results_dir):
    summary = summary_frame(results_frame(results_dir)).query("notebook == '02_vsepp'")
    for name in ("SH", "MH"):
        record = read_results(results_dir / "02_vsepp" / f"{name}.json")
        for row in summary.query("variant == @name").itertuples():
            want = record["metrics"]["summary"][row.evaluation][row.checkpoint][f"{row.direction}_{row.metric}"]
            assert (row.mean, row.std, row.n) == (pytest.approx(want["mean"]), pytest.approx(want["std"]), want["n"])


def test_query_ranks_feed_stats_and_agree_with_the_summary(results_dir):
    sh, mh = (query_ranks(results_dir / "02_vsepp" / f"{n}.json", "dsl", "last", "v2t") for n in ("SH", "MH"))
    record = read_results(results_dir / "02_vsepp" / "SH.json")
    assert sorted(sh) == [0, 1, 2]
    np.testing.assert_array_equal(sh[1], record["metrics"]["runs"][1]["test"]["dsl"]["last"]["v2t"]["ranks"])
    ci = stats.compare_ranks(sh, mh, "R1", n_resamples=500)
    mean = {n: read_results(results_dir / "02_vsepp" / f"{n}.json")["metrics"]["summary"]["dsl"]["last"]["v2t_R1"]["mean"]
            for n in ("SH", "MH")}
    assert ci.paired_seeds and ci.estimate == pytest.approx(mean["MH"] - mean["SH"])
    assert pair_scores(results_dir / "06_cikm_lbpc" / "mse.json")[0].tolist() == [0.0, 0.2, 0.3]


def test_query_ranks_say_what_is_missing(results_dir):
    record = read_results(results_dir / "02_vsepp" / "SH.json")
    with pytest.raises(ValueError, match=r"no evaluation 'qb_norm'.*valid: \['dsl', 'plain'\]"):
        query_ranks(record, "qb_norm")
    for run in record["metrics"]["runs"]:
        del run["test"]["plain"]["selected"]["t2v"]["ranks"]
    with pytest.raises(ValueError, match="no per-query ranks.*re-run its notebook"):
        query_ranks(record)
    with pytest.raises(ValueError, match="not a run_variant record"):
        query_ranks(results_dir / "06_cikm_lbpc" / "mse.json")
    with pytest.raises(ValueError, match="test_scores"):
        pair_scores(record)
    with pytest.raises(FileNotFoundError, match="make reproduce"):
        results_frame(results_dir / "absent")


@pytest.mark.skipif(not COMMITTED.is_dir(), reason="no committed results/ folder in this checkout")
def test_committed_results_read_back_to_their_own_summaries():
    df = results_frame(COMMITTED, queries=QUERY_VIEWS)
    assert set(df.notebook) >= {"01_clip4clip", "06_cikm_lbpc"}
    files = df.groupby(["notebook", "variant"])["file"].first()
    summaries = {key: read_results(COMMITTED / f)["metrics"]["summary"] for key, f in files.items()}
    checked = 0
    summary = summary_frame(df)
    assert set(summary[summary.queries == "first_per_video"].direction) <= {"t2v"}
    for row in summary[summary.queries == "all"].itertuples():
        summary = summaries[row.notebook, row.variant]
        if row.direction == "pairs":
            want = summary[row.split]
        else:
            want = summary[row.evaluation][row.checkpoint][f"{row.direction}_{row.metric}"]
        assert (row.mean, row.std, row.n) == (pytest.approx(want["mean"]), pytest.approx(want["std"], abs=1e-9), want["n"])
        checked += 1
    assert checked > 100


# 10 test videos of 3 captions each, rows not grouped by video: the first caption of video v is its first row
CAPTION_VIDEO = np.random.default_rng(5).permutation(np.repeat(np.arange(10), 3))


def _first_rows(caption_video) -> list[int]:
    """Naive: walk the rows, keep a row whose video was not seen yet."""
    seen, rows = set(), []
    for i, v in enumerate(caption_video):
        if v not in seen:
            seen.add(v)
            rows.append(i)
    return rows


def _with_videos(results_dir: Path, name: str, caption_video=CAPTION_VIDEO, **split_size) -> Path:
    """A copy of 02_vsepp/<name> whose test_set says each query's video (and the split's size, if given)."""
    record = read_results(results_dir / "02_vsepp" / f"{name}.json")
    record["metrics"]["test_set"].update(caption_video=caption_video.tolist(), **split_size)
    path = results_dir / "views" / f"{name}.json"
    write_results(path, name, record["metrics"], record["config"], seed=[0, 1, 2], protocol=record["protocol"])
    return path


def test_query_clusters_and_the_first_caption_per_video_view(results_dir):
    sh, mh = _with_videos(results_dir, "SH"), _with_videos(results_dir, "MH")
    first = _first_rows(CAPTION_VIDEO)
    np.testing.assert_array_equal(query_clusters(sh), CAPTION_VIDEO)
    np.testing.assert_array_equal(query_clusters(sh, queries="first_per_video"), CAPTION_VIDEO[first])
    assert sorted(query_clusters(sh, queries="first_per_video")) == list(range(10))
    np.testing.assert_array_equal(query_clusters(sh, "v2t"), np.arange(10))
    assert query_clusters(sh).dtype == np.int64
    runs = read_results(sh)["metrics"]["runs"]
    got = query_ranks(sh, "dsl", "last", queries="first_per_video")
    for run in runs:
        want = [run["test"]["dsl"]["last"]["t2v"]["ranks"][i] for i in first]
        np.testing.assert_array_equal(got[run["seed"]], want)
    ci = stats.compare_ranks(query_ranks(sh), query_ranks(mh), clusters=query_clusters(sh), n_resamples=300)
    assert (ci.n_items, ci.n_clusters) == (30, 10)


def test_query_views_say_what_is_missing(results_dir):
    sh = _with_videos(results_dir, "SH")
    with pytest.raises(ValueError, match="t2v view; v2t queries are videos"):
        query_ranks(sh, direction="v2t", queries="first_per_video")
    with pytest.raises(ValueError, match="t2v view"):
        query_clusters(sh, "v2t", queries="first_per_video")
    with pytest.raises(ValueError, match="unknown queries 'first'"):
        query_ranks(sh, queries="first")
    with pytest.raises(ValueError, match="unknown direction 'pairs'"):
        query_clusters(sh, "pairs")
    old = results_dir / "02_vsepp" / "SH.json"  # written before caption_video was stored
    with pytest.raises(ValueError, match="no metrics.test_set.caption_video.*re-run its notebook"):
        query_clusters(old)
    with pytest.raises(ValueError, match="no metrics.test_set.caption_video"):
        query_ranks(old, queries="first_per_video")
    with pytest.raises(ValueError, match="no metrics.test_set"):
        query_clusters(results_dir / "06_cikm_lbpc" / "mse.json")


def test_results_frame_reports_all_queries_and_the_first_caption_per_video(results_dir):
    _with_videos(results_dir, "SH", n_split_queries=30, n_split_videos=10)
    _with_videos(results_dir, "MH", caption_video=np.arange(10).repeat(3))  # rows grouped by video
    assert set(results_frame(results_dir, notebooks=["views"]).queries) == {"all"}, "one view unless asked"
    with pytest.raises(ValueError, match="queries must be a sequence of views"):
        results_frame(results_dir, queries="first_per_video")
    df = results_frame(results_dir, notebooks=["views"], queries=QUERY_VIEWS)
    n = 2 * 3 * len(EVALS) * len(CHECKPOINTS) * len(METRICS)  # records x seeds x evaluations x checkpoints x metrics
    assert df.groupby(["direction", "queries"]).size().to_dict() == {("t2v", "all"): n, ("t2v", "first_per_video"): n,
                                                                      ("v2t", "all"): n}
    first = _first_rows(CAPTION_VIDEO)
    record = read_results(results_dir / "views" / "SH.json")
    for run in record["metrics"]["runs"]:
        for e in EVALS:
            for w in CHECKPOINTS:
                rows = df.query("variant == 'SH' and seed == @run['seed'] and evaluation == @e and checkpoint == @w "
                                "and direction == 't2v' and queries == 'first_per_video'").set_index("metric")
                ranks = np.array(run["test"][e][w]["t2v"]["ranks"])[first]  # naive: R@K, median, mean by hand
                want = {"R1": 100 * np.mean(ranks <= 1), "R5": 100 * np.mean(ranks <= 5), "R10": 100 * np.mean(ranks <= 10),
                        "MdR": np.median(ranks), "MnR": np.mean(ranks)}
                assert rows["value"].to_dict() == pytest.approx(want)
                assert (rows["n_queries"] == 10).all()
    summary = summary_frame(df)
    r1 = [100 * np.mean(np.array(run["test"]["plain"]["selected"]["t2v"]["ranks"])[first] <= 1)
          for run in record["metrics"]["runs"]]
    assert stat(summary, "SH", queries="first_per_video") == pytest.approx({"mean": np.mean(r1), "std": np.std(r1), "n": 3})
    assert stat(summary, "SH") == pytest.approx(record["metrics"]["summary"]["plain"]["selected"]["t2v_R1"])
    mh = df[df.variant == "MH"]
    assert (mh[mh.queries == "first_per_video"]["n_queries"] == 10).all()
    sh = df[df.variant == "SH"].iloc[0]
    assert (sh["n_split_queries"], sh["n_split_videos"]) == (30, 10)
    assert np.isnan(mh.iloc[0]["n_split_queries"]), "a record without the split's size: NaN"


def test_scored_on_flags_an_incomplete_split(results_dir):
    complete = read_results(_with_videos(results_dir, "SH", n_split_queries=30, n_split_videos=10))
    complete["metrics"]["test_set"]["excluded_videos"] = {}
    assert scored_on(complete) == "30 test queries, 10 videos"
    assert scored_on(complete, "first_per_video") == "10 test queries (one caption per video), 10 videos"
    partial = {"name": "e2e", "metrics": {"test_set": {"n_test_queries": 8, "n_test_videos": 8, "excluded_videos": {},
                                                       "n_split_queries": 1000, "n_split_videos": 1000}}}
    assert scored_on(partial) == "8 of 1,000 test queries, 8 of 1,000 videos (992 excluded: incomplete split)"
    partial["metrics"]["test_set"].update(n_test_queries=16, n_split_queries=2000)
    assert scored_on(partial, "first_per_video") == ("8 of 1,000 test queries (one caption per video), 8 of 1,000 videos "
                                                     "(992 excluded: incomplete split)")
    unknown_captions = {"name": "x", "metrics": {"test_set": {"n_test_queries": 29, "n_test_videos": 9, "n_split_queries": None,
                                                              "n_split_videos": 10, "excluded_videos": {"v7": "no frames"}}}}
    assert scored_on(unknown_captions) == "29 test queries, 9 of 10 videos (1 excluded: incomplete split)"
    with pytest.raises(ValueError, match="unknown queries"):
        scored_on(complete, "one")


def test_write_verdicts_round_trips_and_rewrites_only_a_changed_table(tmp_path):
    ci = stats.compare_ranks(np.array([1.0, 2.0, 1.0, 3.0]), np.array([1.0, 1.0, 1.0, 2.0]), "R1", n_resamples=200)
    table = stats.verdict_table([{"claim": "b beats a", "comparison": "a -> b", "metric": "t2v R@1 (points)",
                                  "verdict": stats.verdict(ci, 1.4, higher_is_better=True), "scored": "4 test queries"}])
    path = tmp_path / "01_clip4clip" / "verdicts.json"
    write_verdicts(table, tmp_path, "01_clip4clip", [0])
    first = path.read_bytes()
    write_verdicts(table, tmp_path, "01_clip4clip", [0])
    assert path.read_bytes() == first, "an unchanged table must leave the file as it is"
    back = verdicts_frame(tmp_path)
    assert back["notebook"].tolist() == ["01_clip4clip"]
    pd.testing.assert_frame_equal(back.drop(columns="notebook"), table, check_dtype=False)
    assert results_frame(tmp_path).attrs["skipped"] == {"01_clip4clip/verdicts.json":
                                                         "no per-seed runs in metrics (not a training record)"}
    write_verdicts(table.assign(verdict="inconclusive"), tmp_path, "01_clip4clip", [0])
    assert verdicts_frame(tmp_path)["verdict"].tolist() == ["inconclusive"]
    with pytest.raises(ValueError, match=r"lacks columns \['claim'\]"):
        write_verdicts(table.drop(columns="claim"), tmp_path, "01_clip4clip", [0])
    assert verdicts_frame(tmp_path / "01_clip4clip").empty


def test_stat_val_curves_and_scored_on_read_the_records(results_dir):
    record = read_results(results_dir / "02_vsepp" / "SH.json")
    summary = summary_frame(results_frame(results_dir, notebooks=["02_vsepp"]))
    assert set(summary.notebook) == {"02_vsepp"}
    assert stat(summary, "SH", "v2t_MnR", "dsl", "last") == pytest.approx(record["metrics"]["summary"]["dsl"]["last"]["v2t_MnR"])
    cikm = summary_frame(results_frame(results_dir))
    assert stat(cikm, "mse", "pairs_spearman", checkpoint="last", split="val") == pytest.approx(
        {"mean": 0.505, "std": 0.005, "n": 2})
    with pytest.raises(ValueError, match="0 summary rows.*'nope'"):
        stat(summary, "nope")
    assert scored_on(record) == "30 test queries, 10 videos (1 excluded)"
    assert scored_on(results_dir / "06_cikm_lbpc" / "mse.json") == "3 test pairs"
    for seed, run in enumerate(record["metrics"]["runs"]):
        run["history"] = [{"epoch": e, "loss": 0.0, "val": {"t2v": {"R1": 10.0 * seed + e}}} for e in (1, 2)]
    np.testing.assert_array_equal(val_curves(record), [[1, 2], [11, 12], [21, 22]])
    record["metrics"]["runs"][1]["history"][0]["val"] = {}
    with pytest.raises(ValueError, match="seed 1 has no val metric"):
        val_curves(record)
