"""CIKM 2021 AnalytiCup (QQ Browser) video-pair similarity: MSE vs RNT vs LBPC on frozen features.

Each video is embedded by an identity-initialised linear adapter on its pooled feature; a
pair's score is the cosine of the two embeddings; the metric is the Spearman correlation of
scores with the human labels (``scipy.stats.spearmanr``). Losses (papers.md §(e)):

- ``"mse"``: ``MSE(cos, label)``;
- ``"pearson"`` (LBPC): :func:`vidret_lib.losses.pearson_loss` over the whole batch at ``temp``;
- ``rnt=True``: the training labels are replaced **once, over the whole label file**, by
  :func:`vidret_lib.losses.rank_normalize` (average ranks min-max scaled to [0, 1]) before
  either loss. Validation Spearman always uses the raw labels (ranks are what it measures).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import scipy.stats
import torch
import torch.nn.functional as F
from torch import nn

from .heads import identity_adapter
from .losses import pearson_loss, rank_normalize
from .optim import make_optimizer, param_groups
from .runinfo import seed_everything

Tensor = torch.Tensor

__all__ = ["PAIR_LOSSES", "Pairs", "PairConfig", "PairModel", "pair_scores", "spearman", "train_pair_similarity"]

PAIR_LOSSES = ("mse", "pearson")


class Pairs(NamedTuple):
    """Labelled video pairs: indices ``a`` (P,), ``b`` (P,) into the video features, ``label`` (P,)."""

    a: Tensor
    b: Tensor
    label: Tensor


def _pairs(pairs, num_videos: int) -> Pairs:
    a, b, label = (torch.as_tensor(np.asarray(x)) for x in pairs)
    if not (a.shape == b.shape == label.shape and a.ndim == 1):
        raise ValueError(f"pairs must be three 1-D arrays of equal length; got {a.shape}, {b.shape}, {label.shape}")
    if len(a) and (min(a.min(), b.min()) < 0 or max(a.max(), b.max()) >= num_videos):
        raise ValueError(f"pair indices must index the {num_videos} videos")
    return Pairs(a.long(), b.long(), label.double())


@dataclass
class PairConfig:
    """Switches of a pair-similarity run (LBPC write-up: batch 2048, temp 0.2, frozen features)."""

    loss: str = "mse"
    rnt: bool = False
    temp: float = 0.2
    batch_size: int = 2048
    epochs: int = 20
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: float = 0.1
    optimizer: str = "adamw"
    select: str = "last"
    seed: int = 42
    device: str = "cpu"

    def validate(self) -> None:
        if self.loss not in PAIR_LOSSES:
            raise ValueError(f"unknown pair loss {self.loss!r}; valid losses: {PAIR_LOSSES}")
        if self.select not in ("val", "last"):
            raise ValueError(f"select must be 'val' or 'last' (never 'test'); got {self.select!r}")
        if self.batch_size < 2 or self.epochs < 1:
            raise ValueError(f"need batch_size >= 2 and epochs >= 1; got {self.batch_size}, {self.epochs}")


class PairModel(nn.Module):
    """Identity-initialised linear adapter on pooled video features (V, D)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.adapter = identity_adapter(dim)

    def forward(self, feats: Tensor) -> Tensor:
        return F.normalize(self.adapter(feats), dim=-1)


def pair_scores(model: PairModel, video_feats: Tensor, pairs) -> Tensor:
    """Cosine score (P,) of each pair."""
    p = _pairs(pairs, len(video_feats))
    emb = model(video_feats)
    return (emb[p.a.to(emb.device)] * emb[p.b.to(emb.device)]).sum(-1)


@torch.no_grad()
def spearman(model: PairModel, video_feats: Tensor, pairs) -> float:
    """Spearman correlation of the model's pair cosines with the raw labels."""
    scores = pair_scores(model, video_feats, pairs).cpu().numpy()
    return float(scipy.stats.spearmanr(scores, np.asarray(pairs[2])).statistic)


def train_pair_similarity(config: PairConfig, video_feats, pairs, val_pairs=None) -> tuple[PairModel, list[dict]]:
    """Train :class:`PairModel` on labelled pairs; return ``(model, history)``.

    ``video_feats`` (V, D) pooled features; ``pairs`` / ``val_pairs`` are ``(a_idx, b_idx, labels)``
    (``val_pairs`` may index the same features). ``history``: per epoch ``loss`` and
    ``val_spearman`` (None without val pairs). ``select="val"`` returns the best-Spearman epoch's
    weights (ties to the later epoch), ``"last"`` the last.
    """
    config.validate()
    if config.select == "val" and val_pairs is None:
        raise ValueError("select='val' needs val_pairs, or set select='last'")
    device = torch.device(config.device)
    feats = torch.as_tensor(np.asarray(video_feats) if not isinstance(video_feats, Tensor) else video_feats)
    feats = feats.float().to(device)
    train_pairs = _pairs(pairs, len(feats))
    labels = rank_normalize(train_pairs.label) if config.rnt else train_pairs.label  # RNT: once, whole file
    labels = labels.float().to(device)
    seed_everything(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model = PairModel(feats.shape[1]).to(device)
    size = min(config.batch_size, len(labels))
    steps = len(labels) // size
    optimizer, scheduler = make_optimizer(
        config.optimizer, param_groups(model, config.lr, 1.0, config.weight_decay),
        config.lr, config.warmup, steps * config.epochs, config.weight_decay,
    )
    history, best = [], None
    for epoch in range(1, config.epochs + 1):
        model.train()
        order = torch.randperm(len(labels), generator=generator)
        losses = []
        for i in range(steps):
            idx = order[i * size:(i + 1) * size]
            a, b = train_pairs.a[idx].to(device), train_pairs.b[idx].to(device)
            cos = (model(feats[a]) * model(feats[b])).sum(-1)  # (B,) pair cosines
            y = labels[idx.to(device)]
            loss = F.mse_loss(cos, y) if config.loss == "mse" else pearson_loss(cos, y, config.temp)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            losses.append(loss.item())
        model.eval()
        val = spearman(model, feats, val_pairs) if val_pairs is not None else None
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), "val_spearman": val})
        if config.select == "val" and (best is None or val >= best[0]):
            best = (val, {k: v.clone() for k, v in model.state_dict().items()})
    if best is not None:
        model.load_state_dict(best[1])
    return model.eval(), history
