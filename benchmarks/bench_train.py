"""Seconds per training epoch on cached-like features, for every paper's variant.

Default size = the default synthetic benchmark's cached features: 600 training videos x 3
captions, T = 12 frames, D = 512 (random features, so only the speed is meaningful), global
batch 128 (4 steps per epoch with CLIP4Clip's drop_last), plus one evaluation of a 200 x 200
validation matrix. ``--npz FILE`` uses real cached features instead (arrays ``text`` (N, D),
``video`` (V, T, D), ``mask`` (V, T), ``caption_video`` (N,), optional ``title`` (V, D)).

    .venv/bin/python benchmarks/bench_train.py            # default size
    .venv/bin/python benchmarks/bench_train.py --quick    # 120 videos, for a smoke run
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

os.environ.setdefault("VIDRET_PROGRESS", "0")

from vidret_lib.train import FeatureSplit, TrainConfig, evaluate, train  # noqa: E402

VARIANTS = {
    "infonce / meanP": dict(),
    "infonce / seqTransf": dict(head="seqTransf"),
    "vsepp SH / meanP": dict(loss="vsepp", max_violation=False),
    "vsepp MH / meanP": dict(loss="vsepp", max_violation=True),
    "dsl / meanP": dict(loss="dsl"),
    "modality_shuffle / meanP + title": dict(loss="modality_shuffle", use_title=True, alpha=0.5, beta=0.5),
    "infonce + EMCL / meanP": dict(emcl=True),
}


def random_split(videos: int, captions: int, frames: int, dim: int, seed: int) -> FeatureSplit:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(videos, frames, dtype=torch.bool)
    mask[: videos // 3, frames // 2:] = False  # a third of the videos are short (padded frames)
    return FeatureSplit(
        torch.randn(videos * captions, dim, generator=g),
        torch.randn(videos, frames, dim, generator=g) * mask[..., None],
        mask,
        torch.arange(videos).repeat_interleave(captions),
        torch.randn(videos, dim, generator=g),
        torch.ones(videos, dtype=torch.bool),
    )


def load_npz(path: str) -> FeatureSplit:
    data = np.load(path)
    title = data["title"] if "title" in data else None
    present = np.ones(len(data["video"]), bool) if title is not None else None
    return FeatureSplit(data["text"], data["video"], data["mask"], data["caption_video"], title, present)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="120 videos instead of 600")
    ap.add_argument("--npz", help="real cached features (see the module docstring)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=4,
                    help="epochs per variant; the fastest epoch after the first (warm-up) is reported")
    args = ap.parse_args()

    videos = 120 if args.quick else 600
    train_split = load_npz(args.npz) if args.npz else random_split(videos, 3, 12, 512, seed=0)
    val = random_split(max(videos // 3, 16), 1, train_split.video.shape[1], train_split.dim, seed=1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; train: {train_split.num_videos} videos x "
          f"{train_split.num_texts // train_split.num_videos} captions, T={train_split.video.shape[1]}, "
          f"D={train_split.dim}; batch {args.batch_size}")
    print(f"{'variant':36s} {'s/epoch':>8s} {'steps':>6s} {'ms/step':>8s} {'eval s':>7s}")
    for name, options in VARIANTS.items():
        if options.get("use_title") and train_split.title is None:
            print(f"{name:36s} skipped: no title features")
            continue
        cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, select="last", **options)
        result = train(cfg, train_split)
        timed = min(result.history[1:] or result.history, key=lambda h: h["seconds"])  # least disturbed epoch
        eval_s = []
        for _ in range(3):
            start = time.perf_counter()
            evaluate(result.model, val)
            eval_s.append(time.perf_counter() - start)
        print(f"{name:36s} {timed['seconds']:8.3f} {timed['steps']:6d} "
              f"{1000 * timed['seconds'] / timed['steps']:8.1f} {min(eval_s):7.3f}")


if __name__ == "__main__":
    main()
