"""Time and peak memory of vidret_lib.metrics.retrieval_metrics at MSR-VTT full-test scale.

The matrix is 59,800 captions x 2,990 videos (20 captions per video), float32 (0.72 GB), built
from random unit 512-d embeddings block by block (so building it needs no second copy).
Both directions are timed: t2v (one target per caption) and v2t (the transposed view, 20 targets
per video), on the numpy array and on a torch tensor sharing its memory.

Memory, three figures per call:
- "peak RSS": the process's peak resident set (VmHWM, reset just before the call), i.e. the matrix
  itself + the loaded libraries + what the metric allocates. ``import torch`` alone is about 0.5 GB
  resident here, and ``import vidret_lib`` currently imports torch (for ``vidret_lib.EMCL``);
- "extra": that peak minus the resident size just before the call;
- "alloc": the peak of the metric's own numpy allocations (tracemalloc).

Usage: .venv/bin/python benchmarks/bench_metrics.py [--scale 0.1] [--chunk-size 256]
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

from vidret_lib.metrics import retrieval_metrics

CAPTIONS_PER_VIDEO = 20


def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False when not permitted."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def build_sim(n_videos: int, dim: int = 512, seed: int = 0, block: int = 4096) -> np.ndarray:
    """(n_videos * 20, n_videos) float32 cosine matrix from random unit embeddings; caption i -> video i // 20."""
    gen = np.random.default_rng(seed)
    videos = gen.standard_normal((n_videos, dim), dtype=np.float32)
    videos /= np.linalg.norm(videos, axis=1, keepdims=True)
    n_text = n_videos * CAPTIONS_PER_VIDEO
    sim = np.empty((n_text, n_videos), dtype=np.float32)
    for start in range(0, n_text, block):
        stop = min(start + block, n_text)
        # caption = its video's embedding plus noise 8x its norm: R@1 neither 0 nor 100
        text = videos[np.arange(start, stop) // CAPTIONS_PER_VIDEO] + 8.0 * gen.standard_normal(
            (stop - start, dim), dtype=np.float32
        ) / np.sqrt(dim)
        text /= np.linalg.norm(text, axis=1, keepdims=True)
        np.matmul(text, videos.T, out=sim[start:stop])
    return sim


def _time_one(direction: str, kind: str, matrix, targets, chunk_size: int) -> None:
    tracemalloc.start()
    rss_before = _status_mb("VmRSS")
    can_reset = _reset_peak_rss()
    t0 = time.perf_counter()
    m = retrieval_metrics(matrix, targets, chunk_size=chunk_size)
    seconds = time.perf_counter() - t0
    peak = _status_mb("VmHWM") if can_reset else float("nan")
    alloc = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    print(f"{direction:4} {kind:6} {seconds:8.2f} {peak:13.0f} {peak - rss_before:10.0f} {alloc:10.1f}  "
          f"{m['R1']:5.1f}  {m['R5']:5.1f}  {m['R10']:5.1f}  {m['MdR']:5.1f}  {m['MnR']:5.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the 2,990 videos (0.1: quick run)")
    parser.add_argument("--chunk-size", type=int, default=256, help="query rows per chunk")
    args = parser.parse_args()

    print(f"libraries loaded (numpy, vidret_lib.metrics; torch imported: {'torch' in sys.modules}): "
          f"RSS {_status_mb('VmRSS'):.0f} MiB")
    n_videos = max(2, round(2990 * args.scale))
    sim = build_sim(n_videos)
    caption_video = np.arange(sim.shape[0]) // CAPTIONS_PER_VIDEO
    video_captions = np.arange(sim.shape[0]).reshape(n_videos, CAPTIONS_PER_VIDEO)  # (videos, 20)
    print(f"matrix {sim.shape[0]:,} x {sim.shape[1]:,} float32 = {sim.nbytes / 2**30:.2f} GiB "
          f"({sim.nbytes / 2**20:.0f} MiB); chunk {args.chunk_size} query rows")
    print(f"process RSS with the matrix: {_status_mb('VmRSS'):.0f} MiB; "
          f"peak so far (ru_maxrss, incl. building): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")

    print(f"{'dir':4} {'input':6} {'seconds':>8} {'peak RSS MiB':>13} {'extra MiB':>10} {'alloc MiB':>10}"
          "     R1     R5    R10    MdR    MnR")
    for run in [("t2v", "numpy", sim, caption_video), ("v2t", "numpy", sim.T, video_captions)]:
        _time_one(*run, chunk_size=args.chunk_size)

    import torch  # noqa: PLC0415 (late, so the numpy runs show the footprint without it if possible)

    tensor = torch.from_numpy(sim)  # shares memory with sim
    for run in [("t2v", "torch", tensor, caption_video), ("v2t", "torch", tensor.T, video_captions)]:
        _time_one(*run, chunk_size=args.chunk_size)
    print(f"process peak RSS over the whole run (ru_maxrss): "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    if not _reset_peak_rss():
        print("note: /proc/self/clear_refs not writable, so per-run peaks are unavailable (nan)")


if __name__ == "__main__":
    main()
