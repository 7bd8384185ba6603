"""Cost of one forward+backward step of each loss, relative to ``infonce_loss``.

Every step starts from random L2-normalised features (B, 512) that require grad and
includes what the loss needs from them (the (B, B) cosine matrix, or the paired cosines),
so the figures compare whole loss heads, not just the final reduction. The inverted
softmax is inference-only (forward, no grad) and ``rank_normalize`` is a one-off label
transform (NumPy), both timed as they are used. Prints a table; not a test.

    .venv/bin/python benchmarks/bench_losses.py [--quick] [--batch 128 1024] [--repeats N]
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
import torch.nn.functional as F

from vidret_lib import EMCL
from vidret_lib.losses import (
    dual_softmax_loss,
    dual_softmax_rerank,
    infonce_loss,
    modality_shuffle_loss,
    pearson_loss,
    rank_normalize,
    vsepp_loss,
)

DIM = 512


def make_steps(b: int, gen: torch.Generator) -> dict[str, Callable[[], None]]:
    """One closure per row of the table; each runs a full step on fresh leaf features."""

    def feats(*shape: int) -> torch.Tensor:
        return F.normalize(torch.randn(*shape, DIM, generator=gen), dim=-1).requires_grad_(True)

    t, v, shuffled, pos = feats(b), feats(b), feats(b), feats(b)
    labels = torch.randint(0, 20, (b,), generator=gen).float() / 20
    emcl = EMCL().train()

    def backward(loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            for x in (t, v, shuffled, pos):
                x.grad = None
            loss_fn().backward()
        return step

    def emcl_infonce() -> torch.Tensor:
        y = F.normalize(emcl(torch.cat([v, t])), dim=-1)  # (2B, D): [videos; texts], as EMCL-Net
        return infonce_loss(y[b:] @ y[:b].T)

    @torch.no_grad()
    def rerank() -> None:
        dual_softmax_rerank(100 * (t @ v.T), temp=1.0)

    return {
        "infonce_loss": backward(lambda: infonce_loss(t @ v.T)),
        "vsepp_loss (MH)": backward(lambda: vsepp_loss(t @ v.T)),
        "vsepp_loss (SH)": backward(lambda: vsepp_loss(t @ v.T, max_violation=False)),
        "dual_softmax_loss (both dirs)": backward(
            lambda: (dual_softmax_loss(100 * (t @ v.T)) + dual_softmax_loss(100 * (v @ t.T))) / 2),
        "modality_shuffle_loss (M=1)": backward(lambda: modality_shuffle_loss(t, pos, shuffled)),
        "pearson_loss (B pairs)": backward(lambda: pearson_loss((t * v).sum(-1), labels)),
        "EMCL + infonce_loss": backward(emcl_infonce),
        "dual_softmax_rerank (fwd only)": rerank,
        "rank_normalize (B labels)": lambda: rank_normalize(labels.numpy()),
    }


def time_steps(steps: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Best wall time in ms of each step over ``repeats`` runs after one warm-up run.

    The steps are run round-robin, so a burst of load from other processes on this
    shared machine hits every row alike, and the minimum discards such bursts.
    """
    best = {}
    for name, step in steps.items():
        step()
        best[name] = float("inf")
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            best[name] = min(best[name], 1000 * (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats (seconds in all)")
    parser.add_argument("--batch", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--repeats", type=int, default=None, help="default 20, or 5 with --quick")
    args = parser.parse_args()
    repeats = args.repeats or (5 if args.quick else 20)
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, D={DIM}, "
          f"best of {repeats} forward+backward steps (CPU, float32)")
    results = {b: time_steps(make_steps(b, gen), repeats) for b in args.batch}
    header = f"{'step':32s}" + "".join(f"{f'B={b} ms':>12s}{'x InfoNCE':>11s}" for b in args.batch)
    print(header)
    print("-" * len(header))
    for name in results[args.batch[0]]:
        row = f"{name:32s}"
        for b in args.batch:
            ms, base = results[b][name], results[b]["infonce_loss"]
            row += f"{ms:12.3f}{ms / base:11.2f}"
        print(row)


if __name__ == "__main__":
    main()
