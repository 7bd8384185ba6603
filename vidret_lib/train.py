"""One trainer for every paper: the CLIP4Clip recipe with one piece changed by an argument.

``train(TrainConfig(...), train_split, val_split)`` trains a :class:`~vidret_lib.heads.RetrievalModel`:

- **inputs**: frozen-feature mode takes :class:`FeatureSplit` (cached per-frame and per-caption
  features); end-to-end mode takes :class:`RawSplit` (frames + sentences) and an encoder, and
  trains the open_clip towers too, at ``lr * coef_lr`` (CLIP4Clip: 1e-4 * 1e-3 = 1e-7);
- **batches**: ``sampling="video"`` (CLIP4Clip): each epoch visits every video once, with one
  of its captions drawn at random, in batches of ``batch_size`` (last partial batch dropped,
  as CLIP4Clip's ``drop_last=True``); ``sampling="caption"`` visits every caption once (VSE++ /
  CLIP4Clip ``--expand_msrvtt_sentences``), so a batch can hold two captions of one video.
  Under N processes the epoch's order is padded to a multiple of N by repeating its start, as
  CLIP4Clip's ``DistributedSampler``: the global batches and their number are CLIP4Clip's
  (:func:`vidret_lib.clip4clip_recipe.plan_steps`, which also gives the schedule's ``t_total``);
- **false negatives** (papers.md pitfall 9): an off-diagonal pair (i, j) of a batch is a false
  negative when caption i and caption j belong to the same video (possible only with
  ``sampling="caption"``) or are the same sentence (identical caption features; MSR-VTT has
  repeated generic captions). ``false_negatives="mask"`` sets their cosine to ``MASK_COS``
  (-1e4) before the loss: this removes them exactly from InfoNCE (``exp(-1e6) = 0``) and from
  every VSE++ hinge; under CAMoE's DSL the prior turns them into a logit of 0 (small next to
  positives near ``100 * cos``), not an exact removal. ``"keep"`` leaves them as negatives, as
  CLIP4Clip does (``modules/modeling.py`` ``CrossEn`` on the whole batch): the recipe's value;
- **loss by name** (:data:`LOSSES`), with its options; MBVR (``use_title``) trains
  ``L = base(S_qm) + alpha base(S_qv) + beta base(S_qt) [+ gamma L_ms]`` where base is the named
  loss (infonce for ``"modality_shuffle"``) on query x fused / vision-only / title-only scores.
  ``base`` is symmetric and *averages* the two directions, so the paper's
  ``L_bi = L_qm + L_mq`` is 2x ours (absorbed by the weights);
- **optimizer**: CLIP4Clip's BertAdam (or torch AdamW) with its four parameter groups, the
  warmup-cosine schedule over ``steps_per_epoch * epochs`` steps; each step is
  :func:`vidret_lib.clip4clip_recipe.clip4clip_step` (CLIP4Clip ``train_epoch``: backward,
  global gradient clip ``grad_clip_norm``, BertAdam with its per-tensor clip, zero the
  gradients, clamp a learned logit scale at ln 100);
- **checkpoint choice**: ``select="val"`` keeps the epoch with the best validation t2v R@1
  (ties go to the later epoch, as CLIP4Clip's ``best_score <= R1``); ``"last"`` keeps the last.
  Selecting on test is refused. Both the selected and the last weights are returned;
- **multi-process**: under ``torchrun --nproc_per_node N`` each process takes a slice of every
  global batch and the loss is computed on gathered embeddings with exact gradients
  (:mod:`vidret_lib.distributed`);
- **determinism**: the same seed gives the same history and metrics on CPU;
- **faults** (issue 10): training stops with ``FloatingPointError`` at the first non-finite
  loss, gradient norm or weight, naming the epoch, the step and the batch's videos, before the
  optimizer applies a non-finite update; train and val splits that share videos are refused
  (:func:`check_disjoint`, override ``allow_split_overlap``). A video with no valid frame or
  title cannot send training to NaN: every normalisation is
  :func:`vidret_lib.losses.safe_normalize` (zero in, zero out, no gradient), and
  ``vidret_lib.pipeline.split_features`` drops videos that failed to decode.

**End-to-end recipe** (papers.md §0; ``ArrowLuo/CLIP4Clip`` ``main_task_retrieval.py`` and
``modules/modeling.py``): ``TrainConfig(mode="end_to_end", sampling="caption", freeze_layer_num=0,
precision="fp16_weights", learned_logit_scale=True, false_negatives="keep", optimizer="bert_adam")``
with the default lr 1e-4, coef_lr 1e-3, 5 epochs, batch 128. The towers' outputs go straight to
the head (meanP has no parameter of its own; frozen mode's identity adapters are left out),
``freeze_layer_num`` freezes as ``--freeze_layer_num``
(:func:`~vidret_lib.clip4clip_recipe.apply_clip4clip_freeze`), ``precision`` stores the tower
weights as CLIP4Clip (``"fp16_weights"``) or in float32, optionally with bfloat16 autocast
(:func:`~vidret_lib.clip4clip_recipe.prepare_precision`; the forward, the loss and
:func:`featurize` run under :func:`~vidret_lib.clip4clip_recipe.precision_context`).

**Data path and public hooks** (what ``benchmarks/bench_e2e.py`` times). Each epoch's global
batches are planned in the training process (above); each process takes its slice of every
batch. End to end, :func:`frame_loader` (a ``torch.utils.data.DataLoader`` over
:class:`FrameBatches`, the plan's batches in order) reads each batch's frames one video at a
time (:func:`load_frames`) and tokenises its captions, in ``TrainConfig.loader_workers``
processes ahead of the step (0: in the training process), pinned when the device is CUDA, as a
:class:`RawBatch`; frozen mode indexes the cached features (:class:`FeatureBatch`). Each step
is :func:`train_step` (:func:`encode_batch` -- end to end :func:`encode_frames` and CLIP's
text tower --, gather, :func:`compute_loss`, ``clip4clip_step``) on the model and optimizer
of :func:`build_model` and :func:`build_optimizer`. The worker count changes when frames are
read, never which: the parameters after training are the same for any ``loader_workers``.

The logit scale is fixed at ``logit_scale`` (CLIP's learned value trains at lr 1e-7 and stays
at 100, papers.md §0), except with ``learned_logit_scale=True`` (end-to-end only): then the
loss uses ``model.clip.logit_scale.exp()``, which trains with the towers (``lr * coef_lr``,
weight decay as CLIP4Clip's substring rule gives it) and is clamped at ln 100 after each step,
as CLIP4Clip. :func:`evaluate` scores both directions with
:func:`vidret_lib.metrics.both_directions`, optionally re-ranked by DSL (transductive) or
QB-Norm with a querybank of training queries (:func:`vidret_lib.rerank.qb_norm_rerank`).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch

from torch import nn
from torch.utils.data import DataLoader, Dataset

from . import distributed as dist_utils
from .clip4clip_recipe import (
    PRECISIONS, apply_clip4clip_freeze, clip4clip_step, plan_steps, precision_context, prepare_precision,
)
from .emcl import EMCL
from .heads import EMCL_ROWS, HEADS, MODALITIES, RetrievalModel, clip_text_init
from .losses import (
    dual_softmax_loss, dual_softmax_rerank, infonce_loss, modality_shuffle_loss, safe_normalize, vsepp_loss,
)
from .metrics import both_directions
from .optim import OPTIMIZERS, make_optimizer, param_groups
from .progress import progress
from .rerank import qb_norm_rerank
from .runinfo import seed_everything

Tensor = torch.Tensor

__all__ = [
    "LOSSES",
    "RERANKS",
    "MASK_COS",
    "FeatureBatch",
    "FeatureSplit",
    "FrameBatches",
    "RawBatch",
    "RawSplit",
    "TrainConfig",
    "TrainResult",
    "build_model",
    "build_optimizer",
    "check_disjoint",
    "compute_loss",
    "encode_batch",
    "encode_frames",
    "false_negative_mask",
    "featurize",
    "frame_loader",
    "load_frames",
    "train",
    "train_step",
    "evaluate",
]

LOSSES = ("infonce", "vsepp", "dsl", "modality_shuffle")
RERANKS = ("none", "dsl", "qb_norm")
MODES = ("frozen", "end_to_end")
SAMPLINGS = ("video", "caption")
FALSE_NEGATIVES = ("mask", "keep")
SELECTS = ("val", "last")
MASK_COS = -1e4  # cosine given to masked false-negative pairs


# ==================================================================== inputs
@dataclass
class FeatureSplit:
    """Cached features of one split (frozen-feature mode).

    ``text`` (N, D) caption features; ``video`` (V, T, D) per-frame features with ``mask``
    (V, T) bool (False = padded frame); ``caption_video`` (N,) int64: caption i describes
    video ``caption_video[i]`` (``vidret_lib.datasets.Split.caption_video``). For MBVR,
    ``title`` (V, D) features of each video's text side and ``title_present`` (V,) bool.
    ``video_ids`` (optional) names the V videos in column order (training errors name them,
    :func:`check_disjoint` compares splits by them); ``excluded`` maps each video left out of
    the split (e.g. failed to decode) to the reason. NumPy inputs are converted to tensors
    (features float32).

    Example:
        >>> s = FeatureSplit(np.zeros((3, 4)), np.zeros((2, 5, 4)), np.ones((2, 5), bool), [0, 0, 1])
        >>> s.num_texts, s.num_videos, s.dim
        (3, 2, 4)
    """

    text: Tensor
    video: Tensor
    mask: Tensor
    caption_video: Tensor
    title: Tensor | None = None
    title_present: Tensor | None = None
    video_ids: tuple[str, ...] | None = None
    excluded: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.text = _tensor(self.text).float()
        self.video = _tensor(self.video).float()
        self.mask = _tensor(self.mask).bool()
        self.caption_video = _tensor(self.caption_video).long()
        if self.text.ndim != 2 or self.video.ndim != 3 or self.video.shape[2] != self.text.shape[1]:
            raise ValueError(
                f"FeatureSplit needs text (N, D) and video (V, T, D) with the same D; got text "
                f"{tuple(self.text.shape)}, video {tuple(self.video.shape)}"
            )
        (n, d), (v, t) = self.text.shape, self.video.shape[:2]
        if tuple(self.mask.shape) != (v, t):
            raise ValueError(f"mask must be (V, T) = ({v}, {t}); got {tuple(self.mask.shape)}")
        if tuple(self.caption_video.shape) != (n,):
            raise ValueError(f"caption_video must be (N,) = ({n},); got {tuple(self.caption_video.shape)}")
        if n and (self.caption_video.min() < 0 or self.caption_video.max() >= v):
            raise ValueError(f"caption_video holds indices outside [0, {v}): it must index the split's videos")
        if (self.title is None) != (self.title_present is None):
            raise ValueError("pass both title (V, D) and title_present (V,), or neither")
        if self.title is not None:
            self.title = _tensor(self.title).float()
            self.title_present = _tensor(self.title_present).bool()
            if tuple(self.title.shape) != (v, d) or tuple(self.title_present.shape) != (v,):
                raise ValueError(
                    f"title must be (V, D) = ({v}, {d}) and title_present (V,); got "
                    f"{tuple(self.title.shape)} and {tuple(self.title_present.shape)}"
                )
        self.video_ids = _check_video_ids(self.video_ids, v)
        self.excluded = dict(self.excluded)

    @property
    def num_texts(self) -> int:
        return self.text.shape[0]

    @property
    def num_videos(self) -> int:
        return self.video.shape[0]

    @property
    def dim(self) -> int:
        return self.text.shape[1]

    def to(self, device: str | torch.device) -> "FeatureSplit":
        """A copy with every tensor on ``device`` (``video_ids`` and ``excluded`` kept)."""
        return dataclasses.replace(self, **{
            f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        })

    def drop_videos(self, reasons: dict[str, str]) -> "FeatureSplit":
        """A copy without the videos named in ``reasons`` (id -> why) and without their captions.

        The kept videos and captions stay in order; ``caption_video`` is re-indexed and
        ``excluded`` gains ``reasons``. Needs ``video_ids``; raises ``ValueError`` for an id not
        in the split, or when no caption would be left.
        """
        if self.video_ids is None:
            raise ValueError("drop_videos names videos by id: build the FeatureSplit with video_ids=...")
        keep_video, keep_caption, new_index = _keep_videos(self.video_ids, self.caption_video, reasons)
        keep_caption = keep_caption.to(self.text.device)
        kept = {"video": self.video, "mask": self.mask, "title": self.title, "title_present": self.title_present}
        return dataclasses.replace(
            self, text=self.text[keep_caption], caption_video=new_index[self.caption_video[keep_caption]],
            video_ids=tuple(v for v, k in zip(self.video_ids, keep_video.tolist()) if k),
            excluded=self.excluded | dict(reasons),
            **{k: (None if x is None else x[keep_video.to(x.device)]) for k, x in kept.items()},
        )


@dataclass
class RawSplit:
    """Raw inputs of one split (end-to-end mode).

    ``load_video(i)`` returns video i's frames uint8 (T, H, W, 3) and mask bool (T,) (e.g. from
    the frame cache of ``vidret_lib.frames``); ``sentences`` (N,), ``caption_video`` (N,),
    ``video_ids`` and ``excluded`` as in :class:`FeatureSplit`. Training reads one video at a
    time through ``load_video`` (:func:`load_frames`), also in :func:`frame_loader`'s worker
    processes, so a split read from a frame cache never holds more than a batch of frames.
    """

    load_video: Callable[[int], tuple[np.ndarray, np.ndarray]]
    sentences: Sequence[str]
    caption_video: Tensor
    num_videos: int
    video_ids: tuple[str, ...] | None = None
    excluded: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.caption_video = _tensor(self.caption_video).long()
        self.video_ids = _check_video_ids(self.video_ids, self.num_videos)
        self.excluded = dict(self.excluded)
        if len(self.sentences) != len(self.caption_video):
            raise ValueError(f"{len(self.sentences)} sentences but {len(self.caption_video)} caption_video entries")
        if len(self.caption_video) and int(self.caption_video.max()) >= self.num_videos:
            raise ValueError(f"caption_video holds indices outside [0, {self.num_videos})")

    @property
    def num_texts(self) -> int:
        return len(self.sentences)

    @classmethod
    def from_frame_cache(cls, frame_cache, split) -> "RawSplit":
        """A dataset split (``vidret_lib.datasets.Split``) read from a frame cache.

        ``frame_cache.load(video_id)`` returns ``(frames, mask)`` and ``frame_cache.failed``
        maps videos that could not be decoded to the reason (``vidret_lib.frame_cache``); those
        videos and their captions are left out and listed in ``excluded``.
        """
        failed = {v: frame_cache.failed[v] for v in split.video_ids if v in frame_cache.failed}
        keep_video, keep_caption, new_index = _keep_videos(split.video_ids, _tensor(split.caption_video), failed)
        ids = tuple(v for v, k in zip(split.video_ids, keep_video.tolist()) if k)
        caption_video = _tensor(split.caption_video).long()
        return cls(_CachedVideos(frame_cache, ids),
                   [s for s, k in zip(split.sentences, keep_caption.tolist()) if k],
                   new_index[caption_video[keep_caption]], len(ids), ids, failed)


@dataclass(frozen=True)
class _CachedVideos:
    """``load_video`` of a frame-cache split: ``self(i)`` is ``frame_cache.load(video_ids[i])``.

    A picklable object, not a lambda, so that spawned loader workers receive it."""

    frame_cache: object
    video_ids: tuple[str, ...]

    def __call__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.frame_cache.load(self.video_ids[i])


def _tensor(x) -> Tensor:
    return x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))


def _check_video_ids(video_ids, num_videos: int) -> tuple[str, ...] | None:
    """``video_ids`` as a tuple of ``num_videos`` distinct ids (or None); else ValueError."""
    if video_ids is None:
        return None
    ids = tuple(video_ids)
    if len(ids) != num_videos or len(set(ids)) != len(ids):
        raise ValueError(f"video_ids must name the {num_videos} videos once each, in column order; got "
                         f"{len(ids)} ids ({len(set(ids))} distinct)")
    return ids


def _keep_videos(video_ids: Sequence[str], caption_video: Tensor, drop: dict[str, str]) -> tuple[Tensor, Tensor, Tensor]:
    """(keep_video (V,) bool, keep_caption (N,) bool, new_index (V,) int64) for dropping ``drop``'s ids."""
    unknown = sorted(set(drop) - set(video_ids))
    if unknown:
        raise ValueError(f"cannot drop videos {unknown[:5]}: they are not in the split")
    keep_video = torch.tensor([v not in drop for v in video_ids], dtype=torch.bool)
    keep_caption = keep_video[caption_video.cpu()]
    if len(caption_video) and not keep_caption.any():
        raise ValueError(f"dropping {len(drop)} videos leaves the split without captions: {list(drop)[:5]}")
    new_index = torch.cumsum(keep_video.long(), 0) - 1  # old column -> new column (kept videos)
    return keep_video, keep_caption, new_index.to(caption_video.device)


