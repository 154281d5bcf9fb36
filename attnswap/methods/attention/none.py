"""The original attention, computed through attnswap: exact softmax attention by SDPA, no new parameters.

A plan entry with `method: none` keeps those layers exact while other entries convert the rest (the same as
leaving them out of the plan, but written down); it is also the smallest attention method, the template in
docs/architecture.md. It takes the KV cache as it comes, so a cache policy prunes it like an original layer's.
"""

from ...attention import exact_attention
from . import register
from .base import AttentionMethod


@register
class NoChange(AttentionMethod):
    name = "none"
    softcap = True
    takes_scores = True
    summary = "the original softmax attention (SDPA), written into a plan to keep layers exact"
    exact = True

    def forward(self, module, query, key, value, attention_mask, **kwargs):
        return exact_attention(module, query, key, value, attention_mask, **kwargs)
