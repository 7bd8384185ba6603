"""The training losses of the five replicated papers, as pure functions of tensors.

Score-matrix convention (every function here): ``sim`` is (N_text, N_video), rows are
text queries, columns are videos, and matched pairs lie on the diagonal,
``sim[i, j] = s(text_i, video_j)``. Each function follows the input's device and dtype,
uses ``log_softmax``/``logsumexp``-stable arithmetic (finite for N = 1, all-equal
scores, logits of 1e4), and raises ``ValueError`` naming the shape when a square
matrix is needed and not given.

Sources (formulas and facts, not code): CLIP4Clip ``ArrowLuo/CLIP4Clip``
(``modules/until_module.py`` ``CrossEn``), VSE++ ``fartashf/vsepp`` (``model.py``
``ContrastiveLoss``), CAMoE ``starmemda/CAMoE`` (``DSL.py``) and the inverted softmax of
``jpthu17/EMCL`` (``video_retrieval/EMCL-Net/main_retrieval.py``), MBVR (Wang et al.,
SIGIR 2022, no public code) and the CIKM 2021 AnalytiCup LBPC/RNT write-ups. See
``../shared/spec/papers.md`` for the pitfalls of each.
"""
from __future__ import annotations

from typing import Union

import numpy as np
import torch

Tensor = torch.Tensor
ArrayOrTensor = Union[np.ndarray, Tensor]

__all__ = [
    "safe_normalize",
    "infonce_loss",
    "vsepp_loss",
    "dual_softmax_loss",
    "dual_softmax_rerank",
    "modality_shuffle_loss",
    "pearson_loss",
    "rank_normalize",
]


def _check_square(sim: Tensor, name: str = "sim") -> int:
    """Return N for a non-empty square (N, N) score matrix, else raise ValueError."""
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1] or sim.shape[0] == 0:
        raise ValueError(
            f"{name} must be a non-empty square (N, N) score matrix with matched pairs on the "
            f"diagonal; got shape {tuple(sim.shape)}. Pass one row per text and one column "
            "per video of the same batch."
        )
    return sim.shape[0]


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}; got {value!r}")


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0; got {value!r}")


def safe_normalize(x: Tensor, dim: int = -1, eps: float = 1e-12) -> Tensor:
    """L2-normalise ``x`` along ``dim``; a (near-)zero vector gives zero **with zero gradient**.

    Bit for bit ``F.normalize(x, dim=dim, eps=eps)`` (the same ``x.norm`` and division)
    wherever ``||x|| > eps``. Where ``||x|| <= eps`` (a failed-decode video, a fully masked
    pooling, a missing title, an empty input) ``F.normalize`` returns ``x / eps`` and its
    backward multiplies the incoming gradient by ``1 / eps = 1e12``: chained through a few
    normalisations this overflows to inf and then NaN, or, clipped, swamps every other
    gradient. Here such vectors give exactly 0 and pass no gradient, in every dtype (in
    float16, ``F.normalize`` of a zero vector is NaN because ``eps`` underflows to 0).
    Any shape; same dtype and device as ``x``.

    Example:
        >>> x = torch.tensor([[3.0, 4.0], [0.0, 0.0]], requires_grad=True)
        >>> y = safe_normalize(x); y.sum().backward()
        >>> y.tolist(), x.grad[1].tolist()
        ([[0.6000000238418579, 0.800000011920929], [0.0, 0.0]], [0.0, 0.0])
    """
    norm = x.norm(2, dim, keepdim=True)  # as F.normalize: (..., 1, ...) L2 norm along dim
    keep = norm > eps  # False on (near-)zero vectors
    denom = torch.where(keep, norm, torch.ones_like(norm))  # 1 where dropped: no 1/eps gain, no 0/0
    return x / denom * keep  # * 1 (exact) on kept rows, * 0 (value and gradient) on dropped ones


def infonce_loss(sim: Tensor, logit_scale: Union[float, Tensor] = 100.0) -> Tensor:
    """Symmetric InfoNCE of CLIP4Clip: ``(CE_rows(L) + CE_rows(L.T)) / 2``, ``L = scale * sim``.

    ``sim`` is a square (N, N) matrix of cosine similarities; ``logit_scale`` is
    ``exp(clip.logit_scale)`` (100 for CLIP; a float or a tensor, e.g. a learned one).
    Each cross-entropy is the mean over the batch of ``-log_softmax(L)[i, i]``, exactly
    CLIP4Clip's ``CrossEn`` applied to ``t2v`` and ``v2t`` logits and averaged.

    Example:
        >>> infonce_loss(torch.zeros(4, 4)).item()  # all scores equal: log(4)
        1.386294
    """
    _check_square(sim)
    logits = logit_scale * sim  # (N, N): L_ij = scale * cos(t_i, v_j)
    loss_t2v = -torch.log_softmax(logits, dim=1).diagonal().mean()  # text i -> its video i
    loss_v2t = -torch.log_softmax(logits, dim=0).diagonal().mean()  # video j -> its text j
    return (loss_t2v + loss_v2t) / 2


