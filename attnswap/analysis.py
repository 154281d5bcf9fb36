"""Measurements of attention heads, for choosing heads to adapt and for before/after analyses (DEX, Diff).

`recording(model)` collects every attention layer's per-head output (what the o-projection receives, split by
head) during the forward passes inside the block, for converted and plain models alike. `head_redundancy`
turns one layer's outputs into each head's mean cosine similarity to the other heads of the layer (per token,
averaged over tokens): the head-redundancy measure of the Diff/DEX analyses.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from . import attention
from .arch import adapter_for
from .surgery import _base


@contextlib.contextmanager
def recording(model: nn.Module):
    """Yields a dict filled during the block: layer index -> list of per-head outputs [B, T, H, D] (one per call)."""
    base = _base(model)
    layer_of = {id(s.module): s.index for s in adapter_for(base.config).sites(base)}
    previous = base.config._attn_implementation
    base.set_attn_implementation(attention.ensure_registered())
    calls: list = []
    attention.RECORDERS.append(calls)
    found: dict[int, list[torch.Tensor]] = {}
    try:
        yield found
    finally:
        attention.RECORDERS.remove(calls)
        if previous != attention.IMPLEMENTATION:
            base.set_attn_implementation(previous)
        for module, out in calls:
            found.setdefault(layer_of[id(module)], []).append(out)


def head_redundancy(out: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """out [B, T, H, D] -> [H]: each head's mean cosine similarity to the layer's other heads, over tokens.

    keep [B, T] (False = padding) leaves tokens out of the mean.
    """
    x = torch.nn.functional.normalize(out.double(), dim=-1)
    cos = torch.einsum("bthd,btgd->bthg", x, x)  # [B, T, H, H]
    w = torch.ones(out.shape[:2], dtype=torch.float64, device=out.device) if keep is None else keep.double()
    mean = (cos * w[..., None, None]).sum((0, 1)) / w.sum()
    h = out.shape[2]
    return (mean.sum(-1) - mean.diagonal()) / (h - 1)
