"""Data-parallel runs under ``torchrun`` (DESIGN §6): rank / world helpers, rank-0-only writes, barriers,
batch sharding and the gradient all-reduce of the trainable part.

Model: every rank runs the same program (SPMD) on identical weights. Global micro-batch ``b`` of the
1-process run is split into ``world`` contiguous slices (:func:`shard_range`, sizes differ by at most
one); rank ``r`` computes the loss of slice ``r`` scaled by its share ``n_r / n`` and one all-reduce
(SUM) of a flat bucket of the trainable tensors' gradients per optimizer step gives every rank the
gradient of the global batch - what DDP does, without wrapping a module, because a trainable part may be
a list of tensors (WF's alpha) and a frozen reference (the original model, a teacher) never enters it.

Writes: :func:`main_rank_only` runs a writer on rank 0 alone, between two collectives (before: nobody
writes while another rank may still test for the file; after: every rank sees the file and learns
whether rank 0 failed). Every writer of a run directory goes through it, so all ranks must call the
same writers in the same order - they do, the program being the same on every rank.

Imports only torch and the standard library (bottom layer, DESIGN §1). No-ops without an initialised
process group (1 process: nothing changes).
"""
from __future__ import annotations

import functools
import os
import threading
from typing import Any, Callable, Sequence, TypeVar

import torch
from torch import Tensor

__all__ = ["is_distributed", "rank", "world_size", "local_rank", "is_main", "barrier", "init_from_env",
           "shard_range", "shard_batch", "leading_size", "broadcast_", "allreduce_sum_", "all_gather_object",
           "main_rank_only", "broadcast_object", "sum_across_ranks", "flat_grads", "unflatten_grads_", "any_rank"]

F = TypeVar("F", bound=Callable[..., Any])
_local = threading.local()
_CONTROL: dict[str, Any] = {}


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def _control_group():
    """A gloo group for control traffic (barriers, flags, objects on the CPU); the default group when it
    is gloo already. Created lazily, by every rank at its first control collective (same program order)."""
    import torch.distributed as dist

    if dist.get_backend() == "gloo":
        return None
    key = id(dist.distributed_c10d._get_default_group())
    if key not in _CONTROL:
        _CONTROL[key] = dist.new_group(backend="gloo")
    return _CONTROL[key]


def barrier() -> None:
    """Wait for every rank (no-op in 1 process)."""
    if is_distributed():
        import torch.distributed as dist

        dist.barrier(group=_control_group())


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on at least one rank (a MAX all-reduce on the CPU)."""
    if not is_distributed():
        return bool(flag)
    import torch.distributed as dist

    t = torch.tensor([int(bool(flag))], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control_group())
    return bool(t.item())


def sum_across_ranks(values: Sequence[float]) -> list[float]:
    """Element-wise sums of ``values`` over the ranks (float64 on the CPU; exact for integer counts)."""
    if not is_distributed():
        return [v for v in values]
    import torch.distributed as dist

    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=_control_group())
    return t.tolist()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (picklable objects)."""
    if not is_distributed():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_control_group())
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` in 1 process)."""
    if not is_distributed():
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj, group=_control_group())
    return out


def init_from_env(device: str | torch.device | None = None) -> torch.device | None:
    """Initialise the default process group from the ``torchrun`` environment (``WORLD_SIZE`` > 1, with
    ``RANK`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT``): NCCL and ``cuda:LOCAL_RANK`` when the
    run is on CUDA, gloo on the CPU. Returns the device this rank runs on, or None when not under torchrun
    with several processes (nothing is done). Idempotent."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    want = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if want.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("torchrun on device cuda: no CUDA GPU is visible to torch; pass --device cpu")
        n = torch.cuda.device_count()
        if local_rank() >= n:
            raise ValueError(f"torchrun: LOCAL_RANK {local_rank()} but only {n} CUDA device(s) are visible; "
                             "use --nproc_per_node <= the GPU count")
        dev = torch.device("cuda", local_rank())
        torch.cuda.set_device(dev)
    elif want.type == "cpu":
        dev = want
    else:
        raise ValueError(f"torchrun: device {want} is not supported for distributed runs; use cpu or cuda")
    if not dist.is_initialized():
        kw = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", **kw)
    return dev


