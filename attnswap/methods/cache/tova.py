"""tova (Oren et al. 2024, "Transformers are Multi-State RNNs", arXiv 2401.06104): the attention of the last
query."""
from . import register
from .base import CachePolicy


@register
class TOVA(CachePolicy):
    name = "tova"
    summary = "the attention of the last query (TOVA)"
    rows = True

    def score(self, layer, rows):
        return rows[:, :, -1]
