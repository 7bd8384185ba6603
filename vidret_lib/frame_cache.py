"""Keyed, resumable cache of CLIP4Clip frames for the videos of a dataset.

Layout under ``cache_dir``::

    frames/<key>/<video_id>.npz   frames (T, S, S, 3) uint8, mask (T,) bool, indices (n,) int64
    frames/<key>/failures.json    {video_id: reason} for videos that could not be decoded

``key`` names what produced the frames: the dataset's fingerprint, the sampling parameters,
the sampler version and the decord version. Each ``.npz`` is written atomically as soon as its
video is done, so a killed run keeps every finished video and a re-run decodes only the rest.
A video that cannot be decoded is recorded with its reason, reported in one warning naming
the files, loads as zero frames with an all-False mask, and is retried on the next run.

Decoding runs in one thread: on this 2-core machine a pool of 2 decoding threads was no
faster (``benchmarks/bench_frames.py`` measures the sampler).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import decord
import numpy as np

from .cache import cache_key, load_json, load_npz, save_json, save_npz
from .datasets import Dataset
from .frames import SAMPLER_VERSION, VideoDecodeError, sample_clip
from .progress import progress

FAILURES = "failures.json"


@dataclass(frozen=True)
class FrameCache:
    """The cached frames of some videos; build it with :func:`frame_cache`.

    ``failed`` maps each requested video that could not be decoded to the reason; those
    videos load as zero frames with an all-False mask.
    """

    dir: Path
    key: str
    video_ids: tuple[str, ...]
    max_frames: int
    size: int
    failed: dict[str, str]

    def path(self, video_id: str) -> Path:
        """The ``.npz`` file of ``video_id``."""
        return self.dir / f"{video_id}.npz"

    def load(self, video_id: str) -> tuple[np.ndarray, np.ndarray]:
        """``(frames (T, S, S, 3) uint8, mask (T,) bool)`` of one video (zeros if it failed)."""
        if video_id in self.failed:
            return (
                np.zeros((self.max_frames, self.size, self.size, 3), np.uint8),
                np.zeros(self.max_frames, bool),
            )
        path = self.path(video_id)
        if not path.exists():
            raise KeyError(f"{video_id!r} is not in the frame cache {self.dir}; pass it to frame_cache() first")
        try:
            data = load_npz(path)
        except Exception as err:  # a damaged file (disk error, edited by hand): say which
            raise ValueError(f"{path} is unreadable ({err}); delete it and run frame_cache() again") from None
        return data["frames"], data["mask"]

    def load_many(self, video_ids: Iterable[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Stack :meth:`load` over ``video_ids`` (default: all): ``(V, T, S, S, 3)``, ``(V, T)``.

        Memory is ``V * T * S * S * 3`` bytes (1,000 MSR-VTT videos at 12 x 224 px: 1.8 GB);
        load in chunks for large splits.
        """
        ids = list(self.video_ids if video_ids is None else video_ids)
        frames = np.zeros((len(ids), self.max_frames, self.size, self.size, 3), np.uint8)
        masks = np.zeros((len(ids), self.max_frames), bool)
        for i, vid in enumerate(ids):
            frames[i], masks[i] = self.load(vid)
        return frames, masks


def frame_cache(
    dataset: Dataset,
    video_ids: Iterable[str],
    cache_dir: str | os.PathLike,
    *,
    max_frames: int = 12,
    sample_fps: int = 1,
    size: int = 224,
) -> FrameCache:
    """Sample (CLIP4Clip's rule, :func:`vidret_lib.frames.sample_clip`) and cache every video.

    Loads what is cached, decodes the rest, records videos that cannot be decoded in
    ``failures.json`` and warns once, naming them. Interrupting it loses at most the video
    being decoded.
    """
    ids = list(dict.fromkeys(video_ids))
    _check_ids(dataset, ids)
    key = cache_key(
        "frames",
        dataset=dataset.fingerprint(),
        max_frames=max_frames,
        sample_fps=sample_fps,
        size=size,
        sampler_version=SAMPLER_VERSION,
        decoder=f"decord-{decord.__version__}",
    )
    out = Path(cache_dir) / "frames" / key
    todo = [vid for vid in ids if not (out / f"{vid}.npz").exists()]
    failed: dict[str, str] = {}
    for vid in progress(todo, desc=f"decode frames ({key})", unit="video"):
        try:
            clip = sample_clip(dataset.video_path(vid), max_frames, sample_fps, size)
        except VideoDecodeError as err:
            failed[vid] = str(err)
            continue
        save_npz(out / f"{vid}.npz", frames=clip.frames, mask=clip.mask, indices=clip.indices)

    failures_path = out / FAILURES
    known = load_json(failures_path) if failures_path.exists() else {}
    # this run's outcome replaces earlier records of the videos it retried
    retried = set(todo)
    merged = {v: r for v, r in known.items() if v not in retried} | failed
    if merged != known:
        save_json(failures_path, merged)
    failed_here = {v: merged[v] for v in ids if v in merged}
    if failed_here:
        _warn_failures(failed_here, len(ids), failures_path)
    return FrameCache(out, key, tuple(ids), max_frames, size, failed_here)


def _check_ids(dataset: Dataset, ids: list[str]) -> None:
    unknown = [v for v in ids if v not in dataset.videos]
    if unknown:
        raise KeyError(f"videos {unknown[:5]} are not in {dataset.root / 'videos.json'} ({len(unknown)} unknown)")
    unsafe = [v for v in ids if Path(v).name != v or v in {".", ".."}]
    if unsafe:
        raise ValueError(f"video ids {unsafe[:5]} cannot be used as file names in the frame cache")


def _warn_failures(failed: dict[str, str], total: int, failures_path: Path, shown: int = 10) -> None:
    lines = [f"  {vid}: {reason}" for vid, reason in list(failed.items())[:shown]]
    if len(failed) > shown:
        lines.append(f"  ... and {len(failed) - shown} more")
    warnings.warn(
        f"{len(failed)} of {total} videos could not be decoded; they are masked out (zero frames, "
        f"all-False mask) and listed in {failures_path}; fix or re-download them and run again:\n"
        + "\n".join(lines),
        stacklevel=3,
    )
