"""Where a notebook's setup time goes, and the caption and Spearman speed-ups, in one run.

    .venv/bin/python benchmarks/bench_setup.py [--threads 2] [--dataset ../data/shapemotion-default]
        [--captions 1024] [--resamples 10000]

Prints, each timed once in this fresh process: importing torch and open_clip (what every notebook
kernel pays), ``load_encoder("default")`` the first and the second time in the process, caption
encoding of the dataset's first ``--captions`` test captions the old way (batches of 64 in the given
order, full 32-token context) against ``Encoder.encode_text`` (each distinct caption once, sorted by
token count, batches cut to their longest caption), and ``stats.spearman_difference`` at notebook 06's
size (11,328 pairs x 3 seeds x 2 models, ~20 distinct labels). On a machine shared with other busy
processes, figures swing several-fold: compare figures of one run, or use ``--threads 1``.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

T0 = time.perf_counter()
import torch  # noqa: E402  (timed)

T_TORCH = time.perf_counter() - T0
import open_clip  # noqa: E402,F401  (timed: imports torchvision and transformers pieces)

T_OPEN_CLIP = time.perf_counter() - T0 - T_TORCH

import numpy as np  # noqa: E402

from vidret_lib import stats  # noqa: E402
from vidret_lib.datasets import load_dataset  # noqa: E402
from vidret_lib.encoders import load_encoder  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dataset", default=str(Path(__file__).resolve().parents[1] / "data" / "shapemotion-default"))
    parser.add_argument("--captions", type=int, default=1024)
    parser.add_argument("--resamples", type=int, default=10_000)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{torch.get_num_threads()} threads; import torch {T_TORCH:.1f} s, then open_clip {T_OPEN_CLIP:.1f} s")
    encoder, first = timed(lambda: load_encoder("default"))
    _, second = timed(lambda: load_encoder("default"))
    print(f"load_encoder('default'): {first:.1f} s first in the process, {second:.1f} s again")

    captions = load_dataset(args.dataset).split("test", present_only=True).sentences[:args.captions]

    def old_way():
        with torch.no_grad():
            return torch.cat([encoder.model.encode_text(encoder.tokenize(captions[i:i + 64]))
                              for i in range(0, len(captions), 64)])

    old, t_old = timed(old_way)
    new, t_new = timed(lambda: encoder.encode_text(captions))
    print(f"captions: {len(captions)} ({len(set(captions))} distinct): batches of 64 at full context "
          f"{len(captions) / t_old:.1f}/s, encode_text {len(captions) / t_new:.1f}/s ({t_old / t_new:.2f}x); "
          f"max |difference| {float((new - old).abs().max()):.2g}")

    g = np.random.default_rng(0)
    labels = g.integers(0, 21, 11_328) / 20
    a, b = ({s: np.round(labels + g.standard_normal(len(labels)), 4) for s in range(3)} for _ in range(2))
    _, t_spearman = timed(lambda: stats.spearman_difference(a, b, labels, n_resamples=args.resamples))
    print(f"spearman_difference: {args.resamples} resamples x {len(labels)} pairs x 3 seeds x 2 models "
          f"{t_spearman:.1f} s")


if __name__ == "__main__":
    main()