def vsepp_loss(
    sim: Tensor, margin: float = 0.2, max_violation: bool = True, reduction: str = "sum"
) -> Tensor:
    """VSE++ hinge loss (``fartashf/vsepp`` ``model.py`` ``ContrastiveLoss``).

    With ``d_i = sim[i, i]`` and rows = texts, the two hinge terms are

    - text anchor ``i``, negative video ``j``: ``[m + sim[i, j] - d_i]_+``
      (the official ``cost_im``: caption anchor, negative image);
    - video anchor ``j``, negative text ``i``: ``[m + sim[i, j] - d_j]_+``
      (the official ``cost_s``: image anchor, negative caption);

    diagonals zeroed. MH (VSE++, ``max_violation=True``) keeps the hardest negative of
    each anchor, SH (VSE0) sums all hinges. The official code builds ``scores = im @ s.T``
    with rows = images, i.e. ``scores = sim.T``; transposing swaps the two hinge terms and
    leaves their total unchanged, so ``vsepp_loss(sim)`` equals the official loss on
    ``im, s`` exactly. ``reduction="sum"`` is the official one (scale grows with N);
    ``"mean"`` divides that total by N. N = 1 gives 0. ``sim`` is cosine similarity.

    Example:
        >>> vsepp_loss(torch.zeros(3, 3)).item()  # every hardest hinge is m: 3m + 3m
        1.2
        >>> vsepp_loss(torch.zeros(3, 3), max_violation=False).item()  # 12 hinges of m
        2.4
    """
    n = _check_square(sim)
    _check_choice("reduction", reduction, ("sum", "mean"))
    diag = sim.diagonal()  # (N,): d_i = s(t_i, v_i)
    eye = torch.eye(n, dtype=torch.bool, device=sim.device)
    # (N, N) hinge [m + S_ij - d_i]_+ : text anchor i vs negative video j (row-wise)
    cost_t2v = (margin + sim - diag[:, None]).clamp(min=0).masked_fill(eye, 0)
    # (N, N) hinge [m + S_ij - d_j]_+ : video anchor j vs negative text i (column-wise)
    cost_v2t = (margin + sim - diag[None, :]).clamp(min=0).masked_fill(eye, 0)
    if max_violation:  # MH: hardest negative per anchor, (N,) each
        total = cost_t2v.max(dim=1).values.sum() + cost_v2t.max(dim=0).values.sum()
    else:  # SH: sum of all hinges
        total = cost_t2v.sum() + cost_v2t.sum()
    return total / n if reduction == "mean" else total


def dual_softmax_loss(sim: Tensor, temp: float = 1000.0, reduction: str = "mean") -> Tensor:
    """CAMoE's dual softmax loss for one direction, exactly ``starmemda/CAMoE`` ``DSL.py``.

    ``sim`` is a square, already logit-scaled matrix (e.g. ``100 * cos``), rows = queries:

    - prior ``P = softmax(sim / temp, dim=0)`` (over the queries, for each column);
    - revised scores ``S' = sim * P * N``;
    - ``loss_i = -log_softmax(S', dim=1)[i, i]``.

    ``reduction``: ``"mean"`` (default) or ``"none"`` (the per-row vector, as ``DSL.py``
    returns). Training uses both directions:
    ``(dual_softmax_loss(S) + dual_softmax_loss(S.T)) / 2``. At ``temp=1000`` on
    ``100 * cos`` the prior is nearly uniform and the loss is close to InfoNCE; ablate
    the temperature before crediting the loss (papers.md pitfall 3).

    Example:
        >>> dual_softmax_loss(torch.zeros(4, 4)).item()  # uniform prior: log(4)
        1.386294
        >>> dual_softmax_loss(torch.zeros(2, 2), reduction="none").shape
        torch.Size([2])
    """
    n = _check_square(sim)
    _check_positive("temp", temp)
    _check_choice("reduction", reduction, ("mean", "none"))
    prior = torch.softmax(sim / temp, dim=0)  # (N, N): P_ij = softmax over queries i
    revised = sim * prior * n  # (N, N): S'_ij = S_ij * P_ij * N
    loss = -torch.log_softmax(revised, dim=1).diagonal()  # (N,): -log softmax_j(S'_i.)[i]
    return loss.mean() if reduction == "mean" else loss


