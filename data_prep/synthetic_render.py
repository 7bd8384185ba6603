"""Draw ShapeMotion scenes with numpy and write them as H.264 mp4 files with PyAV.

A *scene* (a JSON-ready dict made by :mod:`data_prep.synthetic`) is a background, a main
actor on a path and a few small distractor actors. Frame ``i`` of ``n`` shows the scene at
time ``u = k / (n - 1)`` with ``k = i``, or ``k = n - 1 - i`` when ``scene["reversed"]``:
a reversed scene is, frame for frame, the original played backwards, so the two videos
hold exactly the same set of frames (their frame means are equal) and differ only in
order. That is what makes direction and event order *temporal-only* facts.

Shapes are drawn with 4x4 supersampled coverage (anti-aliased edges); positions are whole
pixels. Nothing here is random: the same scene always gives the same pixels.
"""
from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import av
import numpy as np

# RGB values of the colour and background vocabularies (names are what captions say).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (40, 180, 60),
    "blue": (40, 80, 235),
    "yellow": (245, 220, 40),
    "purple": (150, 50, 200),
    "orange": (250, 140, 20),
    "cyan": (30, 200, 220),
    "pink": (250, 120, 180),
}
BACKGROUNDS = ("black", "white", "grey", "striped", "checkered")
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
# Radius of a shape as a fraction of the frame side.
SIZES: dict[str, float] = {"small": 0.06, "medium": 0.10, "large": 0.15}
DISTRACTOR_SIZE = 0.04
_SUPERSAMPLE = 4


def position(path: dict, u: float) -> tuple[float, float]:
    """Centre ``(x, y)`` in pixels of an actor on ``path`` at time ``u`` in [0, 1] (y points down).

    Example:
        >>> position({"kind": "linear", "start": [10, 50], "end": [80, 50]}, 0.5)
        (45.0, 50.0)
        >>> position({"kind": "bounce", "x": 40, "floor": 80, "height": 30, "bounces": 3}, 1.0)
        (40.0, 80.0)
    """
    kind = path["kind"]
    if kind == "linear":
        (x0, y0), (x1, y1) = path["start"], path["end"]
        return x0 + (x1 - x0) * u, y0 + (y1 - y0) * u
    if kind == "circle":  # sweep > 0 is clockwise on screen, since y points down
        angle = path["angle0"] + path["sweep"] * 2 * math.pi * u
        cx, cy = path["centre"]
        return cx + path["radius"] * math.cos(angle), cy + path["radius"] * math.sin(angle)
    if kind == "bounce":  # |sin| arcs: the same forwards and backwards for whole bounces
        return float(path["x"]), path["floor"] - path["height"] * abs(math.sin(math.pi * path["bounces"] * u))
    if kind == "static":
        return float(path["at"][0]), float(path["at"][1])
    raise ValueError(f"unknown path kind {kind!r} in scene path {path}")