def check_disjoint(
    first: FeatureSplit | RawSplit,
    second: FeatureSplit | RawSplit,
    names: tuple[str, str] = ("train", "val"),
    allow_overlap: bool = False,
) -> dict[str, int]:
    """Refuse two splits that share videos; count (and warn about) identical captions they share.

    Videos are compared by ``video_ids``; when either split has none (a split built by hand)
    the video check is skipped and ``"videos"`` is -1. Shared videos raise ``ValueError``
    naming both splits, the number shared and a few ids, unless ``allow_overlap=True`` (then
    they are warned about). Identical captions (the same sentence of a :class:`RawSplit`, or
    bitwise-identical caption features of a :class:`FeatureSplit`) are only counted and warned
    about, never refused: MSR-VTT's generic captions ("a man is talking") occur in both 9k and
    1k-A, and refusing them would break the papers' protocol. Returns ``{"videos": n shared,
    "captions": n captions of ``second`` with an identical caption in ``first``}`` (-1 when
    the two splits are not of one kind).

    Example:
        >>> a = RawSplit(None, ["a dog runs", "a cat"], [0, 1], 2, ("v1", "v2"))
        >>> b = RawSplit(None, ["a cat", "a bird"], [0, 1], 2, ("v3", "v4"))
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     check_disjoint(a, b)
        {'videos': 0, 'captions': 1}
    """
    first_ids, second_ids = getattr(first, "video_ids", None), getattr(second, "video_ids", None)
    out = {"videos": -1, "captions": -1}
    if first_ids is not None and second_ids is not None:
        in_first = set(first_ids)
        shared = [v for v in second_ids if v in in_first]
        out["videos"] = len(shared)
        if shared:
            message = (
                f"the {names[0]} and {names[1]} splits share {len(shared)} videos (of {len(first_ids)} and "
                f"{len(second_ids)}), e.g. {shared[:5]}: a model would be {'selected' if names[1] == 'val' else 'tested'} "
                f"on videos it trained on. Use disjoint splits (MSR-VTT: train_9k_noval / val, train_9k / test_1ka), "
                f"or pass allow_overlap=True (TrainConfig.allow_split_overlap=True) if the overlap is intended"
            )
            if not allow_overlap:
                raise ValueError(message)
            warnings.warn(message, stacklevel=2)
    if type(first) is type(second):
        keys = set(_caption_keys(first))
        out["captions"] = sum(k in keys for k in _caption_keys(second))
        if out["captions"]:
            warnings.warn(
                f"{out['captions']} of the {second.num_texts} {names[1]} captions also occur in the {names[0]} "
                f"split (identical sentences; MSR-VTT's generic captions do, by the papers' protocol)",
                stacklevel=2,
            )
    return out


