"""Exact softmax attention restricted to a local window plus a few "sink" tokens.

StreamingLLM: Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024,
https://arxiv.org/abs/2309.17453. Causal models: query i attends key j iff j <= i and (i - j < window or
j < sinks). Bidirectional models: |i - j| < window or j < sinks. Positions are cache indices, so the rule
holds unchanged during generation. Computed by SDPA with a boolean band mask [1, 1, Tq, Tk]; a causal full
forward on the CPU without padding, dropout, soft-capping or a score modifier runs the compiled band kernel
instead (`attnswap_kernels.sparse_attn.window_attention`), which computes only the band and the sinks.
"""
import torch
from pydantic import Field

from attnswap_kernels.sparse_attn import window_attention

from ...attention import SCORE_MODIFIER, attention_weights, compiled_causal, exact_attention
from .. import Options
from . import register
from .base import AttentionMethod


class SlidingWindowOptions(Options):
    window: int = Field(256, ge=1, description="tokens each query sees around itself (itself included)")
    sinks: int = Field(4, ge=0, description="first tokens every query always sees (attention sinks)")


def band_mask(q_len: int, kv_len: int, window: int, sinks: int, causal: bool, device) -> torch.Tensor:
    """[1, 1, Tq, Tk] boolean, True = attend. Queries are the last Tq positions of the Tk keys."""
    i = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]  # [Tq, 1]
    j = torch.arange(kv_len, device=device)[None, :]  # [1, Tk]
    dist = i - j
    near = (dist < window) & (dist >= 0) if causal else dist.abs() < window
    keep = near | (j < sinks)
    keep = keep & (j <= i) if causal else keep
    return keep[None, None]


@register
class SlidingWindow(AttentionMethod):
    name = "sliding-window"
    softcap = True
    takes_scores = True
    summary = "exact softmax over a local window plus sink tokens (StreamingLLM)"
    Options = SlidingWindowOptions

    def band_kernel(self, query, key, attention_mask, kwargs) -> bool:
        """True where the compiled band kernel computes exactly what SDPA with the band mask would: a causal full
        forward of float32/64 CPU tensors with no padding mask, no dropout, no soft-capping, no score modifier."""
        return (self.causal and kwargs.get("softcap") is None and kwargs.get(SCORE_MODIFIER) is None
                and compiled_causal(query, key, attention_mask, kwargs))

    def forward(self, module, query, key, value, attention_mask, **kwargs):
        if self.band_kernel(query, key, attention_mask, kwargs):
            out = window_attention(query, key, value, window=self.options.window, sinks=self.options.sinks,
                                   scale=kwargs.get("scaling"))
            return out.transpose(1, 2), None
        q_len, kv_len = query.shape[2], key.shape[2]
        band = band_mask(q_len, kv_len, self.options.window, self.options.sinks, self.causal, query.device)
        if attention_mask is None:
            mask = band
        elif attention_mask.dtype == torch.bool:
            mask = attention_mask & band
        else:
            mask = attention_mask.masked_fill(~band, torch.finfo(attention_mask.dtype).min)
        # the band already carries causality; SDPA must not add its own on top of an explicit mask
        kwargs.pop("is_causal", None)
        return exact_attention(module, query, key, value, mask, is_causal=False, **kwargs)

    def attention_probs(self, query, key, scale: float) -> torch.Tensor:
        """[B, H, Tq, Tk] float64: the softmax over the band and sinks this method attends (`attnswap inspect`)."""
        mask = band_mask(query.shape[2], key.shape[2], self.options.window, self.options.sinks, self.causal,
                         query.device)
        return attention_weights(query, key, scale, mask)
