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
Attention keeps its q/k dimension (the mode that is valid under RoPE; the reduced-dimension attention of the
paper for models without rotary embeddings is not built). The executed model stores the rank-r products at
full size: the parameters and multiply-adds it reports are those of the factorised form r (in + out) against
in x out, what a factorised export would save; writing that form is not built yet. `finetune` of a lowrank
model adds PEFT LoRA as for an unconverted model. `revert` removes the plan, not the projection: the original
weights are not kept.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from .. import Options, Prepared, require_calibration
from . import register
from .base import Tuner, grouped_projections

Target = Literal["q", "k", "v", "o"]


class LowRankOptions(Options):
    targets: list[Target] = Field(["q", "k", "v", "o"], description="projections to replace")
    energy: float = Field(0.99, gt=0, le=1, description="explained variance each projection keeps (chooses r per "
                                                        "layer and projection)")
    rank: int | None = Field(None, ge=1, description="a fixed rank for every projection instead of `energy`")
    ranks: dict[int, dict[str, int]] | None = Field(None, description="set by convert from --calibration text: the "
                                                                      "rank of each layer's projections; not given "
                                                                      "by hand")


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
        moments = second_moments(model, adapter, layers, options.targets, calibration.ids)
        ranks: dict[int, dict[str, int]] = {}
        dense = factorised = 0
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
        return Prepared(options.model_copy(update={"ranks": ranks}), record)

    @classmethod
    def describe(cls, entry, prepared):
        ranks = entry["options"].get("ranks") or {}
        lines = []
        for t in entry["options"].get("targets", []):
            rs = [v[t] for v in ranks.values() if t in v]
            if rs:
                lines.append(f"{t}: rank {min(rs)}..{max(rs)} (mean {sum(rs) / len(rs):.1f}) over {len(rs)} layers")
        if prepared and "dense_parameters" in prepared:
            d, f = prepared["dense_parameters"], prepared["factorised_parameters"]
            lines.append(f"factorised form: {f:,} of {d:,} projection parameters ({f / d:.3f}); measured on "
                         f"{prepared['calibration']['tokens']} tokens of {prepared['calibration']['data']}")
        return lines

    @classmethod
    def model_hooks(cls, model, adapter, options):
        return []  # merged at conversion: nothing runs at forward time

    def merge(self, projections, member=0):
        return None  # already in the weights
