"""Frame-sampling throughput: vidret_lib.frames (decord) vs CLIP4Clip's OpenCV seek-and-read loop.

Both produce the same frames (CLIP4Clip's choice of source frames, Resize(224, bicubic) +
CenterCrop(224) as uint8; normalisation is the encoder's job and is left out of both):

- "decord": ``vidret_lib.frames.sample_frames``: one ``get_batch`` of the kept frames; decord
  decodes forward through the video and seeks only when a kept frame lies past a later key frame;
- "opencv": CLIP4Clip's ``RawVideoExtractorCV2.video_to_tensor`` loop (ArrowLuo/CLIP4Clip
  ``dataloaders/rawvideo_util.py``): for every second, ``set(CAP_PROP_POS_FRAMES, sec*fps)``
  then ``read()``. OpenCV's FFmpeg backend answers each ``set`` by seeking back to a key frame
  and decoding forward to the target, so a clip with one key frame every 250 frames (libx264's
  default, and MSR-VTT's) is decoded again from its start for every second. It preprocesses every
  frame it reads, then keeps ``linspace(0, n-1, 12)`` of them (``--slice_framepos 2``).

Clips: (a) synthetic H.264 clips written with PyAV (320x240 like MSR-VTT, 10 s, 10 to 30 fps
including 29.97, libx264 default preset: B-frames, key frame every 250 frames); (b) the two real
MSR-VTT clips from ../shared/data when present. Each figure is the sum over clips of each clip's
best time in ``--repeats`` passes; the readers read each clip back to back, taking turns to go
first, so that the load of other processes on a shared machine (its load average is printed)
falls on all of them alike.

``--baseline FILE`` adds a third reader, ``sample_frames`` of another version of
``vidret_lib/frames.py`` loaded from FILE, for A/B timing of a change (issue 10: "no benchmark got
slower on MP4 by more than 10%"), e.g. the decord-only sampler of commit 2f1418e:
``git show 2f1418e:vidret_lib/frames.py > /tmp/frames_2f1418e.py``.

Usage: .venv/bin/python benchmarks/bench_frames.py [--quick] [--clips 20] [--seconds 10] [--repeats 3]
       [--baseline FILE]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
import time
from fractions import Fraction
from pathlib import Path
from typing import Callable

import av
import cv2
import numpy as np

from vidret_lib.frames import resize_center_crop, sample_frames

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REAL_CLIPS = [SHARED_DATA / "msrvtt" / "videos" / f"{v}.mp4" for v in ("video9770", "video9771")]
RATES = [Fraction(10), Fraction(15), Fraction(24), Fraction(25), Fraction(30000, 1001), Fraction(30)]
MAX_FRAMES, SIZE = 12, 224


def write_synthetic_clip(path: Path, seconds: int, fps: Fraction, seed: int, width: int = 320, height: int = 240) -> None:
    """Moving coloured squares over a scrolling texture, with noise (a few hundred kbit/s, like MSR-VTT)."""
    rng = np.random.default_rng(seed)
    texture = rng.integers(30, 200, (height, 2 * width, 3), dtype=np.uint8)  # scrolls left 2 px/frame
    noise = rng.integers(-6, 7, (8, height, width, 3), dtype=np.int16)  # cycled, changes every frame
    squares = [(rng.uniform(0, width - 40), rng.uniform(0, height - 40), rng.uniform(-4, 4), rng.uniform(-3, 3),
                rng.integers(0, 256, 3, dtype=np.uint8)) for _ in range(4)]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(int(seconds * fps)):
            shift = (2 * i) % width
            img = texture[:, shift : shift + width].astype(np.int16) + noise[i % len(noise)]
            for x0, y0, vx, vy, colour in squares:
                x, y = int(x0 + vx * i) % (width - 40), int(y0 + vy * i) % (height - 40)
                img[y : y + 40, x : x + 40] = colour
            frame = av.VideoFrame.from_ndarray(np.clip(img, 0, 255).astype(np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def clip4clip_opencv(path: Path, max_frames: int = MAX_FRAMES, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """CLIP4Clip's OpenCV reader at 1 fps (see the module docstring), same output as sample_frames."""
    cap = cv2.VideoCapture(str(path))
    frame_count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    fps = int(cap.get(cv2.CAP_PROP_FPS))
    images = []
    for sec in range((frame_count + fps - 1) // fps + 1):
        cap.set(cv2.CAP_PROP_POS_FRAMES, sec * fps)
        ok, frame = cap.read()
        if not ok:
            break
        images.append(resize_center_crop(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), size))
    cap.release()
    if len(images) > max_frames:
        images = [images[i] for i in np.linspace(0, len(images) - 1, num=max_frames, dtype=int)]
    frames = np.zeros((max_frames, size, size, 3), np.uint8)
    mask = np.zeros(max_frames, bool)
    frames[: len(images)], mask[: len(images)] = images, True
    return frames, mask


