"""CLIP4Clip's frame sampling, decoded with decord where it is exact and PyAV elsewhere.

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

Two decoders pick the same source frames (frame ``i`` = the ``i``-th frame in presentation order):

- **decord** (fast path): MP4/MOV files (ISO BMFF) holding H.264 without a display rotation. Their
  sample table gives every frame's timestamp, so decord's seek is exact; it decodes each frame
  once instead of seeking back to a key frame for every second (``benchmarks/bench_frames.py``),
  and its pixels equal OpenCV's on the MSR-VTT clips (both use FFmpeg's H.264 decoder). Its
  frame count (``len(reader)``) must equal the container's (``nb_frames``), else PyAV is used.
- **PyAV** (``av``, a current FFmpeg) decodes every frame in order and keeps the chosen ones:
  frame-accurate by construction. It handles what decord 0.6 (FFmpeg 4.1 inside) gets wrong or
  cannot open: MPEG-PS (``.mpg``/``.mpeg``/``.vob``) and MPEG-TS (``.ts``), where decord's seek
  silently returns other frames; AV1; animated GIF; WebM without a duration; rotated video.
  Its frame count is the number of decoded frames (OpenCV estimates ``duration * fps`` on
  containers without ``nb_frames``, which can differ by a few frames).

Which decoder runs is decided without decoding a frame: PyAV opens the file for its container,
codec, size, frame rate and frame count (``skip_frame=all``: FFmpeg's stream probe decodes
nothing either), and for H.264 in MP4/MOV the display rotation is read from the ``moov`` box
(:func:`_mp4_rotation`). This costs ~2 ms a clip, ~1% of sampling 12 frames of a 320x240 clip
with decord (``benchmarks/bench_frames.py --baseline``, against the decord-only sampler).

Each returned frame comes with its presentation time (``SampledClip.times``) and the decoder
that produced it (``SampledClip.decoder``), stored by the frame cache.

**Rotation.** A video whose display matrix says "rotate by 90/180/270 degrees" (phone videos)
is returned upright, as players show it and as CLIP4Clip's OpenCV reads it (OpenCV >= 4.5
applies the rotation by default, ``CAP_PROP_ORIENTATION_AUTO``); captions describe the upright
video. Which MP4 is rotated is read from the container's display matrix, as OpenCV does; a
rotation carried only inside an H.264 stream (a display-orientation SEI message) goes unseen
there, as by OpenCV.

**Resolution guard.** Videos above ``MAX_PIXELS`` (4K UHD, 3840 x 2160) are refused with
:class:`VideoDecodeError` naming the file, its size and the ffmpeg command that downscales it,
before anything is decoded: CLIP sees 224 px, an 8K video gains nothing and took 2.9 GB for 12
frames with decord. Refusing is explicit; decoding at reduced size would change the pixels
(another resize path) without saying so.

On healthy files the loop stops at the end of the video (indices ``>= frame_count`` are
unreadable). A damaged file (missing, empty, truncated, corrupt, not a video, or with a chosen
frame FFmpeg cannot decode) raises :class:`VideoDecodeError` naming the file and the reason,
where OpenCV might return a prefix of frames or, for an image renamed ``.mp4``, a nonsense
frame count; a file whose codec FFmpeg cannot decode says "unsupported codec/container" and how
to transcode it. Callers mask such videos (see :mod:`vidret_lib.frame_cache`).
"""
from __future__ import annotations

import io
import math
import os
import re
import struct
from pathlib import Path
from typing import Callable, NamedTuple

import av
import decord
import numpy as np
from PIL import Image

# Bump when the choice of frames or their pixels change, so cached frames are recomputed.
SAMPLER_VERSION = 2  # 2: PyAV for non-MP4 containers, upright rotated videos, resolution guard
MAX_PIXELS = 3840 * 2160  # 4K UHD; see "Resolution guard" in the module docstring
DECORD_FORMAT = "mov,mp4,m4a,3gp,3g2,mj2"  # FFmpeg's name for ISO BMFF (MP4, MOV)
DECORD_CODECS = ("h264",)
DECODERS = {"decord": f"decord-{decord.__version__}", "pyav": f"pyav-{av.__version__}"}
TRANSCODE = "transcode with `ffmpeg -i IN -c:v libx264 -pix_fmt yuv420p OUT.mp4`"