def _caption_keys(split: FeatureSplit | RawSplit) -> list:
    """One key per caption, equal for identical captions (the sentence, or a digest of its features)."""
    if isinstance(split, RawSplit):
        return list(split.sentences)
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in split.text.cpu().numpy()]


# ==================================================================== config
@dataclass
class TrainConfig:
    """Every switch of a training run (typed literals; defaults = CLIP4Clip's MSR-VTT recipe).

    Loss options: ``margin``/``max_violation``/``vsepp_reduction`` (VSE++), ``dsl_temp`` (DSL
    training temperature on ``logit_scale * cos``), ``ms_temp``/``ms_margin`` (MBVR L_ms; with
    ``ms_dynamic_margin`` the margin of query b is ``ms_margin * (1 - cos(F_v_b, F_v_shuffled))``,
    larger for visually different negatives -- our explicit stand-in for MBVR's unpublished
    dynamic margin), ``alpha``/``beta``/``gamma`` (MBVR weights of L_v, L_t, L_ms).
    EMCL: ``emcl_k``/``emcl_stage_num``/``emcl_momentum``/``emcl_lamd``/``emcl_beta`` (the
    :class:`~vidret_lib.emcl.EMCL` module), ``emcl_eval_block`` (evaluation block size) and
    ``emcl_rows``, the rows EMCL is fed in training and evaluation alike: ``"pairs"`` (EMCL-Net's,
    one video row per (text, video) pair plus the texts) or ``"stacked"`` (``[videos; texts]``);
    see :class:`~vidret_lib.heads.RetrievalModel`.
    ``allow_split_overlap=True`` lets :func:`train` accept train and val splits that share
    videos (:func:`check_disjoint`); leave it False unless the overlap is the experiment.

    End-to-end only (see the module docstring's recipe): ``precision`` (one of
    :data:`~vidret_lib.clip4clip_recipe.PRECISIONS`; CLIP4Clip's is ``"fp16_weights"``),
    ``freeze_layer_num`` (-1 freezes nothing; CLIP4Clip's ``--freeze_layer_num 0`` still
    freezes the towers' stem), ``learned_logit_scale`` (train CLIP's logit scale and use it in
    the loss instead of the fixed ``logit_scale``), ``loader_workers`` (processes that read and
    tokenise the next batches while the towers train, :func:`frame_loader`; 0 reads each batch
    in the training process when it is needed; the result is the same for any value).
    """

    loss: str = "infonce"
    logit_scale: float = 100.0
    margin: float = 0.2
    max_violation: bool = True
    vsepp_reduction: str = "sum"
    dsl_temp: float = 1000.0
    ms_temp: float = 0.05
    ms_margin: float = 0.0
    ms_dynamic_margin: bool = False
    alpha: float = 0.0
    beta: float = 0.0
    gamma: float = 1.0
    head: str = "meanP"
    seq_layers: int = 4
    use_title: bool = False
    emcl: bool = False
    emcl_k: int = 32
    emcl_stage_num: int = 9
    emcl_momentum: float = 0.9
    emcl_lamd: float = 1.0
    emcl_beta: float = 3.0
    emcl_eval_block: int = 32
    emcl_rows: str = "pairs"
    mode: str = "frozen"
    precision: str = "fp32"
    freeze_layer_num: int = -1
    learned_logit_scale: bool = False
    loader_workers: int = 0
    optimizer: str = "bert_adam"
    lr: float = 1e-4
    coef_lr: float = 1e-3
    weight_decay: float = 0.2
    warmup: float = 0.1
    grad_clip_norm: float = 1.0
    max_grad_norm: float = 1.0
    allow_split_overlap: bool = False
    epochs: int = 5
    batch_size: int = 128
    sampling: str = "video"
    false_negatives: str = "mask"
    select: str = "val"
    eval_every: int = 1
    seed: int = 42
    device: str = "cpu"

    def validate(self) -> None:
        """Raise ``ValueError`` naming the bad field and its valid values.

        Example:
            >>> TrainConfig(loss="triplet").validate()
            Traceback (most recent call last):
            ...
            ValueError: unknown loss 'triplet'; valid losses: ('infonce', 'vsepp', 'dsl', 'modality_shuffle')
        """
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; valid losses: {LOSSES}")
        if self.select == "test":
            raise ValueError(
                "select='test' is refused: choosing a checkpoint on the test split inflates test numbers "
                "(papers.md pitfall 1). Use select='val' with a validation split, or select='last'"
            )
        for name, value, valid in [
            ("head", self.head, HEADS), ("mode", self.mode, MODES), ("optimizer", self.optimizer, OPTIMIZERS),
            ("sampling", self.sampling, SAMPLINGS), ("false_negatives", self.false_negatives, FALSE_NEGATIVES),
            ("select", self.select, SELECTS), ("vsepp_reduction", self.vsepp_reduction, ("sum", "mean")),
            ("precision", self.precision, PRECISIONS), ("emcl_rows", self.emcl_rows, EMCL_ROWS),
        ]:
            if value not in valid:
                raise ValueError(f"unknown {name} {value!r}; valid values: {valid}")
        if self.loss == "modality_shuffle" and not self.use_title:
            raise ValueError("loss='modality_shuffle' shuffles vision against the title: set use_title=True")
        if self.use_title and self.emcl:
            raise ValueError("use_title and emcl together are not supported")
        if self.use_title and self.mode == "end_to_end":
            raise ValueError("use_title is available in frozen-feature mode only")
        if self.mode != "end_to_end":
            for name, default in (("precision", "fp32"), ("freeze_layer_num", -1), ("learned_logit_scale", False)):
                if getattr(self, name) != default:
                    raise ValueError(
                        f"{name}={getattr(self, name)!r} trains the CLIP towers: set mode='end_to_end' (with a "
                        f"RawSplit and an encoder), or leave {name} at {default!r} in {self.mode!r} mode"
                    )
        if self.loader_workers < 0 or (self.loader_workers and self.mode != "end_to_end"):
            raise ValueError(
                f"loader_workers={self.loader_workers!r}: it counts the processes that read frames in "
                f"mode='end_to_end' (0 = in the training process); use a value >= 0, and 0 in {self.mode!r} mode"
            )
        if self.epochs < 1 or self.batch_size < 2 or self.eval_every < 1:
            raise ValueError(
                f"need epochs >= 1, batch_size >= 2, eval_every >= 1; got {self.epochs}, "
                f"{self.batch_size}, {self.eval_every}"
            )


