"""Cached feature extraction: equality with a naive per-video loop, batching, caching, resuming."""
import hashlib
import json

import numpy as np
import pytest
import torch

from vidret_lib.cache import cache_key, save_npz
from vidret_lib.encoders import load_encoder
from vidret_lib.features import _chunk_name, text_features, video_features

SIZE, T = 64, 4
MASKS = {  # video id -> frame mask of its decoded frames
    "v0": [True, True, True, False],
    "v1": [True, True, True, True],
    "bad": [True, True, False, False],  # the stand-in fails to decode it, unless told otherwise
    "v3": [True, False, False, False],
    "v4": [True, True, False, False],
}


class StandInFrameCache:
    """The interface of vidret_lib.frame_cache.FrameCache that feature extraction uses."""

    def __init__(self, key="frames-test", fail_on=None):
        self.key, self.dir, self.fail_on = key, None, fail_on
        self.failed = {"bad": "cannot decode"}
        self.content = {vid: "1000:1" for vid in MASKS}
        self.loads = []

    def load(self, video_id):
        if video_id == self.fail_on:
            raise RuntimeError(f"simulated crash at {video_id}")
        self.loads.append(video_id)
        if video_id in self.failed:  # as the real FrameCache: zero frames, all-False mask
            return np.zeros((T, SIZE, SIZE, 3), np.uint8), np.zeros(T, bool)
        mask = np.array(MASKS[video_id])
        rng = np.random.default_rng(list(MASKS).index(video_id))
        frames = rng.integers(0, 256, (T, SIZE, SIZE, 3), dtype=np.uint8)
        frames[~mask] = 0
        return frames, mask


class Counting:
    """Wraps an encoder and records the batch sizes it is given (text: the captions of each call, with the
    ``batch_size`` it is asked to run them at)."""

    def __init__(self, encoder):
        self.encoder, self.cache_id, self.embed_dim = encoder, encoder.cache_id, encoder.embed_dim
        self.device = encoder.device
        self.image_batches, self.text_batches, self.text_batch_sizes = [], [], []

    def encode_image(self, frames):
        self.image_batches.append(len(frames))
        return self.encoder.encode_image(frames)

    def encode_text(self, captions, batch_size=None):
        self.text_batches.append(len(captions))
        self.text_batch_sizes.append(batch_size)
        return self.encoder.encode_text(captions, batch_size=batch_size)


@pytest.fixture(scope="module")
def encoder(one_thread):
    return load_encoder("default", image_size=SIZE)


def _naive_video_features(encoder, frame_cache, ids):
    feats = torch.zeros(len(ids), T, encoder.embed_dim)
    for v, vid in enumerate(ids):
        frames, mask = frame_cache.load(vid)
        for t in range(T):
            if mask[t]:
                feats[v, t] = encoder.encode_image(frames[t:t + 1])[0]
    return feats


def test_video_features_match_naive_loop_and_batch_across_videos(encoder, tmp_path):
    ids = list(MASKS)
    counting = Counting(encoder)
    feats, mask = video_features(counting, StandInFrameCache(), ids, tmp_path, batch_size=3)
    assert feats.shape == (5, T, 512) and feats.dtype == torch.float32
    assert mask.tolist() == [MASKS[v] if v != "bad" else [False] * T for v in ids]
    assert counting.image_batches == [3, 3, 3, 1]  # 10 masked-in frames, batches span videos
    expected = _naive_video_features(encoder, StandInFrameCache(), ids)
    torch.testing.assert_close(feats, expected, rtol=1e-4, atol=1e-4)
    assert (feats[~mask] == 0).all() and (feats[mask].abs().sum(-1) > 0).all()


def test_video_features_cached_under_frames_and_encoder_key(encoder, tmp_path):
    ids = ["v4", "v0", "v1"]
    first = video_features(encoder, StandInFrameCache(), ids, tmp_path, chunk_size=2)
    key = cache_key("video-features", frames="frames-test", encoder=encoder.cache_id)
    assert len(list((tmp_path / "features" / key).glob("*.npz"))) == 2
    counting, frames = Counting(encoder), StandInFrameCache()
    second = video_features(counting, frames, ids, tmp_path, chunk_size=2)
    assert counting.image_batches == [] and frames.loads == []
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    # another frame cache key is another folder: computed again
    other = StandInFrameCache(key="frames-other")
    video_features(encoder, other, ids, tmp_path, chunk_size=2)
    assert other.loads == ids


