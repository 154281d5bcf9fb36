"""Differential attention (Diff Transformer) as a conversion of a pretrained attention layer.

Ye et al., "Differential Transformer", ICLR 2025, https://arxiv.org/abs/2410.05258 (microsoft/unilm
Diff-Transformer; transformers' DiffLlama). Per head, with q, k split in two halves:

    O = (softmax(q1 k1^T s) - lambda softmax(q2 k2^T s)) V,   s = (D/2)^-1/2
    O <- RMSNorm(O) * (1 - lambda_init)                       (per head, one learned weight [D] per layer)
    lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init,   lambda_init = 0.8 - 0.6 exp(-0.3 (layer - 1))

Mapping from the pretrained weights: q, k, v, o projections are kept; the halves are chosen so that each
holds whole RoPE rotation pairs (dims i and i + D/2 rotate together, so half 1 = pairs i < D/4 and half 2 =
pairs i >= D/4). Then q1.k1 + q2.k2 = q.k, each half still depends on relative position only, and the first
softmax sees half of every pretrained score. This is not the original attention (a different function, not a
reparametrisation): the converted model starts worse and needs fine-tuning; its starting perplexity is in
docs/methods/diff.md. New parameters: lq1, lk1, lq2, lk2 ([D/2] each, N(0, 0.1) as in the reference code) and
the norm weight ([D], ones) per layer. Layers are numbered from 1 in lambda_init.
"""
import math

import torch
from pydantic import Field
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ...errors import AttnswapError
from .. import Options
from . import register
from .base import AttentionMethod


class DiffOptions(Options):
    lambda_std: float = Field(0.1, ge=0, description="std of the lambda vectors lq1, lk1, lq2, lk2 at conversion")
    eps: float = Field(1e-5, gt=0, description="epsilon of the per-head RMS norm")


def half_indices(head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dims of the two halves: whole RoPE rotation pairs (i, i + D/2) in each; half 1 = pairs i < D/4."""
    if head_dim % 4:
        raise AttnswapError(f"diff: the head dim must be divisible by 4 (two halves of whole RoPE pairs), got {head_dim}")
    quarter, half = head_dim // 4, head_dim // 2
    first = torch.cat([torch.arange(quarter), torch.arange(half, half + quarter)])
    second = torch.cat([torch.arange(quarter, half), torch.arange(half + quarter, head_dim)])
    return first, second


def lambda_init_for(layer: int) -> float:
    """lambda_init of the 1-based layer `layer` (Diff Transformer's depth schedule)."""
    return 0.8 - 0.6 * math.exp(-0.3 * (layer - 1))


@register
class DiffAttention(AttentionMethod):
    name = "diff"
    summary = "Differential attention (two half-dim softmaxes subtracted, per-head RMS norm), from pretrained q/k halves"
    Options = DiffOptions
    adds = "lambda vectors (4 x D/2) and a norm weight (D) per layer; trained by finetune"

    def __init__(self, options, site, geometry, adapter):
        super().__init__(options, site, geometry, adapter)
        d = geometry.head_dim
        first, second = half_indices(d)
        self.register_buffer("first", first, persistent=False)
        self.register_buffer("second", second, persistent=False)
        self.lambda_init = lambda_init_for(site.index + 1)
        g = torch.Generator().manual_seed(1000 + site.index)
        self.lambdas = nn.Parameter(torch.randn(4, d // 2, generator=g) * options.lambda_std)  # lq1, lk1, lq2, lk2
        self.norm_weight = nn.Parameter(torch.ones(d))

    def lam(self) -> torch.Tensor:
        lq1, lk1, lq2, lk2 = self.lambdas.float()
        return torch.exp((lq1 * lk1).sum()) - torch.exp((lq2 * lk2).sum()) + self.lambda_init

    def forward(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        d = query.shape[-1]
        s = (d // 2) ** -0.5
        kwargs.pop("dropout", None)
        parts = []
        for idx in (self.first, self.second):
            o, _ = sdpa_attention_forward(module, query[..., idx], key[..., idx], value, attention_mask,
                                          scaling=s, dropout=0.0, **kwargs)
            parts.append(o.float())  # [B, T, H, D]
        o = parts[0] - self.lam() * parts[1]
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.options.eps) * self.norm_weight.float()
        return (o * (1 - self.lambda_init)).to(query.dtype), None
