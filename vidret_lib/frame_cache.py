"""Keyed, resumable, parallel cache of CLIP4Clip frames for the videos of a dataset.

Layout under ``cache_dir``::

    frames/<key>/<video_id>.npz   frames (T, S, S, 3) uint8, mask (T,) bool, indices (n,) int64,
                                  times (n,) float64 s, decoder str, source str
    frames/<key>/failures.json    {video_id: reason} for videos that could not be decoded

``key`` names what produced the frames: the dataset's fingerprint, the sampling parameters,
the sampler version and the decord and PyAV versions. ``source`` is the video file's
``size:mtime_ns`` when it was decoded: a ``.npz`` is reused only while its video is unchanged,
so a video replaced in place is decoded again (and the features of its chunk recomputed, see
:mod:`vidret_lib.features`) while untouched videos are reused. Size and mtime, as ``make``
uses, cost one ``stat`` per video; a content hash would read every video on every run.
``decoder`` says which decoder produced the frames (:data:`vidret_lib.frames.DECODERS`);
:meth:`FrameCache.summary` counts them.

Videos are decoded in ``workers`` processes (forked, so they start in milliseconds), each
video under a time limit: a decoder call that hangs or crashes its process is killed, recorded
like a decode failure with the reason, and its process replaced. Each ``.npz`` is written
atomically as soon as its video is done, so a killed run keeps every finished video and a
re-run decodes only the rest. A video that cannot be decoded is recorded with its reason,
reported in one warning naming the files, loads as zero frames with an all-False mask, and is
retried on the next run.
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import time
import warnings
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .cache import cache_key, folder_lock, load_json, load_npz, save_json, save_npz
from .datasets import Dataset
from .frames import DECODERS, SAMPLER_VERSION, SampledClip, VideoDecodeError, sample_clip
from .progress import progress

FAILURES = "failures.json"
TIMEOUT_S = 300.0  # per video; MSR-VTT clips take well under a second
# fork: workers start in milliseconds and inherit the loaded modules; spawn where there is no fork
_MP = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")


@dataclass(frozen=True)
class FrameCache:
    """The cached frames of some videos; build it with :func:`frame_cache`.

    ``failed`` maps each requested video that could not be decoded to the reason; those
    videos load as zero frames with an all-False mask. ``content`` maps each video to its
    file's ``size:mtime_ns`` (``"missing"`` when absent) as decoded; ``decoders`` maps each
    decoded video to the decoder that produced its frames.
    """

    dir: Path
    key: str
    video_ids: tuple[str, ...]
    max_frames: int
    size: int
    failed: dict[str, str]
    content: dict[str, str]
    decoders: dict[str, str]

    def path(self, video_id: str) -> Path:
        """The ``.npz`` file of ``video_id``."""
        return self.dir / f"{video_id}.npz"

    def summary(self) -> str:
        """One line: how many videos each decoder produced and how many failed.

        Example:
            >>> FrameCache(Path("c"), "k", ("a", "b", "c"), 12, 224, {"c": "empty"}, {},
            ...            {"a": "decord-0.6.0", "b": "pyav-18.1.0"}).summary()
            '3 videos: decord-0.6.0 1, pyav-18.1.0 1, failed 1'
        """
        counts = Counter(self.decoders.values())
        parts = [f"{name} {n}" for name, n in sorted(counts.items())] + [f"failed {len(self.failed)}"] * bool(self.failed)
        return f"{len(self.video_ids)} videos: " + ", ".join(parts)

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
    workers: int | None = None,
    timeout: float = TIMEOUT_S,
) -> FrameCache:
    """Sample (CLIP4Clip's rule, :func:`vidret_lib.frames.sample_clip`) and cache every video.

    Loads what is cached for unchanged videos, decodes the rest in ``workers`` processes
    (default ``min(os.cpu_count(), videos to decode)``; the frames are the same for any
    number), each video within ``timeout`` seconds, records videos that cannot be decoded or
    time out in ``failures.json`` and warns once, naming them. Interrupting it loses at most
    the videos being decoded. The cache folder is locked while it is filled
    (:func:`vidret_lib.cache.folder_lock`): a second process asking at the same time (another
    torchrun rank) waits, then loads the frames the first decoded. When it decodes videos that were
    not tried before, prints one line naming the folder. Raises ``ValueError`` for ``workers < 1``
    or ``timeout <= 0``.
    """
    if (workers is not None and workers < 1) or not timeout > 0:
        raise ValueError(f"workers ({workers}) must be >= 1 and timeout ({timeout}) > 0 seconds")
    ids = list(dict.fromkeys(video_ids))
    _check_ids(dataset, ids)
    key = cache_key(
        "frames",
        dataset=dataset.fingerprint(),
        max_frames=max_frames,
        sample_fps=sample_fps,
        size=size,
        sampler_version=SAMPLER_VERSION,
        decoders=sorted(DECODERS.values()),
    )
    out = Path(cache_dir) / "frames" / key
    content = {vid: _content(dataset.video_path(vid)) for vid in ids}
    with folder_lock(out):  # a second process (another torchrun rank) waits, then finds the videos decoded
        decoders, failed_here = _fill(dataset, ids, out, key, content, (max_frames, sample_fps, size), workers, timeout)
    if failed_here:
        _warn_failures(failed_here, len(ids), out / FAILURES)
    return FrameCache(out, key, tuple(ids), max_frames, size, failed_here, content,
                      {v: decoders[v] for v in ids if v in decoders})


def _fill(dataset: Dataset, ids: list[str], out: Path, key: str, content: dict[str, str], sampling: tuple,
          workers: int | None, timeout: float) -> tuple[dict[str, str], dict[str, str]]:
    """Decode into ``out`` the videos of ``ids`` not cached for their ``content`` (and retry the failed ones);
    return (decoder per decoded video, reason per failed video). Prints one line when it decodes new videos."""
    decoders = {vid: d for vid in ids if (d := _cached_decoder(out / f"{vid}.npz", content[vid]))}
    todo = [vid for vid in ids if vid not in decoders]
    failures_path = out / FAILURES
    known = load_json(failures_path) if failures_path.exists() else {}
    new = [vid for vid in todo if vid not in known]
    if new:  # one line per cache filled, so a log shows which process decoded (tests count them)
        print(f"frame cache {key}: decoding {len(new)} new videos into {out}", flush=True)
    failed: dict[str, str] = {}
    jobs = [(vid, dataset.video_path(vid), sampling) for vid in todo]
    n_workers = min(workers or os.cpu_count() or 1, len(jobs))
    outcomes = _decode_in_processes(jobs, n_workers, timeout)
    for vid, outcome in progress(outcomes, total=len(todo), desc=f"decode frames ({key})", unit="video"):
        if isinstance(outcome, str):
            failed[vid] = outcome
            continue
        save_npz(out / f"{vid}.npz", frames=outcome.frames, mask=outcome.mask, indices=outcome.indices,
                 times=outcome.times, decoder=np.array(outcome.decoder), source=np.array(content[vid]))
        decoders[vid] = outcome.decoder
    # this run's outcome replaces earlier records of the videos it retried
    retried = set(todo)
    merged = {v: r for v, r in known.items() if v not in retried} | {v: failed[v] for v in todo if v in failed}
    if merged != known:
        save_json(failures_path, merged)
    return decoders, {v: merged[v] for v in ids if v in merged}


def _content(path: Path) -> str:
    """``size:mtime_ns`` of a video file, ``"missing"`` if it is absent."""
    try:
        stat = path.stat()
    except OSError:
        return "missing"
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def _cached_decoder(npz: Path, content: str) -> str | None:
    """The decoder recorded in ``npz`` if it holds frames of a video with this ``content``, else None
    (absent, damaged, or from a video since replaced: decode again)."""
    try:
        with np.load(npz, allow_pickle=False) as data:  # reads only the two small arrays
            return str(data["decoder"]) if str(data["source"]) == content else None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # truncated or not an npz
        return None


class _Worker:
    """One decoding process fed one video at a time through a pipe."""

    def __init__(self) -> None:
        self.conn, child = _MP.Pipe()
        self.process = _MP.Process(target=_worker_loop, args=(child, os.getpid()), daemon=True)
        self.process.start()
        child.close()
        self.job: tuple[str, Path, tuple] | None = None
        self.started = 0.0

    def submit(self, job: tuple[str, Path, tuple]) -> None:
        self.job, self.started = job, time.monotonic()
        self.conn.send(job)

    def stop(self) -> None:
        self.process.kill()
        self.process.join()
        self.conn.close()


def _worker_loop(conn, parent: int) -> None:
    """Sample each video sent; send back the clip, a decode failure, or any other exception.

    Returns when the pipe closes or the parent process ``parent`` is gone: a parent killed with
    SIGKILL cannot close the pipe (forked siblings hold copies of its end), so the worker checks
    every second that it still has that parent instead of waiting forever.
    """
    while True:
        if not conn.poll(1.0):
            if os.getppid() != parent:
                return
            continue
        try:
            vid, path, args = conn.recv()
        except EOFError:
            return
        try:
            reply = ("ok", sample_clip(path, *args))
        except VideoDecodeError as err:
            reply = ("failed", str(err))
        except BaseException as err:  # a bug or Ctrl-C: re-raised in the parent
            reply = ("raised", err)
        conn.send(reply)


def _decode_in_processes(
    jobs: list[tuple[str, Path, tuple]], workers: int, timeout: float
) -> Iterator[tuple[str, SampledClip | str]]:
    """Yield ``(video_id, clip or failure reason)`` as each job finishes, ``workers`` at a time.

    A job still running after ``timeout`` seconds, or whose process dies, is a failure: its
    process is killed and replaced. Any exception other than :class:`VideoDecodeError` raised
    by the sampler is raised here.
    """
    pending = list(reversed(jobs))
    pool = [_Worker() for _ in range(workers)]
    try:
        for worker in pool:
            if pending:
                worker.submit(pending.pop())
        while any(w.job for w in pool):
            busy = [w for w in pool if w.job]
            wait = max(0.0, min(w.started for w in busy) + timeout - time.monotonic())
            ready = multiprocessing.connection.wait([w.conn for w in busy], timeout=wait)
            for i, worker in enumerate(pool):
                if worker.job is None:
                    continue
                vid, path, _ = worker.job
                if worker.conn in ready:
                    try:
                        status, value = worker.conn.recv()
                    except EOFError:  # killed by a crash in the decoder (or the OOM killer)
                        worker.process.join()
                        status, value = "dead", f"the decoding process died (exit code {worker.process.exitcode})"
                elif time.monotonic() - worker.started >= timeout:
                    status, value = "dead", (f"no result within the {timeout:g} s time limit (a hanging decoder, "
                                             "or a very long video: raise frame_cache(timeout=...))")
                else:
                    continue
                if status == "raised":
                    raise value
                if status == "dead":
                    value = str(VideoDecodeError(path, f"{value}; {_ASK}"))
                    worker.stop()
                    pool[i] = worker = _Worker()
                worker.job = None
                yield vid, value
                if pending:
                    worker.submit(pending.pop())
    finally:
        for worker in pool:
            worker.stop()


_ASK = "transcode it with `ffmpeg -i IN -c:v libx264 -pix_fmt yuv420p OUT.mp4` or remove it"


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
