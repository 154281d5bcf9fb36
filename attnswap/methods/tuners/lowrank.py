"""Calibrated low-rank projections: each attention projection replaced by its rank-r PCA projection.

After LiteASR (Kamahori et al., "LiteASR: Efficient Automatic Speech Recognition with Low-Rank Approximation",
arXiv 2502.20583), which finds that the activations of Whisper's encoder projections live in a low-dimensional
subspace: with U_r the top r principal directions of a projection's outputs y = W x + b on calibration data,
y ~ U_r U_r^T y, so W ~ U_r (U_r^T W) is a product of an [out, r] and an [r, in] matrix, r chosen per
projection by the explained variance (`energy`: the smallest r whose eigenvalues sum to that fraction). And the
low-rank view of multi-head attention: W_q^T W_k per head has rank at most the head size, and in practice less.

What attnswap does at conversion (`prepare`, on `--calibration` text; nothing is trained):
- per converted layer and target projection (q, k, v, o; GPT-2's fused q|k|v per slice), the uncentred second
  moment M = E[y y^T] of its outputs over the calibration windows (float64), its eigenvectors U and
  eigenvalues; r = `rank` if given, else the smallest r with sum_{i<=r} lambda_i >= energy * sum lambda;
- W <- U_r U_r^T W and b <- U_r U_r^T b, written into the projection (merged at conversion: no forward hook
  is left; at r = out it is the original up to rounding). The ranks are stored in the plan; the checkpoint
  holds the projected weights, so loading never measures again.
With `attention: full` (the default, valid under RoPE) attention keeps its q/k dimension. With `attention:
reduced` (models without rotary embeddings, one key head per query head), each head's scores are computed in r
dimensions: q.k ~ (A_r^T q).(B_r^T k) with A, B from the SVD of Q^(1/2) K^(1/2) (`score_factors`), the head's
q/k rows rewritten so that their first r outputs carry it and the rest are zero, and the attention told to read
only those r (`attnswap.attention.QK_DIM`; the compiled kernel runs the scores in size r). The executed model
stores the rank-r products at full size: the parameters and multiply-adds it reports are those of the
factorised form r (in + out) against in x out, what a factorised export would save; running or writing that
form is not built (docs/methods/lowrank.md says why). `finetune` of a lowrank
model adds PEFT LoRA as for an unconverted model. `revert` removes the plan, not the projection: the original
weights are not kept.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ...attention import QK_DIM
from ...errors import AttnswapError
from .. import Options, Prepared, require_calibration
from . import register
from .base import Tuner, grouped_projections

Target = Literal["q", "k", "v", "o"]


class LowRankOptions(Options):
    targets: list[Target] = Field(["q", "k", "v", "o"], description="projections to replace")
    energy: float = Field(0.99, gt=0, le=1, description="explained variance each projection keeps (chooses r per "
                                                        "layer and projection)")
    rank: int | None = Field(None, ge=1, description="a fixed rank for every projection instead of `energy`")
    attention: Literal["full", "reduced"] = Field(
        "full", description="full: attention keeps its q/k head size; reduced: each head's scores in r dimensions "
                            "(models without rotary embeddings and with one key head per query head)")
    ranks: dict[int, dict[str, int]] | None = Field(None, description="set by convert from --calibration text: the "
                                                                      "rank of each layer's projections; not given "
                                                                      "by hand")
    qk_dims: dict[int, int] | None = Field(None, description="set by convert (attention: reduced): each layer's "
                                                             "q/k head size; not given by hand")


def chosen_rank(eigenvalues: torch.Tensor, energy: float) -> int:
    """The smallest r whose r largest eigenvalues (descending in `eigenvalues`) hold `energy` of their sum."""
    lam = eigenvalues.clamp_min(0)
    share = lam.cumsum(0) / lam.sum().clamp_min(1e-300)
    return int(min(len(lam), int((share < energy - 1e-12).sum()) + 1))


@torch.no_grad()
def second_moments(model, adapter, layers: list[int], targets: list[str], ids: torch.Tensor) -> dict:
    """{(layer, target): (M [out, out] float64, count)}: E[y y^T] of each projection's outputs over ids [N, T]."""
    from ...surgery import base_model

    base = base_model(model)
    sums: dict = {}
    hooks = []
    for site in adapter.sites(base):
        if site.index not in layers:
            continue
        for module, parts in grouped_projections(adapter, base, site, targets):
            def hook(mod, args, out, parts=parts, layer=site.index):
                y = out.detach().reshape(-1, out.shape[-1]).double()
                for t, sl in parts:
                    ys = y[:, sl]
                    m, n = sums.get((layer, t), (0, 0))
                    sums[(layer, t)] = (m + ys.T @ ys, n + ys.shape[0])
            hooks.append(module.register_forward_hook(hook))
    device = next(base.parameters()).device
    try:
        for row in ids:
            base(input_ids=row[None].to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return sums


def _sqrt_and_inverse(m: torch.Tensor, floor: float = 1e-10) -> tuple[torch.Tensor, torch.Tensor]:
    """M^(1/2) and its inverse for a symmetric PSD M, eigenvalues clamped at floor x the largest (so the two are
    exact inverses of each other even where M is singular)."""
    lam, u = torch.linalg.eigh(m)
    lam = lam.clamp_min(floor * max(float(lam.max()), 1e-300))
    return (u * lam.sqrt()) @ u.T, (u / lam.sqrt()) @ u.T


def score_factors(mq: torch.Tensor, mk: torch.Tensor):
    """(A [d, d], B [d, d], S^2 [d]) with q.k ~ (A_r^T q).(B_r^T k) for one head, A_r / B_r the first r columns.

    With Q = E[q q^T] and K = E[k k^T], the expected squared error of the scores over independent q and k is
    ||Q^(1/2) (I - A_r B_r^T) K^(1/2)||_F^2, smallest when Q^(1/2) A_r B_r^T K^(1/2) is the rank-r truncated SVD of
    C = Q^(1/2) K^(1/2) = U S V^T: A = Q^(-1/2) U S^(1/2), B = K^(-1/2) V S^(1/2). At r = d, A B^T = I: the
    original scores. S^2, descending, is what `energy` reads (`chosen_rank`)."""
    qs, qi = _sqrt_and_inverse(mq)
    ks, ki = _sqrt_and_inverse(mk)
    u, sv, vh = torch.linalg.svd(qs @ ks)
    root = sv.sqrt()
    return qi @ (u * root), ki @ (vh.T * root), sv ** 2


def reduce_qk(adapter, base, site, moments: dict, options, head_dim: int, heads: int) -> int:
    """Rewrite one layer's q and k projections so that each head's first r output dimensions carry its scores
    (A_r^T W_q, B_r^T W_k; `score_factors`) and the rest are zero; r = the largest rank any head needs for
    `energy` (or `rank`). Returns r."""
    (mq, nq), (mk, nk) = moments[(site.index, "q")], moments[(site.index, "k")]
    factors, r = [], 1
    for h in range(heads):
        sl = slice(h * head_dim, (h + 1) * head_dim)
        a, b, sv2 = score_factors(mq[sl, sl] / nq, mk[sl, sl] / nk)
        need = min(options.rank, head_dim) if options.rank is not None else chosen_rank(sv2, options.energy)
        factors.append((a, b))
        r = max(r, need)
    proj = adapter.projections(base, site)
    with torch.no_grad():
        for target, which in (("q", 0), ("k", 1)):
            p = proj[target]
            w = p.weight.detach().double()
            new_w = torch.zeros_like(w)
            bias = None if p.bias is None else p.bias.detach().double()
            new_b = None if bias is None else torch.zeros_like(bias)
            for h, pair in enumerate(factors):
                rows = slice(h * head_dim, h * head_dim + r)
                m = pair[which][:, :r].T  # [r, d]
                new_w[rows] = m @ w[h * head_dim:(h + 1) * head_dim]
                if bias is not None:
                    new_b[rows] = m @ bias[h * head_dim:(h + 1) * head_dim]
            p.weight.copy_(new_w.to(p.weight.dtype))
            if bias is not None:
                p.bias.copy_(new_b.to(p.bias.dtype))
    return r


class _Attribute:
    """A handle that sets an attribute on a module and deletes it on remove() (what revert calls)."""

    def __init__(self, module, name: str, value):
        self.module, self.name = module, name
        setattr(module, name, value)

    def remove(self):
        if hasattr(self.module, self.name):
            delattr(self.module, self.name)


@register
class LowRank(Tuner):
    name = "lowrank"
    summary = "calibrated low-rank projections: W -> U_r U_r^T W from the PCA of its outputs (LiteASR)"
    Options = LowRankOptions
    adds = "nothing trained: projections replaced by their rank-r PCA projection at conversion (LoRA may follow)"
    adapts = False  # `finetune` adds PEFT LoRA on top: this tuner trains nothing itself

    @classmethod
    def prepare(cls, model, options, layers, calibration=None):
        if options.ranks is not None:
            return Prepared(options)
        require_calibration(calibration, "lowrank measures each projection's outputs")
        from ...arch import adapter_for
        from ...surgery import base_model

        base = base_model(model)
        adapter = adapter_for(base.config)
        sites = {s.index: s for s in adapter.sites(base)}
        reduced = options.attention == "reduced"
        geometry = adapter.geometry(base.config)
        if reduced:
            if adapter.positions == "rope":
                raise AttnswapError(f"lowrank attention=reduced: {base.config.model_type} rotates q and k between the "
                                    "projection and the scores (RoPE), so their size cannot shrink; use "
                                    "attention=full (the default)")
            if geometry.num_kv_heads != geometry.num_heads:
                raise AttnswapError("lowrank attention=reduced needs one key head per query head; this model shares "
                                    f"{geometry.num_kv_heads} key heads among {geometry.num_heads}: use attention=full")
        measured = sorted(set(options.targets) | ({"q", "k"} if reduced else set()))
        moments = second_moments(model, adapter, layers, measured, calibration.ids)
        ranks: dict[int, dict[str, int]] = {}
        qk_dims: dict[int, int] = {}
        dense = factorised = 0
        if reduced:
            d, h = geometry.head_dim, geometry.num_heads
            for layer in layers:
                qk_dims[layer] = r = reduce_qk(adapter, base, sites[layer], moments, options, d, h)
                dense += 2 * h * d * geometry.hidden_size
                factorised += 2 * h * r * geometry.hidden_size  # the q and k rows that are not zero
            moments = {key: value for key, value in moments.items() if key[1] in ("v", "o")}
        for (layer, t), (m, n) in sorted(moments.items()):
            lam, u = torch.linalg.eigh(m / n)  # ascending
            lam, u = lam.flip(0), u.flip(1)
            r = min(options.rank, len(lam)) if options.rank is not None else chosen_rank(lam, options.energy)
            p = adapter.projections(base, sites[layer])[t]
            out_f, in_f = p.weight.shape
            basis = u[:, :r]
            proj = (basis @ basis.T).to(p.weight.dtype)
            with torch.no_grad():
                p.weight.copy_(proj @ p.weight)
                if p.bias is not None:
                    p.bias.copy_(proj @ p.bias)
            ranks.setdefault(layer, {})[t] = r
            dense += out_f * in_f
            factorised += min(r * (out_f + in_f), out_f * in_f)
        record = {"calibration": calibration.describe(), "dense_parameters": dense,
                  "factorised_parameters": factorised}
        update = {"ranks": ranks, "qk_dims": qk_dims if reduced else None}
        return Prepared(options.model_copy(update=update), record)

    @classmethod
    def describe(cls, entry, prepared):
        ranks = entry["options"].get("ranks") or {}
        lines = []
        for t in entry["options"].get("targets", []):
            rs = [v[t] for v in ranks.values() if t in v]
            if rs:
                lines.append(f"{t}: rank {min(rs)}..{max(rs)} (mean {sum(rs) / len(rs):.1f}) over {len(rs)} layers")
        dims = entry["options"].get("qk_dims") or {}
        if dims:
            ds = list(dims.values())
            lines.append(f"q/k head size in the scores: {min(ds)}..{max(ds)} (mean {sum(ds) / len(ds):.1f}) over "
                         f"{len(ds)} layers")
        if prepared and "dense_parameters" in prepared:
            d, f = prepared["dense_parameters"], prepared["factorised_parameters"]
            lines.append(f"factorised form: {f:,} of {d:,} projection parameters ({f / d:.3f}); measured on "
                         f"{prepared['calibration']['tokens']} tokens of {prepared['calibration']['data']}")
        return lines

    @classmethod
    def model_hooks(cls, model, adapter, options):
        # the projections are merged at conversion; a reduced layer tells the attention its q/k head size
        dims = options.qk_dims or {}
        return [_Attribute(site.module, QK_DIM, dims[site.index]) for site in adapter.sites(model)
                if site.index in dims]

    def merge(self, projections, member=0):
        return None  # already in the weights