def run(readers: dict[str, Callable], clips: list[Path], repeats: int) -> dict:
    """Per reader, the sum over ``clips`` of each clip's best time in ``repeats`` passes
    (``"seconds"``), the mean absolute difference of its frames from OpenCV's, worst clip
    (``"diff"``, grey levels), and the number of sampled frames (``"frames"``). Checks that every
    reader gives OpenCV's masks."""
    names = list(readers)
    best = {name: [float("inf")] * len(clips) for name in names}
    outputs: dict[str, list] = {name: [None] * len(clips) for name in names}
    for r in range(repeats):
        for i, clip in enumerate(clips):
            first = (r + i) % len(names)  # each reader takes its turn to go first
            for name in names[first:] + names[:first]:
                t0 = time.perf_counter()
                outputs[name][i] = readers[name](clip)
                best[name][i] = min(best[name][i], time.perf_counter() - t0)
    reference = outputs["opencv"]
    for name, out in outputs.items():
        assert all((a[1] == b[1]).all() for a, b in zip(out, reference)), f"{name}: masks differ from opencv's"
    diff = {name: max(np.abs(a[0].astype(np.int16) - b[0]).mean() for a, b in zip(out, reference))
            for name, out in outputs.items()}
    seconds = {name: sum(times) for name, times in best.items()}
    return {"seconds": seconds, "diff": diff, "frames": sum(int(f[1].sum()) for f in reference)}


def report(label: str, clips: list[Path], res: dict) -> None:
    n, frames, seconds = len(clips), res["frames"], res["seconds"]
    print(f"\n{label}: {n} clips, {frames} sampled frames")
    print(f"  {'reader':8} {'seconds':>8} {'clips/s':>8} {'frames/s':>9} {'vs opencv (mean abs)':>21}")
    for name, s in seconds.items():
        print(f"  {name:8} {s:8.3f} {n / s:8.1f} {frames / s:9.1f} {res['diff'][name]:21.3f}")
    print(f"  speed-up decord / opencv: {seconds['opencv'] / seconds['decord']:.2f}x (goal >= 2x)")
    if "baseline" in seconds:
        change = seconds["decord"] / seconds["baseline"] - 1
        print(f"  decord vs baseline: {100 * change:+.1f}% time (goal: at most +10%)")


def load_baseline(path: Path) -> Callable:
    """``sample_frames`` of the ``frames.py`` at ``path``, imported as a standalone module."""
    spec = importlib.util.spec_from_file_location("baseline_frames", path) if path.is_file() else None
    if spec is None:
        raise SystemExit(f"--baseline {path}: not a .py file; write one: git show REV:vidret_lib/frames.py > FILE.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.sample_frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="6 clips, 1 repeat (a few seconds)")
    parser.add_argument("--clips", type=int, default=20)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", type=Path, help="another frames.py to time against (A/B)")
    args = parser.parse_args()
    n_clips, repeats = (6, 1) if args.quick else (args.clips, args.repeats)
    readers = {"decord": sample_frames}
    if args.baseline:  # next to decord, so that the two mostly run back to back
        readers["baseline"] = load_baseline(args.baseline)
    readers["opencv"] = clip4clip_opencv
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; decord num_threads=1, one process")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        synthetic = []
        for i in range(n_clips):
            path = Path(tmp) / f"clip{i:02d}.mp4"
            write_synthetic_clip(path, args.seconds, RATES[i % len(RATES)], seed=i)
            synthetic.append(path)
        kbps = np.mean([p.stat().st_size * 8 / 1000 / args.seconds for p in synthetic])
        print(f"wrote {n_clips} synthetic clips (320x240, {args.seconds} s, {kbps:.0f} kbit/s) "
              f"in {time.perf_counter() - t0:.1f} s")
        report("synthetic", synthetic, run(readers, synthetic, repeats))
    real = [p for p in REAL_CLIPS if p.exists()]
    if real:
        report("real MSR-VTT", real, run(readers, real, repeats))
    else:
        print(f"\nreal MSR-VTT clips absent from {SHARED_DATA}: skipped")


if __name__ == "__main__":
    main()
