"""Processes launched by torchrun: rank, world size and the few collectives a search needs (gloo, CPU).

`evolve` splits each generation's candidates over the ranks (rank r scores candidates r, r + W, ...), gathers
the scores in candidate order and lets every rank take the same CMA-ES step; rank 0 alone writes. Fine-tuning
goes through accelerate (train.py) instead.
"""
from __future__ import annotations

import os


def world() -> tuple[int, int]:
    """(world size, rank): torchrun's, with a gloo process group set up on first use; (1, 0) otherwise."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return 1, 0
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_world_size(), dist.get_rank()


def pin_threads(threads: int | None) -> int:
    """Intra-op threads of this process: `threads`, else the machine's cores shared by the processes on it."""
    import torch

    if threads is None:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        if local == 1:
            return torch.get_num_threads()
        threads = max(1, (os.cpu_count() or 1) // local)
    torch.set_num_threads(threads)
    return threads


def gather_in_order(mine: dict[int, float], total: int) -> list[float]:
    """Every rank's {index: value} merged into the list of `total` values (on every rank)."""
    size, _ = world()
    if size == 1:
        return [mine[i] for i in range(total)]
    import torch.distributed as dist

    parts: list = [None] * size
    dist.all_gather_object(parts, mine)
    merged = {i: v for part in parts for i, v in part.items()}
    return [merged[i] for i in range(total)]


def broadcast(obj):
    """Rank 0's `obj` on every rank."""
    size, _ = world()
    if size == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_ok(ok: bool) -> bool:
    """True on every rank iff `ok` on every rank (one rank's failure stops all of them together)."""
    size, _ = world()
    if size == 1:
        return ok
    import torch
    import torch.distributed as dist

    t = torch.tensor([0 if ok else 1])
    dist.all_reduce(t)
    return int(t) == 0