# ==================================================================== model and loss
def build_model(config: TrainConfig, dim: int, encoder=None) -> RetrievalModel:
    """The model ``config`` describes, seeded by ``config.seed``.

    With an encoder, seqTransf is initialised from its text transformer when compatible
    (:func:`vidret_lib.heads.clip_text_init`). In end-to-end mode a copy of its towers becomes
    ``model.clip`` (trainable, ``lr * coef_lr``), frozen by ``config.freeze_layer_num`` and
    stored in ``config.precision`` (also kept as ``model.precision`` for :func:`featurize`);
    the text and video adapters are identities, as CLIP4Clip has none. Raises ``ValueError``
    without an encoder in end-to-end mode, and ``TypeError`` (from
    :mod:`vidret_lib.clip4clip_recipe`) when ``freeze_layer_num > -1`` or
    ``precision="fp16_weights"`` meet an encoder that is not an open_clip CLIP ViT.
    """
    config.validate()
    seed_everything(config.seed)
    emcl = None
    if config.emcl:
        emcl = EMCL(config.emcl_k, config.emcl_stage_num, config.emcl_momentum, config.emcl_lamd, config.emcl_beta)
    seq_init = clip_text_init(encoder, dim, config.seq_layers) if encoder is not None and config.head == "seqTransf" else None
    model = RetrievalModel(dim, config.head, config.use_title, emcl, config.emcl_eval_block, config.seq_layers, seq_init,
                           config.emcl_rows)
    if config.mode == "end_to_end":
        if encoder is None:
            raise ValueError("mode='end_to_end' trains the encoder's towers: pass encoder=load_encoder(...)")
        model.clip = copy.deepcopy(encoder.model)  # train a copy; the caller's encoder is untouched
        model.raw_encoder = encoder  # for preprocess_frames / tokenize only
        # CLIP4Clip feeds the towers' outputs to the head (modeling.py get_sequence_output /
        # get_visual_output): frozen mode's stand-in for the CLIP weights has no place here
        model.text_adapter, model.video_adapter = nn.Identity(), nn.Identity()
        if config.freeze_layer_num > -1:
            apply_clip4clip_freeze(model.clip, config.freeze_layer_num)
        prepare_precision(model.clip, config.precision)  # before param_groups: fp16 keeps the parameter objects
        model.precision = config.precision
    return model.to(config.device)


