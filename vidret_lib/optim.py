"""The CLIP4Clip optimizer ("BertAdam"), its parameter grouping and schedule, and torch AdamW.

Re-expressed from ``ArrowLuo/CLIP4Clip`` ``modules/optimization.py`` (``BertAdam``,
``warmup_cosine``) and ``main_task_retrieval.py`` (``prep_optimizer``, ``train_epoch``).
How BertAdam differs from ``torch.optim.AdamW`` (papers.md pitfall 5):

- **no bias correction**: the update is ``m / (sqrt(v) + e)`` with the raw moving averages,
  so early updates are smaller than Adam's (step 1: ``0.1 g / (0.14 |g|) ~ 0.71``, not 1);
- ``e`` is added to ``sqrt(v)`` (as AdamW) but AdamW divides by the bias-corrected ``sqrt(v)``;
- decoupled weight decay folded into the update: ``p -= lr_t * (m/(sqrt(v)+e) + wd * p)``;
- the schedule multiplier is evaluated at ``progress = step / t_total`` with the step count
  **before** the update, so the very first update has ``lr = 0`` under warmup;
- ``warmup_cosine`` is ``x / warmup`` for ``x < warmup``, else ``0.5 * (1 + cos(pi * x))``: the
  cosine runs over the **whole** run (not the post-warmup part), so the multiplier jumps from
  ~1 down to ``0.5 * (1 + cos(pi * warmup))`` (0.976 at warmup 0.1) when warmup ends;
- each parameter tensor's gradient is clipped to norm ``max_grad_norm`` on its own, inside the
  step (``clip_grad_norm_(p, max_grad_norm)`` per tensor).

Also note: CLIP4Clip's training loop calls ``clip_grad_norm_(model.parameters(), 1.0)`` (a
**global** clip) *before* ``optimizer.step()``; after that every tensor's norm is <= 1, so the
per-tensor clip inside BertAdam never fires in the official recipe. The trainer reproduces both
(``TrainConfig.grad_clip_norm`` is the global one).
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import nn
from torch.nn.utils import clip_grad_norm_

__all__ = [
    "SCHEDULES",
    "warmup_cosine",
    "warmup_linear",
    "warmup_constant",
    "BertAdam",
    "bert_adam",
    "param_groups",
    "make_optimizer",
    "OPTIMIZERS",
]

OPTIMIZERS = ("bert_adam", "adamw")
NO_DECAY = ("bias", "LayerNorm.bias", "LayerNorm.weight")  # CLIP4Clip prep_optimizer, substring rule


def warmup_cosine(x: float, warmup: float = 0.002) -> float:
    """CLIP4Clip's schedule multiplier at progress ``x = step / t_total``.

    Example:
        >>> warmup_cosine(0.05, 0.1), warmup_cosine(0.5, 0.1), round(warmup_cosine(0.1, 0.1), 4)
        (0.5, 0.5, 0.9755)
    """
    return x / warmup if x < warmup else 0.5 * (1.0 + math.cos(math.pi * x))


def warmup_linear(x: float, warmup: float = 0.002) -> float:
    """Linear warmup, then linear decay to 0 at ``x = 1`` (CLIP4Clip's ``warmup_linear``).

    Example:
        >>> warmup_linear(0.05, 0.1), warmup_linear(0.55, 0.1), warmup_linear(1.2, 0.1)
        (0.5, 0.5, 0.0)
    """
    return x / warmup if x < warmup else max((x - 1.0) / (warmup - 1.0), 0.0)


def warmup_constant(x: float, warmup: float = 0.002) -> float:
    """Linear warmup, then 1.

    Example:
        >>> warmup_constant(0.05, 0.1), warmup_constant(0.7, 0.1)
        (0.5, 1.0)
    """
    return x / warmup if x < warmup else 1.0


SCHEDULES: dict[str, Callable[[float, float], float]] = {
    "warmup_cosine": warmup_cosine,
    "warmup_linear": warmup_linear,
    "warmup_constant": warmup_constant,
}


class BertAdam(torch.optim.Optimizer):
    """CLIP4Clip's BertAdam (see the module docstring for every difference from AdamW).

    Per parameter ``p`` with gradient ``g`` (state ``m``, ``v`` start at 0, ``k`` at 0)::

        g      <- g * min(1, max_grad_norm / (||g|| + 1e-6))     if max_grad_norm > 0 (per tensor)
        m      <- b1 m + (1 - b1) g ;   v <- b2 v + (1 - b2) g^2
        update  = m / (sqrt(v) + e) + weight_decay * p
        lr_k    = lr * schedule(k / t_total, warmup)             (lr if t_total == -1)
        p      <- p - lr_k * update ;   k <- k + 1

    Group options (``lr``, ``weight_decay``, ...) override the defaults per group, as in
    ``prep_optimizer``. The clip modifies ``p.grad`` in place, as the original does.

    Low-precision parameters (CLIP4Clip's fp16 CLIP weights, ``convert_weights``) are handled
    as ``modules/optimization.py`` does: ``m`` and ``v`` are kept in the parameter's dtype and
    every operation runs in it, ``lr_k * update`` included (rounded to that dtype before it is
    subtracted); there is no float32 master copy. In fp16, a first ``v = (1 - b2) g^2``
    underflows to 0 for ``|g| < 1.22e-3`` (then ``update = m / e``), and an update below half
    an ulp of the weight leaves it unchanged: at lr 1e-7 most fp16 elements never move
    (ArrowLuo/CLIP4Clip#96).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        warmup: float = -1,
        t_total: int = -1,
        schedule: str = "warmup_linear",
        b1: float = 0.9,
        b2: float = 0.999,
        e: float = 1e-6,
        weight_decay: float = 0.01,
        max_grad_norm: float = 1.0,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate {lr}: should be >= 0")
        if schedule not in SCHEDULES:
            raise ValueError(f"Invalid schedule {schedule!r}: choose one of {sorted(SCHEDULES)}")
        if not (0.0 <= warmup < 1.0 or warmup == -1):
            raise ValueError(f"Invalid warmup {warmup}: should be in [0, 1) or -1 (no warmup)")
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"Invalid betas b1={b1}, b2={b2}: should be in [0, 1)")
        if e < 0.0:
            raise ValueError(f"Invalid epsilon {e}: should be >= 0")
        defaults = dict(
            lr=lr, schedule=schedule, warmup=warmup, t_total=t_total, b1=b1, b2=b2, e=e,
            weight_decay=weight_decay, max_grad_norm=max_grad_norm,
        )
        super().__init__(params, defaults)

    @staticmethod
    def scheduled_lr(group: dict, step: int) -> float:
        """The learning rate of ``group`` at update number ``step`` (0-based)."""
        if group["t_total"] == -1:
            return group["lr"]
        return group["lr"] * SCHEDULES[group["schedule"]](step / group["t_total"], group["warmup"])

    def get_lr(self) -> list[float]:
        """Current scheduled learning rate of each group (the next update's rate)."""
        out = []
        for group in self.param_groups:
            steps = [self.state[p]["step"] for p in group["params"] if self.state[p]]
            out.append(self.scheduled_lr(group, steps[0] if steps else 0))
        return out

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("BertAdam does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["next_m"] = torch.zeros_like(p)
                    state["next_v"] = torch.zeros_like(p)
                if group["max_grad_norm"] > 0:
                    clip_grad_norm_(p, group["max_grad_norm"])  # this tensor alone
                grad = p.grad
                m, v = state["next_m"], state["next_v"]
                m.mul_(group["b1"]).add_(grad, alpha=1 - group["b1"])
                v.mul_(group["b2"]).addcmul_(grad, grad, value=1 - group["b2"])
                update = m / (v.sqrt() + group["e"])  # no bias correction
                if group["weight_decay"] > 0.0:
                    update += group["weight_decay"] * p  # decoupled decay, scaled by lr_k below
                # lr_k * update is rounded to p's dtype before the subtraction, as CLIP4Clip's
                # update_with_lr; a fused add_(update, alpha=-lr_k) rounds once and changes other
                # fp16 elements at lr 1e-7
                p.sub_(self.scheduled_lr(group, state["step"]) * update)
                state["step"] += 1
        return loss


def bert_adam(
    params: Iterable,
    lr: float,
    warmup: float = 0.1,
    t_total: int = -1,
    schedule: str = "warmup_cosine",
    b1: float = 0.9,
    b2: float = 0.98,
    e: float = 1e-6,
    weight_decay: float = 0.2,
    max_grad_norm: float = 1.0,
) -> BertAdam:
    """BertAdam with CLIP4Clip's MSR-VTT settings as defaults (``prep_optimizer``).

    ``params`` are tensors or param groups (see :func:`param_groups`); ``t_total`` is the
    number of optimizer steps of the whole run (``steps_per_epoch * epochs``).

    Example:
        >>> w = nn.Parameter(torch.ones(2)); opt = bert_adam([w], lr=0.1, t_total=10)
        >>> w.grad = torch.ones(2); _ = opt.step(); w.tolist()  # step 0: warmup lr is 0
        [1.0, 1.0]
    """
    return BertAdam(
        params, lr=lr, warmup=warmup, t_total=t_total, schedule=schedule, b1=b1, b2=b2, e=e,
        weight_decay=weight_decay, max_grad_norm=max_grad_norm,
    )


def param_groups(
    model: nn.Module, lr: float, coef_lr: float, weight_decay: float, tower_prefix: str = "clip."
) -> list[dict]:
    """CLIP4Clip's four parameter groups (``main_task_retrieval.py`` ``prep_optimizer``).

    A parameter is *no-decay* when its name contains ``bias``, ``LayerNorm.bias`` or
    ``LayerNorm.weight`` (a substring rule, reproduced literally: CLIP's own layer norms are
    named ``ln_*``, so their weights **are** decayed in the original too), and a *tower*
    parameter (learning rate ``lr * coef_lr``) when its name contains ``tower_prefix``
    (``"clip."``: the CLIP weights). Groups: tower+decay, other+decay, tower+no-decay,
    other+no-decay; empty groups are dropped. Frozen parameters (``requires_grad=False``)
    are left out.

    Example:
        >>> m = nn.Module(); m.clip = nn.Linear(2, 2); m.head = nn.Linear(2, 2)
        >>> [(g["lr"], g["weight_decay"], len(g["params"])) for g in param_groups(m, 1e-4, 1e-3, 0.2)]
        [(1e-07, 0.2, 1), (0.0001, 0.2, 1), (1e-07, 0.0, 1), (0.0001, 0.0, 1)]
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = []
    for decay in (True, False):
        for tower in (True, False):
            params = [
                p for n, p in named
                if (not any(nd in n for nd in NO_DECAY)) == decay and (tower_prefix in n) == tower
            ]
            if params:
                groups.append({
                    "params": params,
                    "lr": lr * coef_lr if tower else lr,
                    "weight_decay": weight_decay if decay else 0.0,
                })
    return groups


def make_optimizer(
    name: str,
    groups: list[dict],
    lr: float,
    warmup: float,
    t_total: int,
    weight_decay: float,
    max_grad_norm: float = 1.0,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR | None]:
    """``"bert_adam"`` (CLIP4Clip) or ``"adamw"`` (torch AdamW, same groups, betas, eps and schedule).

    Returns ``(optimizer, scheduler)``; BertAdam schedules itself (scheduler None), AdamW gets a
    ``LambdaLR`` with the same ``warmup_cosine`` multiplier at ``step / t_total``, to be stepped
    after each ``optimizer.step()``. AdamW has bias correction and no per-tensor clip.

    Example:
        >>> w = nn.Parameter(torch.ones(2))
        >>> make_optimizer("sgd", [{"params": [w]}], 1e-3, 0.1, 10, 0.2)
        Traceback (most recent call last):
        ...
        ValueError: unknown optimizer 'sgd'; choose one of ('bert_adam', 'adamw')
    """
    if name == "bert_adam":
        opt = bert_adam(groups, lr=lr, warmup=warmup, t_total=t_total, weight_decay=weight_decay,
                        max_grad_norm=max_grad_norm)
        return opt, None
    if name == "adamw":
        opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: warmup_cosine(k / t_total, warmup))
        return opt, sched
    raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")
