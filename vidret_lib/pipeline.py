"""From a dataset name to cached features: what every notebook runs before training.

``prepare_dataset`` makes the data present (ShapeMotion is generated on demand; MSR-VTT is
prepared from a local folder or downloaded), and ``split_features`` walks one split through
the frame cache and the feature caches into a :class:`~vidret_lib.train.FeatureSplit`, seen
through the start ``DataConfig.start`` names (:mod:`vidret_lib.pretrain`). Every step is "load
if present, else compute", so the second notebook to ask for a split only reads files.

End to end (``TrainConfig.mode="end_to_end"``), training reads frames, not features:
``split_inputs`` gives what :func:`~vidret_lib.train.train` takes in a mode (the feature split
itself, or its :func:`raw_split`: the same videos and captions, in the same order, read from the
frame cache), and ``model_features`` gives the features a trained model scores a split with (the
cached ones in frozen mode, its trained towers' end to end), for a notebook's analyses.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .datasets import Dataset, Split, load_dataset
from .features import text_features, video_features
from .frame_cache import frame_cache
from .pretrain import PretrainConfig, StartCheckpoint, apply_start, pretrain_start, start_key
from .train import MODES, FeatureSplit, RawSplit, TrainConfig, featurize

SHAPEMOTION_PREFIX = "shapemotion-"
TITLE_SOURCES = ("title", "category")
STARTS = ("pretrained", "random_projection")
# The pretrained start of the offline default encoder per dataset: the smoke dataset (tests, nbval)
# gets a tiny one; every other dataset the full one (the start does not depend on the dataset).
SMOKE_PRETRAIN = PretrainConfig(n_images=240, heldout=40, captions_per_image=1, epochs=10, batch_size=64)
PRETRAIN_CONFIGS = {"shapemotion-smoke": SMOKE_PRETRAIN}
# CLIP4Clip's end-to-end recipe as TrainConfig fields: every training notebook that can fine-tune end to end
# (01, 02, 03, 05) has a parameter of each name, defaulting to TrainConfig's (frozen) value, passed on as is
RECIPE_SWITCHES = ("mode", "precision", "freeze_layer_num", "sampling", "false_negatives", "learned_logit_scale",
                   "loader_workers")
# the switches that only end-to-end training may set (TrainConfig.validate refuses them in frozen mode)
END_TO_END_ONLY = ("precision", "freeze_layer_num", "learned_logit_scale", "loader_workers")


@dataclass
class DataConfig:
    """Where data and caches live, how frames are sampled, and where the towers start (typed literals).

    ``start`` (keyword): ``"pretrained"`` (the papers' regime: towers that already align images
    and text; with the offline default encoder that is the ShapeMotion start of
    :mod:`vidret_lib.pretrain`, with an open_clip encoder its own pretrained weights, nothing
    applied) or ``"random_projection"`` (the default encoder's towers joined by its random
    orthogonal projections: zero-shot retrieval at chance; default encoder only). Raises
    ``ValueError`` for another value.
    """

    dataset: str = "shapemotion-default"  # "shapemotion-<smoke|default|large>" or "msrvtt"
    data_dir: str = "../data"
    cache_dir: str = "../cache"
    msrvtt_source: str = ""  # a local MSR-VTT folder; empty = download (msrvtt only)
    max_frames: int = 12
    sample_fps: int = 1
    start: str = "pretrained"  # one of STARTS

    def __post_init__(self) -> None:
        if self.start not in STARTS:
            raise ValueError(f"unknown start {self.start!r} in DataConfig; valid starts: {STARTS}")


def start_config(config: DataConfig, encoder) -> PretrainConfig | None:
    """The :class:`~vidret_lib.pretrain.PretrainConfig` of the start ``config`` asks for with
    ``encoder``, or None when nothing is applied (an open_clip encoder's own weights, or the
    default encoder's random projections). Raises ``ValueError`` for ``"random_projection"``
    with an encoder other than the offline default."""
    default = getattr(encoder, "name", None) == "default"
    if config.start == "random_projection" and not default:
        raise ValueError(
            f"start='random_projection' applies to the offline default encoder only, not to "
            f"{getattr(encoder, 'name', encoder)!r} (its towers are already aligned): use start='pretrained'"
        )
    if config.start == "pretrained" and default:
        return PRETRAIN_CONFIGS.get(config.dataset, PretrainConfig())
    return None


def load_start(config: DataConfig, encoder) -> StartCheckpoint | None:
    """The start ``config`` asks for with ``encoder`` (trained once, then cached under
    ``config.cache_dir``; see :func:`start_config`), or None when nothing is applied."""
    pretrain = start_config(config, encoder)
    return None if pretrain is None else pretrain_start(encoder, config.cache_dir, pretrain)


def prepare_dataset(config: DataConfig) -> Dataset:
    """Load the dataset ``config.dataset``, building it first if it is not on disk.

    A ShapeMotion dataset is a cache of a deterministic generator: one on disk that another
    generator version or preset made (its ``content_hash`` differs from what
    :func:`data_prep.synthetic.generate` would write now) is regenerated in place, with a note,
    never silently reused; its videos of unchanged settings are kept.
    """
    root = Path(config.data_dir) / config.dataset
    if config.dataset.startswith(SHAPEMOTION_PREFIX):
        from data_prep.synthetic import PRESETS, content_hash, generate

        size = config.dataset[len(SHAPEMOTION_PREFIX):]
        if (root / "dataset.json").exists():
            dataset = load_dataset(root)
            if size not in PRESETS or dataset.info.get("content_hash") == content_hash(PRESETS[size], 0):
                return dataset
            print(f"{root} was made by another ShapeMotion generator or preset "
                  f"(version {dataset.info.get('version')!r}): regenerating it")
            (root / "dataset.json").unlink()  # marks it incomplete until generate() writes it again
        return generate(root, size=size)
    if (root / "dataset.json").exists():
        return load_dataset(root)
    if config.dataset == "msrvtt":
        from data_prep import msrvtt

        source = Path(config.msrvtt_source) if config.msrvtt_source else None
        if source is None:
            source, downloads = msrvtt.download(Path(config.cache_dir) / "downloads" / "msrvtt")
        else:
            downloads = None
        dataset = msrvtt.prepare(source, root, downloads, reuse_complete=True)  # another rank may have, meanwhile
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
    """Cached frame and caption features of one split, restricted to its present, decodable videos.

    ``title_source`` picks each video's text side for MBVR: its ``"title"`` (ShapeMotion;
    None when missing) or its ``"category"`` name (MSR-VTT has no titles). Videos the frame
    cache could not decode (``FrameCache.failed``) and videos left with no valid frame are
    dropped with their captions, named in a warning and listed in ``FeatureSplit.excluded``
    (id -> reason): a zero video must not enter training or evaluation. ``video_ids`` gives the
    kept videos in column order; per-video or per-caption metadata must be aligned through it.
    Features are cached raw and then mapped through ``config.start`` (:func:`load_start`,
    :func:`vidret_lib.pretrain.apply_start`); raises ``ValueError`` for a start the encoder has not.
    """
    if title_source not in TITLE_SOURCES:
        raise ValueError(f"unknown title_source {title_source!r}; choose one of {TITLE_SOURCES}")
    start = load_start(config, encoder)  # first: a start the encoder cannot have fails before any work
    sp = split if isinstance(split, Split) else dataset.split(split, present_only=True)
    frames = frame_cache(
        dataset, sp.video_ids, config.cache_dir,
        max_frames=config.max_frames, sample_fps=config.sample_fps, size=encoder.image_size,
    )
    video, mask = video_features(encoder, frames, sp.video_ids, config.cache_dir)
    text = text_features(encoder, sp.sentences, config.cache_dir)
    titles = [dataset.videos[v].get(title_source) for v in sp.video_ids]
    present = np.array([bool(t) for t in titles])
    if title_source == "category" and not present.any():
        raise ValueError(
            f"no video of split {sp.name!r} of {dataset.root} has a category: rebuild the dataset from a source "
            "with category.txt (data_prep.msrvtt ships the official list) or use title_source='title'"
        )
    title = text_features(encoder, [t or "" for t in titles], config.cache_dir)
    title = torch.where(torch.as_tensor(present)[:, None], title, torch.zeros_like(title))
    features = FeatureSplit(text, video, mask, sp.caption_video, title, present, video_ids=sp.video_ids)
    failed = {v: frames.failed.get(v, "no valid frame") for v, ok in zip(sp.video_ids, mask.any(1).tolist())
              if not ok or v in frames.failed}
    if failed:
        warnings.warn(
            f"split {sp.name!r}: {len(failed)} of {len(sp.video_ids)} videos left out (no decodable frame), with "
            f"their captions: " + "; ".join(f"{v}: {r}" for v, r in list(failed.items())[:10])
            + (f"; ... and {len(failed) - 10} more" if len(failed) > 10 else "")
            + ". FeatureSplit.excluded lists them all; fix or re-download the videos and run again",
            stacklevel=2,
        )
        features = features.drop_videos(failed)
    return apply_start(features, start)



def feature_rows(dataset: Dataset, split: str, features: FeatureSplit) -> list[dict]:
    """The stored caption records (:meth:`Dataset.caption_rows`) of ``features``' rows, in row order.

    :func:`split_features` drops videos that cannot be decoded, so the dataset's split and the
    features can differ; per-caption labels (ShapeMotion's ``facts``, ``needs_vision``, ...) must be
    read through this, never by position in ``dataset.split(...)``. Raises ``ValueError`` if
    ``features`` has no ``video_ids`` or its captions do not match the stored split.
    """
    if features.video_ids is None:
        raise ValueError("features.video_ids is None: build the split with split_features()")
    kept = set(features.video_ids)
    rows = [r for r in dataset.caption_rows(split, present_only=True) if r["video_id"] in kept]
    expected = [features.video_ids[v] for v in features.caption_video.tolist()]
    if [r["video_id"] for r in rows] != expected:
        raise ValueError(f"the caption rows of split {split!r} of {dataset.root} do not match the features' captions")
    return rows


def twin_queries(dataset: Dataset, split: str, features: FeatureSplit) -> tuple[torch.Tensor, torch.Tensor]:
    """The t2v queries of ``features`` whose video has its time-reversed twin (ShapeMotion's ``twin``
    field) among ``features``' videos: ``(twin_q, twin_of)``, both (Q,) int64 on the CPU, the query's
    caption row and its twin's video index. A query wins the twin test when it scores its own video
    (``caption_video[twin_q]``) above ``twin_of``. Empty for a dataset without twins (MSR-VTT).
    Raises as :func:`feature_rows`.
    """
    index = {v: i for i, v in enumerate(features.video_ids or ())}
    rows = feature_rows(dataset, split, features)
    twin_q = [i for i, r in enumerate(rows) if dataset.videos[r["video_id"]].get("twin") in index]
    twin_of = [index[dataset.videos[rows[i]["video_id"]]["twin"]] for i in twin_q]
    return torch.tensor(twin_q, dtype=torch.long), torch.tensor(twin_of, dtype=torch.long)


def raw_split(config: DataConfig, dataset: Dataset, split: str, encoder, features: FeatureSplit) -> RawSplit:
    """The :class:`~vidret_lib.train.RawSplit` of split ``split`` with exactly the videos and captions of
    ``features`` (its :func:`split_features`), in the same order: what end-to-end training reads.

    Frames come from the same frame cache as ``features`` (the same call, so nothing is decoded again);
    each video is read only when a batch needs it (:meth:`RawSplit.from_frame_cache`). The videos
    ``split_features`` left out (undecodable, or no valid frame) are left out here too, with their
    captions, and listed in ``RawSplit.excluded`` with the same reasons.

    Raises:
        ValueError: ``features`` is not a feature split of ``split`` (other videos, or captions
            that do not match the stored split's); build it with :func:`split_features`.
    """
    if features.video_ids is None:
        raise ValueError("features.video_ids is None: build the feature split with split_features()")
    sp = dataset.split(split, present_only=True)
    frames = frame_cache(
        dataset, sp.video_ids, config.cache_dir,
        max_frames=config.max_frames, sample_fps=config.sample_fps, size=encoder.image_size,
    )
    kept = set(features.video_ids)
    unknown = sorted(kept - set(sp.video_ids))
    if unknown:
        raise ValueError(f"features hold {len(unknown)} videos that split {split!r} of {dataset.root} has not "
                         f"(e.g. {unknown[:3]}): pass the feature split of {split!r}")
    # the features' videos and captions only: a video split_features dropped for having no valid frame
    # has not failed to decode, so from_frame_cache alone would keep it
    rows = [(s, v) for s, v in zip(sp.sentences, sp.caption_video_ids) if v in kept]
    raw = RawSplit.from_frame_cache(frames, Split(sp.name, [s for s, _ in rows], [v for _, v in rows]))
    if raw.video_ids != features.video_ids or not torch.equal(raw.caption_video, features.caption_video.cpu()):
        raise ValueError(f"the captions of split {split!r} of {dataset.root} do not match the features' "
                         "captions: pass the feature split of this split, built by split_features()")
    return dataclasses.replace(raw, excluded=dict(features.excluded))


def split_inputs(mode: str, config: DataConfig, dataset: Dataset, split: str, encoder,
                 features: FeatureSplit) -> FeatureSplit | RawSplit:
    """What :func:`~vidret_lib.train.train` takes for split ``split`` in ``TrainConfig.mode`` ``mode``:
    ``features`` itself (``"frozen"``) or its :func:`raw_split` (``"end_to_end"``).

    Raises ``ValueError`` for another mode (naming the valid ones), or from :func:`raw_split`.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid modes: {MODES}")
    return features if mode == "frozen" else raw_split(config, dataset, split, encoder, features)


def frozen_config(config: TrainConfig) -> TrainConfig:
    """``config`` in frozen mode: :data:`END_TO_END_ONLY` back at TrainConfig's defaults, every other field kept.

    For what a notebook builds on the start's cached features whatever the profile's mode (its
    step-by-step checks, probes of a model at initialisation, zero-shot baselines). A frozen ``config``
    comes back equal to itself.

    Example:
        >>> frozen_config(TrainConfig(mode="end_to_end", precision="fp16_weights", lr=0.5)) == TrainConfig(lr=0.5)
        True
    """
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name in END_TO_END_ONLY}
    return dataclasses.replace(config, mode="frozen", **defaults)


def model_features(model, split: FeatureSplit | RawSplit, videos: int | None = None) -> FeatureSplit:
    """The features ``model`` scores ``split`` with, on the model's device: for an analysis of a trained model.

    A :class:`~vidret_lib.train.FeatureSplit` (frozen mode) is the start's cached features, which
    the model reads through its own adapters: returned as it is (``video_ids`` kept). A
    :class:`~vidret_lib.train.RawSplit` (end to end) is encoded by the model's trained towers
    (:func:`vidret_lib.train.featurize`: text (N, D), video (V, T, D) float32 and mask (V, T)),
    never the start's; with ``videos``, only its first ``videos`` videos and their captions are
    encoded (``caption_video`` indexes them; e.g. one analysis batch of a 9,000-video split).
    The result carries the split's ``video_ids`` (the first ``videos`` of them) and ``excluded``.
    """
    device = next(model.parameters()).device
    if isinstance(split, FeatureSplit):
        return split.to(device)
    if videos is not None and videos < split.num_videos:
        keep = split.caption_video < videos  # (N,) captions of the first `videos` videos
        split = RawSplit(split.load_video, [s for s, k in zip(split.sentences, keep.tolist()) if k],
                         split.caption_video[keep], videos,
                         None if split.video_ids is None else split.video_ids[:videos], split.excluded)
    return dataclasses.replace(featurize(model, split), video_ids=split.video_ids, excluded=dict(split.excluded))


def open_encoder(name: str = "default", pretrained: str = "", device: str = "cpu", context_length: int = 0):
    """:func:`vidret_lib.encoders.load_encoder` from notebook parameters (``pretrained=""``: none;
    ``context_length=0``: the encoder's own, else that many tokens, e.g. CLIP4Clip's 32 words)."""
    from .encoders import load_encoder

    options = {"pretrained": pretrained} if pretrained else {}
    if context_length:
        options["context_length"] = context_length
    return load_encoder(name, device, **options)


def data_key(config: DataConfig, dataset: Dataset, encoder, *splits: str) -> str:
    """Names the features a result was trained and tested on (dataset, splits, frames, encoder, start:
    the start's cache key, or the start's name when nothing is applied)."""
    from .cache import cache_key

    pretrain = start_config(config, encoder)
    return cache_key(
        "data", dataset=dataset.fingerprint(), splits=list(splits), max_frames=config.max_frames,
        sample_fps=config.sample_fps, encoder=encoder.cache_id,
        start=config.start if pretrain is None else start_key(encoder, pretrain),
    )
