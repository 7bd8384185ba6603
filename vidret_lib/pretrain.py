"""The pretrained start: the offline towers aligned on still image-text pairs, playing CLIP's part.

Every replicated paper fine-tunes CLIP (Radford et al. 2021, "Learning Transferable Visual
Models From Natural Language Supervision"): a model whose image and text towers were already
aligned by a symmetric contrastive (InfoNCE) loss on image-text pairs, and which has never
seen a video, so it knows nothing of motion. The offline default encoder
(:mod:`vidret_lib.encoders`) joins two separately pretrained towers by random orthogonal
projections, so its zero-shot retrieval is at chance. This module builds the stand-in for
CLIP's alignment on ShapeMotion:

* the data are :func:`data_prep.synthetic.static_pairs`: still frames of fresh scenes (a
  random stream no split uses) with captions of static facts only (shape, colour, size,
  background, distractors), so, like CLIP, the start knows no motion, direction or event order;
* the model is CLIP's part that the frozen-feature notebooks can hold: one linear map per
  tower, ``W_text`` and ``W_image`` (D, D), applied as ``x @ W.T`` to the encoder's features,
  trained from the identity with the symmetric InfoNCE of :func:`vidret_lib.losses.infonce_loss`
  at a fixed logit scale, captions shared by two stills of a batch masked as false negatives;
* the last ``heldout`` stills are never trained on: the zero-shot t2v/v2t R@1 there, before
  (identity maps) and after, is stored in the checkpoint's ``info``.

:func:`pretrain_start` trains it once per encoder and config and caches it under a key of
everything that made it; :func:`apply_start` maps a :class:`~vidret_lib.train.FeatureSplit`
through it (captions and titles by ``W_text``, every frame by ``W_image``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from data_prep.synthetic import GENERATOR_VERSION, PRESETS, static_pairs

from .cache import cache_key, folder_lock, load_npz, save_npz
from .features import text_features, video_features
from .losses import infonce_loss, safe_normalize
from .metrics import both_directions
from .train import MASK_COS, FeatureSplit, false_negative_mask

PRETRAIN_VERSION = "1"  # bump whenever this module's training or data changes (it is in the cache key)
STILLS = PRESETS["default"]  # the ShapeMotion settings the stills are drawn with (96 px frames)


@dataclass(frozen=True)
class PretrainConfig:
    """Everything that shapes the pretrained start besides the encoder (typed literals).

    ``n_images`` stills, of which the last ``heldout`` are only evaluated, each with
    ``captions_per_image`` distinct captions; ``epochs`` passes over the training stills, one
    of each still's captions drawn per pass, in batches of ``batch_size`` pairs; Adam at ``lr``
    on the two (D, D) maps; InfoNCE at the fixed ``logit_scale`` (CLIP's trained value is 100);
    ``seed`` draws the stills (their random stream) and the batch order.
    Raises ``ValueError`` naming every bad field.

    Example:
        >>> PretrainConfig(n_images=10, heldout=10)
        Traceback (most recent call last):
        ...
        ValueError: invalid PretrainConfig: n_images - heldout = 0 training stills (need >= 2)
    """

    n_images: int = 2500
    heldout: int = 500
    captions_per_image: int = 2
    epochs: int = 30
    batch_size: int = 256
    lr: float = 1e-3
    # 100: the scale fine-tuning uses (CLIP's learned scale, clamped at 100). On the held-out stills a softer
    # scale scores higher (t2v R@1 17.7 at 10, 13.4 at 50, 11.5 at 100), but a start tuned for scale 10
    # leaves fine-tuning at 100 little to add. meanP fine-tuned 5 epochs at lr 5e-4 on the default set, test
    # t2v R@1 gain over zero-shot (paired 95% CIs over 2 seeds, video clusters): +1.4 [+0.3, +2.6] from the
    # scale-100 start, +2.0 [+0.95, +3.1] from the scale-50 one; from the scale-10 start ONE seed, no CI:
    # 8.95 selected vs 8.85 zero-shot (+0.1).
    logit_scale: float = 100.0
    seed: int = 0

    def __post_init__(self) -> None:
        ints = ("n_images", "heldout", "captions_per_image", "epochs", "batch_size", "seed")
        floats = ("lr", "logit_scale")
        bad = [f"{k}={getattr(self, k)!r} (must be an int)" for k in ints
               if isinstance(getattr(self, k), bool) or not isinstance(getattr(self, k), int)]
        bad += [f"{k}={getattr(self, k)!r} (must be a number > 0)" for k in floats
                if isinstance(getattr(self, k), bool) or not isinstance(getattr(self, k), (int, float))
                or not getattr(self, k) > 0]
        if not bad:
            minimum = {"heldout": 2, "captions_per_image": 1, "epochs": 1, "batch_size": 2, "seed": 0}
            bad += [f"{k}={getattr(self, k)} (< {m})" for k, m in minimum.items() if getattr(self, k) < m]
            if self.n_images - self.heldout < 2:
                bad.append(f"n_images - heldout = {self.n_images - self.heldout} training stills (need >= 2)")
        if bad:
            raise ValueError(f"invalid PretrainConfig: {'; '.join(bad)}")


@dataclass
class StartCheckpoint:
    """The pretrained start: CLIP's projection part for the frozen features.

    ``text`` and ``image``: float32 (D, D) maps; the start maps a text feature ``t`` (N, D) to
    ``t @ text.T`` and every frame feature ``f`` (..., D) to ``f @ image.T``. ``key``: the cache
    key of everything that made it (:func:`start_key`). ``info``: what it was trained on
    (``stills``, ``n_train_images``, ``n_pairs``, ``n_unique_captions``), its ``loss_history``
    (mean training loss per epoch) and ``heldout`` zero-shot metrics on the held-out stills
    (``identity`` = before training, ``pretrained`` = after; t2v and v2t R@1 in %, with
    ``chance`` R@1 in %).
    """

    text: Tensor
    image: Tensor
    key: str
    info: dict = field(default_factory=dict)


def start_key(encoder, config: PretrainConfig = PretrainConfig()) -> str:
    """The cache key of the start of ``encoder`` (its ``cache_id``) under ``config`` (no training)."""
    return cache_key(
        "pretrain-start", encoder=encoder.cache_id, config=asdict(config), stills=asdict(STILLS),
        generator=GENERATOR_VERSION, version=PRETRAIN_VERSION,
    )


def pretrain_start(
    encoder, cache_dir: str | os.PathLike, config: PretrainConfig = PretrainConfig()
) -> StartCheckpoint:
    """The pretrained start of ``encoder``, loaded from ``cache_dir/pretrain/<key>.npz`` or trained.

    ``encoder`` needs ``cache_id``, ``device``, ``encode_image`` (uint8 (N, S, S, 3) -> (N, D))
    and ``encode_text`` (list[str] -> (N, D)), as :class:`vidret_lib.encoders.Encoder` has.
    Stills and distinct captions are encoded through the feature caches of
    :mod:`vidret_lib.features` (resumable), then the two maps are trained from the identity
    (see the module docstring) on the CPU, on one thread, with a fixed seed: the same features
    give the same maps bit for bit whatever the thread count (the features themselves may
    differ in the last bits across thread counts). Training runs under :func:`~vidret_lib.cache.folder_lock`
    on ``cache_dir/pretrain``, so a second process waits and then loads the result; the file is
    written atomically. Raises ``ValueError`` if the encoder's text and image features differ in
    width, or for a damaged cache file (naming it).
    """
    key = start_key(encoder, config)
    folder = Path(cache_dir) / "pretrain"
    path = folder / f"{key}.npz"
    with folder_lock(folder):
        if not path.exists():
            text, image, info = _train(encoder, cache_dir, config)
            save_npz(path, text=text.numpy(), image=image.numpy(), info=np.array(json.dumps(info)))
        data = load_npz(path)
    return StartCheckpoint(torch.from_numpy(data["text"]), torch.from_numpy(data["image"]), key,
                           json.loads(str(data["info"])))


def apply_start(split: FeatureSplit, start: StartCheckpoint | None) -> FeatureSplit:
    """``split`` seen through the start: ``text @ W_text.T``, every frame ``@ W_image.T``, titles
    ``@ W_text.T`` (MBVR's titles are text); ``mask``, ``caption_video``, ``title_present``,
    ``video_ids`` and ``excluded`` unchanged. Zero features (padded frames, missing titles) stay
    zero. ``start=None`` returns ``split`` itself. Raises ``ValueError`` when the maps are not
    (D, D) for the split's width D.

    Example:
        >>> s = FeatureSplit(np.ones((1, 2)), np.ones((1, 1, 2)), np.ones((1, 1), bool), [0])
        >>> m = StartCheckpoint(2 * torch.eye(2), torch.tensor([[0.0, 1.0], [0.0, 0.0]]), "k")
        >>> out = apply_start(s, m)
        >>> out.text.tolist(), out.video.tolist()
        ([[2.0, 2.0]], [[[1.0, 0.0]]])
    """
    if start is None:
        return split
    d = split.dim
    for name, w in (("text", start.text), ("image", start.image)):
        if tuple(w.shape) != (d, d):
            raise ValueError(f"start {start.key}: its {name} map is {tuple(w.shape)}, the features are {d}-d; "
                             "pretrain the start with the encoder that made these features")
    w_text, w_image = start.text.to(split.text.device), start.image.to(split.text.device)
    title = None if split.title is None else split.title @ w_text.T
    return dataclasses.replace(split, text=split.text @ w_text.T, video=split.video @ w_image.T, title=title)


# ---------------------------------------------------------------- training


def _encode(encoder, cache_dir, config: PretrainConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Features of the stills and captions: image (n, D), text (U, D) of the U distinct
    captions, caption_index (n, captions_per_image) int64 rows of ``text``."""
    frames, captions, _ = static_pairs(config.n_images, config.seed, STILLS, config.captions_per_image)
    ids = [f"still{i:05d}" for i in range(config.n_images)]
    stills_key = cache_key("stills", n_images=config.n_images, seed=config.seed, stills=asdict(STILLS),
                           captions_per_image=config.captions_per_image, generator=GENERATOR_VERSION)
    # the stills as a frame cache of one-frame videos, so video_features batches and caches them
    stills = SimpleNamespace(key=stills_key, failed={}, content=dict.fromkeys(ids, stills_key),
                             load=lambda v: (frames[int(v[5:])][None], np.ones(1, bool)))
    image, _ = video_features(encoder, stills, ids, cache_dir)
    unique = list(dict.fromkeys(c for caps in captions for c in caps))  # first-seen order
    row = {c: i for i, c in enumerate(unique)}
    text = text_features(encoder, unique, cache_dir)
    if text.shape[1] != image.shape[2]:
        raise ValueError(f"encoder {encoder.cache_id}: text features are {text.shape[1]}-d, image features "
                         f"{image.shape[2]}-d; the start needs one shared width")
    caption_index = torch.tensor([[row[c] for c in caps] for caps in captions])
    return image[:, 0], text, caption_index


def _scores(w_text: Tensor, w_image: Tensor, text: Tensor, image: Tensor) -> Tensor:
    """(N_text, N_image) cosine of ``text @ w_text.T`` and ``image @ w_image.T``."""
    return safe_normalize(text @ w_text.T) @ safe_normalize(image @ w_image.T).T


def _batch_loss(
    w_text: Tensor, w_image: Tensor, text: Tensor, image: Tensor, image_ids: Tensor, caption_ids: Tensor,
    logit_scale: float,
) -> Tensor:
    """Symmetric InfoNCE of B pairs: row i is caption ``caption_ids[i]`` (features ``text[i]``)
    of still ``image_ids[i]`` (features ``image[i]``); off-diagonal pairs with the same caption
    or still are masked (not negatives), as :func:`vidret_lib.train.false_negative_mask` does."""
    sim = _scores(w_text, w_image, text, image)  # (B, B): cos(caption i, still j)
    sim = sim.masked_fill(false_negative_mask(image_ids, caption_ids), MASK_COS)
    return infonce_loss(sim, logit_scale)  # (CE(L) + CE(L.T)) / 2 with L = logit_scale * sim


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one CPU thread, then restore the thread count.

    The maps' steps are small (B x D x D matmuls): one thread is as fast on an idle 2-core
    machine and ~12x faster on a loaded one (measured: 37 vs 470 ms per step of 256 x 512),
    and the result no longer depends on the thread count.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _train(encoder, cache_dir, config: PretrainConfig) -> tuple[Tensor, Tensor, dict]:
    """Train the two maps (see the module docstring): ``(W_text, W_image, info)``."""
    image, text, caption_index = _encode(encoder, cache_dir, config)
    with _one_thread():
        return _fit(image, text, caption_index, config)


def _fit(image: Tensor, text: Tensor, caption_index: Tensor, config: PretrainConfig) -> tuple[Tensor, Tensor, dict]:
    """The maps trained on still features ``image`` (n, D) and caption features ``text`` (U, D),
    ``caption_index`` (n, k) the rows of ``text`` of each still's captions."""
    n_train = config.n_images - config.heldout
    d = image.shape[1]
    generator = torch.Generator().manual_seed(config.seed)
    w_text = torch.nn.Parameter(torch.eye(d))
    w_image = torch.nn.Parameter(torch.eye(d))
    optimizer = torch.optim.Adam([w_text, w_image], lr=config.lr)
    history = []
    for _ in range(config.epochs):
        order = torch.randperm(n_train, generator=generator)
        pick = torch.randint(config.captions_per_image, (n_train,), generator=generator)  # a caption per still
        losses = []
        for batch in order.split(config.batch_size):
            if len(batch) < 2:  # one pair has no negative
                continue
            caption_ids = caption_index[batch, pick[batch]]  # (B,) rows of `text`
            loss = _batch_loss(w_text, w_image, text[caption_ids], image[batch], batch, caption_ids,
                               config.logit_scale)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        history.append(round(float(np.mean(losses)), 6))
    w_text, w_image = w_text.detach().clone(), w_image.detach().clone()

    held = torch.arange(n_train, config.n_images)
    held_captions = caption_index[held].reshape(-1)  # (heldout * k,) rows of `text`
    caption_image = torch.arange(config.heldout).repeat_interleave(config.captions_per_image)

    def zero_shot(wt: Tensor, wi: Tensor) -> dict:
        r = both_directions(_scores(wt, wi, text[held_captions], image[held]), caption_image)
        return {"t2v_R1": r["t2v"]["R1"], "v2t_R1": r["v2t"]["R1"]}

    eye = torch.eye(d)
    info = {
        "stills": "data_prep.synthetic.static_pairs (stream 'pretrain'), ShapeMotion default settings",
        "stills_config": asdict(STILLS),
        "config": asdict(config),
        "n_train_images": n_train,
        "n_pairs": n_train * config.captions_per_image,
        "n_unique_captions": len(text),
        "loss_history": history,
        "heldout": {
            "n_images": config.heldout,
            "n_captions": len(held_captions),
            "chance_R1": round(100.0 / config.heldout, 4),
            "identity": zero_shot(eye, eye),
            "pretrained": zero_shot(w_text, w_image),
        },
    }
    return w_text, w_image, info
