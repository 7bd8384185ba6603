"""Feature extraction throughput against the bare model forward pass, in the same run.

    .venv/bin/python benchmarks/bench_features.py [--quick] [--threads 2] [--encoder default]

Prints images/s and captions/s of ``video_features`` / ``text_features`` on a cold cache (a
temporary folder) and of ``encoder.model.encode_image`` / ``encode_text`` on pre-made
tensors / pre-tokenised captions with the same batch size, and their ratio (goal:
extraction within 15% of the bare forward pass). The frames come from per-video ``.npz``
files, as the frame cache stores them. For the default encoder it also prints the bare
image rate at several input sizes and batch sizes (the choice of ``image_size=96``,
ShapeMotion's frame size, and of the CPU batch size in ``vidret_lib.features.VIDEO_BATCH``).

Each figure is the best of ``--repeats`` runs, the compared runs alternating. On a machine
shared with other busy processes, 2 intra-op threads wait on each other at every layer and
wall-clock figures swing several-fold: compare ``--threads 1`` figures there.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from vidret_lib.cache import save_npz
from vidret_lib.encoders import load_encoder
from vidret_lib.features import TEXT_BATCH, VIDEO_BATCH, text_features, video_features
from vidret_lib.frame_cache import FrameCache

WORDS = "a man woman dog cat red blue car ball is playing running talking about the in".split()


def write_frame_cache(folder: Path, n_videos: int, frames: int, size: int) -> FrameCache:
    """A :class:`~vidret_lib.frame_cache.FrameCache` of random clips: one uncompressed ``.npz`` per
    video (frames uint8 (T, S, S, 3), mask bool (T,) with 2/3 to all of its T frames valid), as
    :func:`vidret_lib.frame_cache.frame_cache` writes them; each video's content stamp is fixed."""
    rng = np.random.default_rng(0)
    ids = tuple(f"video{i}" for i in range(n_videos))
    for vid in ids:
        mask = np.arange(frames) < rng.integers(frames * 2 // 3, frames + 1)  # 8-12 of 12
        save_npz(folder / f"{vid}.npz", mask=mask,
                 frames=rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8))
    return FrameCache(folder, f"bench-{n_videos}x{frames}x{size}", ids, frames, size, failed={},
                      content=dict.fromkeys(ids, "bench"), decoders={})


def best_rates(count: int, runs: dict, repeats: int) -> dict:
    """``{name: items per second}`` of each ``run(repeat)``, best of ``repeats``, runs alternating."""
    best = dict.fromkeys(runs, float("inf"))
    for repeat in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run(repeat)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: count / seconds for name, seconds in best.items()}


def bare_image_run(encoder, frames: np.ndarray, batch_size: int) -> Callable[[int], None]:
    """The bare forward pass over pre-made (preprocessed) batches."""
    batches = [encoder.preprocess_frames(frames[i:i + batch_size])
               for i in range(0, len(frames), batch_size)]

    def run(repeat: int) -> None:
        with torch.no_grad():
            for x in batches:
                encoder.model.encode_image(x)

    return run


def bare_text_run(encoder, captions: list[str], batch_size: int) -> Callable[[int], None]:
    """The bare forward pass over pre-tokenised batches."""
    batches = [encoder.tokenize(captions[i:i + batch_size]) for i in range(0, len(captions), batch_size)]

    def run(repeat: int) -> None:
        with torch.no_grad():
            for tokens in batches:
                encoder.model.encode_text(tokens)

    return run


def report(what: str, function: str, rates: dict) -> None:
    bare, cached = rates["bare"], rates["cached"]
    print(f"{what}: bare forward {bare:.1f}/s, {function} (cold cache) {cached:.1f}/s, "
          f"extraction/bare = {cached / bare:.2f} (overhead {100 * (bare / cached - 1):+.1f}%)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few videos and captions, no sweep")
    parser.add_argument("--encoder", default="default")
    parser.add_argument("--pretrained", default=None, help="for open_clip names, e.g. openai")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--videos", type=int, default=48)
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--captions", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", default="224,160,128,96", help="default encoder: sizes to sweep")
    parser.add_argument("--batch-sizes", default="16,64", help="default encoder: batch sizes to sweep")
    args = parser.parse_args()
    if args.quick:
        args.videos, args.captions, args.repeats, args.sizes = 12, 256, 2, ""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    image_batch = VIDEO_BATCH.get(device.type, VIDEO_BATCH["cpu"])
    text_batch = TEXT_BATCH.get(device.type, TEXT_BATCH["cpu"])

    options = {"pretrained": args.pretrained} if args.encoder != "default" else {}
    encoder = load_encoder(args.encoder, device=device, **options)
    print(f"encoder {encoder.cache_id} on {device}, {torch.get_num_threads()} threads, "
          f"batches of {image_batch} frames / {text_batch} captions")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        frames = write_frame_cache(tmp / "frames", args.videos, args.frames, encoder.image_size)
        masked = np.concatenate([f[m] for f, m in map(frames.load, frames.video_ids)])
        bare = bare_image_run(encoder, masked, image_batch)
        bare(0)  # warm-up
        rates = best_rates(len(masked), {
            "bare": bare,
            "cached": lambda r: video_features(encoder, frames, frames.video_ids, tmp / f"video{r}"),
        }, args.repeats)
        report(f"images ({len(masked)} frames of {args.videos} videos, {encoder.image_size}px)",
               "video_features", rates)

        rng = np.random.default_rng(1)
        captions = [" ".join(rng.choice(WORDS, rng.integers(5, 15))) for _ in range(args.captions)]
        rates = best_rates(len(captions), {
            "bare": bare_text_run(encoder, captions, text_batch),
            "cached": lambda r: text_features(encoder, captions, tmp / f"text{r}"),
        }, args.repeats)
        report(f"captions ({len(captions)})", "text_features", rates)

    if args.encoder == "default" and args.sizes:
        sizes = [int(s) for s in args.sizes.split(",")]
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
        sweep = np.random.default_rng(2).integers(
            0, 256, (max(batch_sizes) * 2, max(sizes), max(sizes), 3), dtype=np.uint8)
        runs = {}
        for size in sizes:
            enc = load_encoder("default", device=device, image_size=size)
            for batch in batch_sizes:
                runs[size, batch] = bare_image_run(enc, sweep[:, :size, :size], batch)
                runs[size, batch](0)  # warm-up
        for (size, batch), rate in best_rates(len(sweep), runs, args.repeats).items():
            print(f"default encoder, bare image forward at {size}px, batch {batch}: "
                  f"{rate:.1f} images/s")


if __name__ == "__main__":
    main()
