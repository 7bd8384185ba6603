"""pipeline: the start switch of DataConfig, applied by split_features and named in data_key."""
import types

import pytest
import torch

from vidret_lib import pipeline
from vidret_lib.datasets import write_dataset
from vidret_lib.pipeline import DataConfig
from vidret_lib.pretrain import PretrainConfig, StartCheckpoint, apply_start, start_key
from vidret_lib.train import FeatureSplit

DEFAULT = types.SimpleNamespace(name="default", cache_id="default-96px-x", image_size=32)
OPEN_CLIP = types.SimpleNamespace(name="ViT-B-32-quickgelu", cache_id="vit-x", image_size=32)


def test_data_config_keeps_its_positional_form_and_checks_start():
    cfg = DataConfig("shapemotion-smoke", "d", "c", "", 12)
    assert (cfg.dataset, cfg.max_frames, cfg.start) == ("shapemotion-smoke", 12, "pretrained")
    assert DataConfig(start="random_projection").start == "random_projection"
    with pytest.raises(ValueError, match=r"unknown start 'clip'.*\('pretrained', 'random_projection'\)"):
        DataConfig(start="clip")


def test_start_config_per_encoder_and_dataset():
    assert pipeline.start_config(DataConfig(), DEFAULT) == PretrainConfig()
    assert pipeline.start_config(DataConfig("shapemotion-smoke"), DEFAULT) == pipeline.SMOKE_PRETRAIN
    assert pipeline.start_config(DataConfig(start="random_projection"), DEFAULT) is None
    assert pipeline.start_config(DataConfig(), OPEN_CLIP) is None  # its own weights: nothing applied
    with pytest.raises(ValueError, match="'random_projection' applies to the offline default encoder only"):
        pipeline.start_config(DataConfig(start="random_projection"), OPEN_CLIP)


@pytest.fixture
def stubbed(tmp_path, monkeypatch):
    """A 3-video dataset whose caches are stand-ins, and a fixed start (no training)."""
    videos = [{"video_id": v, "path": f"{v}.mp4", "title": f"title {v}" if v != "b" else None} for v in "abc"]
    rows = [{"video_id": v, "sentence": f"{v} caption {k}"} for v in "abc" for k in range(2)]
    ds = write_dataset(tmp_path / "ds", {"name": "t"}, videos, {"train": rows})
    monkeypatch.setattr(pipeline, "frame_cache", lambda *a, **k: types.SimpleNamespace(failed={}))
    g = torch.Generator().manual_seed(0)
    video, text = torch.randn(3, 2, 4, generator=g), torch.randn(9, 4, generator=g)
    monkeypatch.setattr(pipeline, "video_features", lambda *a: (video, torch.ones(3, 2, dtype=torch.bool)))
    monkeypatch.setattr(pipeline, "text_features", lambda enc, sentences, cache: text[:len(sentences)])
    start = StartCheckpoint(torch.randn(4, 4, generator=g), torch.randn(4, 4, generator=g), "start-k")
    calls = []
    monkeypatch.setattr(pipeline, "pretrain_start", lambda enc, cache, config: calls.append(config) or start)
    return ds, start, calls, tmp_path


def test_split_features_applies_the_start(stubbed):
    ds, start, calls, tmp_path = stubbed
    raw = pipeline.split_features(DataConfig(cache_dir=str(tmp_path), start="random_projection"), ds, "train", DEFAULT)
    assert calls == []
    mapped = pipeline.split_features(DataConfig(cache_dir=str(tmp_path)), ds, "train", DEFAULT)
    assert calls == [PretrainConfig()]
    want = apply_start(raw, start)
    for name in ("text", "video", "title", "mask", "title_present", "caption_video"):
        assert torch.equal(getattr(mapped, name), getattr(want, name)), name
    assert not torch.equal(mapped.text, raw.text) and not mapped.title[1].any()  # a missing title stays zero
    assert mapped.video_ids == raw.video_ids == ("a", "b", "c")
    own = pipeline.split_features(DataConfig(cache_dir=str(tmp_path)), ds, "train", OPEN_CLIP)
    assert torch.equal(own.text, raw.text) and len(calls) == 1  # an open_clip encoder keeps its weights


def test_data_key_names_the_start(stubbed):
    ds = stubbed[0]
    keys = {start: pipeline.data_key(DataConfig(start=start), ds, DEFAULT, "train") for start in pipeline.STARTS}
    assert keys["pretrained"] != keys["random_projection"]
    smoke = pipeline.data_key(DataConfig("shapemotion-smoke"), ds, DEFAULT, "train")
    assert smoke != keys["pretrained"]  # another pretraining config, another start key
    assert start_key(DEFAULT, PretrainConfig()) != start_key(DEFAULT, pipeline.SMOKE_PRETRAIN)


def test_a_shapemotion_dataset_of_another_generator_is_regenerated_not_reused(tmp_path, capsys):
    from data_prep.synthetic import PRESETS, content_hash
    from vidret_lib.cache import load_json, save_json
    cfg = pipeline.DataConfig("shapemotion-smoke", str(tmp_path), str(tmp_path / "cache"))
    ds = pipeline.prepare_dataset(cfg)
    info = load_json(ds.root / "dataset.json")
    save_json(ds.root / "dataset.json", {**info, "content_hash": "stale", "version": "0"})  # an older generator's
    again = pipeline.prepare_dataset(cfg)
    assert "regenerating" in capsys.readouterr().out
    assert again.info["content_hash"] == content_hash(PRESETS["smoke"], 0)


def test_twin_queries_pairs_each_caption_with_its_videos_twin_when_present(tmp_path):
    # a <-> b and c <-> d are time-reversed twins; d is in the split but not in the features (undecodable)
    twins = {"a": "b", "b": "a", "c": "d", "d": "c", "e": None}
    videos = [{"video_id": v, "path": f"{v}.mp4", "twin": t} for v, t in twins.items()]
    rows = [{"video_id": v, "sentence": f"{v} caption {k}"} for v in "abcde" for k in range(2)]
    ds = write_dataset(tmp_path / "ds", {"name": "t"}, videos, {"test": rows})
    kept = ("a", "b", "c", "e")  # d left out, with its captions
    caption_video = torch.tensor([kept.index(r["video_id"]) for r in rows if r["video_id"] in kept])
    fs = FeatureSplit(torch.zeros(8, 4), torch.zeros(4, 2, 4), torch.ones(4, 2, dtype=torch.bool), caption_video,
                      video_ids=kept)
    twin_q, twin_of = pipeline.twin_queries(ds, "test", fs)
    # naive: every caption row whose video's twin is among the kept videos, and that twin's index
    want = [(i, kept.index(twins[kept[v]])) for i, v in enumerate(caption_video.tolist()) if twins[kept[v]] in kept]
    assert list(zip(twin_q.tolist(), twin_of.tolist())) == want == [(0, 1), (1, 1), (2, 0), (3, 0)]
    assert twin_q.dtype == twin_of.dtype == torch.long
    no_twins = FeatureSplit(torch.zeros(2, 4), torch.zeros(1, 2, 4), torch.ones(1, 2, dtype=torch.bool),
                            torch.tensor([0, 0]), video_ids=("e",))
    assert [t.tolist() for t in pipeline.twin_queries(ds, "test", no_twins)] == [[], []]
