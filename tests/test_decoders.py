"""Which frames come back, per container and codec: each test video is written here with PyAV and
carries its frame number in its pixels, so a wrong seek cannot go unnoticed."""
from __future__ import annotations

import struct
import weakref
from fractions import Fraction
from pathlib import Path

import av
import cv2
import decord
import numpy as np
import pytest

import vidret_lib.frames as frames_mod
from vidret_lib.frames import DECODERS, TRANSCODE, VideoDecodeError, clip4clip_frame_indices, sample_clip

BITS = 8  # frame numbers 0..255, one 2x4 grid of black/white blocks


def numbered(i: int, width: int, height: int) -> np.ndarray:
    """(height, width, 3) uint8 showing ``i`` as 8 black/white blocks in a 2x4 grid over the
    central square (what survives CLIP's centre crop), grey elsewhere."""
    img = np.full((height, width, 3), 128, np.uint8)
    side = min(width, height)
    top, left = (height - side) // 2, (width - side) // 2
    for b in range(BITS):
        r, c = divmod(b, 4)
        y, x = top + r * side // 2, left + c * side // 4
        img[y : y + side // 2, x : x + side // 4] = 255 if (i >> b) & 1 else 0
    return img


def read_number(img: np.ndarray) -> int:
    """Inverse of :func:`numbered` on a square crop of its central square (any size)."""
    side = img.shape[0]
    blocks = [img[r * side // 2 + side // 8 : (r + 1) * side // 2 - side // 8,
                  c * side // 4 + side // 16 : (c + 1) * side // 4 - side // 16] for r in range(2) for c in range(4)]
    return sum(1 << b for b, block in enumerate(blocks) if block.mean() > 128)


def write_numbered(path: Path, codec: str, n_frames: int, fps, width: int, height: int, *, fmt: str | None = None,
                   pix_fmt: str = "yuv420p", options: dict | None = None, rotation: int | None = None,
                   hflip: bool = False) -> Path:
    """A video whose frame ``i`` shows ``i`` (:func:`numbered`), written with PyAV; ``rotation``
    (degrees counter-clockwise) and ``hflip`` set the display matrix of MP4/MOV."""
    with av.open(str(path), "w", format=fmt, options=options or {}) as container:
        stream = container.add_stream(codec, rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if rotation is not None:
            stream.set_display_rotation(rotation, hflip=hflip)
        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(numbered(i, width, height), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


AV1_ENCODERS = sorted({"libaom-av1", "libsvtav1", "librav1e"} & av.codecs_available)
# name: (file, codec, container format, frames, fps, width, height, pixel format, muxer options, decoder)
CASES = {
    "mpeg2-mpg": ("a.mpg", "mpeg2video", "vob", 250, 25, 64, 48, "yuv420p", None, "pyav"),
    "mpeg1-mpeg": ("a.mpeg", "mpeg1video", "mpeg", 250, 25, 64, 48, "yuv420p", None, "pyav"),
    "h264-vob": ("a.vob", "libx264", "vob", 250, 25, 64, 48, "yuv420p", None, "pyav"),
    "h264-ts": ("a.ts", "libx264", "mpegts", 250, 25, 320, 240, "yuv420p", None, "pyav"),
    "gif": ("a.gif", "gif", "gif", 30, 10, 64, 48, "rgb8", None, "pyav"),
    "webm-live": ("a.webm", "libvpx", "webm", 75, 25, 64, 48, "yuv420p", {"live": "1"}, "pyav"),
    "h264-mp4": ("a.mp4", "libx264", "mp4", 250, 25, 64, 48, "yuv420p", None, "decord"),
    "h264-mp4-ntsc": ("b.mp4", "libx264", "mp4", 250, Fraction(30000, 1001), 64, 48, "yuv420p", None, "decord"),
}
CASES["av1-mp4"] = ("c.mp4", (AV1_ENCODERS or ["no AV1 encoder"])[0], "mp4", 60, 25, 64, 64, "yuv420p", None, "pyav")


def expected_indices(n_frames: int, fps: int, max_frames: int) -> list[int]:
    """CLIP4Clip's rule written out: frames sec * int(fps), seconds 0..ceil(n/fps), then linspace."""
    candidates = [s * fps for s in range(-(-n_frames // fps) + 1) if s * fps < n_frames]
    if len(candidates) > max_frames:
        candidates = [candidates[i] for i in np.linspace(0, len(candidates) - 1, max_frames, dtype=int)]
    return candidates


@pytest.mark.parametrize("name", sorted(CASES))
def test_returned_frames_are_the_named_frames(tmp_path, name):
    file, codec, fmt, n, fps, w, h, pix, options, decoder = CASES[name]
    if name == "av1-mp4" and not AV1_ENCODERS:
        pytest.skip(f"no AV1 encoder (libaom-av1, libsvtav1, librav1e) in PyAV {av.__version__}: AV1 not tested")
    path = write_numbered(tmp_path / file, codec, n, fps, w, h, fmt=fmt, pix_fmt=pix, options=options)
    clip = sample_clip(path, max_frames=12, size=48)
    want = expected_indices(n, int(fps), 12)
    assert clip.indices.tolist() == want
    assert [read_number(f) for f in clip.frames[: len(want)]] == want  # the pixels are those frames
    assert clip.decoder == DECODERS[decoder]
    # each frame's presentation time is its index over the frame rate (plus the stream's start);
    # MPEG-PS stamps only some packets: FFmpeg guesses the others to within a frame, or leaves them NaN
    stamped = ~np.isnan(clip.times)
    assert stamped[0] and (stamped.all() or fmt in ("vob", "mpeg"))
    elapsed = clip.times[stamped] - clip.times[0]
    np.testing.assert_allclose(elapsed, np.array(want)[stamped] / float(fps), atol=1.01 / float(fps))
    assert clip4clip_frame_indices(path) == want


def opencv_frames(path: Path, indices: list[int]) -> list[np.ndarray]:
    """RGB frames read by OpenCV (which applies the display rotation, CAP_PROP_ORIENTATION_AUTO)."""
    cap = cv2.VideoCapture(str(path))
    out = []
    for i in indices:
        cap.set(cv2.CAP_PROP_POS_FRAMES, i)
        ok, frame = cap.read()
        assert ok, (path, i)
        out.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    return out


@pytest.mark.parametrize("rotation", [90, 270, 180])
@pytest.mark.parametrize("height", [16, 24, 48, 72])
def test_rotated_h264_is_upright_as_opencv_reads_it(tmp_path, rotation, height):
    path = write_numbered(tmp_path / "r.mp4", "libx264", 40, 10, 96, height, rotation=rotation)
    size = 16
    clip = sample_clip(path, max_frames=4, size=size)
    assert clip.indices.tolist() == [0, 10, 20, 30] and clip.decoder == DECODERS["pyav"]
    reference = [frames_mod.resize_center_crop(f, size) for f in opencv_frames(path, [0, 10, 20, 30])]
    assert opencv_frames(path, [0])[0].shape[:2] == ((96, height) if rotation != 180 else (height, 96))
    diff = np.abs(clip.frames.astype(np.int16) - np.stack(reference)).mean()
    assert diff < 2.0, diff


def ffmpeg_rotation(path: Path) -> int:
    """The display rotation FFmpeg attaches to the first decoded frame (PyAV's ``VideoFrame.rotation``)."""
    with av.open(str(path)) as container:
        return next(container.decode(video=0)).rotation


def set_movie_matrix(path: Path, degrees: float) -> None:
    """Overwrite the ``mvhd`` (movie) matrix with a rotation by ``degrees`` counter-clockwise, in
    av_display_rotation_set's layout (a = cos, b = -sin, c = sin, d = cos; 16.16, w = 1 in 2.30)."""
    data = bytearray(path.read_bytes())
    payload = data.index(b"mvhd") + 4
    assert data[payload] == 0, "version 0 mvhd expected"  # matrix 36 bytes into a version 0 payload
    cos, sin = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    matrix = [round(v * 65536) for v in (cos, -sin)] + [0] + [round(v * 65536) for v in (sin, cos)] + [0, 0, 0, 1 << 30]
    data[payload + 36 : payload + 72] = struct.pack(">9i", *matrix)
    path.write_bytes(bytes(data))


def use_64bit_mdat(path: Path) -> None:
    """Rewrite the 8-byte ``free`` box plus 8-byte ``mdat`` header that FFmpeg's mov muxer writes
    into one 16-byte ``mdat`` header with a 64-bit size (what it writes for files over 4 GiB):
    same offsets, so the file still plays, and the ``moov`` after it is found only by reading the
    64-bit size."""
    data = path.read_bytes()
    at = data.index(b"\x00\x00\x00\x08free")
    size, kind = struct.unpack(">I4s", data[at + 8 : at + 16])
    assert kind == b"mdat", "free then mdat expected"
    path.write_bytes(data[:at] + struct.pack(">I4sQ", 1, b"mdat", size + 8) + data[at + 16 :])


@pytest.mark.parametrize(
    "rotation, hflip, movie, large",
    [
        (None, False, None, False),  # no matrix written: identity
        (0, False, None, True),
        (90, False, None, False),
        (180, False, None, True),
        (270, False, None, False),  # FFmpeg says -90
        (30, False, None, False),  # 29.999..: truncated to 29, as PyAV
        (45, True, None, False),  # mirrored
        (0, False, 90, False),  # rotation from the movie matrix alone
        (90, False, 90, False),  # track and movie matrices compose: 180
        (-30, True, 45, True),
    ],
)
def test_mp4_rotation_from_the_boxes_equals_ffmpegs(tmp_path, rotation, hflip, movie, large):
    path = write_numbered(tmp_path / "r.mp4", "libx264", 20, 10, 64, 48, rotation=rotation, hflip=hflip)
    if movie is not None:
        set_movie_matrix(path, movie)
    if large:
        use_64bit_mdat(path)
    expected = ffmpeg_rotation(path)
    assert frames_mod._mp4_rotation(path) == expected
    clip = sample_clip(path, max_frames=2, size=16)
    assert clip.decoder == DECODERS["decord" if expected == 0 else "pyav"]
    if expected == 0:  # decord found the frames (past a 64-bit mdat too)
        assert [read_number(f) for f in clip.frames] == [0, 10]


def test_decord_path_decodes_nothing_it_does_not_return(tmp_path, monkeypatch):
    """Upright H.264 in MP4 (issue 10: "no benchmark got slower on MP4 by more than 10%"): PyAV
    opens the file once for its stream facts and decodes nothing, neither a frame (~15 ms a clip)
    nor FFmpeg's own probe frames (skip_frame=all, ~4 ms); and decord's reader is gone before the
    frames are resized, since its thread keeps decoding while it lives (~10 ms)."""
    path = write_numbered(tmp_path / "a.mp4", "libx264", 50, 25, 64, 48)
    opened, read, readers_alive = [], [], []
    alive = weakref.WeakSet()

    class Container:  # what PyAV opens, recording what is read from it
        def __init__(self, container):
            self.container = container

        def __getattr__(self, name):
            if name in ("decode", "demux"):
                read.append(name)
            return getattr(self.container, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.container.close()

    class Reader(decord.VideoReader):  # decord's reader, tracked while it lives
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            alive.add(self)

    def spy_open(*args, **kwargs):
        opened.append(kwargs.get("options", {}))
        return Container(real_open(*args, **kwargs))

    def spy_resize(frame, size):
        readers_alive.append(len(alive))
        return real_resize(frame, size)

    real_open, real_resize = av.open, frames_mod.resize_center_crop
    monkeypatch.setattr(frames_mod.av, "open", spy_open)
    monkeypatch.setattr(frames_mod.decord, "VideoReader", Reader)
    monkeypatch.setattr(frames_mod, "resize_center_crop", spy_resize)
    clip = sample_clip(path, max_frames=3, size=16)
    assert clip.decoder == DECODERS["decord"] and clip.indices.tolist() == [0, 25]
    assert read == [] and opened == [{"skip_frame": "all"}]
    assert readers_alive == [0, 0]


def test_unsupported_codec_is_not_called_corrupt(tmp_path):
    path = write_numbered(tmp_path / "x.mp4", "libx264", 10, 10, 64, 48)
    data = path.read_bytes()
    entry = data.index(b"avc1", data.index(b"stsd"))  # the sample entry naming the codec
    path.write_bytes(data[:entry] + b"zzzz" + data[entry + 4:])  # a codec no FFmpeg decoder knows
    with pytest.raises(VideoDecodeError) as info:
        sample_clip(path)
    assert info.value.path == path and "unsupported codec/container" in info.value.reason
    assert TRANSCODE in info.value.reason and "corrupt" not in info.value.reason


@pytest.mark.parametrize("keep, reason", [
    (lambda data: 200, "FFmpeg cannot open it"),  # inside the header
    (lambda data: data.index(b"\x1f\x43\xb6\x75") + 8, "has no decodable frame"),  # first Cluster's header only
])
def test_truncated_pyav_file_is_corrupt(tmp_path, keep, reason):
    path = write_numbered(tmp_path / "t.webm", "libvpx", 50, 25, 64, 48)
    data = path.read_bytes()
    path.write_bytes(data[: keep(data)])
    for fn in (sample_clip, clip4clip_frame_indices):
        with pytest.raises(VideoDecodeError, match="corrupt") as info:
            fn(path)
        assert info.value.path == path and reason in info.value.reason


def test_resolution_guard_names_file_and_size(tmp_path, monkeypatch):
    path = write_numbered(tmp_path / "big.ts", "libx264", 10, 10, 64, 48, fmt="mpegts")
    monkeypatch.setattr(frames_mod, "MAX_PIXELS", 64 * 48 - 1)
    for fn in (sample_clip, clip4clip_frame_indices):
        with pytest.raises(VideoDecodeError, match="64x48") as info:
            fn(path)
        assert info.value.path == path and "ffmpeg -i IN -vf scale" in info.value.reason
