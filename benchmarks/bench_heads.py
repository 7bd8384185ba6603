"""Speed of the heads' CPU hot spots (issue 12's budget): EMCL's block evaluation and seqTransf.

Rows, on random float32 features of width D = 512 (default sizes: the default profile's test
split, 2,000 captions x 1,000 videos of 8 frames, and its training batch of 128):

- ``EMCL-Net eval``: ``RetrievalModel(meanP, EMCL(K=32, 9 stages), emcl_rows="pairs").similarity``
  in eval mode, 32 x 32 blocks (notebook 05's EMCL layer, ``vidret_lib/train.py`` ``evaluate``);
- ``plug-in eval, block b``: EMCL-Net's inference module (K=7, 10 stages, lamd 0.1, beta 4,
  ``emcl_rows="stacked"``), b x b blocks (notebook 05's ``emcl_inference``; here on an untrained model:
  the cost does not depend on the weights);
- each EMCL row again as ``per-block loop``: ``RetrievalModel.scores`` called on one block at a
  time, the evaluation's arithmetic before blocks were batched, with the largest absolute
  difference of its scores from ``similarity``'s;
- ``seqTransf train step``: forward + backward of ``encode_text``, ``encode_video`` (4 blocks) and
  InfoNCE on one batch (notebook 01's step, without the optimizer's update);
- ``seqTransf eval``: ``similarity`` of every caption with every video under ``no_grad``.

Each figure is the best wall time over ``--repeats`` runs after one warm-up run, per thread
count (``torch.set_num_threads``); "per unit" is per block (EMCL) or per call; "cpu s" the best
CPU time of the process (steadier than wall time on a shared machine); "peak MiB" is
the growth of this process's peak resident set (Linux VmHWM, reset before each row) over its
resident set at the row's start. Prints a table; not a test.

    .venv/bin/python benchmarks/bench_heads.py [--quick] [--threads 1 2] [--repeats N]
        [--captions 2000] [--videos 1000] [--batch 128]
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from vidret_lib import EMCL
from vidret_lib.heads import RetrievalModel
from vidret_lib.losses import infonce_loss, safe_normalize

DIM, FRAMES = 512, 8
PLUG_IN = dict(k=7, stage_num=10, lamd=0.1, beta=4.0)  # notebook 05's EMCL_INFERENCE


def per_block_loop(model: RetrievalModel, text: torch.Tensor, video: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """EMCL scores (N, V) with :meth:`RetrievalModel.scores` called on one ``emcl_block`` block at a time."""
    t, v, b = model.encode_text(text), model.encode_video(video, mask), model.emcl_block
    return torch.cat([torch.cat([model.scores(t[i:i + b], v[j:j + b]) for j in range(0, len(v), b)], dim=1)
                      for i in range(0, len(t), b)])


def _resident_bytes(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process in bytes (0 where /proc is missing)."""
    try:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    except (OSError, StopIteration):
        return 0
    return int(line.split()[1]) * 1024


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current VmRSS
    except OSError:
        pass


def measure(fn: Callable[[], object], repeats: int) -> tuple[float, float, int]:
    """Best wall seconds and best CPU seconds of ``fn()`` over ``repeats`` runs after a warm-up run, and its
    peak RSS growth (bytes). On a machine shared with other jobs the CPU time (all threads of this process)
    moves less than the wall time."""
    _reset_peak()
    start_rss = _resident_bytes("VmRSS")
    fn()
    wall = cpu = float("inf")
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = min(wall, time.perf_counter() - start), min(cpu, time.process_time() - start_cpu)
    return wall, cpu, max(0, _resident_bytes("VmHWM") - start_rss)


class Row(NamedTuple):
    """One table row: ``fn`` timed, its time divided by ``units`` (EMCL blocks, or 1); ``loop`` (EMCL rows) the
    same scores by :func:`per_block_loop`, timed on a row of its own and compared with ``fn``'s."""

    name: str
    units: int
    fn: Callable[[], object]
    loop: Callable[[], torch.Tensor] | None = None


