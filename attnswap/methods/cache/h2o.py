"""h2o (Zhang et al. 2023, "H2O: Heavy-Hitter Oracle", arXiv 2306.14048): attention accumulated over every
query so far, plus the last `window` tokens kept (H2O's recent set).

`convention: kvpress` scores as kvpress's ObservedAttentionPress (its H2O): the accumulated attention divided by
the number of queries that could see the entry (seen - position), averaged over each KV group, no recent set."""
import torch
from pydantic import Field

from . import register
from .base import CONVENTION_HELP, CacheOptions, CachePolicy, Convention, protect_recent


class H2OOptions(CacheOptions):
    window: int = Field(32, ge=1, description="recent tokens always kept (convention attnswap)")
    convention: Convention = Field("attnswap", description=CONVENTION_HELP)


@register
class H2O(CachePolicy):
    name = "h2o"
    summary = "heavy hitters: attention accumulated over all queries so far + a recent window (H2O)"
    Options = H2OOptions
    rows = True

    def score(self, layer, rows):
        acc = layer.stats.get("h2o", torch.zeros_like(layer.pos, dtype=torch.float32)) + rows.sum(2)
        layer.stats["h2o"] = acc
        if self.options.convention == "kvpress":
            return acc / (layer.seen - layer.pos).clamp_min(1)
        return protect_recent(acc, layer, self.options.window)
