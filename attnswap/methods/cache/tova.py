"""tova (Oren et al. 2024, "Transformers are Multi-State RNNs", arXiv 2401.06104): the attention of the last
query.

`convention: kvpress` scores as kvpress's TOVAPress: the last query's attention averaged over all query heads
(the same scores for every KV head), and the last token always kept."""
from pydantic import Field

from . import register
from .base import CONVENTION_HELP, CacheOptions, CachePolicy, Convention, protect_recent


class TOVAOptions(CacheOptions):
    convention: Convention = Field("attnswap", description=CONVENTION_HELP)


@register
class TOVA(CachePolicy):
    name = "tova"
    summary = "the attention of the last query (TOVA)"
    Options = TOVAOptions
    rows = True

    def score(self, layer, rows):
        last = rows[:, :, -1]  # [B, Hkv, N], each KV head's group mean
        if self.options.convention == "kvpress":  # the mean over every query head (groups are equal in size)
            return protect_recent(last.mean(1, keepdim=True).expand_as(last), layer, 1)
        return last
