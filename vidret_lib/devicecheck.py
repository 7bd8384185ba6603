"""CUDA's device rules on a CPU: run code written for CUDA without a GPU and catch device mismatches.

``with cuda_rules(device_count=2): ...`` runs its body on the CPU, but every tensor carries a
*virtual device* and the rules of real CUDA are enforced:

- ``x.to("cuda")``, ``x.cuda()``, ``module.to("cuda")``, ``torch.zeros(..., device="cuda:1")``
  and every other call with ``device=`` put the result on that virtual device (``"cuda"`` means
  the current device, :func:`torch.cuda.set_device`); ``.cpu()`` / ``.to("cpu")`` bring it back.
  A transfer copies, as a real one does (the CPU original stays on the CPU);
- an op whose tensors are on two devices (``cpu`` and ``cuda:0``, ``cuda:0`` and ``cuda:1``)
  raises ``RuntimeError: Expected all tensors to be on the same device ...``, as torch does.
  As in torch, 0-dim CPU tensors (scalars) may meet tensors of any device, ``copy_`` and
  ``.data =`` may cross devices, and a CUDA tensor may be indexed with CPU indices;
- ``.numpy()`` / ``np.asarray`` of a CUDA tensor raises torch's ``TypeError`` (``.cpu()`` first);
- a random op that puts its result on CUDA with a CPU ``generator=`` raises, as torch does;
- ``x.device``, ``x.is_cuda``, ``x.get_device()`` report the virtual device, so code such as
  ``y.to(x.device)`` behaves as on a GPU; results of an op are on the device of its inputs;
- gradients: ``p.grad`` is read on ``p``'s device (autograd computes it on the CPU, unseen;
  reading it is an op on ``p``), so optimizers see matching devices; a ``backward(gradient)``
  or ``p.grad = g`` on another device raises, as in torch;
- ``torch.cuda`` / ``torch.accelerator``: ``is_available()`` is True, ``device_count()`` is
  ``device_count``, ``set_device`` / ``current_device`` track the current device,
  ``synchronize``, ``manual_seed(_all)``, ``get_device_name`` and ``current_stream`` are harmless; autocast
  ("cuda") runs in float32 (CPU tensors are outside CUDA autocast);
- ``pin_memory()`` and ``DataLoader(pin_memory=True)`` (also with worker processes) give CPU copies;
- ``torch.distributed``: ``init_process_group(backend="nccl")`` (or ``"cpu:gloo,cuda:nccl"``) runs
  gloo, and a CUDA tensor of ``broadcast`` / ``all_reduce`` / ``all_gather`` /
  ``all_gather_into_tensor`` / ``reduce_scatter_tensor`` must then be on the current CUDA device,
  as NCCL needs; a CPU tensor is refused unless the backend names one for the CPU (``cpu:gloo``),
  as torch refuses it (not checked inside autograd's backward, see the limits). Each process of
  a torchrun world is its own check: ``cuda_rules(device_count=WORLD_SIZE)`` in every process.

How: a :class:`torch.overrides.TorchFunctionMode` sees every torch call made in this thread
(functions, tensor methods and properties, ``nn.functional``, factories); the virtual device
is kept in a side table keyed (weakly) by a tensor's storage, so views, ``.data``,
``nn.Parameter(x)`` and in-place results share their storage's device, as on a GPU.

Limits (what this does not see):

- the mode is per thread: only code run in the entering thread is checked (DataLoader worker
  processes produce CPU tensors, which is right: they are CPU tensors);
- calls are checked at the level they are made: the inside of a torch function
  (``F.multi_head_attention_forward``, ``nn.init.orthogonal_``) and of autograd's backward
  (including a custom ``autograd.Function.backward``) runs unchecked on the CPU;
- ``device`` passed positionally to a factory (``torch.as_tensor(x, None, "cuda")``) is not
  seen; CUDA generators (``torch.Generator("cuda")``), streams, events, ``torch.cuda.device(i)``,
  memory statistics, ``torch.set_default_device("cuda")`` and ``Tensor.type()`` are not simulated;
- ``torch.save`` of a virtual CUDA tensor writes a CPU tensor;
- numerics are the CPU's: no TF32, no float16 autocast, no CUDA-only kernels or bugs.

Example:
    >>> with cuda_rules():
    ...     x = torch.ones(2).to("cuda")
    ...     x.device, (x + 1).device, x.cpu().device
    (device(type='cuda', index=0), device(type='cuda', index=0), device(type='cpu'))
    >>> with cuda_rules():
    ...     torch.ones(2).to("cuda") + torch.ones(2)
    Traceback (most recent call last):
    ...
    RuntimeError: Expected all tensors to be on the same device, but found at least two devices, cuda:0 and cpu! (add, under vidret_lib.devicecheck.cuda_rules)
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator
from unittest import mock

import torch
import torch.distributed as dist
import torch.utils.data._utils.pin_memory as pin_memory_module
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map_only
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["cuda_rules", "CudaRules", "enable_for_process"]

Tensor = torch.Tensor
CPU = torch.device("cpu")
DEVICE_NAME = "virtual CUDA device (vidret_lib.devicecheck, runs on the CPU)"
# Collectives whose tensors NCCL requires on the current CUDA device.
COLLECTIVES = ("broadcast", "all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor")


class CudaRules(TorchFunctionMode):
    """The mode behind :func:`cuda_rules`; ``device_count`` virtual CUDA devices, ``current`` index."""

    def __init__(self, device_count: int = 1) -> None:
        super().__init__()
        if device_count < 1:
            raise ValueError(f"device_count must be >= 1; got {device_count}")
        self.device_count = device_count
        self.current = 0
        self.nccl = False  # init_process_group asked for nccl: CUDA tensors of collectives on the current device
        self.cpu_collectives = True  # the backend has a CPU part (gloo; not plain nccl)
        self._tags: WeakIdKeyDictionary = WeakIdKeyDictionary()  # UntypedStorage -> cuda device
        Get = torch.Tensor
        self._special: dict[Callable, Callable] = {
            Get.device.__get__: lambda t: self.device_of(t),
            Get.is_cuda.__get__: lambda t: self.device_of(t).type == "cuda",
            Get.is_cpu.__get__: lambda t: self.device_of(t).type == "cpu",
            Get.get_device: lambda t: -1 if self.device_of(t).type == "cpu" else self.device_of(t).index,
            Get.to: self._to,
            Get.cpu: lambda t, memory_format=torch.preserve_format: self._transfer(t, CPU, memory_format=memory_format),
            Get.cuda: self._cuda,
            Get.pin_memory: lambda t, device=None: self._pin(t),
            Get.__getitem__: self._getitem,
            Get.__setitem__: self._setitem,
        }
        for name in ("numpy", "__array__"):
            self._special[getattr(Get, name)] = functools.partial(self._to_numpy, getattr(Get, name))
        # may cross devices (torch allows it) or only parse arguments: called as they are
        self._unchecked = {Get.copy_, Get.data.__set__, Get.set_, torch._C._nn._parse_to,
                           torch._has_compatible_shallow_copy_type}

    # ------------------------------------------------------------------ devices
    def resolve(self, device: str | int | torch.device) -> torch.device:
        """A concrete device: ``"cuda"`` -> ``cuda:<current>``; an index past ``device_count`` raises."""
        device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        if device.type != "cuda":
            return device
        index = self.current if device.index is None else device.index
        if not 0 <= index < self.device_count:
            raise RuntimeError(
                f"CUDA error: invalid device ordinal ({device} with {self.device_count} virtual devices; "
                "pass cuda_rules(device_count=...))"
            )
        return torch.device("cuda", index)

    def device_of(self, t: Tensor) -> torch.device:
        """The virtual device of ``t`` (its real device unless it is a strided CPU tensor)."""
        if t.device.type != "cpu" or t.layout != torch.strided:
            return t.device
        return self._tags.get(t.untyped_storage(), CPU)

    def _tag(self, t: Tensor, device: torch.device) -> None:
        if t.device.type != "cpu" or t.layout != torch.strided:
            return
        if device.type == "cuda":
            self._tags[t.untyped_storage()] = device
        else:
            self._tags.pop(t.untyped_storage(), None)

    def _common_device(self, tensors: list[Tensor], op: str) -> torch.device:
        """The one device of ``tensors`` (0-dim CPU tensors may join any), else torch's error."""
        found: list[torch.device] = []
        for t in tensors:
            d = self.device_of(t)
            if (d.type == "cpu" and t.dim() == 0) or d in found:
                continue
            found.append(d)
        if len(found) > 1:
            raise RuntimeError(
                f"Expected all tensors to be on the same device, but found at least two devices, "
                f"{found[0]} and {found[1]}! ({op}, under vidret_lib.devicecheck.cuda_rules)"
            )
        return found[0] if found else CPU

    # ------------------------------------------------------------------ the mode
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in self._special:
            return self._special[func](*args, **kwargs)
        if func in self._unchecked:
            return func(*args, **kwargs)
        op = getattr(func, "__name__", str(func))
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        if kwargs.get("device") is not None:  # a factory or a transfer: the result goes there
            device = self.resolve(kwargs["device"])
            kwargs["device"] = CPU if device.type == "cuda" else kwargs["device"]
        else:
            device = self._common_device(inputs, op)
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False  # pinned memory is CPU memory
        generator = kwargs.get("generator")
        if generator is not None and generator.device.type != device.type:
            raise RuntimeError(
                f"Expected a '{device.type}' device type for generator but found '{generator.device.type}' "
                f"({op}, under vidret_lib.devicecheck.cuda_rules)"
            )
        out = func(*args, **kwargs)
        if isinstance(out, Tensor) and self.device_of(out) != device and any(
                _same_storage(out, t) for t in inputs):
            out = out.clone()  # torch.as_tensor(cpu_tensor, device="cuda") copies
        self._tag_new(out, inputs, device)
        return out

    def _tag_new(self, out: Any, inputs: list[Tensor], device: torch.device) -> None:
        """Tag the tensors of ``out`` that are not storage-sharing views of an input."""
        for t in tree_leaves(out):
            if isinstance(t, Tensor) and not any(_same_storage(t, i) for i in inputs):
                self._tag(t, device)

    # ------------------------------------------------------------------ transfers
    def _transfer(self, t: Tensor, device: torch.device, dtype=None, non_blocking=False, copy=False,
                  memory_format=torch.preserve_format) -> Tensor:
        """``t.to(device, dtype, copy=...)``: a copy when the (virtual) device changes."""
        device = self.resolve(device)
        moved = device != self.device_of(t)
        out = Tensor.to(t, dtype=dtype, non_blocking=non_blocking, copy=copy or moved,
                        memory_format=memory_format)
        if out is not t:
            self._tag(out, device)
        return out

    def _to(self, t: Tensor, *args, copy: bool = False, **kwargs) -> Tensor:
        device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args, **kwargs)
        if args and isinstance(args[0], Tensor):  # t.to(other): other's device and dtype
            device = self.device_of(args[0])
        return self._transfer(t, device if device is not None else self.device_of(t), dtype, non_blocking,
                              copy, memory_format or torch.preserve_format)

    def _cuda(self, t: Tensor, device=None, non_blocking=False, memory_format=torch.preserve_format) -> Tensor:
        return self._transfer(t, "cuda" if device is None else device, None, non_blocking,
                              memory_format=memory_format)

    def _pin(self, t: Tensor) -> Tensor:
        if self.device_of(t).type != "cpu":
            raise RuntimeError(f"cannot pin a {self.device_of(t)} tensor: only dense CPU tensors can be pinned")
        return t.clone()  # pinned memory is CPU memory

    def _to_numpy(self, func: Callable, t: Tensor, *args, **kwargs):
        device = self.device_of(t)
        if device.type == "cuda":
            raise TypeError(
                f"can't convert {device} device type tensor to numpy. Use Tensor.cpu() to copy the tensor "
                "to host memory first. (under vidret_lib.devicecheck.cuda_rules)"
            )
        return func(t, *args, **kwargs)

    # ------------------------------------------------------------------ indexing
    def _check_indices(self, t: Tensor, index: Any) -> bool:
        """CPU indices or indices on ``t``'s device, as torch requires; True for advanced indexing."""
        device = self.device_of(t)
        tensors = [i for i in tree_leaves(index) if isinstance(i, Tensor)]
        for i in tensors:
            if self.device_of(i) not in (CPU, device):
                raise RuntimeError(
                    f"indices should be either on cpu or on the same device as the indexed tensor ({device}); "
                    f"got indices on {self.device_of(i)} (under vidret_lib.devicecheck.cuda_rules)"
                )
        return bool(tensors)

    def _getitem(self, t: Tensor, index: Any) -> Tensor:
        self._check_indices(t, index)
        out = Tensor.__getitem__(t, index)
        self._tag_new(out, [t], self.device_of(t))
        return out

    def _setitem(self, t: Tensor, index: Any, value: Any) -> None:
        advanced = self._check_indices(t, index)
        if advanced and isinstance(value, Tensor):  # index_put_; basic indexing copies (copy_ semantics)
            self._common_device([t, value], "index_put_")
        Tensor.__setitem__(t, index, value)

    # ------------------------------------------------------------------ patched modules
    def set_device(self, device: str | int | torch.device) -> None:
        """``torch.cuda.set_device``: the device that ``"cuda"`` means from now on."""
        self.current = self.resolve(torch.device("cuda", device) if isinstance(device, int) else device).index

    def pin_tree(self, data: Any, device: Any = None) -> Any:
        """``torch.utils.data._utils.pin_memory.pin_memory`` (also run by DataLoader's pin thread)."""
        return tree_map_only(Tensor, self._pin, data)

    def init_process_group(self, real: Callable, *args, backend: str | None = None, **kwargs):
        """``init_process_group``: nccl runs as gloo; CUDA tensors of collectives must then be on the current
        device, and CPU tensors need a CPU backend in ``backend`` (``"cpu:gloo,cuda:nccl"``; plain ``"nccl"`` has none)."""
        self.nccl = backend is not None and "nccl" in str(backend)
        self.cpu_collectives = not self.nccl or "gloo" in str(backend)
        return real(*args, backend="gloo" if self.nccl else backend, **kwargs)

    def collective(self, real: Callable, *args, **kwargs):
        """A collective: under nccl every CUDA tensor must be on the current CUDA device, and a CPU tensor
        needs a CPU backend."""
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        # inside a handler (e.g. a custom backward run by backward()) the mode is off and tags unknown
        if self.nccl and self in torch.overrides._get_current_function_mode_stack():
            current = torch.device("cuda", self.current)
            for t in tensors:
                if self.device_of(t) == CPU and self.cpu_collectives:
                    continue
                if self.device_of(t) != current:
                    raise RuntimeError(
                        f"NCCL {real.__name__}: tensors must be CUDA tensors on the current device {current} "
                        f"(torch.cuda.set_device); got one on {self.device_of(t)} "
                        "(under vidret_lib.devicecheck.cuda_rules)"
                    )
        return real(*args, **kwargs)

    def patches(self) -> list:
        """The ``mock.patch`` objects that make ``torch.cuda`` / ``torch.accelerator`` / dist answer as on a GPU."""
        count, current = (lambda: self.device_count), (lambda: self.current)
        cuda = {
            "is_available": lambda: True, "device_count": count, "current_device": current,
            "set_device": self.set_device, "synchronize": lambda device=None: None,
            "get_device_name": lambda device=None: DEVICE_NAME,
            "manual_seed": lambda seed: None, "manual_seed_all": lambda seed: None,
            "current_stream": lambda device=None: _Stream(), "is_current_stream_capturing": lambda: False,
        }
        accelerator = {
            "is_available": lambda: True, "device_count": count,
            "current_accelerator": lambda check_available=False: torch.device("cuda"),
            "current_device_index": current, "set_device_index": self.set_device,
            "synchronize": lambda device=None: None, "current_stream": lambda device=None: _Stream(),
        }
        collectives = {
            name: functools.partial(self.collective, getattr(dist, name)) for name in COLLECTIVES
        }
        return (
            [mock.patch.object(torch.cuda, k, v) for k, v in cuda.items()]
            + [mock.patch.object(torch.accelerator, k, v) for k, v in accelerator.items()]
            + [mock.patch.object(pin_memory_module, "pin_memory", self.pin_tree),
               mock.patch.object(dist, "init_process_group",
                                 functools.partial(self.init_process_group, dist.init_process_group))]
            + [mock.patch.object(dist, k, v) for k, v in collectives.items()]
        )


