"""Querybank normalisation (QB-Norm): the non-transductive re-ranking of a score matrix.

QB-Norm (Bogolin et al., CVPR 2022; ``ioanacroi/qb-norm`` ``dynamic_inverted_softmax.py``)
divides a query's exponentiated scores by a per-gallery-item normaliser computed from a
**querybank of training queries**, so no test query influences another one -- unlike the
dual-softmax "revised similarity" of CAMoE / EMCL-Net
(:func:`vidret_lib.losses.dual_softmax_rerank`), whose prior uses the whole test matrix
(transductive, papers.md §(b)). Its "dynamic inverted softmax" only renormalises the
queries whose top-1 item is a *hub*: an item that some querybank query ranks in its top k.
"""
from __future__ import annotations

import torch

Tensor = torch.Tensor

__all__ = ["qb_norm_rerank"]


def qb_norm_rerank(sim: Tensor, train_query_sim: Tensor, beta: float = 20.0, k: int = 1) -> Tensor:
    """QB-Norm with the dynamic inverted softmax, re-expressed from ``ioanacroi/qb-norm``.

    ``sim`` (Q, G): test queries x gallery (e.g. test captions x test videos for t2v);
    ``train_query_sim`` (B, G): querybank (e.g. training captions) x the same gallery.

    - hubs = every gallery item in the top ``k`` of some querybank row;
    - ``norm_g = sum_b exp(beta * train_query_sim[b, g])``  (G,);
    - a query whose top-1 item (argmax of its row) is a hub gets the row
      ``exp(beta * sim[q, g]) / norm_g``; other rows keep their raw scores.

    Rows are ranked independently (read the result row-wise). Computed as
    ``exp(beta*sim - logsumexp(beta*bank, 0))``, the same value without overflow.
    Defaults are the repository's (``beta`` 20, ``k`` 1). For v2t pass ``sim.T`` with a
    bank of training videos x test captions.

    Example:
        >>> sim = torch.tensor([[0.9, 0.8], [0.2, 0.1]])      # video 0 is a hub
        >>> bank = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3]])
        >>> qb_norm_rerank(sim, bank, beta=10.0).argmax(dim=1).tolist()
        [1, 1]
    """
    if sim.ndim != 2 or train_query_sim.ndim != 2 or sim.shape[1] != train_query_sim.shape[1]:
        raise ValueError(
            f"sim (Q, G) and train_query_sim (B, G) must share the gallery axis; got "
            f"{tuple(sim.shape)} and {tuple(train_query_sim.shape)}"
        )
    if not 1 <= k <= sim.shape[1]:
        raise ValueError(f"k must be in [1, {sim.shape[1]}] (gallery size); got {k}")
    hubs = torch.zeros(sim.shape[1], dtype=torch.bool, device=sim.device)
    hubs[train_query_sim.topk(k, dim=1).indices.reshape(-1)] = True  # (G,) retrieved by the bank
    active = hubs[sim.argmax(dim=1)]  # (Q,) queries whose top-1 item is a hub
    log_norm = torch.logsumexp(beta * train_query_sim, dim=0)  # (G,) log sum_b exp(beta * bank)
    out = sim.clone()
    out[active] = torch.exp(beta * sim[active] - log_norm)
    return out
