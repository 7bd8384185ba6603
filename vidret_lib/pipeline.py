"""From a dataset name to cached features: what every notebook runs before training.

``prepare_dataset`` makes the data present (ShapeMotion is generated on demand; MSR-VTT is
prepared from a local folder or downloaded), and ``split_features`` walks one split through
the frame cache and the feature caches into a :class:`~vidret_lib.train.FeatureSplit`.
Every step is "load if present, else compute", so the second notebook to ask for a split
only reads files.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .datasets import Dataset, Split, load_dataset
from .features import text_features, video_features
from .frame_cache import frame_cache
from .train import FeatureSplit

SHAPEMOTION_PREFIX = "shapemotion-"
TITLE_SOURCES = ("title", "category")


@dataclass
class DataConfig:
    """Where data and caches live and how frames are sampled (typed literals)."""

    dataset: str = "shapemotion-default"  # "shapemotion-<smoke|default|large>" or "msrvtt"
    data_dir: str = "../data"
    cache_dir: str = "../cache"
    msrvtt_source: str = ""  # a local MSR-VTT folder; empty = download (msrvtt only)
    max_frames: int = 12
    sample_fps: int = 1


def prepare_dataset(config: DataConfig) -> Dataset:
    """Load the dataset ``config.dataset``, building it first if it is not on disk."""
    root = Path(config.data_dir) / config.dataset
    if (root / "dataset.json").exists():
        return load_dataset(root)
    if config.dataset.startswith(SHAPEMOTION_PREFIX):
        from data_prep.synthetic import generate

        return generate(root, size=config.dataset[len(SHAPEMOTION_PREFIX):])
    if config.dataset == "msrvtt":
        from data_prep import msrvtt

        source = Path(config.msrvtt_source) if config.msrvtt_source else None
        if source is None:
            source, downloads = msrvtt.download(Path(config.cache_dir) / "downloads" / "msrvtt")
        else:
            downloads = None
        dataset = msrvtt.prepare(source, root, downloads)
        print(msrvtt.describe(dataset.manifest()))
        return dataset
    raise ValueError(
        f"unknown dataset {config.dataset!r}: use 'shapemotion-smoke', 'shapemotion-default', "
        "'shapemotion-large' or 'msrvtt'"
    )


def split_features(
    config: DataConfig,
    dataset: Dataset,
    split: str | Split,
    encoder,
    title_source: str = "title",
) -> FeatureSplit:
    """Cached frame and caption features of one split, restricted to its present videos.

    ``title_source`` picks each video's text side for MBVR: its ``"title"`` (ShapeMotion;
    None when missing) or its ``"category"`` name (MSR-VTT has no titles).
    """
    if title_source not in TITLE_SOURCES:
        raise ValueError(f"unknown title_source {title_source!r}; choose one of {TITLE_SOURCES}")
    sp = split if isinstance(split, Split) else dataset.split(split, present_only=True)
    frames = frame_cache(
        dataset, sp.video_ids, config.cache_dir,
        max_frames=config.max_frames, sample_fps=config.sample_fps, size=encoder.image_size,
    )
    video, mask = video_features(encoder, frames, sp.video_ids, config.cache_dir)
    text = text_features(encoder, sp.sentences, config.cache_dir)
    titles = [dataset.videos[v].get(title_source) for v in sp.video_ids]
    present = np.array([bool(t) for t in titles])
    title = text_features(encoder, [t or "" for t in titles], config.cache_dir)
    title = torch.where(torch.as_tensor(present)[:, None], title, torch.zeros_like(title))
    return FeatureSplit(text, video, mask, sp.caption_video, title, present)



def open_encoder(name: str = "default", pretrained: str = "", device: str = "cpu"):
    """:func:`vidret_lib.encoders.load_encoder` from notebook parameters (``pretrained=""``: none)."""
    from .encoders import load_encoder

    return load_encoder(name, device, **({"pretrained": pretrained} if pretrained else {}))


def data_key(config: DataConfig, dataset: Dataset, encoder, *splits: str) -> str:
    """Names the features a result was trained and tested on (dataset, splits, frames, encoder)."""
    from .cache import cache_key

    return cache_key(
        "data", dataset=dataset.fingerprint(), splits=list(splits), max_frames=config.max_frames,
        sample_fps=config.sample_fps, encoder=encoder.cache_id,
    )
