"""The frame cache: keyed, atomic, resumable; bad videos recorded, masked and retried."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_frames import write_clip  # tests/ is on sys.path (pytest's default import mode)

import vidret_lib.frame_cache as fc
from vidret_lib.cache import load_npz
from vidret_lib.datasets import write_dataset
from vidret_lib.frame_cache import frame_cache
from vidret_lib.frames import clip4clip_frame_indices, sample_clip, sample_frames

GOOD = ["g0", "g1", "g2", "g3"]
BAD = ["empty", "text", "truncated", "missing"]
PARAMS = dict(max_frames=4, size=16)


def make_dataset(root: Path, ids: list[str]):
    videos = root / "videos"
    videos.mkdir(parents=True)
    for i, vid in enumerate(v for v in ids if v.startswith("g")):
        write_clip(videos / f"{vid}.mp4", 20 + 15 * i, 10)  # 2 to 6.5 s
    if "empty" in ids:
        (videos / "empty.mp4").write_bytes(b"")
    if "text" in ids:
        (videos / "text.mp4").write_text("this is not a video\n" * 20)
    if "truncated" in ids:
        data = write_clip(root / "whole.mp4", 60, 10).read_bytes()
        (videos / "truncated.mp4").write_bytes(data[: len(data) // 2])
    records = [{"video_id": v, "path": f"videos/{v}.mp4", "title": None, "category": None} for v in ids]
    captions = [{"video_id": v, "sentence": f"caption of {v}"} for v in ids]
    return write_dataset(root, {"name": "frames-test", "version": "1"}, records, {"test": captions})


def count_decodes(monkeypatch, fail_after: int | None = None) -> list[str]:
    """Record the videos the cache decodes; optionally interrupt after ``fail_after`` of them."""
    decoded: list[str] = []

    def spy(path, *args):
        if fail_after is not None and len(decoded) == fail_after:
            raise KeyboardInterrupt
        decoded.append(Path(path).stem)
        return sample_clip(path, *args)

    monkeypatch.setattr(fc, "sample_clip", spy)
    return decoded


def test_frames_are_cached_under_a_key_of_their_parameters(tmp_path):
    ds = make_dataset(tmp_path / "ds", GOOD)
    cache = frame_cache(ds, GOOD, tmp_path / "cache", **PARAMS)
    assert cache.dir == tmp_path / "cache" / "frames" / cache.key and cache.failed == {}
    assert sorted(p.name for p in cache.dir.iterdir()) == [f"{v}.npz" for v in GOOD]
    for vid in GOOD:
        frames, mask = cache.load(vid)
        ref_frames, ref_mask = sample_frames(ds.video_path(vid), **PARAMS)
        np.testing.assert_array_equal(frames, ref_frames)
        np.testing.assert_array_equal(mask, ref_mask)
        assert load_npz(cache.path(vid))["indices"].tolist() == clip4clip_frame_indices(ds.video_path(vid), 4)
    frames, masks = cache.load_many()
    assert frames.shape == (4, 4, 16, 16, 3) and masks.shape == (4, 4)
    assert masks.sum(1).tolist() == [2, 4, 4, 4]  # g0 is 2 s long: frames 0 and 10
    other = frame_cache(ds, GOOD[:1], tmp_path / "cache", max_frames=4, size=24)
    assert other.key != cache.key
    with pytest.raises(KeyError, match="not in the frame cache"):
        other.load("g1")


def test_bad_videos_are_reported_masked_and_nothing_is_lost(tmp_path, monkeypatch):
    ids = GOOD[:2] + BAD + GOOD[2:]
    ds = make_dataset(tmp_path / "ds", ids)
    with pytest.warns(UserWarning, match="4 of 8 videos could not be decoded") as record:
        cache = frame_cache(ds, ids, tmp_path / "cache", **PARAMS)
    message = str(record[0].message)
    for vid in BAD:
        assert str(ds.video_path(vid)) in message
    assert set(cache.failed) == set(BAD)
    assert json.loads((cache.dir / "failures.json").read_text()) == cache.failed
    assert "does not exist" in cache.failed["missing"] and "empty" in cache.failed["empty"]
    frames, mask = cache.load("text")
    assert frames.shape == (4, 16, 16, 3) and not frames.any() and not mask.any()
    frames, masks = cache.load_many()
    assert masks.any(1).tolist() == [v.startswith("g") for v in ids]

    mtimes = {vid: cache.path(vid).stat().st_mtime_ns for vid in GOOD}
    decoded = count_decodes(monkeypatch)
    with pytest.warns(UserWarning, match="4 of 8"):
        again = frame_cache(ds, ids, tmp_path / "cache", **PARAMS)
    assert sorted(decoded) == sorted(BAD)  # only the failures are retried
    assert {vid: again.path(vid).stat().st_mtime_ns for vid in GOOD} == mtimes
    assert again.failed == cache.failed and again.key == cache.key


def test_a_repaired_video_is_decoded_on_the_next_run(tmp_path):
    ds = make_dataset(tmp_path / "ds", ["g0", "missing"])
    with pytest.warns(UserWarning, match="missing"):
        frame_cache(ds, ["g0", "missing"], tmp_path / "cache", **PARAMS)
    write_clip(ds.video_path("missing"), 30, 10)
    cache = frame_cache(ds, ["g0", "missing"], tmp_path / "cache", **PARAMS)
    assert cache.failed == {} and cache.load("missing")[1].sum() == 3
    assert json.loads((cache.dir / "failures.json").read_text()) == {}


def test_interrupted_run_keeps_finished_videos_and_resumes(tmp_path, monkeypatch):
    ds = make_dataset(tmp_path / "ds", GOOD)
    decoded = count_decodes(monkeypatch, fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        frame_cache(ds, GOOD, tmp_path / "cache", **PARAMS)
    assert decoded == GOOD[:2]
    out = next((tmp_path / "cache" / "frames").iterdir())
    assert sorted(p.name for p in out.iterdir()) == ["g0.npz", "g1.npz"]  # no partial or temporary file
    for vid in GOOD[:2]:
        assert load_npz(out / f"{vid}.npz")["mask"].any()

    decoded = count_decodes(monkeypatch)
    cache = frame_cache(ds, GOOD, tmp_path / "cache", **PARAMS)
    assert decoded == GOOD[2:] and cache.dir == out
    assert cache.load_many()[1].any(1).all()


def test_unknown_and_unsafe_video_ids_fail_before_any_work(tmp_path):
    ds = make_dataset(tmp_path / "ds", GOOD[:1])
    with pytest.raises(KeyError, match="nope"):
        frame_cache(ds, ["g0", "nope"], tmp_path / "cache", **PARAMS)
    assert not (tmp_path / "cache").exists()
    odd = write_dataset(tmp_path / "odd", {"name": "odd"}, [{"video_id": "../x", "path": "x.mp4"}], {})
    with pytest.raises(ValueError, match="cannot be used as file names"):
        frame_cache(odd, ["../x"], tmp_path / "cache", **PARAMS)