def dual_softmax_rerank(sim: Tensor, temp: float = 1.0, direction: str = "t2v") -> Tensor:
    """Inference-time "revised similarity" (inverted softmax) of CAMoE / EMCL-Net.

    ``"t2v"`` (rank videos for each text row): ``sim * softmax(sim / temp, dim=0) * N_text``;
    ``"v2t"`` (rank texts for each video column): ``sim * softmax(sim / temp, dim=1) * N_video``.
    The default ``temp=1`` is meant for ``100 * cos`` (the CAMoE author's advice,
    CAMoE#4); EMCL-Net uses ``temp=0.01`` on raw cosines, the same prior, and a result
    100 times smaller, so the same ranking. The final constant is the length of the
    softmax axis; EMCL-Net multiplies by the number of rows in both directions, which is
    the same for a square matrix, and any positive constant leaves the ranking unchanged.
    A rectangular (N_text, N_video) matrix is accepted.

    **Transductive**: the prior of each score uses every other query of the test matrix at
    once and assumes one-to-one pairs (CAMoE#6, #7, #9); report it as a protocol switch.
    Returns a matrix of the same shape to rank with (for t2v read rows, for v2t columns).

    Example:
        >>> sim = torch.tensor([[0.9, 0.1], [0.8, 0.7]])  # text 1 prefers the wrong video
        >>> sim.argmax(dim=1).tolist(), dual_softmax_rerank(sim, temp=0.1).argmax(dim=1).tolist()
        ([0, 0], [0, 1])
    """
    if sim.ndim != 2:
        raise ValueError(f"sim must be a 2-D (N_text, N_video) matrix; got shape {tuple(sim.shape)}")
    _check_positive("temp", temp)
    _check_choice("direction", direction, ("t2v", "v2t"))
    axis = 0 if direction == "t2v" else 1  # t2v: prior over texts (dim 0); v2t: over videos
    prior = torch.softmax(sim / temp, dim=axis)  # (N_text, N_video)
    return sim * prior * sim.shape[axis]


def modality_shuffle_loss(
    query: Tensor,
    fused_pos: Tensor,
    fused_shuffled: Tensor,
    temp: float = 0.05,
    margin: Union[float, Tensor] = 0.0,
) -> Tensor:
    """MBVR's modality-shuffled loss ``L_ms`` (Wang et al., SIGIR 2022), mean over the batch.

    ``query`` (B, D) are query embeddings, ``fused_pos`` (B, D) the fused embeddings of
    each query's own video (its text + its vision), ``fused_shuffled`` (B, D) or (B, M, D)
    fused embeddings of the same text with shuffled vision (the MS negatives). Scores are
    cosines ``s(q, m)``; with ``delta_b`` the margin of row b::

        L_ms = -1/B sum_b log( e^{s(q_b, m_b)/tau}
                               / (e^{s(q_b, m_b)/tau} + sum_k e^{(s(q_b, m^_bk) + delta_b)/tau}) )

    The margin is added to the shuffled **cosine** before dividing by ``tau`` (so it is in
    cosine units, independent of the temperature); a positive margin makes the loss ask
    for a larger gap between the positive and its MS negatives. MBVR's dynamic margin
    (from visual relevance) is not public: pass it explicitly as a scalar or a (B,) tensor.

    Example:
        >>> q = torch.eye(2)  # the positive matches exactly, the MS negative is orthogonal
        >>> modality_shuffle_loss(q, q, q.flip(0), temp=1.0).item()  # log(1 + e^-1)
        0.313262
    """
    if query.ndim != 2 or fused_pos.shape != query.shape:
        raise ValueError(
            f"query and fused_pos must both be (B, D); got {tuple(query.shape)} and "
            f"{tuple(fused_pos.shape)}"
        )
    if fused_shuffled.ndim == 2:
        fused_shuffled = fused_shuffled[:, None, :]  # (B, D) -> (B, 1, D)
    b, d = query.shape
    if fused_shuffled.ndim != 3 or fused_shuffled.shape[0] != b or fused_shuffled.shape[2] != d:
        raise ValueError(
            f"fused_shuffled must be (B, D) or (B, M, D) with B={b}, D={d}; "
            f"got {tuple(fused_shuffled.shape)}"
        )
    _check_positive("temp", temp)
    margin = torch.as_tensor(margin, dtype=query.dtype, device=query.device)
    if margin.ndim == 1 and margin.shape[0] == b:
        margin = margin[:, None]  # (B,) -> (B, 1), one margin per query row
    elif margin.ndim != 0:
        raise ValueError(f"margin must be a scalar or a ({b},) tensor; got shape {tuple(margin.shape)}")
    q = safe_normalize(query)  # (B, D); a zero row gives cosines 0 and no gradient
    pos = safe_normalize(fused_pos)  # (B, D)
    neg = safe_normalize(fused_shuffled)  # (B, M, D)
    s_pos = (q * pos).sum(dim=-1)  # (B,): s(q_b, m_b)
    s_neg = torch.einsum("bd,bmd->bm", q, neg)  # (B, M): s(q_b, m^_bk)
    logits = torch.cat([s_pos[:, None], s_neg + margin], dim=1) / temp  # (B, 1 + M)
    return -torch.log_softmax(logits, dim=1)[:, 0].mean()  # positive sits in column 0