decord.logging.set_level(decord.logging.QUIET)  # FFmpeg's own messages; errors are raised below


class VideoDecodeError(Exception):
    """A video that cannot be sampled: missing, empty, truncated, corrupt, not a video, too slow a
    frame rate, too large, or in a codec/container FFmpeg cannot decode.

    Example:
        >>> err = VideoDecodeError("videos/v1.mp4", "file does not exist")
        >>> str(err)
        'cannot decode videos/v1.mp4: file does not exist'
    """

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot decode {self.path}: {reason}")

    def __reduce__(self):  # picklable (the frame cache's worker processes send it back)
        return type(self), (self.path, self.reason)


class SampledClip(NamedTuple):
    """Frames of one video, padded to ``max_frames``, with their source frame indices."""

    frames: np.ndarray  # (max_frames, size, size, 3) uint8, zero where mask is False
    mask: np.ndarray  # (max_frames,) bool, True for real frames (a prefix)
    indices: np.ndarray  # (n,) int64 source frame indices, n = mask.sum()
    times: np.ndarray  # (n,) float64 presentation time (s) of each frame as its decoder reports it; NaN if unstamped
    decoder: str  # "decord-<version>" or "pyav-<version>" (see DECODERS)


class _Probe(NamedTuple):
    format: str  # FFmpeg's container name
    codec: str  # FFmpeg's codec name
    frames: int  # nb_frames from the container, 0 when unknown
    fps: float  # average frame rate


def clip4clip_frame_indices(path: str | os.PathLike, max_frames: int = 12, sample_fps: int = 1) -> list[int]:
    """The source frame indices CLIP4Clip's OpenCV loop picks for ``path`` (see module docstring).

    The list is shorter than ``max_frames`` for a clip shorter than ``max_frames`` seconds.
    Raises :class:`VideoDecodeError` naming the file when it cannot be decoded.
    """
    return _sample(Path(path), max_frames, sample_fps, None)[0]


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
    """:func:`sample_frames` plus the source frame indices, their times and the decoder (what the frame cache stores)."""
    indices, times, kept, decoder = _sample(Path(path), max_frames, sample_fps, lambda rgb: resize_center_crop(rgb, size))
    frames = np.zeros((max_frames, size, size, 3), dtype=np.uint8)
    mask = np.zeros(max_frames, dtype=bool)
    frames[: len(kept)] = kept
    mask[: len(kept)] = True
    return SampledClip(frames, mask, np.asarray(indices, np.int64), np.asarray(times, np.float64), decoder)


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