@contextlib.contextmanager
def cuda_rules(device_count: int = 1) -> Iterator[CudaRules]:
    """Run the body on the CPU under CUDA's device rules with ``device_count`` virtual GPUs.

    See the module docstring for the rules and the limits. Yields the :class:`CudaRules` mode.
    Raises ``ValueError`` for ``device_count < 1``.
    """
    rules = CudaRules(device_count)
    with contextlib.ExitStack() as stack:
        for patch in rules.patches():
            stack.enter_context(patch)
        stack.enter_context(rules)
        yield rules


_PROCESS_RULES: list[tuple[contextlib.ExitStack, CudaRules]] = []  # what enable_for_process entered, kept open


def enable_for_process(device_count: int = 1) -> CudaRules:
    """Enter :func:`cuda_rules` for good: the rules apply from now on, never left.

    For a process that is itself the check, such as a notebook kernel run by ``python -m
    vidret_lib.reproduce --cuda-rules N`` (``vidret_lib.profiles.apply_smoke`` calls this when
    ``VIDRET_CUDA_RULES=N``). The rules see code run in the calling thread; a notebook kernel runs
    every cell in its main thread. A second call enters nothing more and returns the first mode.
    Raises ``ValueError`` for ``device_count < 1``, and when a second call asks for another count.
    """
    if _PROCESS_RULES:
        rules = _PROCESS_RULES[0][1]
        if rules.device_count != device_count:
            raise ValueError(f"cuda_rules already entered with device_count={rules.device_count}, "
                             f"not {device_count}")
        return rules
    stack = contextlib.ExitStack()
    rules = stack.enter_context(cuda_rules(device_count))
    _PROCESS_RULES.append((stack, rules))
    return rules


class _Stream:
    """The default stream of a virtual device: work is synchronous, nothing is ever captured."""

    def is_capturing(self) -> bool:
        return False

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass

    def wait_stream(self, stream: "_Stream") -> None:
        pass


def _same_storage(a: Tensor, b: Tensor) -> bool:
    if a.device != b.device or a.layout != torch.strided or b.layout != torch.strided:
        return False
    return a.untyped_storage() is b.untyped_storage()
