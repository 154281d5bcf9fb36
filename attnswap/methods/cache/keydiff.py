"""keydiff (Park et al. 2025, "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM Inference",
arXiv 2504.15364; kvpress's KeyDiffPress): keys least similar to the head's mean key are kept. Needs no
attention rows, so it runs where attention weights are never formed (and costs one mean per eviction)."""
import torch

from . import register
from .base import CachePolicy


@register
class KeyDiff(CachePolicy):
    name = "keydiff"
    summary = "keeps the keys least similar (cosine) to the head's mean key (KeyDiff)"

    def score(self, layer, rows):
        keys = torch.nn.functional.normalize(layer.keys.float(), dim=-1)  # [B, Hkv, N, D]
        w = layer.valid[..., None].float()
        anchor = torch.nn.functional.normalize((keys * w).sum(2, keepdim=True), dim=-1)  # mean direction
        return -(keys * anchor).sum(-1)