def _offsets(path: Path, fps: int, sample_fps: int) -> list[int]:
    """Frames read within each second: ``range(0, fps, fps // sample_fps)[:sample_fps]`` (CLIP4Clip)."""
    if fps < 1:
        raise VideoDecodeError(path, f"frame rate {fps} fps is below 1 fps")
    offsets = list(range(0, fps, max(fps // sample_fps, 1)))[:sample_fps]
    if len(offsets) < sample_fps:
        raise VideoDecodeError(path, f"frame rate {fps} fps is below sample_fps={sample_fps}")
    return offsets


def _candidates(path: Path, frame_count: int, fps: int, sample_fps: int) -> list[int]:
    """CLIP4Clip's frames before ``linspace``: ``sec * fps + offset`` for seconds ``0..duration``."""
    offsets = _offsets(path, fps, sample_fps)
    duration = (frame_count + fps - 1) // fps  # ceil(frame_count / fps) seconds
    # seconds 0..duration inclusive, as CLIP4Clip; indices >= frame_count are unreadable
    return [s * fps + o for s in range(duration + 1) for o in offsets if s * fps + o < frame_count]


def _keep(n: int, max_frames: int) -> np.ndarray:
    """Positions kept among ``n`` candidates: ``linspace(0, n-1, max_frames)`` (--slice_framepos 2)."""
    return np.linspace(0, n - 1, num=max_frames, dtype=int) if n > max_frames else np.arange(n)


def _sample(
    path: Path, max_frames: int, sample_fps: int, convert: Callable[[np.ndarray], np.ndarray] | None
) -> tuple[list[int], list[float], list[np.ndarray], str]:
    """Chosen indices, their times, ``convert(rgb (H, W, 3) uint8)`` of each (none if ``convert``
    is None) and the decoder's name."""
    if max_frames < 1 or sample_fps < 1:
        raise ValueError(f"max_frames ({max_frames}) and sample_fps ({sample_fps}) must be >= 1")
    probe = _probe(path)
    if probe.format == DECORD_FORMAT and probe.codec in DECORD_CODECS and _mp4_rotation(path) == 0:
        decoded = _sample_decord(path, probe, max_frames, sample_fps, decode=convert is not None)
        if decoded is not None:
            indices, times, rgb = decoded  # decord's reader is gone by now (see _sample_decord)
            frames = [] if convert is None else [convert(frame) for frame in rgb]
            return indices, times, frames, DECODERS["decord"]
    return _sample_pyav(path, probe, max_frames, sample_fps, convert)


def _check_file(path: Path) -> None:
    if not path.exists():
        raise VideoDecodeError(path, "file does not exist")
    if not path.is_file():
        raise VideoDecodeError(path, "is not a file")
    if path.stat().st_size == 0:
        raise VideoDecodeError(path, "file is empty (0 bytes)")


def _probe(path: Path) -> _Probe:
    """Container, codec, frame count and frame rate, read with PyAV (no frame is decoded).

    Raises :class:`VideoDecodeError`: not a file FFmpeg can open (corrupt), a still image,
    no video stream, a codec FFmpeg cannot decode (unsupported), or above ``MAX_PIXELS``.
    """
    _check_file(path)
    try:
        # skip_frame=all: only the container's facts are read here; without it FFmpeg's stream
        # probe (avformat_find_stream_info) decodes up to 7 H.264 frames to guess the reordering
        # delay: ~5 of the ~7 ms this open took on a 320x240 clip (the decoders open the file
        # again themselves). Only the pixel format, unused here, is then left unknown.
        container = av.open(str(path), options={"skip_frame": "all"})
    except av.error.FFmpegError as err:
        raise VideoDecodeError(
            path, f"FFmpeg cannot open it ({_short(err)}): truncated, corrupt or not a video; re-download or remove it"
        ) from None
    with container:
        name = container.format.name
        if name == "image2" or name.endswith("_pipe"):
            raise VideoDecodeError(path, f"is a still image ({name}), not a video; remove it")
        if not container.streams.video:
            raise VideoDecodeError(path, f"has no video stream ({name} container); remove it")
        stream = container.streams.video[0]
        codec = stream.codec_context
        if codec is None or codec.name in (None, "", "none"):
            raise VideoDecodeError(path, f"unsupported codec/container (no FFmpeg decoder, {name}): {TRANSCODE}")
        width, height = codec.width, codec.height
        if width * height > MAX_PIXELS:
            raise VideoDecodeError(
                path,
                f"is {width}x{height} ({width * height / 1e6:.1f} Mpixel), above the {MAX_PIXELS / 1e6:.1f} Mpixel "
                "limit (4K UHD) that keeps decoding within memory; CLIP sees 224 px, so downscale it: "
                "`ffmpeg -i IN -vf scale=-2:720 -c:v libx264 -pix_fmt yuv420p OUT.mp4`",
            )
        rate = stream.average_rate or stream.guessed_rate or 0
        return _Probe(name, codec.name, stream.frames or 0, float(rate))


def _mp4_rotation(path: Path) -> int | None:
    """Display rotation (whole degrees counter-clockwise, in [-180, 180], as PyAV's
    ``VideoFrame.rotation``) of the first video track of an MP4/MOV file, read from its boxes
    without decoding a frame.

    As FFmpeg's mov demuxer (FFmpeg ``libavformat/mov.c``, ``mov_read_tkhd``): the track's
    ``tkhd`` matrix times the movie's ``mvhd`` matrix is the display matrix, whose rotation is
    ``av_display_rotation_get`` (``libavutil/display.c``). OpenCV rotates by the same matrix
    (``CAP_PROP_ORIENTATION_AUTO``). Returns None when the boxes cannot be read (no ``moov``,
    no video track, damaged sizes, a degenerate matrix): PyAV then decodes the file and turns
    each frame as FFmpeg reports it.
    """
    with open(path, "rb") as f:
        moov = _find(f, 0, os.fstat(f.fileno()).st_size, b"moov")
        if moov is None:
            return None
        f.seek(moov[0])
        data = io.BytesIO(f.read(moov[1] - moov[0]))  # the index only: tens of KB for a short clip
    end = moov[1] - moov[0]
    mvhd = _find(data, 0, end, b"mvhd")
    for kind, *trak in _boxes(data, 0, end):
        if kind != b"trak":
            continue
        mdia, tkhd = _find(data, *trak, b"mdia"), _find(data, *trak, b"tkhd")
        hdlr = None if mdia is None else _find(data, *mdia, b"hdlr")
        # handler_type follows version/flags and pre_defined (8.4.3); "vide" marks a video track
        if hdlr is None or tkhd is None or _read(data, hdlr[0] + 8, 4) != b"vide":
            continue
        # the matrix follows version/flags, times, ids and durations (64-bit in version 1), then
        # layer/group/volume (tkhd, ISO/IEC 14496-12 8.3.2) or rate/volume (mvhd, 8.2.2)
        track = _matrix(data, tkhd, offsets=(40, 52))
        movie = np.eye(3) if mvhd is None else _matrix(data, mvhd, offsets=(36, 48))
        if track is None or movie is None:
            return None
        (a, b, _), (c, d, _), _ = track @ movie  # the display matrix (a b u; c d v; x y w), as mov_read_tkhd
        scale_x, scale_y = math.hypot(a, c), math.hypot(b, d)  # av_display_rotation_get from here on
        if not scale_x or not scale_y:
            return None
        return int(-math.degrees(math.atan2(b / scale_y, a / scale_x)))  # truncated, as PyAV
    return None


def _boxes(f, start: int, end: int):
    """``(type, payload start, payload end)`` of each ISO BMFF box in ``f[start:end]`` (a binary
    file). A box is a 32-bit big-endian size (1: a 64-bit size follows the type; 0: up to
    ``end``) and a 4-byte type (ISO/IEC 14496-12 4.2); a size that does not fit ends the walk."""
    while start + 8 <= end:
        head = _read(f, start, 16)
        size, kind = struct.unpack_from(">I4s", head)
        header = 16 if size == 1 else 8
        if len(head) < header:
            return
        size = struct.unpack_from(">Q", head, 8)[0] if size == 1 else size or end - start
        if not header <= size <= end - start:
            return
        yield kind, start + header, start + size
        start += size


def _find(f, start: int, end: int, kind: bytes) -> tuple[int, int] | None:
    """Payload ``(start, end)`` of the first box of type ``kind`` in ``f[start:end]``, or None."""
    return next(((s, e) for k, s, e in _boxes(f, start, end) if k == kind), None)


def _read(f, offset: int, n: int) -> bytes:
    """Up to ``n`` bytes of the binary file ``f`` from ``offset`` (fewer at its end)."""
    f.seek(offset)
    return f.read(n)


def _matrix(f, payload: tuple[int, int], offsets: tuple[int, int]) -> np.ndarray | None:
    """The 3x3 transformation matrix in the full box whose payload is ``f[payload[0]:payload[1]]``,
    ``offsets[version]`` bytes in (version 0 or 1, the payload's first byte): 9 big-endian int32
    ``a b u c d v x y w``, 16.16 fixed point except ``u v w`` (2.30), as float64 (ISO/IEC
    14496-12 6.2.2); None when the box ends first."""
    start, stop = payload
    offset = start + offsets[_read(f, start, 1) == b"\x01"]
    if offset + 36 > stop:
        return None
    values = np.array(struct.unpack(">9i", _read(f, offset, 36)), np.float64).reshape(3, 3)
    return values / np.array([2.0**16, 2.0**16, 2.0**30])  # column 2 is 2.30, the others 16.16


def _open_decord(path: Path, probe: _Probe) -> decord.VideoReader | None:
    """decord's reader, or None where decord cannot open the file or its frame count disagrees
    with the container's (PyAV decodes it then: a decord limit, not corruption)."""
    try:
        # one decoding thread: faster than FFmpeg's automatic threading on 320x240 clips here
        reader = decord.VideoReader(str(path), num_threads=1)
    except (decord.DECORDError, RuntimeError):
        return None
    return reader if len(reader) == probe.frames else None


def _sample_decord(
    path: Path, probe: _Probe, max_frames: int, sample_fps: int, decode: bool
) -> tuple[list[int], list[float], np.ndarray] | None:
    """Chosen indices, their times and, if ``decode``, their RGB frames ``(n, H, W, 3)`` uint8 read
    with decord (an empty array otherwise); None where decord is not used (:func:`_open_decord`).

    decord decodes forward and seeks only when the next index lies past a later key frame. Its
    reader is dropped on return, before the caller resizes the frames: while it lives, its
    decoding thread keeps decoding frames nobody asked for (~10 ms of CPU a 320x240 clip here,
    ``benchmarks/bench_frames.py --baseline``).

    A frame FFmpeg cannot decode means the file is damaged: decord reports such errors from its
    decoder thread, a frame or two late, so "the first unreadable frame" of a damaged file is
    not well defined; the whole file is rejected instead.
    """
    reader = _open_decord(path, probe)
    if reader is None:
        return None
    fps = int(reader.get_avg_fps())  # CLIP4Clip: int(cap.get(CAP_PROP_FPS)), 29.97 -> 29
    candidates = _candidates(path, len(reader), fps, sample_fps)
    indices = [candidates[i] for i in _keep(len(candidates), max_frames)]
    times = reader.get_frame_timestamp(indices)[:, 0].astype(np.float64).tolist()
    if not decode:
        return indices, times, np.empty((0, 0, 0, 3), np.uint8)
    try:
        return indices, times, reader.get_batch(indices).asnumpy()
    except decord.DECORDError as err:
        raise VideoDecodeError(path, f"a frame cannot be decoded ({_short(err)}): the file is corrupt") from None


def _sample_pyav(path, probe, max_frames, sample_fps, convert):
    """Decode every frame in order (frame ``i`` is the ``i``-th decoded frame), keep the candidates.

    The frame count is only known at the end, so every candidate is converted and kept (at
    ``size`` px, ~150 KB each at 224 px) and ``linspace`` picks among them afterwards.
    """
    fps = int(probe.fps)
    offsets = set(_offsets(path, fps, sample_fps))
    kept: list[tuple[int, float, np.ndarray | None]] = []
    count = 0
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_count = 1  # parallelism comes from the frame cache's processes
            for frame in container.decode(stream):
                if count % fps in offsets:  # frame sec * fps + offset
                    rgb = None if convert is None else convert(_upright(frame))
                    kept.append((count, np.nan if frame.time is None else float(frame.time), rgb))
                count += 1
    except av.error.FFmpegError as err:
        raise VideoDecodeError(path, f"a frame cannot be decoded ({_short(err)}): the file is corrupt") from None
    if count == 0:
        raise VideoDecodeError(path, "has no decodable frame: truncated or corrupt; re-download or remove it")
    if probe.frames and count < probe.frames:
        raise VideoDecodeError(path, f"only {count} of its {probe.frames} frames decode: truncated or corrupt")
    chosen = [kept[i] for i in _keep(len(kept), max_frames)]
    frames = [] if convert is None else [rgb for _, _, rgb in chosen]
    return [i for i, _, _ in chosen], [t for _, t, _ in chosen], frames, DECODERS["pyav"]


def _upright(frame: av.VideoFrame) -> np.ndarray:
    """RGB (H, W, 3) uint8 of ``frame`` turned as its display matrix says (counter-clockwise degrees)."""
    rgb = frame.to_ndarray(format="rgb24")
    return np.ascontiguousarray(np.rot90(rgb, k=(frame.rotation // 90) % 4)) if frame.rotation else rgb


def _short(err: Exception) -> str:
    """decord's or FFmpeg's message without timestamps and source locations."""
    line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return re.sub(r"\[[^\]]*\]\s*|\S+\.(cc|h):\d+:\s*", "", line).strip() or type(err).__name__