def test_video_features_resume_after_a_crash(encoder, tmp_path):
    ids = ["v0", "v1", "v3", "v4", "bad"]
    with pytest.raises(RuntimeError, match="simulated crash at v3"):
        video_features(encoder, StandInFrameCache(fail_on="v3"), ids, tmp_path, chunk_size=2)
    frames = StandInFrameCache()
    feats, mask = video_features(encoder, frames, ids, tmp_path, chunk_size=2)
    assert frames.loads == ["v3", "v4", "bad"]  # the first chunk was kept
    expected = _naive_video_features(encoder, StandInFrameCache(), ids)
    torch.testing.assert_close(feats, expected, rtol=1e-4, atol=1e-4)
    assert not mask[4].any() and (feats[4] == 0).all()


def test_video_features_recompute_a_chunk_whose_failed_video_decodes_now(encoder, tmp_path):
    ids = ["v0", "v1", "bad", "v3"]
    _, mask = video_features(encoder, StandInFrameCache(), ids, tmp_path, chunk_size=2)
    assert not mask[2].any()
    fixed = StandInFrameCache()
    fixed.failed = {}  # the frame cache's retry succeeded
    feats, mask = video_features(encoder, fixed, ids, tmp_path, chunk_size=2)
    assert fixed.loads == ["bad", "v3"]
    assert mask[2].tolist() == MASKS["bad"]
    torch.testing.assert_close(feats, _naive_video_features(encoder, fixed, ids), rtol=1e-4, atol=1e-4)


def test_video_features_recompute_the_chunk_of_a_replaced_video(encoder, tmp_path):
    ids = ["v0", "v1", "v3", "v4"]
    first, _ = video_features(encoder, StandInFrameCache(), ids, tmp_path, chunk_size=2)
    replaced = StandInFrameCache()
    replaced.content["v3"] = "2000:2"  # v3's file was replaced in place: new size and mtime
    feats, _ = video_features(encoder, replaced, ids, tmp_path, chunk_size=2)
    assert replaced.loads == ["v3", "v4"]  # its chunk is recomputed, the untouched chunk reused
    assert torch.equal(feats, first)  # the stand-in's frames did not change


def test_video_features_reject_a_wrong_chunk(encoder, tmp_path):
    key = cache_key("video-features", frames="frames-test", encoder=encoder.cache_id)
    path = tmp_path / "features" / key / f"{_chunk_name(['v0'], StandInFrameCache())}.npz"
    save_npz(path, feats=np.zeros((1, T, 512), np.float32), mask=np.zeros((1, T), bool),
             video_ids=np.array(["v1"]))
    with pytest.raises(ValueError, match="holds other videos"):
        video_features(encoder, StandInFrameCache(), ["v0"], tmp_path)
    with pytest.raises(ValueError, match="at least one video"):
        video_features(encoder, StandInFrameCache(), [], tmp_path)


def test_text_features_match_naive_loop_cache_and_resume(encoder, tmp_path):
    sentences = [f"a {c} {s} moves" for c in ("red", "green", "blue") for s in ("circle", "square")]
    sentences.append("a red circle moves")  # duplicates are allowed
    counting = Counting(encoder)
    feats = text_features(counting, sentences, tmp_path, batch_size=3, chunk_size=4)
    assert counting.text_batches == [4, 3] and counting.text_batch_sizes == [3, 3]  # one call per chunk
    expected = torch.cat([encoder.encode_text([s]) for s in sentences])
    torch.testing.assert_close(feats, expected, rtol=1e-4, atol=1e-5)
    assert feats.shape == (7, 512)

    counting = Counting(encoder)
    assert torch.equal(text_features(counting, sentences, tmp_path, batch_size=3, chunk_size=4), feats)
    assert counting.text_batches == []

    digest = hashlib.sha256(json.dumps(sentences).encode()).hexdigest()
    key = cache_key("text-features", encoder=encoder.cache_id, sentences=digest, chunk_size=4)
    (tmp_path / "features" / key / "chunk-00001.npz").unlink()  # as if killed during chunk 2
    counting = Counting(encoder)
    torch.testing.assert_close(text_features(counting, sentences, tmp_path, batch_size=3, chunk_size=4),
                               feats)
    assert counting.text_batches == [3]  # only the deleted chunk

    counting = Counting(encoder)
    text_features(counting, sentences[:-1], tmp_path, batch_size=3, chunk_size=4)
    assert sum(counting.text_batches) == 6  # another sentence list is another cache
    with pytest.raises(ValueError, match="at least one sentence"):
        text_features(encoder, [], tmp_path)

