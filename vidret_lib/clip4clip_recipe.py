"""CLIP4Clip's end-to-end recipe pieces, for an open_clip ``CLIP`` (ViT) tower.

Each function re-expresses one piece of ``ArrowLuo/CLIP4Clip`` (commit 508ffa3) so that the
trainer (:mod:`vidret_lib.train`) can call it:

- :func:`apply_clip4clip_freeze` -- ``--freeze_layer_num`` (``main_task_retrieval.py``, "freeze
  testing" block in ``main``);
- :func:`prepare_precision` and :func:`precision_context` -- the precision of the CLIP weights:
  CLIP4Clip stores them in fp16 (``modules/modeling.py`` ``CLIP4Clip.__init__`` calls
  ``convert_weights(self.clip)`` from ``modules/module_clip.py``); ``"fp32"`` and ``"amp_bf16"``
  are the alternatives users compare it with (ArrowLuo/CLIP4Clip#96: 43% R@1 with fp16 weights,
  about 40% with fp32 or AMP);
- :func:`plan_steps` -- steps per epoch and ``t_total`` of the schedule (``main`` computes
  ``num_train_optimization_steps`` from ``len(train_dataloader)``;
  ``dataloaders/data_dataloaders.py`` ``dataloader_msrvtt_train`` builds that loader);
- :func:`clip4clip_step` -- what ``train_epoch`` does with one batch's loss.

The recipe's names, as CLIP4Clip's README command passes them: ``--freeze_layer_num 0``,
``--expand_msrvtt_sentences``, ``--batch_size 128`` over 4 GPUs, 5 epochs, ``--lr 1e-4``,
``--coef_lr 1e-3`` (the optimizer side is :mod:`vidret_lib.optim`).
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, ContextManager, Iterable, NamedTuple

import torch
from torch import nn

from . import distributed as dist_utils

__all__ = [
    "PRECISIONS",
    "LOGIT_SCALE_MAX",
    "apply_clip4clip_freeze",
    "prepare_precision",
    "precision_context",
    "StepPlan",
    "plan_steps",
    "clip4clip_step",
]

PRECISIONS = ("fp32", "fp16_weights", "amp_bf16")
LOGIT_SCALE_MAX = math.log(100)  # main_task_retrieval.py train_epoch: clamp at np.log(100) (openai/CLIP#46)

# Parameters that always train, whatever freeze_layer_num (name prefixes, as CLIP4Clip's
# ``name.find(prefix) == 0``); open_clip's CLIP names them exactly as OpenAI's CLIP does.
_ALWAYS_TRAIN = ("ln_final.", "text_projection", "logit_scale", "visual.ln_post.", "visual.proj")
_LAYERED = ("visual.transformer.resblocks.", "transformer.resblocks.")


def _check_clip_vit(clip: nn.Module, what: str) -> None:
    """Raise ``TypeError`` unless ``clip`` is an open_clip ``CLIP`` with a ViT image tower."""
    from open_clip.model import CLIP
    from open_clip.transformer import VisionTransformer

    if not isinstance(clip, CLIP) or not isinstance(clip.visual, VisionTransformer):
        raise TypeError(
            f"{what} follows CLIP4Clip, written for OpenAI's CLIP ViT (open_clip CLIP with a VisionTransformer, "
            f"e.g. ViT-B-32-quickgelu); got {type(clip).__name__} with visual {type(getattr(clip, 'visual', None)).__name__}. "
            "Pass encoder.model of an open_clip ViT encoder (the 'default' offline encoder is not one)"
        )


def apply_clip4clip_freeze(clip: nn.Module, freeze_layer_num: int = 0) -> list[str]:
    """Freeze CLIP parameters as CLIP4Clip's ``--freeze_layer_num``; return the frozen names.

    Source: ``ArrowLuo/CLIP4Clip`` ``main_task_retrieval.py`` ``main`` ("freeze testing"). With
    ``freeze_layer_num > -1``, a parameter of ``model.clip`` keeps training when its name starts
    with ``ln_final.``, ``text_projection``, ``logit_scale``, ``visual.ln_post.`` or
    ``visual.proj``, or when it is in block ``N >= freeze_layer_num`` of
    ``visual.transformer.resblocks.N`` / ``transformer.resblocks.N``; every other parameter gets
    ``requires_grad = False``. So ``0`` (the README's value) still freezes the parameters that
    carry no layer number: ``visual.conv1``, ``visual.class_embedding``,
    ``visual.positional_embedding``, ``visual.ln_pre``, ``token_embedding`` and the text
    ``positional_embedding``. ``-1`` freezes nothing. open_clip's ``CLIP`` uses OpenAI's
    parameter names, so the rule applies to them unchanged. CLIP4Clip's ``linear_patch="3d"``
    branch (which, through a ``find`` test, keeps nearly everything trainable) is not
    reproduced: the recipe uses ``"2d"``. Parameters are only ever frozen, never unfrozen.

    Args:
        clip: an open_clip ``CLIP`` with a ViT image tower (``encoder.model``; in end-to-end
            training ``model.clip``).
        freeze_layer_num: -1 (freeze nothing) up to the number of transformer blocks
            (CLIP4Clip asserts ``-1 <= n <= 12`` for ViT-B/32).

    Returns:
        The frozen parameter names, in ``named_parameters`` order.

    Raises:
        TypeError: ``clip`` is not an open_clip ``CLIP`` with a ``VisionTransformer``.
        ValueError: ``freeze_layer_num`` outside ``[-1, number of blocks]``.
    """
    _check_clip_vit(clip, "apply_clip4clip_freeze")
    blocks = max(len(clip.visual.transformer.resblocks), len(clip.transformer.resblocks))
    if not -1 <= freeze_layer_num <= blocks:
        raise ValueError(f"freeze_layer_num={freeze_layer_num} is outside [-1, {blocks}] (this model has {blocks} blocks)")
    if freeze_layer_num == -1:
        return []
    frozen = []
    for name, param in clip.named_parameters():
        if name.startswith(_ALWAYS_TRAIN):
            continue  # top layers always train
        layered = [p for p in _LAYERED if name.startswith(p)]
        if layered and int(name[len(layered[0]):].split(".")[0]) >= freeze_layer_num:
            continue  # block N >= freeze_layer_num trains
        param.requires_grad_(False)
        frozen.append(name)
    return frozen


def _cast_to_conv1_dtype(visual: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: images in the patch embedding's dtype (OpenAI/CLIP4Clip ``image.type(self.dtype)``)."""
    return (args[0].to(visual.conv1.weight.dtype), *args[1:])


def prepare_precision(clip: nn.Module, precision: str) -> nn.Module:
    """Put an open_clip CLIP tower's weights in the dtypes of ``precision``; returns ``clip``.

    - ``"fp16_weights"`` (CLIP4Clip): ``open_clip.model.convert_weights_to_lp(clip, float16)``,
      which converts what CLIP4Clip's ``convert_weights`` (``modules/module_clip.py``, the same
      function as OpenAI's) converts on a CLIP ViT: the weight and bias of every ``Conv``/
      ``Linear`` (``visual.conv1``, attention ``out_proj``, ``mlp.c_fc``/``c_proj``), the
      ``nn.MultiheadAttention`` ``in_proj_weight``/``in_proj_bias``, and the ``text_projection``
      and ``visual.proj`` matrices. LayerNorms, ``logit_scale``, ``token_embedding``,
      ``class_embedding`` and both ``positional_embedding`` stay float32 (their forward is cast
      to the activations' fp16, as in OpenAI's code; open_clip's LayerNorm computes in float32
      for fp16 input). A forward pre-hook on ``clip.visual`` casts the images to fp16, as
      ``CLIP.encode_image`` does in CLIP4Clip, so callers keep passing float32 pixels. The
      towers then return fp16 features (cast with ``.float()`` before the loss, as CLIP4Clip's
      ``get_sequence_output``/``get_visual_output``). There is no float32 master copy: the
      optimizer updates the fp16 tensors in fp16 (:class:`vidret_lib.optim.BertAdam`), so at
      lr 1e-7 most fp16 elements never change (ArrowLuo/CLIP4Clip#96).
    - ``"fp32"``: every floating parameter and buffer float32 (``clip.float()``), for any
      module (e.g. the offline default encoder's towers).
    - ``"amp_bf16"``: float32 weights as ``"fp32"``; the forward runs under
      :func:`precision_context` (``torch.autocast`` to bfloat16).

    Call it once, before building the optimizer (``convert_weights_to_lp`` replaces
    ``param.data``; the parameter objects stay the same).

    Raises:
        ValueError: unknown ``precision``.
        TypeError: ``"fp16_weights"`` and ``clip`` is not an open_clip ``CLIP`` with a
            ``VisionTransformer``.
    """
    from open_clip.model import convert_weights_to_lp

    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    if precision != "fp16_weights":
        return clip.float()
    _check_clip_vit(clip, "prepare_precision(precision='fp16_weights')")
    convert_weights_to_lp(clip, torch.float16)
    clip.visual.register_forward_pre_hook(_cast_to_conv1_dtype)
    return clip


def precision_context(precision: str, device: str | torch.device) -> ContextManager:
    """The context for the forward pass and loss of a ``precision`` run.

    ``"amp_bf16"``: ``torch.autocast(device.type, dtype=torch.bfloat16)`` (no gradient scaler
    is needed for bfloat16); ``"fp32"`` and ``"fp16_weights"``: no autocast (CLIP4Clip runs
    its fp16 weights without one). Run ``loss.backward()`` outside the context.

    Example:
        >>> with precision_context("amp_bf16", "cpu"):
        ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
        torch.bfloat16

    Raises:
        ValueError: unknown ``precision``.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    if precision == "amp_bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class StepPlan(NamedTuple):
    """Optimizer steps of one epoch and of the whole run (``t_total`` of the schedule)."""

    steps_per_epoch: int
    total_steps: int


def plan_steps(n_samples: int, batch_size: int, epochs: int, world_size: int = 1) -> StepPlan:
    """CLIP4Clip's step count for ``n_samples`` training samples per epoch.

    Sources (``ArrowLuo/CLIP4Clip``): ``dataloaders/data_dataloaders.py``
    ``dataloader_msrvtt_train`` draws the samples with a ``DistributedSampler`` (shuffled, the
    sample list padded to ``ceil(n / world) * world`` by repeating its start) into batches of
    ``batch_size // n_gpu`` per process with ``drop_last=True``; ``main_task_retrieval.py``
    sets ``num_train_optimization_steps = (len(train_dataloader) + ga - 1) / ga * epochs``
    (``ga`` = gradient accumulation, 1 in the recipe). With ``--expand_msrvtt_sentences`` a
    sample is a caption (``MSRVTT_TrainDataLoader`` with ``unfold_sentences``), otherwise a
    video with one random caption. So::

        steps_per_epoch = ceil(n_samples / world_size) // (batch_size // world_size)
        total_steps     = steps_per_epoch * epochs

    (``n_gpu`` is the node's GPU count, equal to ``world_size`` on one node.) Example: the
    180,000 captions of MSR-VTT 9k at batch 128 give ``180000 // 128 = 1406`` steps per epoch
    (the last 32 captions of each shuffled epoch are dropped) and 7,030 in 5 epochs.

    Example:
        >>> plan_steps(180_000, 128, 5), plan_steps(180_000, 128, 5, world_size=4)
        (StepPlan(steps_per_epoch=1406, total_steps=7030), StepPlan(steps_per_epoch=1406, total_steps=7030))

    Raises:
        ValueError: a non-positive argument, ``batch_size`` not divisible by ``world_size``
            (CLIP4Clip's ``init_device`` refuses it too), or fewer samples per process than
            one batch (zero steps).
    """
    if min(n_samples, batch_size, epochs, world_size) < 1:
        raise ValueError(
            f"n_samples, batch_size, epochs and world_size must be >= 1; got {n_samples}, {batch_size}, "
            f"{epochs}, {world_size}"
        )
    if batch_size % world_size:
        raise ValueError(
            f"batch_size {batch_size} is not divisible by world_size {world_size}: each process takes an equal "
            "share of a batch, so choose a batch_size that is a multiple of the number of processes"
        )
    per_process = -(-n_samples // world_size)  # DistributedSampler.num_samples = ceil(n / world)
    steps = per_process // (batch_size // world_size)  # DataLoader(drop_last=True)
    if steps == 0:
        raise ValueError(
            f"{n_samples} samples over {world_size} process(es) fill no batch of {batch_size}: use a smaller batch_size"
        )
    return StepPlan(steps, steps * epochs)


def clip4clip_step(
    loss: torch.Tensor,
    params: Iterable[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    logit_scale: nn.Parameter | None = None,
    grad_clip_norm: float = 1.0,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    check_grad_norm: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """One optimizer step on ``loss`` in CLIP4Clip's order; returns the global gradient norm.

    Source: ``ArrowLuo/CLIP4Clip`` ``main_task_retrieval.py`` ``train_epoch`` (gradient
    accumulation 1)::

        loss.backward()                       # DDP averages the gradients over processes here
        clip_grad_norm_(params, 1.0)          # one global norm over every gradient
        optimizer.step()                      # BertAdam: its per-tensor clip, then the update
        optimizer.zero_grad()                 # torch 1.7: gradients zeroed, not set to None
        logit_scale.data.clamp_(max=ln(100))  # after the step (openai/CLIP#46)

    Here the process average is :func:`vidret_lib.distributed.average_gradients` (a no-op in
    one process), and ``clip_grad_norm_`` is written as its two halves
    (``get_total_norm``, then ``clip_grads_with_norm_``) so that ``check_grad_norm(norm)``
    can look at the norm, and raise, before any weight changes. ``scheduler`` (for torch
    AdamW's ``LambdaLR``; BertAdam schedules itself and CLIP4Clip passes none) is stepped right
    after ``optimizer.step()``, the order torch requires. ``zero_grad(set_to_none=False)``
    keeps torch 1.7's semantics (CLIP4Clip's requirement): a trainable parameter that gets no
    gradient in a later step still has a zero gradient, so BertAdam still moves it (momentum
    and weight decay) instead of skipping it.

    Args:
        loss: scalar loss of this process's batch, with its graph.
        params: the trainable parameters (the ones the optimizer holds).
        optimizer: e.g. :func:`vidret_lib.optim.bert_adam` over
            :func:`vidret_lib.optim.param_groups`.
        logit_scale: CLIP's learned log-scale (``model.clip.logit_scale``), clamped at
            :data:`LOGIT_SCALE_MAX` after the step; None when the scale is not learned.
        grad_clip_norm: the global clip's max norm; ``<= 0`` disables the clip.
        scheduler: stepped after the optimizer, or None.
        check_grad_norm: called with the norm before the clip and the step (e.g. to stop on a
            non-finite norm), or None.

    Returns:
        The global L2 norm of the (process-averaged) gradients before clipping, a 0-d float
        tensor.
    """
    params = list(params)
    loss.backward()
    dist_utils.average_gradients(params)
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if check_grad_norm is not None:
        check_grad_norm(grad_norm)
    if grad_clip_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, grad_clip_norm, grad_norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=False)
    if logit_scale is not None:
        with torch.no_grad():
            logit_scale.clamp_(max=LOGIT_SCALE_MAX)
    return grad_norm
