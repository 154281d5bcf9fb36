"""knorm (Devoto et al. 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression",
arXiv 2406.11430): a low key norm means keep."""
from . import register
from .base import CachePolicy


@register
class KNorm(CachePolicy):
    name = "knorm"
    summary = "keeps the keys of lowest L2 norm (no attention needed)"

    def score(self, layer, rows):
        return -layer.keys.float().norm(dim=-1)
