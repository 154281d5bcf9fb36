"""h2o (Zhang et al. 2023, "H2O: Heavy-Hitter Oracle", arXiv 2306.14048): attention accumulated over every
query so far, plus the last `window` tokens kept (H2O's recent set)."""
import torch
from pydantic import Field

from . import register
from .base import CacheOptions, CachePolicy, protect_recent


class H2OOptions(CacheOptions):
    window: int = Field(32, ge=1, description="recent tokens always kept")


@register
class H2O(CachePolicy):
    name = "h2o"
    summary = "heavy hitters: attention accumulated over all queries so far + a recent window (H2O)"
    Options = H2OOptions
    rows = True

    def score(self, layer, rows):
        acc = layer.stats.get("h2o", torch.zeros_like(layer.pos, dtype=torch.float32)) + rows.sum(2)
        layer.stats["h2o"] = acc
        return protect_recent(acc, layer, self.options.window)
