"""Separable self-attention (MobileViTv2), as a conversion of a pretrained encoder's attention.

Mehta and Rastegari, "Separable Self-attention for Mobile Vision Transformers", TMLR 2023,
https://arxiv.org/abs/2206.02680 (apple/ml-cvnets). Instead of every token attending to every token, one latent
token attends to all of them: context scores c = softmax over tokens of the latent token's scores, a context
vector c_v = sum_t c_t k_t of the keys, and every token's output is ReLU(v_t) * c_v (element-wise): O(T d).

attnswap maps it onto a layer's own q, k, v per head: the latent token is a learned query l_h [d] per head
(scores l_h . k_t x scale; zeros at conversion, so the context starts as the mean key), and a learned gain g_h [d]
(ones at conversion) scales the context vector: out_t = ReLU(v_t) * (g_h * c_v). The queries are not used (the
paper has none). Bidirectional models only: the context vector sums the whole sequence (a causal form, one per
prefix, is not the paper's). Padding tokens are left out of the softmax. A different function from softmax
attention: a converted layer needs `distill` (which trains l and g) and usually `finetune`.
"""
from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from attnswap_kernels import per_query_head

from .. import Options
from . import register
from .base import AttentionMethod, key_padding_keep


class SeparableOptions(Options):
    relu: bool = Field(True, description="ReLU on the values, as the paper (false: the values as they are)")


def separable(k, v, latent, gain, keep=None, scale: float | None = None, relu: bool = True):
    """k, v [B, H, T, d], latent and gain [H, d], keep [B, T] (False = padding) or None -> [B, H, T, d]:
    out_t = f(v_t) * gain * sum_s softmax_s(latent . k_s x scale) k_s, f = ReLU or the identity."""
    dt = torch.promote_types(k.dtype, torch.float32)
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("bhtd,hd->bht", k.to(dt), latent.to(dt)) * scale
    if keep is not None:
        scores = scores.masked_fill(~keep[:, None, :], float("-inf"))
    weights = torch.softmax(scores, dim=-1)  # [B, H, T]
    context = torch.einsum("bht,bhtd->bhd", weights, k.to(dt)) * gain.to(dt)[None]
    vals = torch.relu(v.to(dt)) if relu else v.to(dt)
    return (vals * context[:, :, None, :]).to(v.dtype)


@register
class Separable(AttentionMethod):
    name = "separable"
    uses_mask = False  # reads the padding only
    directions = frozenset({"bidirectional"})
    summary = "separable self-attention (MobileViTv2): one learned latent query, a context vector, O(T d)"
    Options = SeparableOptions
    adds = "a latent query and a context gain per head (d each); trained by distill"

    def __init__(self, options, site, geometry, adapter):
        super().__init__(options, site, geometry, adapter)
        h, d = geometry.num_heads, geometry.head_dim
        self.latent = nn.Parameter(torch.zeros(h, d))
        self.gain = nn.Parameter(torch.ones(h, d))

    def forward(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        h = query.shape[1]
        out = separable(per_query_head(key, h), per_query_head(value, h), self.latent, self.gain,
                        key_padding_keep(attention_mask), scaling, self.options.relu)
        return out.transpose(1, 2), None