def _inside(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Boolean mask of points ``(x, y)`` (in radius units, centre 0) inside ``shape``."""
    if shape == "circle":
        return x**2 + y**2 <= 1.0
    if shape == "square":
        return np.maximum(abs(x), abs(y)) <= 0.8
    if shape == "diamond":
        return abs(x) + abs(y) <= 1.0
    if shape == "cross":
        return ((abs(x) <= 0.32) & (abs(y) <= 1.0)) | ((abs(y) <= 0.32) & (abs(x) <= 1.0))
    if shape == "triangle":
        return _in_polygon(x, y, [(0.0, -1.0), (0.95, 0.8), (-0.95, 0.8)])
    if shape == "star":
        pts = []
        for k in range(10):  # 5 outer points (radius 1) alternating with 5 inner (radius 0.45)
            r = 1.0 if k % 2 == 0 else 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((r * math.cos(a), r * math.sin(a)))
        return _in_polygon(x, y, pts)
    raise ValueError(f"unknown shape {shape!r}; known shapes: {SHAPES}")


def _in_polygon(x: np.ndarray, y: np.ndarray, pts: list[tuple[float, float]]) -> np.ndarray:
    """Even-odd rule: a point is inside if a ray to +x crosses the outline an odd number of times."""
    inside = np.zeros(x.shape, dtype=bool)
    for (xa, ya), (xb, yb) in zip(pts, pts[1:] + pts[:1]):
        crosses = (ya > y) != (yb > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_cross = xa + (y - ya) * (xb - xa) / (yb - ya)
        inside ^= crosses & (x < x_cross)
    return inside


@lru_cache(maxsize=256)
def sprite(shape: str, radius: int) -> np.ndarray:
    """Anti-aliased coverage (float32 in [0, 1], shape ``(2r+1, 2r+1)``) of ``shape`` of ``radius`` px.

    Example:
        >>> a = sprite("circle", 5)
        >>> a.shape, float(a[5, 5]), float(a[0, 0])
        ((11, 11), 1.0, 0.0)
    """
    n = 2 * radius + 1
    s = _SUPERSAMPLE
    offsets = (np.arange(n * s) + 0.5) / s - 0.5 - radius  # pixel-centre grid, supersampled
    y, x = np.meshgrid(offsets / radius, offsets / radius, indexing="ij")
    cover = _inside(shape, x, y).reshape(n, s, n, s).mean(axis=(1, 3))
    return cover.astype(np.float32)


def background(name: str, size: int, phase: int) -> np.ndarray:
    """A ``(size, size, 3)`` float32 background image; ``phase`` shifts the texture."""
    yy, xx = np.mgrid[0:size, 0:size]
    if name == "black":
        grey = np.full((size, size), 12.0)
    elif name == "white":
        grey = np.full((size, size), 240.0)
    elif name == "grey":
        grey = np.full((size, size), 125.0)
    elif name == "striped":
        period = max(4, size // 12)
        grey = np.where(((xx + phase) // (period // 2)) % 2 == 0, 60.0, 105.0)
    elif name == "checkered":
        cell = max(4, size // 8)
        grey = np.where((((xx + phase) // cell) + ((yy + phase) // cell)) % 2 == 0, 70.0, 150.0)
    else:
        raise ValueError(f"unknown background {name!r}; known backgrounds: {BACKGROUNDS}")
    return np.repeat(grey[:, :, None], 3, axis=2).astype(np.float32)


def actor_look(actor: dict, u: float) -> tuple[str, str]:
    """``(shape, colour)`` of an actor at time ``u``: events switch it at ``u >= 0.5``.

    Example:
        >>> a = {"shape": "circle", "colour": "red", "event": "colour_change",
        ...      "shape2": None, "colour2": "blue"}
        >>> actor_look(a, 0.25), actor_look(a, 0.75)
        (('circle', 'red'), ('circle', 'blue'))
    """
    event = actor.get("event", "none")
    if event == "none" or u < 0.5:
        return actor["shape"], actor["colour"]
    if event == "colour_change":
        return actor["shape"], actor["colour2"]
    if event == "sequence":
        return actor["shape2"], actor["colour2"]
    raise ValueError(f"unknown event {event!r} in actor {actor}")


def _paste(frame: np.ndarray, cover: np.ndarray, rgb: tuple[int, int, int], cx: int, cy: int) -> None:
    """Alpha-blend a sprite of colour ``rgb`` centred at ``(cx, cy)``, clipped to the frame."""
    r = cover.shape[0] // 2
    h, w = frame.shape[:2]
    y0, y1, x0, x1 = cy - r, cy + r + 1, cx - r, cx + r + 1
    sy0, sx0 = max(0, -y0), max(0, -x0)
    y0c, y1c, x0c, x1c = max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)
    if y0c >= y1c or x0c >= x1c:
        return
    a = cover[sy0 : sy0 + (y1c - y0c), sx0 : sx0 + (x1c - x0c), None]
    region = frame[y0c:y1c, x0c:x1c]
    region *= 1.0 - a
    region += a * np.asarray(rgb, dtype=np.float32)


def render_frame(scene: dict, frame_size: int, u: float) -> np.ndarray:
    """The scene at time ``u`` in [0, 1] (as drawn, ``scene["reversed"]`` not applied): uint8
    ``(frame_size, frame_size, 3)``. Raises ``ValueError`` for ``u`` outside [0, 1].

    Example:
        >>> scene = {"background": "white", "phase": 0, "reversed": False, "distractors": [],
        ...          "actor": {"shape": "circle", "colour": "red", "size": "large", "event": "none",
        ...                    "shape2": None, "colour2": None, "path": {"kind": "static", "at": [32, 32]}}}
        >>> f = render_frame(scene, 64, 0.0)
        >>> f.shape, f[32, 32].tolist(), f[0, 0].tolist()
        ((64, 64, 3), [220, 30, 30], [240, 240, 240])
    """
    if not 0.0 <= u <= 1.0:
        raise ValueError(f"u={u}: a scene's time runs from 0 to 1")
    frame = background(scene["background"], frame_size, scene["phase"])
    actors = [(a, DISTRACTOR_SIZE) for a in scene["distractors"]]
    actors.append((scene["actor"], SIZES[scene["actor"]["size"]]))  # the main actor is drawn last, on top
    for actor, rel_size in actors:
        shape, colour = actor_look(actor, u)
        x, y = position(actor["path"], u)
        radius = max(2, round(rel_size * frame_size))
        _paste(frame, sprite(shape, radius), COLOURS[colour], round(x), round(y))
    np.clip(np.rint(frame), 0, 255, out=frame)
    return frame.astype(np.uint8)


def render_frames(scene: dict, frame_size: int, n_frames: int) -> np.ndarray:
    """All frames of a scene: uint8 array ``(n_frames, frame_size, frame_size, 3)``.

    Example:
        >>> scene = {"background": "black", "phase": 0, "reversed": False, "distractors": [],
        ...          "actor": {"shape": "square", "colour": "red", "size": "large", "event": "none",
        ...                    "shape2": None, "colour2": None,
        ...                    "path": {"kind": "linear", "start": [16, 32], "end": [48, 32]}}}
        >>> f = render_frames(scene, 64, 5)
        >>> f.shape, f.dtype
        ((5, 64, 64, 3), dtype('uint8'))
        >>> back = render_frames({**scene, "reversed": True}, 64, 5)
        >>> bool((back == f[::-1]).all())
        True
    """
    if n_frames < 2:
        raise ValueError(f"n_frames={n_frames}: a video needs at least 2 frames")
    out = np.empty((n_frames, frame_size, frame_size, 3), dtype=np.uint8)
    for i in range(n_frames):
        k = n_frames - 1 - i if scene["reversed"] else i
        out[i] = render_frame(scene, frame_size, k / (n_frames - 1))
    return out


def write_mp4(path: str | Path, frames: np.ndarray, fps: int, crf: int, comment: str) -> None:
    """Encode ``frames`` (uint8 ``(T, H, W, 3)`` RGB, even H and W) as H.264/yuv420p mp4 at ``fps``.

    x264 runs on one thread without macroblock-tree rate control, so the same frames give
    the same bytes (checked here, not promised by x264). ``comment`` is stored in the
    container metadata (the generator puts the video's key there to validate reruns).
    """
    _, h, w, _ = frames.shape
    with av.open(str(path), "w", format="mp4") as container:
        container.metadata["comment"] = comment
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        # mbtree off: with it, 1-3% of these videos came out different on a re-encode (x264 in
        # PyAV 18's wheel, one thread); without it, none in 750 re-encodes of 150 videos.
        stream.options = {"crf": str(crf), "preset": "medium", "threads": "1", "x264-params": "mbtree=0"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def mp4_matches(path: str | Path, comment: str, n_frames: int, frame_size: int) -> bool:
    """True when ``path`` is a readable mp4 holding ``n_frames`` frames of the expected size and key.

    Only the container header is read (no decoding), so checking a finished video is cheap.
    """
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            return (
                container.metadata.get("comment") == comment
                and stream.frames == n_frames
                and stream.codec_context.width == frame_size
                and stream.codec_context.height == frame_size
            )
    except (av.error.FFmpegError, IndexError, OSError):
        return False