# ----------------------------------------------------------------------------------- sharding
def shard_range(n: int, r: int | None = None, w: int | None = None) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of a global batch of ``n`` rows that rank ``r`` of ``w`` takes (contiguous,
    sizes differ by at most one; concatenated over ranks in order they give ``0..n-1``)."""
    r = rank() if r is None else r
    w = world_size() if w is None else w
    return (n * r) // w, (n * (r + 1)) // w


def leading_size(batch: Any) -> int | None:
    """Rows of the first tensor found in ``batch`` (tensor / tuple / list / dict; None entries skipped)."""
    if torch.is_tensor(batch):
        return int(batch.shape[0]) if batch.dim() else None
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for v in batch:
            n = leading_size(v)
            if n is not None:
                return n
    return None


def shard_batch(batch: Any, r: int | None = None, w: int | None = None) -> Any:
    """Rank ``r``'s slice of every tensor in ``batch`` along dim 0 (each tensor split by its own length,
    :func:`shard_range`); non-tensors pass through."""
    r = rank() if r is None else r
    w = world_size() if w is None else w
    if w == 1:
        return batch
    if torch.is_tensor(batch):
        if not batch.dim():
            return batch
        lo, hi = shard_range(batch.shape[0], r, w)
        return batch[lo:hi]
    if isinstance(batch, dict):
        return {k: shard_batch(v, r, w) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(shard_batch(v, r, w) for v in batch)
    return batch


# ----------------------------------------------------------------------------- collectives
def broadcast_(tensors: Sequence[Tensor], src: int = 0) -> None:
    """Copy rank ``src``'s values of ``tensors`` into every rank's (in place; one flat bucket per dtype)."""
    if not is_distributed():
        return
    import torch.distributed as dist

    by_dtype: dict[Any, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault((t.dtype, t.device), []).append(t)
    for ts in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1) for t in ts])
        dist.broadcast(flat, src=src)
        with torch.no_grad():
            off = 0
            for t in ts:
                t.copy_(flat[off:off + t.numel()].view_as(t))
                off += t.numel()


def allreduce_sum_(flat: Tensor) -> Tensor:
    """In-place SUM all-reduce of one tensor over the default group (no-op in 1 process)."""
    if is_distributed():
        import torch.distributed as dist

        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    return flat


def flat_grads(tensors: Sequence[Tensor], extra: Sequence[Tensor] = ()) -> Tensor:
    """One float32 bucket (float64 when a tensor is float64): every tensor's ``.grad`` (zeros where None), then ``extra``."""
    dev = tensors[0].device if tensors else (extra[0].device if extra else torch.device("cpu"))
    dt = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    parts = [(t.grad if t.grad is not None else torch.zeros_like(t)).detach().reshape(-1).to(dt) for t in tensors]
    parts += [e.detach().reshape(-1).to(device=dev, dtype=dt) for e in extra]
    return torch.cat(parts) if parts else torch.zeros(0, device=dev)


def unflatten_grads_(tensors: Sequence[Tensor], flat: Tensor) -> Tensor:
    """Write the bucket back into each tensor's ``.grad``; returns what is left of ``flat`` (the extras)."""
    off = 0
    for t in tensors:
        g = flat[off:off + t.numel()].view_as(t).to(t.dtype)
        if t.grad is None:
            t.grad = g.clone()
        else:
            t.grad.copy_(g)
        off += t.numel()
    return flat[off:]


# --------------------------------------------------------------------------- rank-0 writes
def main_rank_only(fn: F) -> F:
    """Decorator: in a process group, ``fn`` runs on rank 0 alone between two collectives, and the
    other ranks return None (or raise when rank 0 raised). Nested calls run plainly (one gate)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not is_distributed() or getattr(_local, "depth", 0) > 0:
            return fn(*args, **kwargs)
        barrier()
        err: BaseException | None = None
        out = None
        if is_main():
            _local.depth = 1
            try:
                out = fn(*args, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after the other ranks know
                err = exc
            finally:
                _local.depth = 0
        failed = any_rank(err is not None)
        if err is not None:
            raise err
        if failed:
            raise RuntimeError(f"rank 0 failed in {fn.__qualname__}; see its error above")
        return out

    return wrapper  # type: ignore[return-value]
