"""End-to-end training speed of CLIP4Clip's recipe: steps/s, frames/s, one MSR-VTT epoch, peak memory.

What is measured: the library's training step in end-to-end mode with CLIP4Clip's recipe
(``TrainConfig(mode="end_to_end", sampling="caption", freeze_layer_num=0,
learned_logit_scale=True, false_negatives="keep")``, BertAdam; ``ArrowLuo/CLIP4Clip``
``main_task_retrieval.py``, papers.md §0), for each precision (``fp16_weights``, CLIP4Clip's
fp16 weights; ``amp_bf16``; ``fp32``), through the library's own hooks: the model and
optimizer of :func:`vidret_lib.train.build_model` / :func:`~vidret_lib.train.build_optimizer`,
and train()'s step, :func:`vidret_lib.train.train_step` (the valid frames preprocessed on the
device, both towers, ``compute_loss``, ``clip4clip_step``: backward, global clip, BertAdam,
zero_grad, logit-scale clamp), then ``loss.item()``. train()'s per-step finiteness checks
(``train_step``'s ``check``) are left out.

Each precision is timed twice:

- **with loader**: every step reads its batch through train()'s loader,
  :func:`vidret_lib.train.frame_loader` (a ``torch.utils.data.DataLoader``, ``--workers``
  processes, pinned on CUDA) over a shuffled plan of caption batches of a
  :meth:`~vidret_lib.train.RawSplit.from_frame_cache` split: ``.npz`` files laid out as
  :mod:`vidret_lib.frame_cache` writes them (uint8 frames (T, S, S, 3) and mask (T,), read by
  ``FrameCache.load``; random pixels: the files are uncompressed, so the content does not change
  the cost), captions tokenised in the workers, the batch copied to the device
  (``non_blocking``). The files are written just before and sit in the page cache, as a cache
  that fits in memory does after the first epoch; a slow disk would be slower;
- **without loader**: one batch, copied to the device once, is reused by every step.

A gap between the two means the loader starves the device (raise ``--workers``). ``--warmup``
steps run untimed first (allocations, kernel selection, worker start-up). frames/s counts the
frames through the image tower (batch x frames per step); the epoch projection is
``plan_steps(180,000 captions, batch)`` steps (1,406 at batch 128) times s/step. Peak memory is
``torch.cuda.max_memory_allocated`` on CUDA, and the peak resident set of this process (Linux
``VmHWM``, reset per measurement; loader workers not included) on the CPU.

Default: ``ViT-B-32-quickgelu`` with random weights (no download), batch 128, 12 frames, 224 px,
77 tokens, on CUDA. Without CUDA the default size would take about an hour, so the script
measures ``--tiny`` instead and says so; pass ``--batch-size``/``--frames`` to time the real
ViT-B/32 on the CPU at a size you choose. ``--tiny``: a CLIP-shaped open_clip model (width 64,
2 layers, 32 px, 16 tokens, random weights), batch 4, 2 frames. A CPU without AVX-512 FP16/BF16
runs float16 and bfloat16 matmuls through slow paths (measured on a 2-core AMD EPYC: 0.3 GFLOP/s
against 22 in float32, one thread): the tiny model's steps hide it (they are overhead-bound), but
``fp16_weights`` and ``amp_bf16`` steps of the real ViT-B/32 take minutes there.

    .venv/bin/python benchmarks/bench_e2e.py                 # the GPU figures (tiny on a CPU)
    .venv/bin/python benchmarks/bench_e2e.py --tiny --steps 5 --json e2e.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from vidret_lib.cache import save_npz
from vidret_lib.clip4clip_recipe import plan_steps
from vidret_lib.datasets import Split
from vidret_lib.encoders import Encoder, load_encoder
from vidret_lib.frame_cache import FrameCache
from vidret_lib.train import (
    RawBatch, RawSplit, TrainConfig, build_model, build_optimizer, frame_loader, train_step,
)

MSRVTT_9K_CAPTIONS = 180_000  # MSR-VTT 9k with --expand_msrvtt_sentences (papers.md §0): 1,406 steps at batch 128
EPOCHS = 5  # the recipe's epochs: the schedule's t_total is plan_steps(..., EPOCHS).total_steps
PRECISION_ORDER = ("fp16_weights", "amp_bf16", "fp32")
MODEL = "ViT-B-32-quickgelu"
TINY_MODEL = "vidret-bench-tiny-clip"
# CLIP-shaped like tests/test_recipe.py's tiny_clip, with open_clip's vocabulary (its SimpleTokenizer's ids)
TINY_CONFIG = {
    "embed_dim": 32, "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
SIZES = {"tiny": dict(batch_size=4, frames=2, steps=5, warmup=1),
         "real": dict(batch_size=128, frames=12, steps=20, warmup=3)}
WORDS = (("red", "blue", "green", "yellow"), ("ball", "cube", "car", "dog"), ("rolls", "spins", "drives", "jumps"),
         ("to the left", "to the right", "slowly", "fast"))


def register_tiny_clip(folder: str | os.PathLike) -> str:
    """Write :data:`TINY_CONFIG` as ``<folder>/<TINY_MODEL>.json``, register it with open_clip, return its name.

    After this, ``load_encoder(TINY_MODEL, pretrained=None)`` builds it like any open_clip
    architecture (random weights, open_clip's tokenizer at 16 tokens, OpenAI's mean/std).
    """
    import open_clip

    path = Path(folder) / f"{TINY_MODEL}.json"
    path.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(path)
    return TINY_MODEL


def recipe_config(precision: str, batch_size: int, device: str, **changes) -> TrainConfig:
    """CLIP4Clip's end-to-end recipe (papers.md §0) at ``precision``; ``changes`` override any field."""
    recipe = dict(mode="end_to_end", sampling="caption", freeze_layer_num=0, precision=precision,
                  learned_logit_scale=True, false_negatives="keep", optimizer="bert_adam",
                  batch_size=batch_size, device=device, select="last")
    return TrainConfig(**recipe | changes)


