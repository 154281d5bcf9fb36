"""SOFT: softmax-free attention, a Gaussian kernel approximated by Nystrom landmarks, for a pretrained encoder.

Lu et al., "SOFT: Softmax-free Transformer with Linear Complexity", NeurIPS 2021, https://arxiv.org/abs/2110.11945
(fudan-zvg/SOFT). The attention matrix is a Gaussian kernel S_ij = exp(-||q_i - k_j||^2 x s / 2) (the paper:
s = 1/sqrt(d), with q = k from one shared projection), never formed: with m landmarks q~, k~ (means of m
consecutive segments of the tokens, the paper's pooling) S ~ G(Q, K~) G(Q~, K~)^+ G(Q~, K), where ^+ is the
Moore-Penrose inverse computed in the forward pass by Newton-Schulz iterations X <- X (2I - B X) from
X0 = B^T / (||B||_1 ||B||_inf) (it converges to B^+ for any B, singular ones included, and its gradient is the
gradient of the iterations, with no eigen-decomposition to become unstable). O(T m d + m^3).

For a pretrained layer, attnswap uses the layer's scale s and, by default, the pretrained q and k (`shared: true`
uses the queries on both sides, the paper's q = k). Its output is, with `normalize: true` (the default),
S D V / S D 1 with D = diag(exp(s ||k_j||^2 / 2)): exactly the softmax attention of q and k when the landmarks
are the tokens themselves and the inverse is exact (tested), since S_ij D_j = exp(s q_i.k_j - s ||q_i||^2 / 2);
with `normalize: false`, the paper's unnormalised S V. A temperature per head multiplies s (1 at conversion, the
exp of a parameter so that it stays positive), trained by `distill`. Bidirectional models only (landmarks pool the
whole sequence). Padding tokens are in no landmark and no key, so they change no real token; an input with fewer
real tokens than landmarks has every real token as a landmark and the rest unused. Measured on MiniLM:
docs/methods/soft.md.
"""
from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from attnswap_kernels import per_query_head

from .. import Options
from . import register
from .base import AttentionMethod, key_padding_keep


DEN_FLOOR = 0.05  # of a head's median row sum (normalize: true)


class SoftOptions(Options):
    landmarks: int = Field(64, ge=1, description="Nystrom landmarks m: means of m consecutive segments of the tokens")
    sinks: int = Field(0, ge=0, description="the first real tokens as landmarks of their own (attention sinks); "
                                            "measured no better on MiniLM: docs/methods/soft.md")
    iterations: int = Field(8, ge=1, description="Newton-Schulz iterations of the landmark matrix's pseudo-inverse "
                                                 "(fewer: a more regularised inverse; on MiniLM 8 measured stable, 12 "
                                                 "and more let rare rows blow up: docs/methods/soft.md)")
    shared: bool = Field(False, description="use the queries as keys too (the paper's q = k); false: the pretrained "
                                            "q and k")
    normalize: bool = Field(True, description="divide by the rows' sums, with the keys' norms factored out (softmax "
                                              "attention when exact); false: the paper's unnormalised kernel")
    temperature: float = Field(1.0, gt=0, description="initial temperature of every head (multiplies the scale)")


def newton_schulz_pinv(b: torch.Tensor, iterations: int) -> torch.Tensor:
    """Moore-Penrose inverse of b [..., m, n] by Newton-Schulz iterations X <- X (2I - b X), X0 = b^T / (|b|_1 |b|_inf)."""
    bt = b.transpose(-1, -2)
    norms = b.abs().sum(-2).amax(-1) * b.abs().sum(-1).amax(-1)  # max column sum x max row sum
    x = bt / norms.clamp(min=torch.finfo(b.dtype).tiny)[..., None, None]
    eye = torch.eye(b.shape[-2], dtype=b.dtype, device=b.device)
    for _ in range(iterations):
        x = x @ (2 * eye - b @ x)
    return x


def segment_means(x: torch.Tensor, keep: torch.Tensor | None, m: int, sinks: int = 0):
    """x [B, H, T, d] -> (landmarks [B, H, m, d], used [B, m]). With n >= m real tokens: landmarks j < sinks are the
    real tokens of rank j (attention sinks, kept on their own), the other m - sinks are means of consecutive
    segments of the n' = n - sinks later real tokens, ranks sinks + floor(i n' / (m - sinks)) ..
    sinks + floor((i + 1) n' / (m - sinks)) - 1. With n < m: every real token is a landmark, and the m - n
    landmarks left over are unused (zero, `used` False)."""
    b, _, t, _ = x.shape
    if keep is None:
        keep = torch.ones(b, t, dtype=torch.bool, device=x.device)
    sinks = min(sinks, m - 1)
    n = keep.sum(1, keepdim=True)  # [B, 1]
    pos = keep.long().cumsum(1) - 1  # [B, T]
    i = torch.arange(m - sinks, device=x.device)[None]
    start, end = sinks + i * (n - sinks) // (m - sinks), sinks + (i + 1) * (n - sinks) // (m - sinks)
    j = torch.arange(sinks, device=x.device)[None].expand(b, sinks)
    start, end = torch.cat([j, start], 1), torch.cat([j + 1, end], 1)  # [B, m]
    few = n < m  # every real token its own landmark
    one = torch.arange(m, device=x.device)[None]
    start, end = torch.where(few, one, start), torch.where(few, one + 1, end)
    pool = (pos[:, None] >= start[..., None]) & (pos[:, None] < end[..., None]) & keep[:, None]  # [B, m, T]
    used = pool.any(-1)
    pool = pool.to(x.dtype)
    pool = pool / pool.sum(-1, keepdim=True).clamp(min=1)
    return torch.einsum("bmt,bhtd->bhmd", pool, x), used