def build_optimizer(config: TrainConfig, model: RetrievalModel, total_steps: int):
    """``(optimizer, scheduler)`` as :func:`train` makes them: ``config.optimizer`` over CLIP4Clip's
    four parameter groups (:func:`vidret_lib.optim.param_groups`: the towers at ``lr * coef_lr``,
    no weight decay on biases and norms), warmup-cosine over ``total_steps`` (the schedule's
    ``t_total``; :func:`~vidret_lib.clip4clip_recipe.plan_steps` gives train()'s)."""
    return make_optimizer(
        config.optimizer, param_groups(model, config.lr, config.coef_lr, config.weight_decay),
        config.lr, config.warmup, total_steps, config.weight_decay, config.max_grad_norm,
    )


def train_step(
    config: TrainConfig,
    model: RetrievalModel,
    optimizer,
    scheduler,
    batch: RawBatch | FeatureBatch,
    fn_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    check: Callable[[str, Tensor], None] | None = None,
) -> Tensor:
    """One training step of :func:`train` on one local batch; returns the loss (0-dim, detached).

    ``batch`` sits on the model's device (a :class:`RawBatch` end to end, a :class:`FeatureBatch`
    on cached features). Under ``config.precision``'s context: :func:`encode_batch`, the
    embeddings gathered from every process (:mod:`vidret_lib.distributed`; identity in one
    process), :func:`compute_loss` with the false negatives ``fn_mask`` (B, B) of the global
    batch (or None); then :func:`~vidret_lib.clip4clip_recipe.clip4clip_step` (backward, global
    clip, optimizer step, zero_grad, logit-scale clamp). ``check(what, value)`` (optional) sees
    the loss, the gradient norm before any weight changes, and whether every weight is finite
    after the step (``what`` = ``"loss"``, ``"gradient norm"``, ``"weights"``); :func:`train`
    raises ``FloatingPointError`` there.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    with precision_context(config.precision, config.device):  # forward and loss; backward outside
        text, vision, title = encode_batch(model, batch)
        text, vision = dist_utils.gather(text), dist_utils.gather(vision)
        title = dist_utils.gather(title) if title is not None else None
        loss = compute_loss(config, model, text, vision, fn_mask, title, generator)
    if check is not None:
        check("loss", loss)
    clip4clip_step(  # CLIP4Clip train_epoch: backward, global clip, step, zero_grad, clamp
        loss, params, optimizer, model.clip.logit_scale if config.learned_logit_scale else None,
        config.grad_clip_norm, scheduler,
        check_grad_norm=None if check is None else lambda norm: check("gradient norm", norm),  # weights untouched
    )
    if check is not None:
        check("weights", torch.stack([torch.isfinite(p).all() for p in params]).all())
    return loss.detach()


def _base_loss(config: TrainConfig, sim: Tensor, scale: float | Tensor) -> Tensor:
    """The named loss on a square cosine matrix (infonce for 'modality_shuffle') at logit scale ``scale``."""
    if config.loss in ("infonce", "modality_shuffle"):
        return infonce_loss(sim, scale)
    if config.loss == "vsepp":
        return vsepp_loss(sim, config.margin, config.max_violation, config.vsepp_reduction)
    scaled = scale * sim  # DSL takes logit-scaled scores; symmetric use
    return (dual_softmax_loss(scaled, config.dsl_temp) + dual_softmax_loss(scaled.T, config.dsl_temp)) / 2


def false_negative_mask(video_ids: Tensor, sentence_ids: Tensor) -> Tensor:
    """(B, B) bool: off-diagonal pairs sharing a video or a sentence (see the module docstring).

    Example:
        >>> false_negative_mask(torch.tensor([0, 0, 1]), torch.tensor([5, 6, 5])).int().tolist()
        [[0, 1, 1], [1, 0, 0], [1, 0, 0]]
    """
    same = (video_ids[:, None] == video_ids[None, :]) | (sentence_ids[:, None] == sentence_ids[None, :])
    return same & ~torch.eye(len(video_ids), dtype=torch.bool, device=video_ids.device)


def compute_loss(
    config: TrainConfig,
    model: RetrievalModel,
    text: Tensor,
    vision: Tensor,
    fn_mask: Tensor | None,
    title: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The training loss of one (gathered) global batch.

    ``text`` (B, D) and ``vision`` (B, D) from :meth:`RetrievalModel.encode_text` /
    :meth:`~RetrievalModel.encode_video`; ``title`` (B, D) from ``encode_title`` for MBVR;
    ``fn_mask`` (B, B) false negatives to mask (or None). ``generator`` draws the MBVR shuffle.
    The logit scale is ``config.logit_scale``, or with ``config.learned_logit_scale``
    ``model.clip.logit_scale.exp()`` (CLIP4Clip ``modules/modeling.py`` ``get_similarity_logits``).
    """
    def masked(sim: Tensor) -> Tensor:
        return sim if fn_mask is None else sim.masked_fill(fn_mask, MASK_COS)

    scale = model.clip.logit_scale.exp() if config.learned_logit_scale else config.logit_scale
    if not config.use_title:
        return _base_loss(config, masked(model.scores(text, vision)), scale)
    q = safe_normalize(text)  # (B, D) queries
    f_v = safe_normalize(vision)  # (B, D) vision-only F_v
    f_m = model.fusion(f_v, title)  # (B, D) fused F_m
    loss = _base_loss(config, masked(q @ f_m.T), scale)  # L_bi: query <-> fused
    if config.alpha:
        loss = loss + config.alpha * _base_loss(config, masked(q @ f_v.T), scale)  # L_v: query <-> vision only
    if config.beta:
        loss = loss + config.beta * _base_loss(config, masked(q @ title.T), scale)  # L_t: query <-> title only
    if config.loss == "modality_shuffle":
        b = len(q)
        perm = torch.randperm(b, generator=generator).to(q.device)
        shuffled = torch.empty_like(perm)
        shuffled[perm] = perm.roll(1)  # a derangement: every row gets another row's vision
        f_ms = model.fusion(f_v[shuffled], title)  # (B, D): own title, wrong vision
        margin = config.ms_margin
        if config.ms_dynamic_margin:
            margin = config.ms_margin * (1 - (f_v * f_v[shuffled]).sum(-1)).detach()  # (B,)
        loss = loss + config.gamma * modality_shuffle_loss(q, f_m, f_ms, config.ms_temp, margin)
    return loss


