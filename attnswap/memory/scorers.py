"""Scorers: each gives every cached entry of a layer a score per KV head (higher = keep).

`rows` says whether the scorer needs the attention rows of the queries since the last eviction (the
cache recomputes only those). Baselines follow NVIDIA/kvpress and their papers:
- streaming (StreamingLLM, Xiao et al. 2023): the first `sinks` tokens and the most recent ones.
- h2o (Zhang et al. 2023, "Heavy-Hitter Oracle"): attention accumulated over every query so far, plus the
  last `window` tokens kept (H2O's recent set).
- tova (Oren et al. 2024, "Transformers are Multi-State RNNs"): the attention of the last query.
- snapkv (Li et al. 2024): the attention of the last `window` queries (the observation window), averaged
  and max-pooled over neighbouring positions (kernel 7); the window itself is kept.
- knorm (Devoto et al. 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression"):
  low key norm = keep.
- random: seeded uniform scores.
- namm (Cetin et al. 2024, "An Evolved Universal Transformer Memory"): see `attnswap.memory.namm`.
"""
from __future__ import annotations

from typing import ClassVar

import torch

SCORERS: dict[str, type["Scorer"]] = {}


def register(cls):
    SCORERS[cls.name] = cls
    return cls


class Scorer:
    name: ClassVar[str]
    rows: ClassVar[bool] = False

    def __init__(self, variant):
        self.variant = variant
        self.options = variant.options

    def score(self, layer, rows: torch.Tensor | None) -> torch.Tensor:
        """[B, Hkv, N] scores of the layer's entries; rows [B, Hkv, R, N] (or None) from the recent queries."""
        raise NotImplementedError


def _protect_recent(score: torch.Tensor, layer, window: int) -> torch.Tensor:
    return score.masked_fill(layer.pos >= layer.seen - window, torch.inf)


@register
class Streaming(Scorer):
    name = "streaming"

    def score(self, layer, rows):
        return layer.pos.float().masked_fill(layer.pos < self.options.sinks, torch.inf)


@register
class H2O(Scorer):
    name = "h2o"
    rows = True

    def score(self, layer, rows):
        acc = layer.stats.get("h2o", torch.zeros_like(layer.pos, dtype=torch.float32)) + rows.sum(2)
        layer.stats["h2o"] = acc
        return _protect_recent(acc, layer, self.options.window)


@register
class TOVA(Scorer):
    name = "tova"
    rows = True

    def score(self, layer, rows):
        return rows[:, :, -1]


@register
class SnapKV(Scorer):
    name = "snapkv"
    rows = True

    def score(self, layer, rows):
        window = rows[:, :, -self.options.window:].mean(2)  # [B, Hkv, N]
        b, hk, n = window.shape
        pooled = torch.nn.functional.max_pool1d(window.reshape(b * hk, 1, n), 7, stride=1, padding=3).view(b, hk, n)
        return _protect_recent(pooled, layer, self.options.window)


@register
class KNorm(Scorer):
    name = "knorm"

    def score(self, layer, rows):
        return -layer.keys.float().norm(dim=-1)


@register
class Random(Scorer):
    name = "random"

    def score(self, layer, rows):
        g = torch.Generator().manual_seed(self.options.seed * 1_000_003 + self.variant.layer_index * 1009 + layer.evictions)
        return torch.rand(layer.pos.shape, generator=g).to(layer.pos.device)