def rows(captions: int, videos: int, batch: int) -> list[Row]:
    """The table's rows on random features (seed 0) of ``captions`` captions, ``videos`` videos, a ``batch``."""
    gen = torch.Generator().manual_seed(0)
    text = torch.randn(captions, DIM, generator=gen)
    video = torch.randn(videos, FRAMES, DIM, generator=gen)
    mask = torch.ones(videos, FRAMES, dtype=torch.bool)
    mask[::3, FRAMES // 2:] = False  # every third video has half its frames (padding, as short videos)
    video[~mask] = 0.0

    def emcl_row(name: str, emcl_kwargs: dict, block: int, emcl_rows: str) -> Row:
        torch.manual_seed(0)
        model = RetrievalModel(DIM, emcl=EMCL(**emcl_kwargs), emcl_block=block, emcl_rows=emcl_rows).eval()
        units = -(-captions // block) * -(-videos // block)  # blocks, ragged ones included
        return Row(name, units, torch.no_grad()(lambda: model.similarity(text, video, mask)),
                   torch.no_grad()(lambda: per_block_loop(model, text, video, mask)))

    torch.manual_seed(0)
    seq = RetrievalModel(DIM, head="seqTransf")

    def train_step() -> None:
        seq.train()
        seq.zero_grad(set_to_none=True)
        t = seq.encode_text(text[:batch])
        v = seq.encode_video(video[:batch], mask[:batch])  # meanP pooling of the seqTransf frames, normalised
        infonce_loss(safe_normalize(t) @ v.T).backward()

    @torch.no_grad()
    def seq_eval() -> torch.Tensor:
        seq.eval()
        return seq.similarity(text, video, mask)

    return [emcl_row("EMCL-Net eval (pairs, K=32, 9 stages, block 32)", {}, 32, "pairs"),
            *(emcl_row(f"plug-in eval (stacked, K=7, 10 stages, block {b})", PLUG_IN, b, "stacked")
              for b in (32, 1024)),
            Row(f"seqTransf train step (batch {batch} x {FRAMES})", 1, train_step),
            Row(f"seqTransf eval ({captions} x {videos})", 1, seq_eval)]


def main(argv: list[str] | None = None) -> dict:
    """Print the table; return ``{threads: {name: {...}}}`` with ``seconds``, ``cpu_seconds``, ``per_unit_ms``,
    ``peak_mib`` and ``max_abs_diff`` per row.

    An EMCL row's per-block loop is keyed ``name + " / per-block loop"``; ``max_abs_diff`` is its
    largest absolute score difference from the row's (None on the other rows).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat, one thread (seconds in all)")
    parser.add_argument("--threads", type=int, nargs="+", default=None, help="thread counts (default 1 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per row (default 3, 1 with --quick)")
    parser.add_argument("--captions", type=int, default=None, help="test captions (default 2000, 96 with --quick)")
    parser.add_argument("--videos", type=int, default=None, help="test videos (default 1000, 48 with --quick)")
    parser.add_argument("--batch", type=int, default=None, help="training batch (default 128, 16 with --quick)")
    args = parser.parse_args(argv)
    threads = args.threads or ([1] if args.quick else [1, 2])
    repeats = args.repeats or (1 if args.quick else 3)
    captions, videos = args.captions or (96 if args.quick else 2000), args.videos or (48 if args.quick else 1000)
    batch = args.batch or (16 if args.quick else 128)
    if min([*threads, repeats, captions, videos]) < 1 or not 1 <= batch <= min(captions, videos):
        parser.error(f"threads, repeats, captions and videos must be >= 1 and 1 <= batch <= min(captions, videos); "
                     f"got threads={threads}, repeats={repeats}, captions={captions}, videos={videos}, batch={batch}")
    print(f"torch {torch.__version__}, D={DIM}, {FRAMES} frames, float32, best of {repeats} after a warm-up, "
          f"load average {os.getloadavg()[0]:.2f}")
    before = torch.get_num_threads()
    figures: dict = {}
    try:
        for n in threads:
            torch.set_num_threads(n)
            figures[n] = {}
            print(f"\n{n} thread(s)")
            print(f"{'row':54s}{'units':>7s}{'seconds':>10s}{'ms/unit':>10s}{'cpu s':>9s}{'peak MiB':>10s}"
                  f"{'max |diff|':>12s}")
            for row in rows(captions, videos, batch):
                timed = [(row.name, row.fn, None)]
                if row.loop is not None:
                    timed.append((f"{row.name} / per-block loop", row.loop, float((row.loop() - row.fn()).abs().max())))
                for name, fn, diff in timed:
                    seconds, cpu, peak = measure(fn, repeats)
                    figures[n][name] = {"seconds": seconds, "cpu_seconds": cpu, "peak_mib": peak / 2**20,
                                        "per_unit_ms": 1000 * seconds / row.units, "max_abs_diff": diff}
                    shown = "  per-block loop" if diff is not None else name
                    print(f"{shown:54s}{row.units:7d}{seconds:10.3f}{1000 * seconds / row.units:10.3f}{cpu:9.3f}"
                          f"{peak / 2**20:10.0f}{'' if diff is None else f'{diff:12.2e}'}")
    finally:
        torch.set_num_threads(before)
    return figures


if __name__ == "__main__":
    main()
