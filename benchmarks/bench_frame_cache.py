"""Frame-cache throughput: serial (1 worker process) vs 2 worker processes on the same videos.

Both runs write the same frames (tests/test_frame_cache.py checks the bytes); each run starts
from an empty cache. Clips are bench_frames.py's synthetic 320x240 H.264 clips. Each figure is
the best of ``--repeats`` passes, alternating; the load average before and after is printed,
since other processes share the CPU (2 processes cannot reach 2x when others hold a core).

Usage: .venv/bin/python benchmarks/bench_frame_cache.py [--clips 16] [--seconds 10] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from bench_frames import RATES, write_synthetic_clip

from vidret_lib.datasets import write_dataset
from vidret_lib.frame_cache import frame_cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "ds"
        (root / "videos").mkdir(parents=True)
        ids = [f"clip{i:02d}" for i in range(args.clips)]
        for i, vid in enumerate(ids):
            write_synthetic_clip(root / "videos" / f"{vid}.mp4", args.seconds, RATES[i % len(RATES)], seed=i)
        records = [{"video_id": v, "path": f"videos/{v}.mp4"} for v in ids]
        ds = write_dataset(root, {"name": "bench", "version": "1"}, records, {})
        best = {1: float("inf"), 2: float("inf")}
        for _ in range(args.repeats):
            for workers in best:
                cache_dir = Path(tmp) / f"cache{workers}"
                shutil.rmtree(cache_dir, ignore_errors=True)
                t0 = time.perf_counter()
                frame_cache(ds, ids, cache_dir, workers=workers)
                best[workers] = min(best[workers], time.perf_counter() - t0)
    print(f"load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after, on {os.cpu_count()} CPUs; "
          f"{args.clips} clips of {args.seconds} s")
    for workers, seconds in best.items():
        print(f"  {workers} process(es): {seconds:7.3f} s  {args.clips / seconds:6.1f} clips/s")
    print(f"  speed-up 2 / 1 processes: {best[1] / best[2]:.2f}x (goal >= 1.7x)")


if __name__ == "__main__":
    main()
