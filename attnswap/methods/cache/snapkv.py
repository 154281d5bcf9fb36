"""snapkv (Li et al. 2024, "SnapKV", arXiv 2404.14469): the attention of the last `window` queries (the
observation window), averaged and max-pooled over neighbouring positions (kernel 7); the window is kept.

`convention: kvpress` scores as kvpress's SnapKVPress: the window's mean attention over the entries before the
window, average-pooled (kernel 5, zero padding counted) and averaged over each KV group; the window is kept
(kvpress's default window is 64: set `window: 64` to match it)."""
import torch
from pydantic import Field

from . import register
from .base import CONVENTION_HELP, CacheOptions, CachePolicy, Convention, protect_recent


class SnapKVOptions(CacheOptions):
    window: int = Field(32, ge=1, description="observation window (its tokens are kept)")
    convention: Convention = Field("attnswap", description=CONVENTION_HELP)


@register
class SnapKV(CachePolicy):
    name = "snapkv"
    summary = "attention of an observation window of recent queries, max-pooled (SnapKV)"
    Options = SnapKVOptions
    rows = True

    def score(self, layer, rows):
        window = rows[:, :, -self.options.window:].mean(2)  # [B, Hkv, N]
        b, hk, n = window.shape
        if self.options.convention == "kvpress":
            # pooled over the entries before the window only: entries are in position order with the window right
            # after them, so zeroing the window is kvpress's zero padding. The group mean commutes with the window
            # mean and the average pool, so the group-mean rows give kvpress's scores.
            before = (layer.pos < layer.seen - self.options.window) & layer.valid  # [B, Hkv, N]
            x = window.masked_fill(~before, 0.0).reshape(b * hk, 1, n)
            pooled = torch.nn.functional.avg_pool1d(x, 5, stride=1, padding=2).view(b, hk, n)
            return protect_recent(torch.where(before, pooled, window), layer, self.options.window)
        pooled = torch.nn.functional.max_pool1d(window.reshape(b * hk, 1, n), 7, stride=1, padding=3).view(b, hk, n)
        return protect_recent(pooled, layer, self.options.window)
