"""snapkv (Li et al. 2024, "SnapKV", arXiv 2404.14469): the attention of the last `window` queries (the
observation window), averaged and max-pooled over neighbouring positions (kernel 7); the window is kept."""
import torch
from pydantic import Field

from . import register
from .base import CacheOptions, CachePolicy, protect_recent


class SnapKVOptions(CacheOptions):
    window: int = Field(32, ge=1, description="observation window (its tokens are kept)")


@register
class SnapKV(CachePolicy):
    name = "snapkv"
    summary = "attention of an observation window of recent queries, max-pooled (SnapKV)"
    Options = SnapKVOptions
    rows = True

    def score(self, layer, rows):
        window = rows[:, :, -self.options.window:].mean(2)  # [B, Hkv, N]
        b, hk, n = window.shape
        pooled = torch.nn.functional.max_pool1d(window.reshape(b * hk, 1, n), 7, stride=1, padding=3).view(b, hk, n)
        return protect_recent(pooled, layer, self.options.window)
