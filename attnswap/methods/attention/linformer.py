"""Linformer: keys and values projected along the sequence to a few pseudo-tokens, as a conversion of an encoder.

Wang et al., "Linformer: Self-Attention with Linear Complexity", 2020, https://arxiv.org/abs/2006.04768
(facebookresearch/fairseq, examples/linformer). Keys and values [n, d] are multiplied along the sequence by
E, F [r, n] (r << n): out = softmax(Q (E K)^T x scale) (F V), so a query meets r pseudo-tokens instead of n tokens:
O(n r d). One E and one F per layer, shared by its heads (the paper's headwise sharing).

Initialisation, never random. `init: pca` measures E and F: on calibration windows of the projection length n,
the uncentred second moment of the layer's key columns along the sequence (sum over windows, heads and channels
of k[:, c] k[:, c]^T, n x n) gives its top-r eigenvectors as E's rows, the values' as F's rows; each row is scaled
so that its entries' absolute values sum to 1, so a pseudo-token is a signed mix of tokens on one token's scale
(the top, near-constant direction becomes the mean key / mean value). `init: pooling` (the default) needs no
calibration: row i averages the i-th of r equal segments of positions (a pseudo-token is a segment's mean). On
MiniLM-L6 pooling measured better than pca on every number, untrained and after distillation
(docs/methods/linformer.md), hence the default.

Variable lengths, two ways (`lengths`):
- `pad` (the paper's): an input of T <= n real tokens uses E's and F's first T columns, the same as zero-padding it
  to n (the pseudo-tokens past the input are zero keys with zero values, and still take softmax mass);
- `adaptive` (the default): E and F are resampled along the positions to T columns (position p of n covers
  [p/n, (p+1)/n); its weight is spread over the T new positions by overlap, so each row keeps its sum: a segment
  mean stays a segment mean).
Padding tokens are left out and real tokens keep their order (position = rank among the real tokens), so padding
changes no real token. Inputs longer than n are refused in one line.
Bidirectional models only (a causal Linformer would mix future tokens into every pseudo-token). E and F are new
parameters: trained by `distill`, usually followed by `finetune`.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from attnswap_kernels import per_query_head

from ...errors import AttnswapError
from .. import Options, Prepared, calibration_lines, require_calibration
from . import register
from .base import AttentionMethod, key_padding_keep


class LinformerOptions(Options):
    rank: int = Field(128, ge=1, description="pseudo-tokens r: rows of E and F (the paper: 128 or 256 at n = 512)")
    length: int | None = Field(None, ge=1, description="projection length n: the longest input (default: the "
                                                       "model's maximum positions); shorter inputs use E's first "
                                                       "columns (zero padding)")
    lengths: Literal["adaptive", "pad"] = Field("adaptive", description="inputs shorter than n: adaptive (E and F "
                                                                          "resampled to the input's length) or pad "
                                                                          "(their first columns: zero padding, the "
                                                                          "paper's)")
    init: Literal["pooling", "pca"] = Field("pooling", description="pooling: segment means; pca: E and F from the "
                                                                  "top principal directions along the sequence of "
                                                                  "calibration keys / values (needs --calibration; "
                                                                  "measured worse on MiniLM: docs/methods/linformer.md)")


def resampled(e: torch.Tensor, t: int) -> torch.Tensor:
    """e [r, n] -> [r, t]: E's positions stretched onto t positions; each source column is spread over the target
    columns in proportion to their overlap (position p covers [p/n, (p+1)/n)), so every row keeps its sum."""
    n = e.shape[1]
    if t == n:
        return e
    src = torch.arange(n + 1, device=e.device)[:, None] * t  # in units of 1 / (n t): exact integers
    dst = torch.arange(t + 1, device=e.device)[None, :] * n
    overlap = (torch.minimum(src[1:], dst[:, 1:]) - torch.maximum(src[:-1], dst[:, :-1])).clamp(min=0)  # [n, t]
    return e @ (overlap.to(e.dtype) / t)


def linformer(q, k, v, e, f, keep=None, scale: float | None = None, adaptive: bool = False):
    """q, k, v [B, H, T, d] (heads matched), e, f [r, n] (n >= real tokens), keep [B, T] (False = padding) or None
    -> [B, H, T, d]: softmax(q (E k)^T x scale) (F v), token t taking column rank(t) of E and F (adaptive: of E and
    F resampled to the number of real tokens)."""
    dt = torch.promote_types(q.dtype, torch.float32)
    t = q.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if keep is not None:
        pos = (keep.long().cumsum(1) - 1).clamp(min=0)  # rank among the real tokens
        real, m = keep.sum(1).tolist(), keep[:, None, :].to(dt)

    def columns(x):  # [r, n] -> [1 or B, r, T]: the column of x each token takes
        x = x.to(dt)
        if keep is None:
            return (resampled(x, t) if adaptive else x[:, :t])[None]
        if adaptive:
            return torch.stack([resampled(x, n)[:, pos[i].clamp(max=n - 1)] for i, n in enumerate(real)]) * m
        return x[:, pos].transpose(0, 1) * m

    ee, ff = columns(e), columns(f)
    kp = torch.einsum("brt,bhtd->bhrd", ee, k.to(dt))
    vp = torch.einsum("brt,bhtd->bhrd", ff, v.to(dt))
    attn = torch.softmax(q.to(dt) @ kp.transpose(-1, -2) * scale, dim=-1)  # [B, H, T, r]
    return (attn @ vp).to(v.dtype)


def pooling_rows(rank: int, length: int) -> torch.Tensor:
    """[rank, length]: row i averages the i-th of `rank` equal segments of the positions (at least one each)."""
    rows = torch.zeros(rank, length)
    for i in range(rank):
        a = i * length // rank
        b = max(a + 1, (i + 1) * length // rank)
        rows[i, a:min(b, length)] = 1.0 / (min(b, length) - a)
    return rows


def principal_rows(moment: torch.Tensor, rank: int) -> torch.Tensor:
    """[rank, n]: the top-`rank` eigenvectors of an n x n second moment, each scaled to unit L1 norm, its sign
    chosen so that its entries sum to >= 0."""
    lam, u = torch.linalg.eigh(moment.double())
    rows = u.flip(1)[:, :rank].T
    rows = rows * torch.where(rows.sum(1, keepdim=True) < 0, -1.0, 1.0)
    return (rows / rows.abs().sum(1, keepdim=True)).float()


@torch.no_grad()
def sequence_moments(model, ids: torch.Tensor, layers) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, on windows `ids` [N, n]: the uncentred second moments along the sequence of the key and of the
    value columns, each [n, n] (sums over windows, heads and channels)."""
    from .analysis import recording

    device = next(model.parameters()).device
    wanted, sums = set(layers), {}
    for row in ids:
        with recording(model, inputs=True) as found:
            model(input_ids=row[None].to(device))
        for layer, entries in found.items():
            if layer in wanted:
                _, _, k, v = entries[0]
                cols = [x[0].double().permute(1, 0, 2).reshape(x.shape[2], -1) for x in (k, v)]  # [n, heads x d]
                mk, mv = (c @ c.T for c in cols)
                pk, pv = sums.get(layer, (0, 0))
                sums[layer] = (pk + mk.cpu(), pv + mv.cpu())
    return sums


