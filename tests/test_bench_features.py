"""benchmarks/bench_features.py: its frame cache is one that video_features accepts (content stamps included)."""
import importlib.util
from pathlib import Path

import numpy as np
import torch

from vidret_lib.features import video_features

_SPEC = importlib.util.spec_from_file_location(
    "bench_features", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_features.py")
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)


class MeanPixel:
    """A stand-in encoder: feature = mean pixel value of the frame, D = 1."""

    cache_id, device, embed_dim = "mean-pixel", "cpu", 1

    def encode_image(self, frames):
        return torch.tensor(frames.mean(axis=(1, 2, 3)), dtype=torch.float32)[:, None]


def test_bench_frame_cache_feeds_video_features_like_a_naive_loop(tmp_path):
    cache = bench.write_frame_cache(tmp_path / "frames", 3, 12, 8)
    feats, mask = video_features(MeanPixel(), cache, cache.video_ids, tmp_path / "features", batch_size=5)
    for i, vid in enumerate(cache.video_ids):
        frames, want_mask = cache.load(vid)
        assert 8 <= want_mask.sum() <= 12 and torch.equal(mask[i], torch.from_numpy(want_mask))
        want = np.where(want_mask, frames.mean(axis=(1, 2, 3)), 0.0)
        torch.testing.assert_close(feats[i, :, 0], torch.from_numpy(want).float())
