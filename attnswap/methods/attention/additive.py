"""Efficient additive attention (SwiftFormer), as a conversion of a pretrained encoder's attention.

Shaker et al., "SwiftFormer: Efficient Additive Attention for Transformer-based Real-time Mobile Vision
Applications", ICCV 2023, https://arxiv.org/abs/2303.15446 (Amshaker/SwiftFormer); the additive similarity of
CAS-ViT (arXiv 2408.03703) is the same family. No key-value product: q and k are L2-normalised per token, learned
token weights a_t = q_t . w_g x d^-1/2, L2-normalised over the tokens, pool the queries into one global query
G = sum_t a_t q_t, which interacts with every key element-wise; a linear layer takes the place of the key-value
interaction: out_t = Proj(G * k_t) + q_t (the reference code's form; its final linear is the layer's own output
projection here). O(T d) per head, plus a d x d product per token.

attnswap maps it onto a layer's own q and k per head (the values are not used, as in the paper); w_g [d] and Proj
([d, d] and a bias) are new per head, initialised as the reference code's layers are (w_g ~ N(0, 1), Proj like
`nn.Linear`), seeded by the layer. Bidirectional models only (the global query pools the whole sequence). Padding
tokens get no weight. A different function from softmax attention: a converted layer needs `distill` (which trains
w_g and Proj) and usually `finetune`.
"""
from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from attnswap_kernels import per_query_head

from .. import Options
from . import register
from .base import AttentionMethod, key_padding_keep


class AdditiveOptions(Options):
    seed: int = Field(0, ge=0, description="seed of w_g and Proj's initialisation (layer l uses seed + l)")


def additive(q, k, w_g, proj_w, proj_b, keep=None):
    """q, k [B, H, T, d], w_g [H, d], proj_w [H, d, d] (out, in), proj_b [H, d], keep [B, T] or None -> [B, H, T, d]."""
    dt = torch.promote_types(q.dtype, torch.float32)
    qn, kn = F.normalize(q.to(dt), dim=-1), F.normalize(k.to(dt), dim=-1)
    a = torch.einsum("bhtd,hd->bht", qn, w_g.to(dt)) * q.shape[-1] ** -0.5
    if keep is not None:
        a = a * keep[:, None, :].to(dt)
    a = F.normalize(a, dim=-1)  # over tokens
    g = torch.einsum("bht,bhtd->bhd", a, qn)  # the global query
    out = torch.einsum("bhtd,hed->bhte", g[:, :, None, :] * kn, proj_w.to(dt)) + proj_b.to(dt)[None, :, None, :]
    return (out + qn).to(q.dtype)


@register
class Additive(AttentionMethod):
    name = "additive"
    uses_mask = False  # reads the padding only
    directions = frozenset({"bidirectional"})
    summary = "efficient additive attention (SwiftFormer): a pooled global query, element-wise with keys, O(T d)"
    Options = AdditiveOptions
    adds = "token weights w_g (d) and a d x d projection with bias per head; trained by distill"

    def __init__(self, options, site, geometry, adapter):
        super().__init__(options, site, geometry, adapter)
        h, d = geometry.num_heads, geometry.head_dim
        g = torch.Generator().manual_seed(options.seed + site.index)
        bound = 1 / math.sqrt(d)  # nn.Linear's default range
        self.w_g = nn.Parameter(torch.randn(h, d, generator=g))
        self.proj_w = nn.Parameter((torch.rand(h, d, d, generator=g) * 2 - 1) * bound)
        self.proj_b = nn.Parameter((torch.rand(h, d, generator=g) * 2 - 1) * bound)

    def forward(self, module, query, key, value, attention_mask, **kwargs):
        out = additive(query, per_query_head(key, query.shape[1]), self.w_g, self.proj_w, self.proj_b,
                       key_padding_keep(attention_mask))
        return out.transpose(1, 2), None
