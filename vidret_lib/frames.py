"""CLIP4Clip's frame sampling, decoded with decord.

CLIP4Clip (ArrowLuo/CLIP4Clip ``dataloaders/rawvideo_util.py``, ``RawVideoExtractorCV2``) reads
a video with OpenCV like this:

- ``fps = int(CAP_PROP_FPS)``: the frame rate is *truncated*, so a 29.97 fps clip steps by 29
  frames and its "seconds" drift ahead of real time;
- ``duration = ceil(frame_count / fps)``; ``interval = fps // sample_fps`` (at least 1);
  the offsets within a second are ``range(0, fps, interval)[:sample_fps]``;
- for ``sec`` in ``0..duration`` (inclusive) and each offset it seeks to ``sec*fps + offset``
  and reads one frame, stopping at the first frame it cannot read;
- the MSR-VTT loader (``dataloaders/dataloader_msrvtt_retrieval.py``) then keeps
  ``linspace(0, n-1, max_frames, dtype=int)`` of the ``n`` frames when ``n > max_frames``
  (``--slice_framepos 2``, the value in every command of the CLIP4Clip README; the argparse
  default 0 would keep the first ``max_frames``), and zero-pads plus masks when ``n < max_frames``;
- each frame gets Resize(shorter side = 224, bicubic) and CenterCrop(224) on a PIL image, then
  CLIP's normalisation (left to the encoder here).

This module picks the same source frames with decord (frame count = ``len(reader)``, frame rate
= ``int(reader.get_avg_fps())``), which decodes each frame once instead of seeking back to a
key frame for every second (see ``benchmarks/bench_frames.py``). Decoded pixels equal OpenCV's
on the MSR-VTT clips (both use FFmpeg's H.264 decoder).

decord counts the frames by indexing every packet (``len(reader)``); OpenCV reads the
container's ``nb_frames``. They agree on mp4 files; on containers without ``nb_frames`` (webm,
mkv) OpenCV estimates ``duration * fps`` and the last second may differ.

On healthy files the loop stops at the end of the video (indices ``>= frame_count`` are
unreadable). A damaged file (missing, empty, truncated, corrupt, not a video, or with a chosen
frame FFmpeg cannot decode) raises :class:`VideoDecodeError` naming the file and the reason,
where OpenCV might return a prefix of frames or, for an image renamed ``.mp4``, a nonsense
frame count; callers mask such videos (see :mod:`vidret_lib.frame_cache`).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import NamedTuple

import decord
import numpy as np
from PIL import Image

# Bump when the choice of frames or their pixels change, so cached frames are recomputed.
SAMPLER_VERSION = 1

decord.logging.set_level(decord.logging.QUIET)  # FFmpeg's own messages; errors are raised below


class VideoDecodeError(Exception):
    """A video that cannot be sampled: missing, empty, truncated, corrupt, not a video, or too slow a frame rate.

    Example:
        >>> err = VideoDecodeError("videos/v1.mp4", "file does not exist")
        >>> str(err)
        'cannot decode videos/v1.mp4: file does not exist'
    """

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot decode {self.path}: {reason}")


class SampledClip(NamedTuple):
    """Frames of one video, padded to ``max_frames``, with their source frame indices."""

    frames: np.ndarray  # (max_frames, size, size, 3) uint8, zero where mask is False
    mask: np.ndarray  # (max_frames,) bool, True for real frames (a prefix)
    indices: np.ndarray  # (n,) int64 source frame indices, n = mask.sum()


def clip4clip_frame_indices(path: str | os.PathLike, max_frames: int = 12, sample_fps: int = 1) -> list[int]:
    """The source frame indices CLIP4Clip's OpenCV loop picks for ``path`` (see module docstring).

    The list is shorter than ``max_frames`` for a clip shorter than ``max_frames`` seconds.
    Raises :class:`VideoDecodeError` naming the file when it cannot be decoded.
    """
    indices, _ = _decode_clip4clip(Path(path), max_frames, sample_fps)
    return indices


def sample_frames(
    path: str | os.PathLike, max_frames: int = 12, sample_fps: int = 1, size: int = 224
) -> tuple[np.ndarray, np.ndarray]:
    """CLIP4Clip's frames of ``path``: ``(frames (max_frames, size, size, 3) uint8, mask (max_frames,) bool)``.

    Frames are resized (shorter side ``size``, bicubic) and centre-cropped as CLIP's
    preprocessing does; normalisation is left to the encoder. Missing frames are zero and
    masked out. Raises :class:`VideoDecodeError` naming the file when it cannot be decoded.
    """
    clip = sample_clip(path, max_frames, sample_fps, size)
    return clip.frames, clip.mask


def sample_clip(path: str | os.PathLike, max_frames: int = 12, sample_fps: int = 1, size: int = 224) -> SampledClip:
    """:func:`sample_frames` plus the source frame indices (what the frame cache stores)."""
    indices, raw = _decode_clip4clip(Path(path), max_frames, sample_fps)
    frames = np.zeros((max_frames, size, size, 3), dtype=np.uint8)
    mask = np.zeros(max_frames, dtype=bool)
    for t, frame in enumerate(raw):
        frames[t] = resize_center_crop(frame, size)
    mask[: len(raw)] = True
    return SampledClip(frames, mask, np.asarray(indices, dtype=np.int64))


def resize_center_crop(frame: np.ndarray, size: int) -> np.ndarray:
    """Resize (H, W, 3) uint8 so the shorter side is ``size`` (PIL bicubic), then centre-crop.

    Same sizes and rounding as torchvision's ``Resize(size)`` + ``CenterCrop(size)`` on a PIL
    image (CLIP's ``_transform``): the longer side becomes ``int(size * long / short)``.

    Example:
        >>> resize_center_crop(np.zeros((240, 320, 3), np.uint8), 224).shape
        (224, 224, 3)
    """
    h, w = frame.shape[:2]
    if h <= w:
        new_h, new_w = size, int(size * w / h)
    else:
        new_h, new_w = int(size * h / w), size
    img = Image.fromarray(frame).resize((new_w, new_h), Image.BICUBIC)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return np.asarray(img.crop((left, top, left + size, top + size)))


def _decode_clip4clip(path: Path, max_frames: int, sample_fps: int) -> tuple[list[int], np.ndarray]:
    """Chosen source indices and their decoded RGB frames ``(n, H, W, 3)``.

    Every index below the frame count of a healthy file is readable, so the ``n`` frames
    CLIP4Clip reads are known before decoding and only the kept ones are converted to RGB.
    """
    if max_frames < 1 or sample_fps < 1:
        raise ValueError(f"max_frames ({max_frames}) and sample_fps ({sample_fps}) must be >= 1")
    reader = _open(path)
    frame_count = len(reader)
    fps = int(reader.get_avg_fps())  # CLIP4Clip: int(cap.get(CAP_PROP_FPS)), 29.97 -> 29
    if fps < 1:
        raise VideoDecodeError(path, f"frame rate {reader.get_avg_fps():.3f} fps is below 1 fps")
    offsets = list(range(0, fps, max(fps // sample_fps, 1)))[:sample_fps]
    if len(offsets) < sample_fps:
        raise VideoDecodeError(path, f"frame rate {fps} fps is below sample_fps={sample_fps}")
    duration = (frame_count + fps - 1) // fps  # ceil(frame_count / fps) seconds
    # seconds 0..duration inclusive, as CLIP4Clip; indices >= frame_count are unreadable
    candidates = [s * fps + o for s in range(duration + 1) for o in offsets if s * fps + o < frame_count]
    n = len(candidates)
    keep = np.linspace(0, n - 1, num=max_frames, dtype=int) if n > max_frames else np.arange(n)
    indices = [candidates[i] for i in keep]  # --slice_framepos 2
    return indices, _decode(path, reader, indices)


def _decode(path: Path, reader: decord.VideoReader, indices: list[int]) -> np.ndarray:
    """Decode ``indices`` (increasing) as ``(n, H, W, 3)`` uint8 RGB.

    decord decodes forward and seeks only when the next index lies past a later key frame.
    A frame FFmpeg cannot decode means the file is damaged: decord reports such errors from its
    decoder thread, a frame or two late, so "the first unreadable frame" of a damaged file is
    not well defined; the whole file is rejected instead.
    """
    try:
        return reader.get_batch(indices).asnumpy()
    except decord.DECORDError as err:
        raise VideoDecodeError(path, f"a frame cannot be decoded ({_short(err)}): the file is corrupt") from None


def _open(path: Path) -> decord.VideoReader:
    if not path.exists():
        raise VideoDecodeError(path, "file does not exist")
    if not path.is_file():
        raise VideoDecodeError(path, "is not a file")
    if path.stat().st_size == 0:
        raise VideoDecodeError(path, "file is empty (0 bytes)")
    try:
        # one decoding thread: faster than FFmpeg's automatic threading on 320x240 clips here
        return decord.VideoReader(str(path), num_threads=1)
    except (decord.DECORDError, RuntimeError) as err:
        detail = _short(err)  # "Error reading <path>..." says nothing more
        detail = "" if str(path) in detail else f" ({detail})"
        raise VideoDecodeError(
            path, f"decord cannot open it{detail}: truncated, corrupt or not a video; re-download or remove it"
        ) from None


def _short(err: Exception) -> str:
    """decord's message without timestamps and source locations."""
    line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return re.sub(r"\[[^\]]*\]\s*|\S+\.(cc|h):\d+:\s*", "", line).strip() or type(err).__name__
