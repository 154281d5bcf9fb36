"""The cache-policy interface: a policy scores every cached entry of a layer per KV head (higher = keep).

A policy instance is attached to each attention module whose cache it prunes (its `attnswap_cache`
submodule); during prefill and decoding with `attnswap.generation.make_cache` the layer's cache is a
`PrunedLayer`, which every `interval` tokens asks the policy for scores and keeps the best `budget` x tokens
seen per KV head. `rows = True` asks for the attention rows of the queries since the last eviction (the cache
recomputes only those). A policy is ~10 lines: `score()` (see streaming.py). Without that cache (a plain
forward, training) the model is unchanged. Baselines follow NVIDIA/kvpress and their papers.
"""
from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from .. import Method, Options


Convention = Literal["attnswap", "kvpress"]
CONVENTION_HELP = ("attnswap: the policy as its paper describes it (documented per policy); kvpress: the scoring of "
                   "NVIDIA/kvpress's press of the same name, to compare with kvpress's published numbers")


class CacheOptions(Options):
    budget: float | None = Field(0.5, gt=0, le=1, description="fraction of the tokens seen that each layer and KV "
                                                              "head keeps")
    interval: int = Field(512, ge=1, description="score and evict every N tokens")


class CachePolicy(Method, nn.Module):
    kind = "cache"
    Options: ClassVar[type[CacheOptions]] = CacheOptions
    directions = frozenset({"causal"})
    # the policy needs the attention rows of the queries since the last eviction
    rows: ClassVar[bool] = False
    # the policy may run without a budget (budget null: it keeps the entries that score above 0)
    free_budget: ClassVar[bool] = False
    # names of buffers a search (`attnswap evolve`) may set: a flat parameter vector shared by every layer
    evolvable: ClassVar[str | None] = None

    def __init__(self, options: CacheOptions, site, geometry, adapter):
        super().__init__()
        self.options = options
        self.layer_index = site.index

    @classmethod
    def check_options(cls, options: CacheOptions) -> None:
        from ...errors import AttnswapError

        if options.budget is None and not cls.free_budget:
            raise AttnswapError(f"cache policy '{cls.name}' needs a budget (a fraction in (0, 1])")

    def make_cache_layer(self):
        """The cache layer this policy runs in during prefill and decoding."""
        from .pruned import PrunedLayer

        return PrunedLayer(self)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return []  # a policy's parameters are searched (evolve), not trained by gradient

    def score(self, layer, rows: torch.Tensor | None) -> torch.Tensor:
        """[B, Hkv, N] scores of the layer's entries; rows [B, Hkv, R, N] (or None) from the recent queries.
        `layer` is the `PrunedLayer`: keys, values, pos (original positions), valid, seen, stats (per-entry
        state the policy may keep, aligned with the entries)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.options.model_dump().items())


def protect_recent(score: torch.Tensor, layer, window: int) -> torch.Tensor:
    """Scores with the last `window` tokens raised to +inf (always kept)."""
    return score.masked_fill(layer.pos >= layer.seen - window, torch.inf)