def write_frame_cache(folder: str | os.PathLike, videos: int, frames: int, size: int, seed: int = 0) -> FrameCache:
    """``videos`` random clips of ``frames`` valid uint8 frames (frames, size, size, 3), one ``.npz`` each.

    The files are what :func:`vidret_lib.frame_cache.frame_cache` writes (``frames``, ``mask``,
    uncompressed, through ``vidret_lib.cache.save_npz``), so :meth:`FrameCache.load` reads them.
    """
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    ids = tuple(f"video{i}" for i in range(videos))
    for vid in ids:
        save_npz(folder / f"{vid}.npz", frames=rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8),
                 mask=np.ones(frames, dtype=bool))
    return FrameCache(folder, "bench-e2e", ids, frames, size, failed={}, content={}, decoders={})


def captions(videos: int, per_video: int = 2) -> tuple[list[str], list[int]]:
    """``per_video`` distinct sentences for each video, and ``caption_video`` (the video of each)."""
    combos = np.array(np.meshgrid(*[range(len(w)) for w in WORDS], indexing="ij")).reshape(len(WORDS), -1).T
    sentences = [" ".join(["a"] + [WORDS[k][j] for k, j in enumerate(combos[i % len(combos)])])
                 for i in range(videos * per_video)]
    return sentences, [i // per_video for i in range(videos * per_video)]


def caption_split(cache: FrameCache, per_video: int = 2) -> RawSplit:
    """The cache's videos with :func:`captions`' sentences, as train() reads them (one video at a time)."""
    sentences, caption_video = captions(len(cache.video_ids), per_video)
    return RawSplit.from_frame_cache(cache, Split("bench", sentences, [cache.video_ids[v] for v in caption_video]))


def batch_plan(split: RawSplit, batch_size: int, steps: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` batches of (caption indices (B,), video indices (B,)): shuffled captions, repeated
    as needed, so that one pass of the loader covers a whole measurement (a new pass would restart
    the workers' prefetching, which a real epoch of 1,406 steps does once)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(split.num_texts, generator=g)
                       for _ in range(-(-steps * batch_size // split.num_texts))])
    return [(c, split.caption_video[c]) for c in order[:steps * batch_size].view(steps, batch_size)]


class RecipeStep:
    """train()'s model and optimizer for ``config`` (:func:`~vidret_lib.train.build_model`,
    :func:`~vidret_lib.train.build_optimizer`), and its step, :func:`~vidret_lib.train.train_step`.

    ``total_steps`` is the schedule's ``t_total`` (train(): ``plan_steps(...).total_steps``).
    Calling it with a :class:`~vidret_lib.train.RawBatch` on the device runs one step and returns
    the loss (a float).
    """

    def __init__(self, config: TrainConfig, encoder: Encoder, total_steps: int):
        self.config = config
        self.model = build_model(config, encoder.embed_dim, encoder).train()
        self.optimizer, self.scheduler = build_optimizer(config, self.model, total_steps)

    def __call__(self, batch: RawBatch) -> float:
        return train_step(self.config, self.model, self.optimizer, self.scheduler, batch).item()


def _on_device(batches, device: torch.device) -> Iterator[RawBatch]:
    """Each batch copied to ``device`` (asynchronously from pinned memory), as train() does."""
    for batch in batches:
        yield batch.to(device, non_blocking=True)


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM, the peak resident set
    except OSError:
        pass


def _peak_memory(device: torch.device) -> int:
    """Bytes: CUDA's peak allocation, or this process's peak resident set (VmHWM, else ru_maxrss)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step: RecipeStep, batches: Iterator, warmup: int, steps: int, device: torch.device) -> dict:
    """Run ``warmup`` untimed then ``steps`` timed steps on ``batches``; seconds and peak memory (bytes)."""
    _reset_peak_memory(device)
    for _ in range(warmup):
        step(next(batches))
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step(next(batches))
    _sync(device)
    return {"seconds": time.perf_counter() - start, "peak_memory_bytes": _peak_memory(device)}


def hours_minutes(seconds: float) -> str:
    """``h:mm`` (rounded to the minute).

    Example:
        >>> hours_minutes(3 * 3600 + 29.6 * 60), hours_minutes(20)
        ('3:30', '0:00')
    """
    minutes = round(seconds / 60)
    return f"{minutes // 60}:{minutes % 60:02d}"


def run_precision(precision: str, encoder: Encoder, split: RawSplit, args, device: torch.device,
                  epoch_steps: int) -> list[dict]:
    """The two rows (without, then with the loader) of one precision; a row that fails holds the error."""
    config = recipe_config(precision, args.batch_size, str(device))
    step = RecipeStep(config, encoder, plan_steps(MSRVTT_9K_CAPTIONS, args.batch_size, EPOCHS).total_steps)
    plan = batch_plan(split, args.batch_size, args.warmup + args.steps)
    resident = next(_on_device(frame_loader(split, plan[:1], encoder.tokenizer), device))  # on the device once
    loader = frame_loader(split, plan, encoder.tokenizer, args.workers, device)
    rows = []
    for with_loader, batches in ((False, itertools.repeat(resident)), (True, _on_device(loader, device))):
        row = {"precision": precision, "loader": with_loader, "steps": args.steps, "error": None}
        try:
            timed = measure(step, batches, args.warmup, args.steps, device)
        except (RuntimeError, NotImplementedError) as err:  # no kernel for a dtype, out of memory, a worker killed
            rows.append(row | {"error": f"{type(err).__name__}: {err}"})
            continue
        s_per_step = timed["seconds"] / args.steps
        rows.append(row | {
            "s_per_step": s_per_step, "steps_per_s": 1 / s_per_step,
            "frames_per_s": args.batch_size * args.frames / s_per_step, "epoch_seconds": epoch_steps * s_per_step,
            "epoch_h_mm": hours_minutes(epoch_steps * s_per_step), "peak_memory_bytes": timed["peak_memory_bytes"],
        })
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a tiny CLIP-shaped model, batch 4, 2 frames (CPU smoke size)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="default: cuda when available, else cpu")
    ap.add_argument("--precision", choices=PRECISION_ORDER, action="append",
                    help="measure only this precision (repeatable); default: all three")
    ap.add_argument("--batch-size", type=int, help="default 128 (tiny: 4)")
    ap.add_argument("--frames", type=int, help="frames per video, default 12 (tiny: 2)")
    ap.add_argument("--steps", type=int, help="timed steps per row, default 20 (tiny: 5)")
    ap.add_argument("--warmup", type=int, help="untimed steps before each row, default 3 (tiny: 1)")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                    help="loader worker processes (TrainConfig.loader_workers; default: min(8, CPUs); 0 loads "
                         "in this process)")
    ap.add_argument("--threads", type=int, help="intra-op threads of this process (torch.set_num_threads); default: "
                    "torch's. On a CPU shared with other jobs, 1 avoids threads waiting on each other at every op")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    for name, least in (("batch_size", 2), ("frames", 1), ("steps", 1), ("warmup", 0), ("workers", 0), ("threads", 1)):
        if getattr(args, name) is not None and getattr(args, name) < least:
            ap.error(f"--{name.replace('_', '-')} must be >= {least}; got {getattr(args, name)}")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device; use --device cpu")
    if not args.tiny and torch.device(args.device).type != "cuda" and args.batch_size is None and args.frames is None:
        print(f"no CUDA device: ViT-B/32 at batch 128 x 12 frames would take about an hour on the CPU; measuring "
              f"--tiny instead (pass --batch-size/--frames to time the real {MODEL} on the CPU at that size)")
        args.tiny = True
    for name, value in SIZES["tiny" if args.tiny else "real"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.precision = [p for p in PRECISION_ORDER if p in (args.precision or PRECISION_ORDER)]
    return args


def main(argv: list[str] | None = None) -> dict:
    """Measure, print the table, write ``--json``; return the figures (see the module docstring)."""
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    epoch_steps = plan_steps(MSRVTT_9K_CAPTIONS, args.batch_size, 1).steps_per_epoch
    with tempfile.TemporaryDirectory(prefix="bench_e2e_") as tmp:
        name = register_tiny_clip(tmp) if args.tiny else MODEL
        encoder = load_encoder(name, device, pretrained=None)  # random weights: only the speed is meaningful
        videos = max(16, 2 * args.batch_size)
        split = caption_split(write_frame_cache(tmp, videos, args.frames, encoder.image_size))
        tokens = encoder.tokenizer(["a"]).shape[1]
        figures = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "load_average": os.getloadavg()[0],
            "model": name, "batch_size": args.batch_size, "frames": args.frames, "image_size": encoder.image_size,
            "tokens": tokens, "workers": args.workers, "warmup": args.warmup, "epoch_steps": epoch_steps,
            "memory": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS of this process",
            "rows": [],
        }
        print(f"device {figures['device']}, torch {torch.__version__}, {figures['threads']} threads, load average "
              f"{figures['load_average']:.2f} on {os.cpu_count()} CPUs")
        print(f"{name} (random weights), batch {args.batch_size} x {args.frames} frames of {encoder.image_size} px, "
              f"{tokens} tokens; {args.workers} loader workers; {args.warmup} warm-up + {args.steps} timed steps; "
              f"one MSR-VTT 9k epoch = {epoch_steps} steps at this batch")
        print(f"{'precision':13s} {'loader':6s} {'steps':>5s} {'s/step':>8s} {'steps/s':>8s} {'frames/s':>9s} "
              f"{'epoch h:mm':>10s} {'peak MiB':>9s}")
        for precision in args.precision:
            for row in run_precision(precision, encoder, split, args, device, epoch_steps):
                figures["rows"].append(row)
                head = f"{precision:13s} {'on' if row['loader'] else 'off':6s}"
                if row["error"]:
                    print(f"{head} does not run on {device.type}: {row['error'].splitlines()[0]}", flush=True)
                    continue
                print(f"{head} {row['steps']:5d} {row['s_per_step']:8.3f} {row['steps_per_s']:8.2f} "
                      f"{row['frames_per_s']:9.1f} {row['epoch_h_mm']:>10s} {row['peak_memory_bytes'] / 2**20:9.0f}",
                      flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(f"peak memory: {figures['memory']}; epoch = {epoch_steps} x s/step")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return figures


if __name__ == "__main__":
    main()
