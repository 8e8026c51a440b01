"""torchrun helpers: which rank am I, rank 0 does the writing, and gathers of rows and objects.

Every ditgraft command runs the same code on every rank (``torchrun --nproc_per_node N ditgraft ...``; nccl with
CUDA, gloo on CPU). The rule: all ranks compute, only rank 0 writes files, and the others wait for it
(``on_main``), so that every rank then sees the same run directory and takes the same decisions. Without a process
group every helper is the single-process identity.
"""
from __future__ import annotations

from typing import Callable, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_world()[0] == 0


def barrier() -> None:
    if rank_world()[1] > 1:
        dist.barrier()


def broadcast_from_main(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (picklable objects)."""
    if rank_world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` (typically a file write, or a decision read from the run directory) on rank 0 only; every rank
    waits for it and returns rank 0's result."""
    return broadcast_from_main(fn() if is_main() else None)


def gather_to_main(obj) -> list | None:
    """[obj of rank 0, obj of rank 1, ...] on rank 0; None on the others."""
    rank, world = rank_world()
    if world == 1:
        return [obj]
    out = [None] * world if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous share [lo, hi) of range(n) for ``rank``; shares differ in size by at most one."""
    return n * rank // world, n * (rank + 1) // world


def all_gather_rows(local: torch.Tensor, n: int) -> torch.Tensor:
    """Every rank holds rows ``shard_bounds(n, rank, world)`` of an (n, ...) tensor; return all n rows on every
    rank (on ``local``'s device and dtype). The collective runs on CUDA under nccl, on the CPU under gloo."""
    rank, world = rank_world()
    if world == 1:
        return local
    comm = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    size = -(-n // world)
    padded = torch.zeros((size,) + tuple(local.shape[1:]), dtype=local.dtype, device=comm)
    padded[:len(local)] = local.to(comm)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    rows = [parts[r][:shard_bounds(n, r, world)[1] - shard_bounds(n, r, world)[0]] for r in range(world)]
    return torch.cat(rows).to(local.device)
