"""Processes launched by torchrun: rank, world size, the few collectives a search needs, and FSDP2 sharding.

`evolve` splits each generation's candidates over the ranks (rank r scores candidates r, r + W, ...), gathers
the scores in candidate order and lets every rank take the same CMA-ES step; rank 0 alone writes. `finetune`
(through accelerate) and `distill` are data parallel, replicated or sharded (`shard_model`, below).
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
        import torch

        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
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


def barrier() -> None:
    """Every rank waits here for the others (nothing with one process)."""
    size, _ = world()
    if size > 1:
        import torch.distributed as dist

        dist.barrier()


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


# ------------------------------------------------------------------------------------------------------ FSDP2
# `finetune` and `distill` with `parallel: fsdp` shard the model with torch's FSDP2 (`fully_shard`): every
# parameter becomes a DTensor holding 1/W of its rows on each rank, gathered for a module's forward and
# backward and reduce-scattered after. accelerate is not used for this: on CPU it keeps a MULTI_CPU (DDP)
# setup whatever FSDP plugin it is given, so nothing would be sharded.

def shard(model, units) -> None:
    """fully_shard each module of `units` (innermost first: the caller orders them), then the root `model`."""
    from torch.distributed.fsdp import fully_shard

    world()  # the process group exists
    for module in units:
        fully_shard(module)
    fully_shard(model)


def shard_model(model) -> None:
    """FSDP2 units of a transformers model (a PEFT wrapper too): every attention module the adapter finds (so
    one can run alone, as distillation does), then every decoder layer holding one, then the root."""
    from .arch import adapter_for
    from .surgery import base_model

    sites = adapter_for(base_model(model).config).sites(model)
    layers = [model.get_submodule(s.path.rsplit(".", 1)[0]) for s in sites]
    shard(model, [s.module for s in sites] + [m for m in layers if m is not model])


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def shard_fraction(model) -> float:
    """Elements of the parameters this rank holds / elements of the parameters: 1/W where all are sharded."""
    from torch.distributed.tensor import DTensor

    mine = total = 0
    for p in model.parameters():
        total += p.numel()
        mine += p.to_local().numel() if isinstance(p, DTensor) else p.numel()
    return round(mine / total, 4)


def full(t):
    """The whole tensor of a DTensor (a collective: every rank calls it, in the same order); `t` otherwise."""
    from torch.distributed.tensor import DTensor

    return t.detach().full_tensor() if isinstance(t, DTensor) else t


def like(param, value):
    """`value` (a whole tensor) laid out as `param`: this rank's shard of it where `param` is a DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor) and not isinstance(value, DTensor) and tuple(value.shape) == tuple(param.shape):
        return distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None)
    return value


def unshard(model):
    """Make a sharded `model` whole again on every rank, in place (a collective): each DTensor parameter is
    replaced by a plain one holding the gathered tensor (tied weights stay tied), and what fully_shard added
    (the FSDP class in each module's MRO, its hooks, its registry entries) is removed, so the model is used and
    saved as any other, by one rank alone too. FSDP2 has no public call for this; torch is pinned and the test
    (tests/test_fsdp.py) checks that no trace is left."""
    import torch
    from torch.distributed._composable.contract import REGISTRY_KEY, STATE_KEY
    from torch.distributed._composable_state import _module_state_mapping
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not sharded:
        return model
    for m in sharded:
        m.reshard()
    whole: dict[int, torch.nn.Parameter] = {}
    for m in model.modules():
        for name, p in list(m._parameters.items()):
            if isinstance(p, DTensor):
                if id(p) not in whole:
                    whole[id(p)] = torch.nn.Parameter(full(p).clone(), requires_grad=p.requires_grad)
                m._parameters[name] = whole[id(p)]
    for m in sharded:
        state = m._get_fsdp_state()
        handles = [state._pre_forward_hook_handle, state._post_forward_hook_handle]
        for group in state._fsdp_param_groups:
            handles += [*group._module_to_pre_save_state_dict_hook_handle.values(),
                        *group._module_to_pre_load_state_dict_hook_handle.values()]
            handles += [p._post_load_hook_handle for p in group.fsdp_params if hasattr(p, "_post_load_hook_handle")]
        for h in handles:
            if h is not None:
                h.remove()
        m.__class__ = next(c for c in type(m).__mro__ if not issubclass(c, FSDPModule))
        for key in (STATE_KEY, REGISTRY_KEY):
            m.__dict__.pop(key, None)
        _module_state_mapping.pop(m, None)
    return model
