"""The one place that knows about processes: a single process, or several started by ``torchrun``.

A trainer asks its :class:`Backend` for its rank and share of the work, for the all-gather of a rollout, for
the gradient all-reduce after each mini-batch and for barriers around what only the main process writes. One
process without a launcher gets :class:`SingleProcess`, where every call is the identity, so a plain run does
exactly what it did before this module existed.

Under ``torchrun --nproc_per_node N`` (or ``accelerate launch``, which sets the same environment variables),
:func:`make_backend` returns :class:`TorchDistributed`: the process group is gloo on CPU and NCCL on CUDA, and
every collective has a timeout, so a rank that dies makes the others fail with an error instead of waiting
forever. Gradients are summed across ranks after each mini-batch; with the loss divided by the *global* token
(or sequence) count, the sum is exactly the one-process gradient of the whole mini-batch.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Protocol, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from tether.models import pick_device

T = TypeVar("T")

#: Seconds a collective may wait for the other ranks before it fails (TORCH_DIST_TIMEOUT_S overrides it).
DEFAULT_TIMEOUT_S = 600


class Backend(Protocol):
    """What a trainer needs to know about the processes of a job."""

    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        """Whether this process writes files (rank 0)."""
        ...

    def device(self, requested: str) -> torch.device:
        """The device this process trains on, given the config's ``device`` setting."""
        ...

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank (picklable objects; tensors on CPU)."""
        ...

    def all_reduce_grads(self, params: list[nn.Parameter]) -> None:
        """Sum the gradients of ``params`` over the ranks, in place."""
        ...

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of ``values`` over the ranks."""
        ...

    def barrier(self) -> None:
        """Wait until every rank is here."""
        ...


class SingleProcess:
    """The backend of a plain, single-process run: rank 0 of 1, every collective is the identity."""

    rank = 0
    world_size = 1

    @property
    def is_main(self) -> bool:
        return True

    def device(self, requested: str) -> torch.device:
        return pick_device(requested)

    def gather_objects(self, obj: Any) -> list[Any]:
        return [obj]

    def all_reduce_grads(self, params: list[nn.Parameter]) -> None:
        return None

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def barrier(self) -> None:
        return None


class TorchDistributed:
    """Several processes started by ``torchrun`` / ``accelerate launch`` (the ``RANK`` / ``WORLD_SIZE`` variables)."""

    def __init__(self, timeout_s: float | None = None) -> None:
        timeout_s = timeout_s or float(os.environ.get("TORCH_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S))
        if not dist.is_initialized():
            use_cuda = torch.cuda.is_available()
            if use_cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout_s))
            # A group left open at interpreter exit can abort the process ("terminate called without an active
            # exception" from gloo's threads), failing a run that finished: close the group we opened.
            atexit.register(close_process_group)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: str) -> torch.device:
        if requested in ("auto", "cuda") and torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)  # one device per process
        if requested == "auto":
            return torch.device("cpu")
        return torch.device(requested)

    def gather_objects(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def all_reduce_grads(self, params: list[nn.Parameter]) -> None:
        # A sharded (FSDP) parameter's gradient is a DTensor that FSDP has already reduce-scattered (summed).
        grads = [p.grad for p in params if p.grad is not None and not isinstance(p.grad, DTensor)]
        if not grads:
            return
        # One flat buffer, one collective (a parameter without a gradient on every rank has none on any: the
        # ranks run the same model on the same kind of batch).
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        # NCCL reduces CUDA tensors only: statistics gathered on the CPU travel through this process's GPU.
        comm = torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
        out = values.to(comm, copy=True)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out.to(values.device)

    def barrier(self) -> None:
        dist.barrier()


def on_main(backend: Backend, fn: Callable[..., T], *args: Any) -> T | None:
    """``fn(*args)`` on the main process alone (what writes files), then wait for every process; None elsewhere."""
    result = fn(*args) if backend.is_main else None
    backend.barrier()
    return result


def close_process_group() -> None:
    """Destroy the default process group if one is open, after the other processes are done with it.

    Without the barrier, a gloo process that tears its connections down while another still uses them can abort
    the other ("terminate called without an active exception") after a run that finished. The barrier waits at
    most 30 s, so a process whose peers died still exits.
    """
    if not dist.is_initialized():
        return
    if dist.get_backend() == "gloo":
        with contextlib.suppress(Exception):
            dist.monitored_barrier(timeout=timedelta(seconds=30))
    dist.destroy_process_group()


def launched_distributed() -> bool:
    """Whether this process was started by a launcher with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def make_backend(group_for_one: bool = False) -> Backend:
    """:class:`TorchDistributed` under a multi-process launcher, else :class:`SingleProcess`.

    ``group_for_one``: a process group of one under a launcher started with one process (what FSDP needs to run
    on a single device: ``torchrun --nproc_per_node 1`` with ``sharding: fsdp``).
    """
    under_launcher = "WORLD_SIZE" in os.environ
    return TorchDistributed() if launched_distributed() or (group_for_one and under_launcher) else SingleProcess()


def rank_slice(n: int, rank: int, world_size: int, what: str) -> slice:
    """The contiguous share of ``n`` items that ``rank`` handles; ``n`` must divide by ``world_size``."""
    if n % world_size:
        raise ValueError(f"{what} ({n}) must be divisible by the number of processes ({world_size})")
    share = n // world_size
    return slice(rank * share, (rank + 1) * share)


#: The autocast dtype of each ``mixed_precision`` setting.
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, mixed_precision: str) -> contextlib.AbstractContextManager[Any]:
    """bfloat16 / float16 autocast on ``device`` for "bf16" / "fp16", else a context that does nothing."""
    if mixed_precision == "no":
        return contextlib.nullcontext()
    if mixed_precision not in AUTOCAST_DTYPES:
        raise ValueError(f"unknown mixed_precision {mixed_precision!r}; expected 'no', 'bf16' or 'fp16'")
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[mixed_precision])


def make_grad_scaler(device: torch.device, mixed_precision: str, sharded: bool) -> Any:
    """A loss scaler for fp16 (float16 gradients underflow without one); None for "no" and "bf16".

    Under FSDP each process sees only its shard of the gradients, so the scaler must agree across processes
    on whether any gradient overflowed: the sharded scaler does that reduction.
    """
    if mixed_precision != "fp16":
        return None
    if sharded:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device.type)
    return torch.amp.GradScaler(device.type)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Turn on transformers' (non-reentrant) gradient checkpointing; a clear error for a model without it.

    transformers 5 names it activation checkpointing (the old name is deprecated); older versions have only
    ``gradient_checkpointing_enable``.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