def pearson_loss(pred_sim: Tensor, target: ArrayOrTensor, temp: float = 0.2) -> Tensor:
    """LBPC, the large-batch Pearson correlation loss (CIKM 2021 AnalytiCup write-up).

    ``pred_sim`` (B,) are predicted pair cosines, ``target`` (B,) the graded labels:

    - ``p = softmax(pred_sim / temp)`` over the **whole batch** (so the loss depends on the
      batch and on ``temp``; write-up 0.2, its code default 0.5);
    - ``p~ = p - mean(p)``, ``y~ = y - mean(y)``;
    - ``corr = sum(p~ y~) / (||p~|| ||y~|| + 1e-5)``, ``loss = -corr``.

    Norms use ``torch.linalg.vector_norm``, whose gradient at a zero vector is 0, so
    all-equal predictions give a finite gradient (``sqrt(sum(x**2))`` would give NaN).
    Half-precision input (float16, bfloat16) is computed in float32 and the loss cast back:
    the backward of ``/ (... + 1e-5)`` squares the denominator, and ``1e-10`` underflows to 0
    in float16 (a NaN gradient for all-equal predictions).

    Example:
        >>> pearson_loss(torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0.0, 1.0, 2.0])).item()
        -0.915404
    """
    target = torch.as_tensor(target, dtype=pred_sim.dtype, device=pred_sim.device)
    if pred_sim.ndim != 1 or target.shape != pred_sim.shape:
        raise ValueError(
            f"pred_sim and target must be 1-D of the same length; got {tuple(pred_sim.shape)} "
            f"and {tuple(target.shape)}"
        )
    _check_positive("temp", temp)
    work = torch.promote_types(pred_sim.dtype, torch.float32)  # float16/bfloat16 -> float32
    p = torch.softmax(pred_sim.to(work) / temp, dim=0)  # (B,): softmax over the whole batch
    p_c = p - p.mean()  # (B,) centred prediction
    y = target.to(work)
    y_c = y - y.mean()  # (B,) centred label
    denom = torch.linalg.vector_norm(p_c) * torch.linalg.vector_norm(y_c) + 1e-5
    return (-(p_c * y_c).sum() / denom).to(pred_sim.dtype)


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of a 1-D array, ties sharing the mean of their ranks."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    starts_group = np.r_[True, sorted_values[1:] != sorted_values[:-1]]  # first of each tie group
    group = np.cumsum(starts_group) - 1  # group index of each sorted position
    first = np.flatnonzero(starts_group)  # 0-based start of each group
    last = np.r_[first[1:], values.size]  # 0-based end (exclusive) of each group
    group_rank = (first + 1 + last) / 2.0  # mean of 1-based ranks first+1 .. last
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = group_rank[group]
    return ranks


def rank_normalize(values: ArrayOrTensor) -> ArrayOrTensor:
    """RNT label transform: average ranks (ties equal), min-max scaled to [0, 1].

    The same ranks as ``scipy.stats.rankdata(values, "average")`` over all entries, then
    ``(r - min r) / (max r - min r)``; constant input gives zeros, not NaN. Apply it once
    to the whole label file (it is a global transform), not per batch. A NumPy array
    gives a float64 array; a tensor gives a tensor on the same device (same dtype when
    floating, else float64). The shape is kept. NaN input raises ValueError.

    Example:
        >>> rank_normalize(np.array([3.0, 1.0, 3.0, 2.0]))
        array([1. , 0. , 1. , 0.4])
        >>> rank_normalize(torch.tensor([5.0, 5.0]))
        tensor([0., 0.])
    """
    is_tensor = isinstance(values, Tensor)
    flat = (values.detach().cpu().numpy() if is_tensor else np.asarray(values)).reshape(-1)
    if np.isnan(flat).any():
        raise ValueError("rank_normalize got NaN values; drop or fill them first")
    ranks = _average_ranks(flat)
    span = ranks.max() - ranks.min() if ranks.size else 0.0
    scaled = (ranks - ranks.min()) / span if span > 0 else np.zeros_like(ranks)
    scaled = scaled.reshape(np.shape(values))
    if not is_tensor:
        return scaled
    dtype = values.dtype if values.is_floating_point() else torch.float64
    return torch.as_tensor(scaled, dtype=dtype, device=values.device)
