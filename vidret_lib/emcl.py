"""EMCL: Expectation-Maximization Contrastive Learning (Jin et al., NeurIPS 2022).

The same arithmetic as the ``Emcl`` class of ``jpthu17/EMCL``
(``video_retrieval/EMCL-Net/tvr/models/until_module.py``), re-expressed as an
``nn.Module`` whose persistent bases are a registered buffer (saved in checkpoints,
moved by ``.to()``). EMCL-Net applies it to the rows it is about to compare, un-normalised,
before L2-normalising each row for the cosine (``get_logits`` in
``video_retrieval/EMCL-Net/tvr/models/modeling.py``): one text-conditioned pooled video per
(text, video) pair, then the texts -- ``B * B + B`` rows (16,512 for the all-gathered
training batch of 128) and ``32 * 32 + 32 = 1,056`` rows per 32 x 32 evaluation block, so a
pair's score depends on the other members of its block (papers.md pitfall 4). Its
inference-module variant (CLIP2Video) stacks ``[videos; texts]`` instead. The training loss
stays plain symmetric InfoNCE. Which rows vidret stacks is
:class:`vidret_lib.heads.RetrievalModel`'s ``emcl_rows``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

Tensor = torch.Tensor

__all__ = ["EMCL"]


class EMCL(nn.Module):
    """EM subspace reconstruction ``Y = X + beta * X_hat`` of a feature batch ``X`` (N, D).

    Each of the D feature channels is treated as a point in R^N and softly clustered onto
    K unit bases ``mu`` (N, K) by ``stage_num`` EM iterations, all under ``no_grad``:

    - E-step: ``Z = softmax_K(X^T mu / lamd)`` (D, K), then ``Z <- Z / (1e-6 + sum_D Z)``;
    - M-step: ``mu = X Z`` (N, K), then each column ``mu_k <- mu_k / (1e-6 + ||mu_k||)``.

    The reconstruction ``X_hat = mu Z^T`` (N, D) carries no gradient, so ``dY/dX`` is the
    identity. "Initial value maintenance": the buffer ``mu`` (1, K) starts as
    ``N(0, 2/K)`` divided by ``1e-6 +`` its norm along the length-1 axis (entries
    ~ +-1), is broadcast to (N, K) at each call, and in train mode is updated as
    ``mu <- momentum * mu + (1 - momentum) * mean_N(mu_final)`` (no re-normalisation, as
    the official code); in eval mode it is left alone. The buffer keeps its own dtype
    and device; the computation follows the input's.

    Defaults are EMCL-Net's (K=32, 9 stages, momentum 0.9, lamd 1, beta 3); the
    inference-module variant uses K=7, stage_num=10, lamd=0.1, beta=4 in eval mode.
    For the "rank of the learned bases" analysis call :meth:`em` on a batch.

    **Repeated rows.** ``weights`` (N,) (optional, default all 1) gives each row of ``x`` a
    multiplicity: EM on ``x`` with ``weights[r] = m`` equals EM on the stack in which row
    ``r`` occurs ``m`` times (the copies get equal bases rows and equal outputs, so each
    copy's output is that row's output). With the bases ``mu`` (N, K) of the distinct rows
    and ``w = weights[:, None]``, the E-step's ``X^T mu`` becomes ``x^T (w * mu)``, the
    M-step's column norm ``sqrt(sum_N w * mu^2)``, and the momentum update's ``mean_N``
    the ``w``-weighted mean; with all weights 1 it is EMCL-Net's arithmetic.
    This is how :class:`vidret_lib.heads.RetrievalModel` feeds EMCL-Net's per-pair video rows
    (``N_text`` equal copies of each video row under a text-independent pooling) at the cost
    of ``[videos; texts]``.

    Example:
        >>> emcl = EMCL(k=4)
        >>> emcl(torch.randn(6, 8)).shape, tuple(emcl.mu.shape)
        (torch.Size([6, 8]), (1, 4))
    """

    mu: Tensor

    def __init__(
        self, k: int = 32, stage_num: int = 9, momentum: float = 0.9, lamd: float = 1.0, beta: float = 3.0
    ) -> None:
        super().__init__()
        if k < 1 or stage_num < 1:
            raise ValueError(f"EMCL needs k >= 1 and stage_num >= 1; got k={k}, stage_num={stage_num}")
        if not 0.0 <= momentum <= 1.0 or not lamd > 0:
            raise ValueError(f"EMCL needs 0 <= momentum <= 1 and lamd > 0; got {momentum}, {lamd}")
        self.k, self.stage_num, self.momentum, self.lamd, self.beta = k, stage_num, momentum, lamd, beta
        mu = torch.empty(1, k).normal_(0.0, math.sqrt(2.0 / k))  # (1, K) ~ N(0, 2/K)
        self.register_buffer("mu", mu / (1e-6 + mu.norm(dim=0, keepdim=True)))  # norm over the 1-axis

    def extra_repr(self) -> str:
        return (
            f"k={self.k}, stage_num={self.stage_num}, momentum={self.momentum}, "
            f"lamd={self.lamd}, beta={self.beta}"
        )

    @staticmethod
    def _weights(x: Tensor, weights: Tensor | None) -> Tensor:
        """Row multiplicities as a column (..., N, 1) in ``x``'s dtype/device; checks the shapes."""
        if x.ndim not in (2, 3):
            raise ValueError(f"EMCL expects features of shape (N, D) or a batch (B, N, D); got {tuple(x.shape)}")
        rows = tuple(x.shape[:-1])
        if weights is None:
            return x.new_ones(*rows, 1)
        if tuple(weights.shape) != rows or not bool((weights > 0).all()):
            raise ValueError(
                f"EMCL weights must be one positive multiplicity per row of x, shape {rows}; "
                f"got shape {tuple(weights.shape)}" + ("" if tuple(weights.shape) != rows else " with a value <= 0")
            )
        return weights.to(x)[..., None]

    @torch.no_grad()
    def em(self, x: Tensor, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Run the EM iterations on ``x`` (N, D) from the current ``mu``; change no state.

        ``weights`` (N,), optional: each row's multiplicity (see the class docstring).
        Returns ``(bases, resp)``: the final bases ``mu`` (N, K), unit columns (in the
        ``weights``-weighted norm), and the final normalised responsibilities ``Z`` (D, K);
        ``bases @ resp.T`` is ``X_hat``. ``torch.linalg.svdvals(bases)`` shows how many
        independent bases were learned.

        **A batch of independent inputs**: ``x`` (B, N, D) with ``weights`` (B, N) runs B
        separate EMs at once (batched matmuls; each ``x[b]`` from the same ``mu``, as B calls
        would, to float rounding) and returns ``bases`` (B, N, K) and ``resp`` (B, D, K).
        Raises ``ValueError`` for an ``x`` that is not 2-D or 3-D, or bad weights.

        Example:
            >>> bases, resp = EMCL(k=3).em(torch.randn(5, 7))
            >>> tuple(bases.shape), tuple(resp.shape)
            ((5, 3), (7, 3))
            >>> tuple(EMCL(k=3).em(torch.randn(4, 5, 7))[1].shape)
            (4, 7, 3)
        """
        w = self._weights(x, weights)  # (..., N, 1) multiplicities, 1 = EMCL-Net's plain stack
        root_w = w.sqrt()  # (..., N, 1): the weighted column norm is the plain norm of root_w * bases
        bases = self.mu.to(device=x.device, dtype=x.dtype).expand(*x.shape[:-1], -1)  # (..., N, K)
        x_t = x.mT.contiguous()  # (..., D, N), copied once: a GEMM on a contiguous operand is faster
        # the in-place steps below compute the same values as out-of-place ones, without new buffers
        for _ in range(self.stage_num):
            resp = torch.softmax((x_t @ (w * bases)).div_(self.lamd), dim=-1)  # E-step (..., D, K): softmax over K
            resp.div_(resp.sum(dim=-2, keepdim=True).add_(1e-6))  # (..., D, K): / (1e-6 + sum over D)
            bases = x @ resp  # M-step (..., N, K): mu = X Z
            bases.div_((root_w * bases).norm(dim=-2, keepdim=True).add_(1e-6))  # (..., N, K): unit columns
        return bases, resp

    def forward(self, x: Tensor, weights: Tensor | None = None) -> Tensor:
        """``Y = X + beta * X_hat`` for ``x`` (N, D), rows weighted by ``weights`` (N,) if given.

        Train mode also updates ``mu`` (one momentum step per call). In eval mode ``x`` may be a
        batch (B, N, D) of independent inputs with ``weights`` (B, N) (see :meth:`em`); -> (B, N, D).
        Raises ``ValueError`` for a batch in train mode (one momentum step needs one input).
        """
        if self.training and x.ndim == 3:
            raise ValueError(
                f"EMCL got a batch {tuple(x.shape)} in train mode, where each call moves the bases once: "
                "call it once per (N, D) input, or call .eval() to evaluate a batch of independent inputs"
            )
        bases, resp = self.em(x, weights)  # (..., N, K), (..., D, K), both without gradient
        x_hat = bases @ resp.mT  # (..., N, D) reconstruction from the K bases
        if self.training:  # initial value maintenance: momentum update of the (1, K) buffer
            w = self._weights(x, weights)
            new = ((w * bases).sum(dim=0, keepdim=True) / w.sum()).to(self.mu)  # (1, K) mean over the N rows
            self.mu.mul_(self.momentum).add_(new, alpha=1.0 - self.momentum)
        return x + self.beta * x_hat