# ==================================================================== batches
def _epoch_batches(
    caption_video: Tensor, num_videos: int, config: TrainConfig, generator: torch.Generator, world: int = 1
) -> list[tuple[Tensor, Tensor]]:
    """(caption indices (B,), video indices (B,)) of each global batch of one epoch over ``world`` processes.

    As CLIP4Clip's loader (``dataloaders/data_dataloaders.py`` ``dataloader_msrvtt_train``): the
    shuffled samples are padded to a multiple of ``world`` by repeating the start
    (``DistributedSampler``) and cut into batches with ``drop_last``; global batch k is the union
    of every process's batch k, so there are :func:`~vidret_lib.clip4clip_recipe.plan_steps` of them.
    """
    if config.sampling == "video":
        videos = torch.randperm(num_videos, generator=generator)
        order = torch.argsort(caption_video, stable=True)  # captions grouped by video
        counts = torch.bincount(caption_video, minlength=num_videos)
        if (counts == 0).any():
            raise ValueError(f"video {int(torch.nonzero(counts == 0)[0])} has no caption; drop it from the split")
        starts = torch.cumsum(counts, 0) - counts
        pick = (torch.rand(num_videos, generator=generator) * counts[videos]).long()  # one caption per video
        captions = order[starts[videos] + pick]
    else:
        captions = torch.randperm(len(caption_video), generator=generator)
        videos = caption_video[captions]
    size = min(config.batch_size, len(captions))
    padded = torch.arange(-(-len(captions) // world) * world) % len(captions)  # ceil(n / world) * world
    captions, videos = captions[padded], videos[padded]
    n = len(captions) // size  # drop_last, as CLIP4Clip
    return [(captions[i * size:(i + 1) * size], videos[i * size:(i + 1) * size]) for i in range(n)]


# ==================================================================== batches on the device
class RawBatch(NamedTuple):
    """One (local) batch of end-to-end inputs, as :func:`frame_loader` yields it (CPU tensors).

    ``frames`` uint8 (n, H, W, 3): the valid frames of the batch's videos, video by video and in
    frame order (padded slots are not loaded onto the device, nor encoded); ``mask`` bool (b, T):
    which of each video's T slots hold a frame (its n True entries, row-major, are ``frames``);
    ``tokens`` int64 (b, L): the captions' token ids (the encoder's tokenizer).
    """

    frames: Tensor
    mask: Tensor
    tokens: Tensor

    def to(self, device: str | torch.device, non_blocking: bool = False) -> "RawBatch":
        """The batch on ``device`` (``non_blocking`` copies overlap compute when the batch is pinned)."""
        return RawBatch(*(x.to(device, non_blocking=non_blocking) for x in self))


class FeatureBatch(NamedTuple):
    """One (local) batch of frozen-mode inputs: rows of a :class:`FeatureSplit` on its device.

    ``text`` (b, D), ``video`` (b, T, D), ``mask`` (b, T), and for MBVR ``title`` (b, D) and
    ``title_present`` (b,) (None without titles).
    """

    text: Tensor
    video: Tensor
    mask: Tensor
    title: Tensor | None
    title_present: Tensor | None

    @classmethod
    def of(cls, split: FeatureSplit, captions: Tensor, videos: Tensor) -> "FeatureBatch":
        """Captions ``captions`` (b,) and videos ``videos`` (b,) of ``split`` (indices, any device)."""
        captions, videos = captions.to(split.text.device), videos.to(split.text.device)
        titled = split.title is not None
        return cls(split.text[captions], split.video[videos], split.mask[videos],
                   split.title[videos] if titled else None, split.title_present[videos] if titled else None)


def load_frames(split: RawSplit, videos: Sequence[int] | Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``(frames uint8 (n, H, W, 3), mask bool (b, T))`` of ``videos`` (b split indices): the
    valid frames of each video in order, read one video at a time through ``split.load_video``.

    Raises ``ValueError`` naming the video when its frames and mask disagree in length, or when
    its number of frame slots differs from the first video's.
    """
    frames, masks = [], []
    for v in videos:
        video_frames, mask = split.load_video(int(v))
        mask = np.asarray(mask, dtype=bool)
        if len(video_frames) != len(mask) or (masks and mask.shape != masks[0].shape):
            name = split.video_ids[int(v)] if split.video_ids is not None else f"#{int(v)}"
            raise ValueError(f"video {name}: {len(video_frames)} frames and a mask of {mask.shape}; every video of "
                             f"a RawSplit needs frames (T, H, W, 3) and a mask (T,) with the same T (the frame "
                             f"cache's max_frames)")
        frames.append(video_frames[mask])
        masks.append(mask)
    return np.concatenate(frames), np.stack(masks)


class FrameBatches(Dataset):
    """Item k: the :class:`RawBatch` of ``batches[k]`` = (caption indices (b,), video indices (b,)) of ``split``.

    Frames are read per video (:func:`load_frames`; a frame-cache split loads one ``.npz`` per
    video), captions tokenised by ``tokenizer`` (list[str] -> int64 (b, L); the encoder's, on the
    CPU). Worker processes receive this object once per epoch: forked workers share the split's
    memory; spawned ones (macOS, Windows) pickle it, which needs a picklable ``split.load_video``
    (:meth:`RawSplit.from_frame_cache` gives one).
    """

    def __init__(self, split: RawSplit, batches: Sequence[tuple[Tensor, Tensor]], tokenizer: Callable):
        self.split, self.batches, self.tokenizer = split, list(batches), tokenizer

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> RawBatch:
        captions, videos = self.batches[k]
        frames, mask = load_frames(self.split, videos)
        tokens = self.tokenizer([self.split.sentences[int(i)] for i in captions])
        return RawBatch(torch.from_numpy(frames), torch.from_numpy(mask), torch.as_tensor(tokens))


def frame_loader(split: RawSplit, batches: Sequence[tuple[Tensor, Tensor]], tokenizer: Callable,
                 workers: int = 0, device: str | torch.device = "cpu") -> DataLoader:
    """A ``DataLoader`` yielding the :class:`RawBatch` of each of ``batches``, in order (CPU tensors).

    ``workers`` processes read and tokenise ahead of the training step (0: in this process, when
    the step asks); the batches are pinned when ``device`` is CUDA, so that
    ``batch.to(device, non_blocking=True)`` overlaps the copy with compute. The order, and so the
    training, is the same for any ``workers``.
    """
    return DataLoader(FrameBatches(split, batches, tokenizer), batch_size=None, shuffle=False,
                      num_workers=workers, pin_memory=torch.device(device).type == "cuda")


# ==================================================================== end-to-end encoding
def encode_frames(model: RetrievalModel, frames: Tensor, mask: Tensor) -> Tensor:
    """The image tower on a batch's valid frames: per-frame features (b, T, D) float32, zero at padded slots.

    ``frames`` uint8 (n, H, W, 3) and ``mask`` bool (b, T) with n True entries, as in
    :class:`RawBatch`, on the model's device. Runs with gradients under the caller's precision
    context; the frames are normalised on their own device (``Encoder.preprocess_frames``).
    """
    pixels = model.raw_encoder.preprocess_frames(frames, device=frames.device)  # (n, 3, S, S) float32
    feats = model.clip.encode_image(pixels).float()  # (n, D)
    video = feats.new_zeros(*mask.shape, feats.shape[-1])  # (b, T, D)
    video[mask] = feats
    return video


def encode_batch(model: RetrievalModel, batch: RawBatch | FeatureBatch) -> tuple[Tensor, Tensor, Tensor | None]:
    """Embeddings (text (b, D), vision (b, D), title (b, D) or None) of a local batch, with gradients.

    A :class:`RawBatch` (end-to-end) goes through the towers (:func:`encode_frames`, CLIP's
    ``encode_text``), a :class:`FeatureBatch` (frozen) through the adapters only; then the head.
    """
    if isinstance(batch, RawBatch):
        text = model.clip.encode_text(batch.tokens).float()  # (b, D)
        video = encode_frames(model, batch.frames, batch.mask)  # (b, T, D)
        return model.encode_text(text), model.encode_video(video, batch.mask), None
    title = model.encode_title(batch.title, batch.title_present) if model.use_title else None
    return model.encode_text(batch.text), model.encode_video(batch.video, batch.mask), title


def _tower_text(model: RetrievalModel, sentences: Sequence[str], device) -> Tensor:
    """Text tower output (B, D) float32 for a list of sentences."""
    return model.clip.encode_text(model.raw_encoder.tokenize(list(sentences)).to(device)).float()


@torch.no_grad()
def featurize(model: RetrievalModel, split: RawSplit, batch: int = 32) -> FeatureSplit:
    """Encode a :class:`RawSplit` with the model's current towers (eval mode) into a :class:`FeatureSplit`.

    The towers run under the precision they were trained in (``model.precision``, set by
    :func:`build_model`: bfloat16 autocast for ``"amp_bf16"``); features come back float32.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    text, videos, masks = [], [], []
    with precision_context(model.precision, device):
        for i in range(0, split.num_texts, batch):
            text.append(_tower_text(model, split.sentences[i:i + batch], device))
        for i in range(0, split.num_videos, batch):
            loaded = load_frames(split, range(i, min(i + batch, split.num_videos)))
            frames, mask = (torch.from_numpy(x).to(device) for x in loaded)
            videos.append(encode_frames(model, frames, mask))
            masks.append(mask)
    model.train(was_training)
    return FeatureSplit(torch.cat(text), torch.cat(videos), torch.cat(masks), split.caption_video.to(device))


def _sentence_ids(split) -> Tensor:
    """(N,) id of each caption's sentence: equal ids = identical captions."""
    if isinstance(split, RawSplit):
        index: dict[str, int] = {}
        return torch.tensor([index.setdefault(s, len(index)) for s in split.sentences])
    return torch.unique(split.text.cpu(), dim=0, return_inverse=True)[1]  # identical features


# ==================================================================== training
@dataclass
class TrainResult:
    """What :func:`train` returns.

    ``model`` carries the selected weights (eval mode); ``selected_state`` / ``last_state``
    are CPU state dicts of the chosen and the last epoch, so a notebook can report the
    fixed-last-epoch number beside the selected one (:meth:`model_at`). ``history`` has one
    dict per epoch: ``epoch``, ``loss`` (mean over steps), ``lr``, ``seconds``, ``steps``
    and ``val`` (``{"t2v": .., "v2t": ..}`` or None when not evaluated).
    """

    model: RetrievalModel
    history: list[dict]
    chosen_epoch: int
    selected_state: dict
    last_state: dict
    config: TrainConfig

    def model_at(self, which: str = "selected") -> RetrievalModel:
        """A copy of the model with the ``"selected"`` or ``"last"`` weights."""
        states = {"selected": self.selected_state, "last": self.last_state}
        if which not in states:
            raise ValueError(f"which must be 'selected' or 'last'; got {which!r}")
        keep = getattr(self.model, "raw_encoder", None)
        model = copy.deepcopy(self.model, memo={id(keep): keep} if keep is not None else None)
        model.load_state_dict(states[which])
        return model.eval()


def _snapshot(model: RetrievalModel) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _current_lr(optimizer) -> float:
    if hasattr(optimizer, "get_lr"):
        return max(optimizer.get_lr())
    return max(g["lr"] for g in optimizer.param_groups)


def _device(config: TrainConfig, world: int) -> torch.device:
    device = torch.device(config.device)
    if device.type == "cuda" and world > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def _stop_if_not_finite(what: str, value: Tensor, epoch: int, step: int, steps: int, split, videos: Tensor) -> None:
    """Raise ``FloatingPointError`` naming the epoch, step and batch videos if ``value`` is not finite.

    ``value`` is a tensor (for ``"weights"``: whether every weight is finite).
    """
    if bool(torch.isfinite(value).all()):
        return
    ids = [split.video_ids[int(i)] if split.video_ids is not None else f"#{int(i)}" for i in videos]
    shown = "" if what == "weights" else f" ({value.item()})"
    raise FloatingPointError(
        f"training stopped: non-finite {what}{shown} at epoch {epoch}, step {step} of {steps} "
        f"({'after the optimizer step' if what == 'weights' else 'no weight changed'}). The batch's {len(ids)} videos"
        f"{'' if split.video_ids is not None else ' (column indices; pass FeatureSplit.video_ids to name them)'}: "
        f"{', '.join(ids)}. Check their features (no valid frame, non-finite values) or lower the learning rate"
    )


def train(config: TrainConfig, train: FeatureSplit | RawSplit, val: FeatureSplit | RawSplit | None = None,
          encoder=None) -> TrainResult:
    """Train a retrieval model as ``config`` says; see the module docstring.

    Frozen mode: ``train``/``val`` are :class:`FeatureSplit`; ``encoder`` (optional) only
    initialises seqTransf from CLIP's text transformer. End-to-end mode: :class:`RawSplit` and a
    required encoder (``vidret_lib.encoders.load_encoder``) whose towers are copied and trained.
    Under ``torchrun`` every process must call this with the same arguments; the process group
    it joins stays open (call ``torch.distributed.destroy_process_group()`` at the end).

    Raises ``ValueError`` when ``train`` and ``val`` share videos (:func:`check_disjoint`;
    ``config.allow_split_overlap`` overrides), and ``FloatingPointError`` at the first
    non-finite loss or gradient norm (before that step changes any weight) or non-finite
    weight after a step, naming the epoch, the step and the batch's video ids. End-to-end:
    ``ValueError`` without an encoder, ``TypeError`` when ``freeze_layer_num > -1`` or
    ``precision="fp16_weights"`` meet an encoder that is not an open_clip CLIP ViT.
    """
    config.validate()
    if config.select == "val" and val is None:
        raise ValueError("select='val' needs a validation split: pass val=..., or set select='last'")
    expected = FeatureSplit if config.mode == "frozen" else RawSplit
    for name, split in (("train", train), ("val", val)):
        if split is not None and not isinstance(split, expected):
            raise TypeError(f"mode={config.mode!r} takes {expected.__name__} inputs; {name} is {type(split).__name__}")
    if config.use_title and train.title is None:
        raise ValueError("use_title=True needs FeatureSplit.title and title_present for the training split")
    if val is not None:
        check_disjoint(train, val, ("train", "val"), config.allow_split_overlap)
    rank, world = dist_utils.init_from_env(config.device)
    device = _device(config, world)
    config = dataclasses.replace(config, device=str(device))
    if config.mode == "frozen":
        train, val = train.to(device), (val.to(device) if val is not None else None)
        dim = train.dim
    else:
        if encoder is None:
            raise ValueError("mode='end_to_end' needs encoder=load_encoder(...)")
        dim = encoder.embed_dim
    model = build_model(config, dim, encoder)
    dist_utils.broadcast_parameters(model)
    generator = torch.Generator().manual_seed(config.seed)
    sentence_ids = _sentence_ids(train)
    caption_video = train.caption_video.cpu()
    n_items = train.num_videos if config.sampling == "video" else train.num_texts
    plan = plan_steps(n_items, min(config.batch_size, n_items), config.epochs, world)  # CLIP4Clip's loader length
    optimizer, scheduler = build_optimizer(config, model, plan.total_steps)
    history: list[dict] = []
    best: tuple[float, int, dict] | None = None
    for epoch in progress(range(1, config.epochs + 1), desc="epochs"):
        model.train()
        start, losses = time.perf_counter(), []
        batches = _epoch_batches(caption_video, train.num_videos, config, generator, world)
        local = [(dist_utils.shard(c, rank, world), dist_utils.shard(v, rank, world)) for c, v in batches]
        if config.mode == "end_to_end":  # read (ahead, with loader_workers) and copied to the device
            loader = frame_loader(train, local, model.raw_encoder.tokenizer, config.loader_workers, device)
            inputs = (batch.to(device, non_blocking=True) for batch in loader)
        else:
            inputs = (FeatureBatch.of(train, c, v) for c, v in local)
        for step, ((captions, videos), batch) in enumerate(zip(batches, inputs), 1):
            where = (epoch, step, plan.steps_per_epoch, train, videos)
            fn_mask = None
            if config.false_negatives == "mask":
                fn_mask = false_negative_mask(videos, sentence_ids[captions]).to(device)
            loss = train_step(config, model, optimizer, scheduler, batch, fn_mask, generator,
                              check=lambda what, value: _stop_if_not_finite(what, value, *where))
            losses.append(loss.item())
        record = {
            "epoch": epoch, "loss": float(np.mean(losses)), "lr": _current_lr(optimizer),
            "seconds": time.perf_counter() - start, "steps": len(losses), "val": None,
        }
        if val is not None and (epoch % config.eval_every == 0 or epoch == config.epochs):
            record["val"] = evaluate(model, val)
            score = record["val"]["t2v"]["R1"]
            if config.select == "val" and (best is None or score >= best[0]):
                best = (score, epoch, _snapshot(model))
        history.append(record)
    last_state = _snapshot(model)
    chosen_epoch, selected_state = (best[1], best[2]) if config.select == "val" else (config.epochs, last_state)
    model.load_state_dict(selected_state)
    return TrainResult(model.eval(), history, chosen_epoch, selected_state, last_state, config)


# ==================================================================== evaluation
@torch.no_grad()
def _similarity(model: RetrievalModel, text: Tensor, videos: FeatureSplit, modality: str) -> Tensor:
    return model.similarity(text, videos.video, videos.mask, videos.title, videos.title_present, modality)


@torch.no_grad()
def evaluate(
    model: RetrievalModel,
    split: FeatureSplit | RawSplit,
    rerank: str = "none",
    prior: FeatureSplit | RawSplit | None = None,
    modality: str = "fused",
    logit_scale: float = 100.0,
    dsl_temp: float = 1.0,
    qb_beta: float = 20.0,
    qb_k: int = 1,
    with_ranks: bool = False,
) -> dict:
    """R@1/5/10, MdR, MnR of both directions on ``split``: ``{"t2v": {...}, "v2t": {...}}``.

    ``rerank``: ``"none"``; ``"dsl"``, the inverted softmax on ``logit_scale * cos`` at
    ``dsl_temp`` (CAMoE#4's temperature 1 = EMCL-Net's 0.01 on raw cosines), computed over the
    whole test matrix -- **transductive**; ``"qb_norm"``, QB-Norm with a querybank from
    ``prior`` (the *training* split): its captions for t2v, its videos for v2t (beta, k as the
    repository's defaults). ``modality`` picks MBVR's ``"fused"``, ``"vision"`` or ``"title"``
    video embedding. Several captions per video are handled by ``caption_video``. ``with_ranks=True``
    adds each query's rank to each direction (:func:`vidret_lib.metrics.both_directions`).
    """
    if rerank not in RERANKS:
        raise ValueError(f"unknown rerank {rerank!r}; valid values: {RERANKS}")
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; valid values: {MODALITIES}")
    if rerank == "qb_norm" and prior is None:
        raise ValueError("rerank='qb_norm' needs prior=<training split> for its querybank (never the test split)")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    split = (featurize(model, split) if isinstance(split, RawSplit) else split).to(device)
    sim = _similarity(model, split.text, split, modality)  # (N_text, N_video) cosine
    cv = split.caption_video
    if rerank == "none":
        out = both_directions(sim, cv, with_ranks=with_ranks)
    elif rerank == "dsl":
        scaled = logit_scale * sim
        out = {
            "t2v": both_directions(dual_softmax_rerank(scaled, dsl_temp, "t2v"), cv, with_ranks=with_ranks)["t2v"],
            "v2t": both_directions(dual_softmax_rerank(scaled, dsl_temp, "v2t"), cv, with_ranks=with_ranks)["v2t"],
        }
    else:
        prior = (featurize(model, prior) if isinstance(prior, RawSplit) else prior).to(device)
        bank_t2v = _similarity(model, prior.text, split, modality)  # (N_train, V): training captions x test videos
        bank_v2t = _similarity(model, split.text, prior, modality).T  # (V_train, N): training videos x test captions
        out = {
            "t2v": both_directions(qb_norm_rerank(sim, bank_t2v, qb_beta, qb_k), cv, with_ranks=with_ranks)["t2v"],
            "v2t": both_directions(qb_norm_rerank(sim.T, bank_v2t, qb_beta, qb_k).T, cv, with_ranks=with_ranks)["v2t"],
        }
    model.train(was_training)
    return out
