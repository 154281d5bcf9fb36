"""XCA: cross-covariance attention, as a conversion of a pretrained encoder's attention.

El-Nouby et al., "XCiT: Cross-Covariance Image Transformers", NeurIPS 2021, https://arxiv.org/abs/2106.09681
(facebookresearch/xcit). Attention runs across channels instead of tokens: per head, with the layer's own
Q, K, V [T, d], each channel (column) of Q and K is L2-normalised over the tokens, A = softmax(tau Q^T K) is a
[d, d] matrix (softmax over the key channels, as in the reference code), and token t's output is A v_t: a mixing
of its own value channels that every token shares. Cost O(T d^2) instead of O(T^2 d); tau is a learned
temperature per head (1 at conversion, as in XCiT).

Bidirectional models only: the channel statistics sum over the whole sequence (a causal form would need one
matrix per prefix, which the paper does not define). Padding tokens are left out of the normalisation and the
covariance, so they change no real token's output. The function differs from softmax attention: a converted
layer needs `distill` (which trains tau per head) and usually `finetune`.
"""
from __future__ import annotations

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from attnswap_kernels import per_query_head

from .. import Options
from . import register
from .base import AttentionMethod, key_padding_keep


class XCAOptions(Options):
    temperature: float = Field(1.0, gt=0, description="initial temperature tau of every head (XCiT: 1)")
    eps: float = Field(1e-6, gt=0, description="epsilon of the channel L2 normalisation")


def xca(q, k, v, tau, keep=None, eps: float = 1e-6):
    """q [B, H, T, d], k/v [B, H, T, d] (heads matched), tau [H], keep [B, T] (False = padding) or None ->
    [B, H, T, d]: out_t = softmax(tau q_hat^T k_hat) v_t, channels of q and k L2-normalised over the kept tokens."""
    if keep is not None:
        m = keep[:, None, :, None].to(q.dtype)
        q, k = q * m, k * m
    dt = torch.promote_types(q.dtype, torch.float32)
    qn = F.normalize(q.to(dt), dim=-2, eps=eps)  # over tokens
    kn = F.normalize(k.to(dt), dim=-2, eps=eps)
    attn = torch.softmax(qn.transpose(-1, -2) @ kn * tau.to(dt).view(1, -1, 1, 1), dim=-1)  # [B, H, d, d]
    return (v.to(dt) @ attn.transpose(-1, -2)).to(v.dtype)  # out[t, i] = sum_j A[i, j] v[t, j]


@register
class XCA(AttentionMethod):
    name = "xca"
    uses_mask = False  # reads the padding only
    directions = frozenset({"bidirectional"})
    summary = "cross-covariance attention (XCiT): a [d, d] channel attention per head, O(T d^2)"
    Options = XCAOptions
    adds = "a temperature per head (1 at conversion); trained by distill"

    def __init__(self, options, site, geometry, adapter):
        super().__init__(options, site, geometry, adapter)
        self.tau = nn.Parameter(torch.full((geometry.num_heads,), float(options.temperature)))

    def forward(self, module, query, key, value, attention_mask, **kwargs):
        h = query.shape[1]
        out = xca(query, per_query_head(key, h), per_query_head(value, h), self.tau, key_padding_keep(attention_mask),
                  self.options.eps)
        return out.transpose(1, 2), None