def _sqdist(a, b):
    """a [..., M, d], b [..., N, d] -> [..., M, N] squared distances (clamped at 0)."""
    return ((a * a).sum(-1)[..., :, None] + (b * b).sum(-1)[..., None, :] - 2 * a @ b.transpose(-1, -2)).clamp(min=0)


def soft(q, k, v, tau, keep=None, landmarks: int = 64, iterations: int = 8, scale: float | None = None,
         normalize: bool = True, sinks: int = 0):
    """q, k, v [B, H, T, d] (heads matched), tau [H], keep [B, T] (False = padding) or None -> [B, H, T, d]:
    S V (normalize: S D V / S D 1) with S ~ G(q, k~) G(q~, k~)^+ G(q~, k), G(a, b) = exp(-s tau ||a - b||^2 / 2)."""
    dt = torch.promote_types(q.dtype, torch.float32)
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    s = (q.shape[-1] ** -0.5 if scale is None else scale) * tau.to(dt).view(1, -1, 1, 1)
    (qm, used), (km, _) = segment_means(q, keep, landmarks, sinks), segment_means(k, keep, landmarks, sinks)
    on = used[:, None, :].to(dt)  # [B, 1, m]: unused landmarks are in no factor (their rows and columns zero)
    # the m x m pseudo-inverse in float64 (cheap at m^3; fp32 rounding there is amplified by the conditioning)
    gram = torch.exp(-0.5 * s.double() * _sqdist(qm.double(), km.double())) * (on[..., None] * on[..., None, :]).double()
    w = newton_schulz_pinv(gram, iterations).to(dt)
    if not normalize:
        a = torch.exp(-0.5 * s * _sqdist(q, km)) * on[:, :, None, :]  # [B, H, T, m]
        c = torch.exp(-0.5 * s * _sqdist(qm, k)) * on[..., None]  # [B, H, m, T]
        if keep is not None:
            c = c * keep[:, None, None, :].to(dt)
        return (a @ (w @ (c @ v))).to(v.dtype)
    # in the ratio a factor per query cancels: G(q, k~) is used without its exp(-s |q|^2 / 2), and with each row's
    # maximum taken out (a query far from every landmark would otherwise get a row of underflowing values)
    loga = s * (q @ km.transpose(-1, -2)) - 0.5 * s * (km * km).sum(-1)[..., None, :]  # [B, H, T, m]
    loga = loga.masked_fill(~used[:, None, None, :], float("-inf"))
    a = torch.exp(loga - loga.amax(-1, keepdim=True))
    # G(q~, k) D = exp(s q~.k - s |q~|^2 / 2), in the log domain too; each landmark's maximum is moved into the
    # pseudo-inverse's column and the largest of them cancels in the ratio
    logc = s * (qm @ k.transpose(-1, -2)) - 0.5 * s * (qm * qm).sum(-1, keepdim=True)  # [B, H, m, T]
    if keep is not None:
        logc = logc.masked_fill(~keep[:, None, None, :], float("-inf"))
    top = logc.amax(-1, keepdim=True)  # [B, H, m, 1]
    c = torch.exp(logc - top) * on[..., None]
    top = top.masked_fill(~used[:, None, :, None], float("-inf"))
    w = w * torch.exp(top - top.amax(-2, keepdim=True)).transpose(-1, -2)
    aw = a @ w  # [B, H, T, m]
    num, den = aw @ (c @ v), aw @ c.sum(-1, keepdim=True)
    # the Nystrom form can bring a row's sum near zero (or below) where the kernel's is not: a floor at a fraction
    # of the head's median row sum (in size, over the real queries) bounds such rows (the query factor taken out
    # above puts rows on one scale)
    size = den.abs() if keep is None else den.abs().masked_fill(~keep[:, None, :, None], float("nan"))
    floor = DEN_FLOOR * size.nanmedian(dim=-2, keepdim=True).values.clamp(min=torch.finfo(dt).tiny)
    return (num / torch.maximum(den, floor)).to(v.dtype)


@register
class Soft(AttentionMethod):
    name = "soft"
    uses_mask = False  # reads the padding only
    directions = frozenset({"bidirectional"})
    summary = "SOFT: a Gaussian-kernel attention through Nystrom landmarks and a Newton-Schulz pseudo-inverse"
    Options = SoftOptions
    adds = "a temperature per head (1 at conversion); trained by distill"

    def __init__(self, options, site, geometry, adapter):
        super().__init__(options, site, geometry, adapter)
        self.log_tau = nn.Parameter(torch.full((geometry.num_heads,), float(options.temperature)).log())

    def forward(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        h, o = query.shape[1], self.options
        key = query if o.shared else per_query_head(key, h)
        out = soft(query, key, per_query_head(value, h), self.log_tau.exp(), key_padding_keep(attention_mask), o.landmarks,
                   o.iterations, scaling, o.normalize, o.sinks)
        return out.transpose(1, 2), None