@register
class Linformer(AttentionMethod):
    name = "linformer"
    uses_mask = False  # reads the padding only
    directions = frozenset({"bidirectional"})
    summary = "Linformer: keys and values projected along the sequence to r pseudo-tokens (E, F from calibration)"
    Options = LinformerOptions
    adds = "E and F [r, n] per layer (measured on calibration text, or segment means); trained by distill"

    def __init__(self, options, site, geometry, adapter):
        super().__init__(options, site, geometry, adapter)
        if options.length is None:
            raise AttnswapError("linformer: no projection length; convert through attnswap.convert (it sets the "
                                "model's maximum positions) or give --set length=N")
        rows = pooling_rows(options.rank, options.length)
        self.e = nn.Parameter(rows.clone())
        self.f = nn.Parameter(rows)

    @classmethod
    def prepare(cls, model, options, layers, calibration=None):
        from ...models import max_positions

        if options.length is None:
            n = max_positions(model.config)
            if n is None:
                raise AttnswapError("linformer: this model states no maximum length; give --set length=N")
            options = options.model_copy(update={"length": n})
        n, r = options.length, options.rank
        if r > n:
            raise AttnswapError(f"linformer: rank {r} is above the projection length {n}; give --set rank=N with "
                                f"N <= {n}")
        if options.init == "pooling":
            return Prepared(options)
        require_calibration(calibration, "linformer init: pca measures E and F (init: pooling needs none)")
        if calibration.ids.shape[1] != n:
            raise AttnswapError(f"linformer measures E and F on calibration windows of its projection length {n}: "
                                f"pass --calibration-seq-len {n} and --calibration-tokens of at least {n} (got "
                                f"windows of {calibration.ids.shape[1]}), or --set length={calibration.ids.shape[1]}")
        buffers = {}
        for layer, (mk, mv) in sequence_moments(model, calibration.ids, layers).items():
            buffers[layer] = {"e": principal_rows(mk, r), "f": principal_rows(mv, r)}
        return Prepared(options, {"calibration": calibration.describe()}, buffers)

    @classmethod
    def reference_parameters(cls, geometry, adapter) -> int:
        """E and F per layer, 2 r n, at a projection length of 512 (BERT's; it is the model's maximum positions)."""
        return 2 * cls.Options().rank * 512

    @classmethod
    def describe(cls, entry, prepared):
        o = entry["options"]
        lines = [f"{o.get('rank')} pseudo-tokens over {o.get('length')} positions, init {o.get('init')}, shorter "
                 f"inputs: {o.get('lengths')}"]
        return lines + calibration_lines(prepared)

    def forward(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        h = query.shape[1]
        keep = key_padding_keep(attention_mask)
        real = query.shape[2] if keep is None else int(keep.sum(1).max())
        if real > self.options.length:
            raise AttnswapError(f"linformer projects at most {self.options.length} tokens, got {real}: convert with "
                                f"--set length={real} (or longer), or give shorter inputs")
        out = linformer(query, per_query_head(key, h), per_query_head(value, h), self.e, self.f, keep, scaling,
                        self.options.lengths == "adaptive")
        return out.transpose(1, 2), None
