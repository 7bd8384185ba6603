"""The frame cache: keyed, atomic, resumable; bad videos recorded, masked and retried."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from test_decoders import write_numbered
from test_frames import write_clip  # tests/ is on sys.path (pytest's default import mode)

import vidret_lib.frame_cache as fc
from vidret_lib.cache import load_npz
from vidret_lib.datasets import write_dataset
from vidret_lib.frame_cache import frame_cache
from vidret_lib.frames import DECODERS, clip4clip_frame_indices, sample_clip, sample_frames

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


def count_decodes(monkeypatch, tmp_path: Path, fail_after: int | None = None, sleep_on: str | None = None):
    """Record the videos the cache decodes (in a file: they are decoded in worker processes, which
    inherit this patch); optionally interrupt after ``fail_after`` of them, or hang on ``sleep_on``.
    Returns a function giving the decoded video ids so far."""
    log = tmp_path / "decoded.log"
    log.write_text("")

    def decoded() -> list[str]:
        return log.read_text().split()

    def spy(path, *args):
        if fail_after is not None and len(decoded()) == fail_after:
            raise KeyboardInterrupt
        if Path(path).stem == sleep_on:
            time.sleep(60)  # a decoder that hangs
        with open(log, "a") as fh:
            fh.write(Path(path).stem + "\n")
        return sample_clip(path, *args)

    monkeypatch.setattr(fc, "sample_clip", spy)
    return decoded


def test_frames_are_cached_under_a_key_of_their_parameters(tmp_path):
    ds = make_dataset(tmp_path / "ds", GOOD)
    cache = frame_cache(ds, GOOD, tmp_path / "cache", **PARAMS)
    assert cache.dir == tmp_path / "cache" / "frames" / cache.key and cache.failed == {}
    assert sorted(p.name for p in cache.dir.iterdir()) == [".vidret.lock"] + [f"{v}.npz" for v in GOOD]
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
    decoded = count_decodes(monkeypatch, tmp_path)
    with pytest.warns(UserWarning, match="4 of 8"):
        again = frame_cache(ds, ids, tmp_path / "cache", **PARAMS)
    assert sorted(decoded()) == sorted(BAD)  # only the failures are retried
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
    decoded = count_decodes(monkeypatch, tmp_path, fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        frame_cache(ds, GOOD, tmp_path / "cache", workers=1, **PARAMS)
    assert decoded() == GOOD[:2]
    out = next((tmp_path / "cache" / "frames").iterdir())
    assert sorted(p.name for p in out.iterdir()) == [".vidret.lock", "g0.npz", "g1.npz"]  # no partial or temporary file
    for vid in GOOD[:2]:
        assert load_npz(out / f"{vid}.npz")["mask"].any()

    decoded = count_decodes(monkeypatch, tmp_path)
    cache = frame_cache(ds, GOOD, tmp_path / "cache", **PARAMS)
    assert sorted(decoded()) == GOOD[2:] and cache.dir == out
    assert cache.load_many()[1].any(1).all()


def test_unknown_and_unsafe_video_ids_fail_before_any_work(tmp_path):
    ds = make_dataset(tmp_path / "ds", GOOD[:1])
    with pytest.raises(KeyError, match="nope"):
        frame_cache(ds, ["g0", "nope"], tmp_path / "cache", **PARAMS)
    assert not (tmp_path / "cache").exists()
    odd = write_dataset(tmp_path / "odd", {"name": "odd"}, [{"video_id": "../x", "path": "x.mp4"}], {})
    with pytest.raises(ValueError, match="cannot be used as file names"):
        frame_cache(odd, ["../x"], tmp_path / "cache", **PARAMS)


def test_parallel_decoding_gives_the_serial_bytes_and_records_decoders(tmp_path):
    ids = GOOD + ["ts"]
    ds = make_dataset(tmp_path / "ds", GOOD + ["ts"])
    write_numbered(ds.video_path("ts"), "libx264", 45, 10, 64, 48, fmt="mpegts")  # PyAV's container
    serial = frame_cache(ds, ids, tmp_path / "one", workers=1, **PARAMS)
    parallel = frame_cache(ds, ids, tmp_path / "two", workers=2, **PARAMS)
    assert serial.key == parallel.key and serial.decoders == parallel.decoders
    assert serial.decoders == {**{v: DECODERS["decord"] for v in GOOD}, "ts": DECODERS["pyav"]}
    assert serial.summary() == f"5 videos: {DECODERS['decord']} 4, {DECODERS['pyav']} 1"
    for vid in ids:
        a, b = load_npz(serial.path(vid)), load_npz(parallel.path(vid))
        reference = sample_clip(ds.video_path(vid), 4, 1, 16)  # in this process
        assert sorted(a) == ["decoder", "frames", "indices", "mask", "source", "times"]
        for name in ("frames", "mask", "indices", "times", "decoder"):
            np.testing.assert_array_equal(a[name], b[name])
            np.testing.assert_array_equal(a[name], getattr(reference, name))
        assert a["frames"].dtype == np.uint8 and a["times"].dtype == np.float64


def test_a_replaced_video_is_decoded_again_and_untouched_ones_reused(tmp_path, monkeypatch):
    ds = make_dataset(tmp_path / "ds", GOOD[:3])
    first = frame_cache(ds, GOOD[:3], tmp_path / "cache", **PARAMS)
    assert first.load("g1")[1].sum() == 4
    write_clip(ds.video_path("g1"), 20, 10)  # replaced in place by a 2 s video
    stat = ds.video_path("g1").stat()
    decoded = count_decodes(monkeypatch, tmp_path)
    again = frame_cache(ds, GOOD[:3], tmp_path / "cache", **PARAMS)
    assert decoded() == ["g1"] and again.key == first.key
    assert again.load("g1")[1].sum() == 2
    assert again.content["g1"] == f"{stat.st_size}:{stat.st_mtime_ns}" != first.content["g1"]
    assert str(load_npz(again.path("g1"))["source"]) == again.content["g1"]
    os.utime(ds.video_path("g0"), ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # same bytes, touched
    frame_cache(ds, GOOD[:3], tmp_path / "cache", **PARAMS)
    assert decoded() == ["g1", "g0"]


def test_a_hanging_or_crashing_decoder_is_stopped_and_reported(tmp_path, monkeypatch):
    ds = make_dataset(tmp_path / "ds", GOOD[:3])
    count_decodes(monkeypatch, tmp_path, sleep_on="g1")
    start = time.monotonic()
    with pytest.warns(UserWarning, match="1 of 3 videos could not be decoded"):
        cache = frame_cache(ds, GOOD[:3], tmp_path / "cache", workers=2, timeout=2.0, **PARAMS)
    assert time.monotonic() - start < 20
    assert list(cache.failed) == ["g1"] and "2 s time limit" in cache.failed["g1"]
    assert str(ds.video_path("g1")) in cache.failed["g1"]
    assert json.loads((cache.dir / "failures.json").read_text()) == cache.failed
    assert cache.load("g0")[1].any() and cache.load("g2")[1].any()

    monkeypatch.setattr(fc, "sample_clip", lambda path, *args: os._exit(3))  # a decoder that crashes
    with pytest.warns(UserWarning, match="g1"):
        cache = frame_cache(ds, GOOD[:3], tmp_path / "cache", workers=1, **PARAMS)
    assert "process died (exit code 3)" in cache.failed["g1"]


def test_bad_workers_or_timeout(tmp_path):
    ds = make_dataset(tmp_path / "ds", GOOD[:1])
    for bad in (dict(workers=0), dict(timeout=0)):
        with pytest.raises(ValueError, match="must be >= 1"):
            frame_cache(ds, GOOD[:1], tmp_path / "cache", **bad, **PARAMS)


def test_a_truncated_npz_is_decoded_again(tmp_path):
    npz = tmp_path / "v.npz"
    npz.write_bytes(b"PK\x03\x04 truncated")  # a zip header and nothing else, as a kill mid-copy leaves
    assert fc._cached_decoder(npz, "123:456") is None
    npz.write_bytes(b"not a zip at all")
    assert fc._cached_decoder(npz, "123:456") is None


def test_a_worker_whose_parent_is_gone_exits():
    import multiprocessing

    here, there = multiprocessing.Pipe()
    start = time.monotonic()
    fc._worker_loop(there, parent=os.getppid() + 1_000_000)  # not our parent: as after the parent's SIGKILL
    assert time.monotonic() - start < 5
    here.close()
