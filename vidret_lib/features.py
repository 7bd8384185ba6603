"""Cached, batched, resumable feature extraction: per-frame image features, per-caption text features.

With frozen towers every later experiment trains on these caches (seconds per epoch).

Layout under ``<cache_dir>/features/``:

* ``<cache_key("video-features", frames=<frame cache key>, encoder=<encoder.cache_id>)>/``
  holds one ``.npz`` per chunk of ``chunk_size`` videos, named by a hash of the chunk's
  video ids, of those among them that the frame cache could not decode and of their video
  files' content stamps (``FrameCache.content``: a replaced video changes its chunk's name): ``feats``
  float32 (n, T, D) (zeros where the frame mask is False), ``mask`` bool (n, T),
  ``video_ids``.
* ``<cache_key("text-features", encoder=..., sentences=<sha256 of the list>, chunk_size=...)>/``
  holds ``chunk-00000.npz``, ... of ``chunk_size`` sentences each: ``feats`` (n, D).

Chunks are written atomically as soon as they are done, so a killed run resumes at the
first missing chunk, and a second call only reads files (the encoder is not called). A folder is
locked while its chunks are computed (:func:`vidret_lib.cache.folder_lock`): a second process
asking for the same features at the same time (another torchrun rank) waits, then reads them. A
call that computes chunks prints one line naming the folder.
Features are the encoder's raw outputs (not L2-normalised).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from .cache import cache_key, folder_lock, load_npz, save_npz
from .progress import progress

VIDEO_CHUNK = 256
TEXT_CHUNK = 4096
# Default batch sizes by device type. On a CPU small batches are faster per item (the
# activations stay in cache): EfficientNet-Lite0 at 160 px on one thread runs ~2x faster at
# 16 frames per batch than at 64; MiniLM likewise prefers 64 captions to 256
# (benchmarks/bench_features.py). GPUs want large batches.
VIDEO_BATCH = {"cpu": 16, "cuda": 256}
TEXT_BATCH = {"cpu": 64, "cuda": 1024}


def video_features(
    encoder,
    frame_cache,
    video_ids: Sequence[str],
    cache_dir: str | os.PathLike,
    batch_size: int | None = None,
    chunk_size: int = VIDEO_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frame features of ``video_ids``: (feats float32 (V, T, D), mask bool (V, T)).

    ``frame_cache`` provides ``.key``, ``.failed`` and ``.content`` (dicts keyed by video id;
    ``content`` names each video file's version) and ``.load(video_id) -> (frames uint8
    (T, S, S, 3), mask bool (T,))``: a chunk of videos is recomputed when one of them is
    replaced or its decoding failure is fixed; only masked-in frames are encoded, ``batch_size`` frames at a time
    (default ``VIDEO_BATCH`` for the encoder's device) across video boundaries; masked-out
    frames get zero features.

    Example:
        >>> import tempfile, types
        >>> class Enc:  # a stand-in: feature = mean pixel value, D = 1
        ...     cache_id, device = "mean-pixel", "cpu"
        ...     def encode_image(self, x): return torch.tensor(x.mean(axis=(1, 2, 3)))[:, None]
        >>> frames = types.SimpleNamespace(key="k", failed={}, content={"3": "a", "7": "b"}, load=lambda v: (
        ...     np.full((2, 4, 4, 3), int(v), np.uint8), np.array([True, v == "7"])))
        >>> feats, mask = video_features(Enc(), frames, ["3", "7"], tempfile.mkdtemp())
        features: encoding 2 of 2 videos into ...
        >>> feats[..., 0].tolist(), mask.tolist()
        ([[3.0, 0.0], [7.0, 7.0]], [[True, False], [True, True]])
    """
    video_ids = list(video_ids)
    if not video_ids:
        raise ValueError("video_features needs at least one video id")
    if batch_size is None:
        batch_size = _for_device(VIDEO_BATCH, encoder.device)
    folder = _features_dir(cache_dir, "video-features", frames=frame_cache.key,
                           encoder=encoder.cache_id)
    chunks = [video_ids[i:i + chunk_size] for i in range(0, len(video_ids), chunk_size)]
    # a chunk is named by its videos, which of them failed to decode and each video file's
    # content stamp: the frame cache retries failed videos and re-decodes replaced ones, and
    # neither may reuse the chunk's old features
    paths = [folder / f"{_chunk_name(ids, frame_cache)}.npz" for ids in chunks]
    with folder_lock(folder):  # a second process (another torchrun rank) waits, then reads the chunks
        todo = sum(len(ids) for ids, path in zip(chunks, paths) if not path.exists())
        _say_computing(todo, len(video_ids), "videos", folder)
        with progress(total=todo, desc="video features", unit="video") as bar:
            for ids, path in zip(chunks, paths):
                if not path.exists():
                    feats_np, mask_np = _encode_videos(encoder, frame_cache, ids, batch_size, bar.update)
                    save_npz(path, feats=feats_np, mask=mask_np, video_ids=np.array(ids))
    feats, masks = [], []
    for ids, path in zip(chunks, paths):
        data = load_npz(path)
        if data["video_ids"].tolist() != ids:
            raise ValueError(f"{path} holds other videos than expected; delete it to recompute")
        feats.append(data["feats"])
        masks.append(data["mask"])
    return torch.from_numpy(np.concatenate(feats)), torch.from_numpy(np.concatenate(masks))


