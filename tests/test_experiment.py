"""run_variant / load_or_run: results are reused only when what produced them is unchanged."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from vidret_lib import experiment
from vidret_lib.datasets import Split
from vidret_lib.experiment import ledger_path, load_or_run, run_variant, scored_counts, source_id, table
from vidret_lib.results import read_results
from vidret_lib.train import FeatureSplit, TrainConfig, evaluate, train


def _split(seed: int, videos: int = 12, captions_per_video: int = 2, dim: int = 8) -> FeatureSplit:
    g = np.random.default_rng(seed)
    video = g.standard_normal((videos, 4, dim)).astype(np.float32)
    caption_video = np.repeat(np.arange(videos), captions_per_video)
    text = video.mean(1)[caption_video] + 0.5 * g.standard_normal((len(caption_video), dim)).astype(np.float32)
    return FeatureSplit(text, video, np.ones((videos, 4), bool), caption_video)


@pytest.fixture
def splits():
    return _split(0), _split(1), _split(2)


@pytest.fixture
def counted_train(monkeypatch):
    calls = []

    def counting(config, *args, **kwargs):
        calls.append(config.seed)
        return train(config, *args, **kwargs)

    monkeypatch.setattr(experiment, "train", counting)
    return calls


CONFIG = TrainConfig(loss="infonce", head="meanP", lr=1e-3, epochs=2, batch_size=4)


def test_run_variant_trains_each_seed_and_reuses_the_record(tmp_path, splits, counted_train):
    tr, va, te = splits
    first = run_variant("v", CONFIG, [0, 1], tr, va, te, str(tmp_path), "nb", "data-a")
    assert counted_train == [0, 1]
    again = run_variant("v", CONFIG, [0, 1], tr, va, te, str(tmp_path), "nb", "data-a")
    assert counted_train == [0, 1], "an unchanged variant must be loaded, not retrained"
    assert again["metrics"] == first["metrics"]
    # the recorded test metrics are those of the seed's val-selected model
    result = train(dataclasses.replace(CONFIG, seed=1), tr, va)
    assert first["metrics"]["runs"][1]["test"]["plain"]["selected"] == evaluate(result.model, te, with_ranks=True)
    assert first["metrics"]["runs"][1]["test"]["plain"]["last"] == evaluate(result.model_at("last"), te, with_ranks=True)
    r1 = [r["test"]["plain"]["selected"]["t2v"]["R1"] for r in first["metrics"]["runs"]]
    assert first["metrics"]["summary"]["plain"]["selected"]["t2v_R1"]["mean"] == pytest.approx(np.mean(r1))
    assert first["metrics"]["summary"]["plain"]["selected"]["t2v_R1"]["std"] == pytest.approx(np.std(r1))


def test_run_variant_records_per_query_ranks_and_the_test_set_counts(tmp_path, splits, counted_train):
    tr, va, te = splits
    te.excluded = {"video9": "decode error: moov atom not found"}  # a video the split dropped (FeatureSplit.excluded)
    evals = {"plain": {}, "dsl": {"rerank": "dsl"}}
    rec = run_variant("v", CONFIG, [0, 1], tr, va, te, str(tmp_path), "nb", "data-a", evals=evals)
    m = rec["metrics"]
    for run in m["runs"]:
        for e in evals:
            for which in ("selected", "last"):
                for direction, n in (("t2v", te.num_texts), ("v2t", te.num_videos)):
                    got = run["test"][e][which][direction]
                    assert len(got["ranks"]) == got["n_queries"] == n
                    assert 100 * np.mean(np.array(got["ranks"]) <= 1) == pytest.approx(got["R1"])
    assert all("ranks" not in key for s in m["summary"].values() for w in s.values() for key in w)
    # without the full split, its size is what was scored plus the excluded videos (their captions are not known)
    assert m["test_set"] == {"n_test_queries": 24, "n_test_videos": 12, "excluded_videos": dict(te.excluded),
                             "caption_video": te.caption_video.tolist(), "n_split_queries": None, "n_split_videos": 13}
    assert table([rec], ["t2v_R1"]).splitlines()[-1].endswith("| 24 | 12 of 13 (1 excluded: incomplete split) |")


def test_run_variant_records_the_full_split_size_and_each_querys_video(tmp_path, splits, counted_train):
    tr, va, te = splits
    te = dataclasses.replace(te, video_ids=tuple(f"t{i}" for i in range(12)))
    # the dataset's split: 20 videos, 2 captions each; 8 videos (not on disk) never reached the features
    full = Split("test", [f"caption {i}" for i in range(40)], [f"t{i // 2}" for i in range(40)])
    rec = run_variant("v", CONFIG, [0], tr, va, te, str(tmp_path), "nb", "data-a", full_test_split=full)
    ts = rec["metrics"]["test_set"]
    assert (ts["n_split_queries"], ts["n_split_videos"]) == (40, 20)
    want = [v for v in range(12) for _ in range(2)]  # naive: caption i of _split describes video i // 2
    assert ts["caption_video"] == want
    assert scored_counts(ts) == ("24 of 40", "12 of 20", " (8 excluded: incomplete split)")
    assert table([rec], ["t2v_R1"]).splitlines()[-1].endswith("| 24 of 40 | 12 of 20 (8 excluded: incomplete split) |")
    complete = Split("test", [f"caption {i}" for i in range(24)], [f"t{i // 2}" for i in range(24)])
    rec = run_variant("v", CONFIG, [0], tr, va, te, str(tmp_path), "nb", "data-a", full_test_split=complete)
    assert counted_train == [0], "another split size rewrites the record from the kept seed runs"
    assert scored_counts(rec["metrics"]["test_set"]) == ("24", "12", "")
    assert table([rec], ["t2v_R1"]).splitlines()[-1].endswith("| 24 | 12 |")
    other = Split("val", ["x", "y"], ["v0", "t3"])
    with pytest.raises(ValueError, match=r"full_test_split 'val' lacks 11 scored test videos.*pass the split"):
        run_variant("v", CONFIG, [0], tr, va, te, str(tmp_path), "nb", "data-a", full_test_split=other)


def test_scored_counts_of_records_written_before_the_split_size_was_stored():
    old = {"n_test_queries": 1200, "n_test_videos": 600, "excluded_videos": {"v9": "decode error"}}
    assert scored_counts(old) == ("1,200", "600", " (1 excluded)")
    assert scored_counts({**old, "excluded_videos": {}}) == ("1,200", "600", "")


def test_run_variant_refuses_overlapping_train_and_test_splits(tmp_path, splits, counted_train):
    tr, va, te = splits
    ids = tuple(f"video{i}" for i in range(12))
    tr = dataclasses.replace(tr, video_ids=ids)
    te = dataclasses.replace(te, video_ids=ids[9:] + tuple(f"test{i}" for i in range(9)))  # 3 shared
    with pytest.raises(ValueError, match=r"train.*test.*3"):
        run_variant("v", CONFIG, [0], tr, va, te, str(tmp_path), "nb", "data-a")
    assert counted_train == [], "the check runs before any training"
    with pytest.warns(UserWarning):  # the named override trains, and says so
        run_variant("v", dataclasses.replace(CONFIG, allow_split_overlap=True), [0], tr, va, te, str(tmp_path),
                    "nb", "data-a")
    assert counted_train == [0]


CHANGES = {
    "config": {"config": dataclasses.replace(CONFIG, lr=2e-3)},
    "seeds": {"seeds": [1]},
    "data_key": {"data_key": "data-b"},
    "evals": {"evals": {"plain": {}, "dsl": {"rerank": "dsl"}}},
    "eval_arguments": {"evals": {"plain": {"rerank": "dsl", "dsl_temp": 0.5}}},  # same name, other arguments
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_run_variant_retrains_when_what_produced_it_changes(tmp_path, splits, counted_train, change):
    tr, va, te = splits
    kwargs = {"config": CONFIG, "seeds": [0], "data_key": "data-a", "evals": None}
    run_variant("v", kwargs["config"], kwargs["seeds"], tr, va, te, str(tmp_path), "nb", kwargs["data_key"])
    kwargs.update(CHANGES[change])
    run_variant("v", kwargs["config"], kwargs["seeds"], tr, va, te, str(tmp_path), "nb", kwargs["data_key"],
                evals=kwargs["evals"])
    assert len(counted_train) == 2


def test_run_variant_analyses_see_the_trained_models(tmp_path, splits, counted_train):
    tr, va, te = splits

    def r1(model):
        return {"r1": evaluate(model, te)["t2v"]["R1"]}

    rec = run_variant("v", CONFIG, [0], tr, va, te, str(tmp_path), "nb", "data-a", analyses={"r1": r1})
    run = rec["metrics"]["runs"][0]
    for which in ("selected", "last"):
        assert run["analyses"]["r1"][which]["r1"] == run["test"]["plain"][which]["t2v"]["R1"]
    assert counted_train == [0]
    run_variant("v", CONFIG, [0], tr, va, te, str(tmp_path), "nb", "data-a", analyses={"r1": r1})
    assert counted_train == [0], "same analysis source: the record is reused"

    def r1(model):  # noqa: F811 -- an edited analysis
        return {"r1": evaluate(model, te)["t2v"]["R1"], "v2t": evaluate(model, te)["v2t"]["R1"]}

    rec = run_variant("v", CONFIG, [0], tr, va, te, str(tmp_path), "nb", "data-a", analyses={"r1": r1})
    assert counted_train == [0, 0], "an edited analysis recomputes the record"
    assert "v2t" in rec["metrics"]["runs"][0]["analyses"]["r1"]["selected"]


def test_load_or_run_computes_once_and_checks_the_library(tmp_path, monkeypatch):
    calls = []

    def compute():
        calls.append(1)
        return {"x": len(calls)}

    args = (tmp_path, "nb", "rec", {"a": (1, 2)}, {"seeds": [0]}, compute)
    first = load_or_run(*args, seed=[0])
    assert first["metrics"] == {"x": 1} and first["config"] == {"a": [1, 2]}
    assert load_or_run(*args, seed=[0])["metrics"] == {"x": 1}, "tuple vs list must not defeat the reuse"
    assert load_or_run(tmp_path, "nb", "rec", {"a": (1, 3)}, {"seeds": [0]}, compute, seed=[0])["metrics"] == {"x": 2}
    path = tmp_path / "nb" / "rec.json"
    ledger_path(path).unlink()  # as in a fresh clone: the record arrived with git, this checkout did not write it
    assert load_or_run(tmp_path, "nb", "rec", {"a": (1, 3)}, {"seeds": [0]}, compute, seed=[0])["metrics"] == {"x": 3}
    path.write_text(path.read_text().replace('"x": 3', '"x": 99'))  # edited by hand: not what this checkout wrote
    assert load_or_run(tmp_path, "nb", "rec", {"a": (1, 3)}, {"seeds": [0]}, compute, seed=[0])["metrics"] == {"x": 4}
    monkeypatch.setattr(experiment, "library_hash", lambda: "other-code")
    assert load_or_run(tmp_path, "nb", "rec", {"a": (1, 3)}, {"seeds": [0]}, compute, seed=[0])["metrics"] == {"x": 5}
    assert read_results(path)["protocol"]["identity"]["library"] == "other-code"


def _helper(x):
    return x * 2


def _uses_helper(x):
    return [_helper(v) for v in x]


def test_source_id_follows_helpers_defined_beside_it(monkeypatch):
    before = source_id(_uses_helper)

    def _edited_helper(x):
        return x * 3

    monkeypatch.setitem(globals(), "_helper", _edited_helper)
    assert source_id(_uses_helper) != before, "editing a helper (called inside a comprehension) must change the id"


def test_source_id_changes_with_the_source():
    def f(x):
        return x + 1

    def g(x):
        return x + 2

    assert source_id(f) != source_id(g)
    assert source_id(f) == source_id(f)


def test_a_changed_prior_split_is_a_changed_evaluation(tmp_path, splits, counted_train):
    tr, va, te = splits
    for prior in (tr, tr, va):
        run_variant("v", CONFIG, [0], tr, va, te, str(tmp_path), "nb", "data-a",
                    evals={"qb": {"rerank": "qb_norm", "prior": prior}})
    assert counted_train == [0, 0], "the same prior reuses the record, another prior recomputes it"


def test_a_run_killed_at_one_seed_keeps_the_seeds_before_it(tmp_path, splits, monkeypatch):
    tr, va, te = splits
    calls = []

    def dies_at_seed_1(config, *args, **kwargs):
        calls.append(config.seed)
        if config.seed == 1:
            raise KeyboardInterrupt("killed")
        return train(config, *args, **kwargs)

    monkeypatch.setattr(experiment, "train", dies_at_seed_1)
    with pytest.raises(KeyboardInterrupt):
        run_variant("v", CONFIG, [0, 1], tr, va, te, str(tmp_path), "nb", "data-a")
    assert not (tmp_path / "nb" / "v.json").exists(), "no record of a variant whose seeds did not all finish"

    def counting(config, *args, **kwargs):
        calls.append(config.seed)
        return train(config, *args, **kwargs)

    monkeypatch.setattr(experiment, "train", counting)
    rec = run_variant("v", CONFIG, [0, 1], tr, va, te, str(tmp_path), "nb", "data-a")
    assert calls == [0, 1, 1], "the rerun trains only the seed that did not finish"
    assert [r["seed"] for r in rec["metrics"]["runs"]] == [0, 1]
    run_variant("v", CONFIG, [0, 1, 2], tr, va, te, str(tmp_path), "nb", "data-a")
    assert calls == [0, 1, 1, 2], "adding a seed to the list trains only that seed"


@pytest.mark.parametrize("select", ["val", "last"])
def test_run_variant_scores_the_last_epoch_once_when_it_is_the_selected_one(tmp_path, splits, monkeypatch, select):
    tr, va, te = splits
    config = dataclasses.replace(CONFIG, select=select, epochs=3)
    scored = []

    def counting(model, split, **kwargs):
        scored.append(id(split))
        return evaluate(model, split, **kwargs)

    monkeypatch.setattr(experiment, "evaluate", counting)
    analysed = []
    rec = run_variant("v", config, [0, 1], tr, va, te, str(tmp_path), "nb", "data-a",
                      analyses={"n": lambda model: analysed.append(1) or {"n": 1}})
    test_calls = sum(1 for s in scored if s == id(te))
    results = [train(dataclasses.replace(config, seed=s), tr, va) for s in (0, 1)]
    same = [r.chosen_epoch == config.epochs for r in results]
    assert test_calls == len(analysed) == sum(1 if s else 2 for s in same)  # one scoring per distinct checkpoint
    if select == "last":
        assert all(same)
    for run, result in zip(rec["metrics"]["runs"], results):  # what is recorded equals scoring each checkpoint
        assert run["test"]["plain"]["selected"] == evaluate(result.model, te, with_ranks=True)
        assert run["test"]["plain"]["last"] == evaluate(result.model_at("last"), te, with_ranks=True)
