"""Multi-process training through ``torchrun`` / ``torch.distributed``, with exact gradients.

Run a script that calls :func:`vidret_lib.train.train` as ``torchrun --nproc_per_node N script.py``:
:func:`init_from_env` joins the process group that torchrun describes in the environment
(gloo on CPU, nccl on CUDA). Every process draws the same global batch (same seed) and
keeps its contiguous slice (:func:`shard`); embeddings are gathered with
:func:`gather` so every process computes the loss of the whole global batch, and
:func:`average_gradients` averages parameter gradients across processes.

Why the gradients are exact, and why CLIP4Clip's are not (papers.md §0, pitfall 6).
Let ``L`` be the loss of the global batch, identical on all W processes, and ``x_r`` the
local embeddings of process r (produced by parameters ``theta`` before the gather).

- :class:`AllGather` (used here) back-propagates by summing the incoming gradients of every
  process' copy of ``L`` (an all-reduce, then the local slice): process r gets
  ``W * dL/dx_r``, hence ``W * dL/dx_r * dx_r/dtheta``; averaging over processes gives
  ``sum_r dL/dx_r dx_r/dtheta = dL/dtheta``, the single-process full-batch gradient. This is
  the rule of ``torch.distributed.nn.functional.all_gather``, which we do not use: it is
  deprecated in torch 2.14, and with it ~1 in 10 two-process gloo runs aborted at exit
  ("terminate called without an active exception"; 8 of 120 runs, 0 of 120 with ours).
- CLIP4Clip's ``AllGather`` (``ArrowLuo/CLIP4Clip`` ``modules/until_module.py``) returns
  only ``grad_output`` of the local slice: process r gets ``dL/dx_r`` once, and DDP's
  average gives ``(1/W) dL/dtheta`` for every parameter before the gather (towers, heads);
  parameters after it (the logit scale) get the full gradient. Adam-type updates are
  nearly scale-invariant, so the effect shows through the eps, the gradient clipping
  thresholds and the relative strength of weight decay (EMCL's README: 47.0 on 2 GPUs vs
  48.2 on 8 at the same global batch).

Parameters used after the gather (e.g. the MBVR fusion) see the full batch on every
process; their (identical) gradients are unchanged by averaging.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["init_from_env", "rank_and_world", "is_main_process", "from_main_process", "barrier", "shard", "AllGather",
           "gather", "average_gradients", "broadcast_parameters"]


def init_from_env(device: str | torch.device = "cpu") -> tuple[int, int]:
    """Join the process group described by torchrun's environment; return ``(rank, world_size)``.

    With ``WORLD_SIZE`` unset or 1 (a plain ``python`` run) nothing is initialised and
    ``(0, 1)`` is returned. When ``device`` is CUDA, or a GPU for this process exists
    (``LOCAL_RANK < torch.cuda.device_count()``), the process uses ``cuda:LOCAL_RANK``
    (:func:`torch.cuda.set_device`, also when the group was joined before) and the backend is
    ``"cpu:gloo,cuda:nccl"``: nccl for CUDA tensors, gloo for CPU ones (a record's reuse
    decision, a CPU-side probe), whichever call joins first; otherwise gloo.

    Example:
        >>> "WORLD_SIZE" in os.environ or init_from_env("cpu") == (0, 1)
        True
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.device(device).type == "cuda" or (torch.cuda.is_available() and local_rank < torch.cuda.device_count())
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the current process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """Whether this process writes the files every process would write alike (results, figures).

    Rank 0 of the process group, or, before a group is joined, of torchrun's environment
    (``RANK``; 0 when unset): a notebook kernel that has not trained yet knows its rank too.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def from_main_process(value):
    """Rank 0's ``value`` (any picklable object) on every process; ``value`` itself without a group.

    For decisions every process must take alike (reuse a record or compute it: a process that
    computes alone would wait forever in training's collectives). Join the group first
    (:func:`init_from_env`).
    """
    _, world = rank_and_world()
    if world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait until every process of the group gets here (nothing without a group)."""
    if rank_and_world()[1] > 1:
        dist.barrier()


def shard(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """The contiguous slice of a global batch that process ``rank`` handles.

    Gathering the slices of all processes in rank order gives back ``batch``, so the gathered
    batch, the loss and the gradients equal the single-process ones.

    Example:
        >>> shard(torch.arange(6), 1, 2).tolist()
        [3, 4, 5]
    """
    if len(batch) % world_size:
        raise ValueError(
            f"a global batch of {len(batch)} cannot be split evenly over {world_size} processes; "
            "choose batch_size divisible by the number of processes"
        )
    size = len(batch) // world_size
    return batch[rank * size:(rank + 1) * size]


class AllGather(torch.autograd.Function):
    """``x`` (B, ...) of every process concatenated in rank order (W*B, ...); backward sums the
    gradients of all processes and returns this process' slice (see the module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        ctx.rank, ctx.size = dist.get_rank(), x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)  # sum over processes of dL_r / d(gathered)
        return grad[ctx.rank * ctx.size:(ctx.rank + 1) * ctx.size]


def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (B_local, ...) from every process along dim 0, keeping exact gradients.

    :class:`AllGather`, whose backward sums the gradients of all processes (see the module
    docstring). Identity without a process group.
    """
    _, world = rank_and_world()
    if world == 1:
        return x
    return AllGather.apply(x.contiguous())


def average_gradients(params) -> None:
    """All-reduce each parameter gradient and divide by the world size (what DDP does).

    Call after ``loss.backward()`` and before clipping / ``optimizer.step()``. Parameters
    without a gradient on this process get a zero gradient first so that every process
    takes part in the same all-reduces.
    """
    _, world = rank_and_world()
    if world == 1:
        return
    for p in params:
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad.div_(world)


def broadcast_parameters(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every process (identical start)."""
    _, world = rank_and_world()
    if world == 1:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)