def text_features(
    encoder,
    sentences: Sequence[str],
    cache_dir: str | os.PathLike,
    batch_size: int | None = None,
    chunk_size: int = TEXT_CHUNK,
) -> torch.Tensor:
    """Features (N, D) float32 of ``sentences``, in order: ``encoder.encode_text(chunk, batch_size=...)``
    per chunk of ``chunk_size`` sentences, cached per chunk; the encoder runs ``batch_size`` captions at a
    time (default ``TEXT_BATCH`` for the encoder's device; :meth:`vidret_lib.encoders.Encoder.encode_text`
    encodes each distinct caption of the chunk once, sorted by length).

    Example:
        >>> import tempfile
        >>> class Enc:  # a stand-in: feature = caption length, D = 1
        ...     cache_id, device = "length", "cpu"
        ...     def encode_text(self, c, batch_size=None): return torch.tensor([[float(len(s))] for s in c])
        >>> text_features(Enc(), ["a", "abc"], tempfile.mkdtemp())[:, 0].tolist()
        features: encoding 2 of 2 captions into ...
        [1.0, 3.0]
    """
    sentences = list(sentences)
    if not sentences:
        raise ValueError("text_features needs at least one sentence")
    if batch_size is None:
        batch_size = _for_device(TEXT_BATCH, encoder.device)
    digest = hashlib.sha256(json.dumps(sentences).encode()).hexdigest()
    folder = _features_dir(cache_dir, "text-features", encoder=encoder.cache_id, sentences=digest,
                           chunk_size=chunk_size)
    starts = range(0, len(sentences), chunk_size)
    paths = [folder / f"chunk-{i:05d}.npz" for i in range(len(starts))]
    with folder_lock(folder):  # a second process (another torchrun rank) waits, then reads the chunks
        todo = sum(len(sentences[s:s + chunk_size]) for s, p in zip(starts, paths) if not p.exists())
        _say_computing(todo, len(sentences), "captions", folder)
        with progress(total=todo, desc="text features", unit="caption") as bar:
            for start, path in zip(starts, paths):
                if not path.exists():
                    chunk = sentences[start:start + chunk_size]
                    # one call per chunk: the encoder encodes its distinct captions once, batched by length
                    save_npz(path, feats=encoder.encode_text(chunk, batch_size=batch_size).cpu().numpy())
                    bar.update(len(chunk))
    return torch.from_numpy(np.concatenate([load_npz(path)["feats"] for path in paths]))


def _encode_videos(
    encoder, frame_cache, ids: list[str], batch_size: int, advance: Callable[[int], object]
) -> tuple[np.ndarray, np.ndarray]:
    """Encode the masked-in frames of ``ids``: (feats (n, T, D) float32, mask (n, T) bool)."""
    masks: list[np.ndarray] = []
    flat_feats: list[np.ndarray] = []  # (n_masked_frames, D) per batch, in frame order

    def frames_in_order() -> Iterator[np.ndarray]:
        for vid in ids:
            frames, mask = frame_cache.load(vid)
            if masks and len(mask) != len(masks[0]):
                raise ValueError(f"video {vid}: {len(mask)} frame slots, others have {len(masks[0])}")
            masks.append(np.asarray(mask, bool))
            yield frames[masks[-1]]
            advance(1)

    for batch in _batches(frames_in_order(), batch_size):
        flat_feats.append(encoder.encode_image(batch).cpu().numpy())
    mask = np.stack(masks)  # (n, T)
    dim = flat_feats[0].shape[1] if flat_feats else encoder.embed_dim
    feats = np.zeros(mask.shape + (dim,), np.float32)
    if flat_feats:
        feats[mask] = np.concatenate(flat_feats)  # row-major order = video, then frame
    return feats, mask


def _say_computing(todo: int, total: int, unit: str, folder: Path) -> None:
    """One line when a call computes features (not when it only reads them): which process filled a cache
    shows in its log (tests count these lines)."""
    if todo:
        print(f"features: encoding {todo} of {total} {unit} into {folder}", flush=True)


def _batches(groups: Iterator[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """Regroup a stream of (k_i, ...) arrays into (size, ...) batches (the last may be smaller)."""
    pending: list[np.ndarray] = []
    count = 0
    for group in groups:
        pending.append(group)
        count += len(group)
        while count >= size:
            joined = np.concatenate(pending)
            yield joined[:size]
            pending, count = [joined[size:]], count - size
    if count:
        yield np.concatenate(pending)


def _chunk_name(ids: list[str], frame_cache) -> str:
    return cache_key("videos", ids=ids, failed=[v for v in ids if v in frame_cache.failed],
                     content=[frame_cache.content[v] for v in ids])


def _for_device(table: dict[str, int], device: str | torch.device) -> int:
    return table.get(torch.device(device).type, table["cpu"])


def _features_dir(cache_dir: str | os.PathLike, name: str, **parts: str | int) -> Path:
    return Path(cache_dir) / "features" / cache_key(name, **parts)

