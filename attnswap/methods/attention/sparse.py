"""Sparse causal attention: hash buckets and query/key dropping in a flash-style kernel.

Source: Pagliardini, Paliotta, Jaggi and Fleuret, "Faster Causal Attention Over Large Sequences Through Sparse
Flash Attention" (NeurIPS 2023, https://arxiv.org/abs/2306.01160; authors' code
epfml/dynamic-sparse-flash-attention). The paper extends FlashAttention to two dynamic sparsity patterns:
*hash* (queries and keys bucketed by a hash; a query attends causally to the keys of its bucket) and
*qk-drop* (some queries and keys removed per head; the rest attend causally among themselves), each computed
without ever forming the skipped blocks.

attnswap's version for converting a pretrained causal model (the definition:
`attnswap_kernels/sparse_attn/reference.py`):
- buckets: an angular LSH of each head's q and k (Reformer's: argmax over [xR, -xR] for one random rotation per
  layer and head, seeded: no parameters); `buckets: 1` puts every token in one bucket;
- drop: a fraction of each head's queries and keys with the smallest norms is dropped. Thresholds come from
  calibration text at conversion (quantiles of the norms, per head), so the rule is causal and decoding drops
  exactly what a full forward drops; `drop: 0` keeps everything;
- every query also attends to the first `sinks` keys and to the last `window` positions (itself included): a
  pretrained model needs its local context and its attention sinks, and no row is ever empty. A dropped query
  attends to those only (the paper's cheap path).
With one bucket and nothing dropped this is the original attention exactly. No parameters are added: adapt with
`finetune` (LoRA), which trains through the kernels (both differentiable). Decoding uses the default KV cache.
"""
from __future__ import annotations

import torch
from pydantic import Field, model_validator

from attnswap_kernels import per_query_head
from attnswap_kernels.sparse_attn import lsh_buckets, sparse_attention

from ...errors import AttnswapError
from .. import Options, Prepared, calibration_lines, require_calibration
from . import register
from .analysis import recorded_qk
from .base import AttentionMethod, key_padding_keep


class SparseOptions(Options):
    buckets: int = Field(64, ge=1, description="hash buckets per head (angular LSH of q and k; 1: no hashing); 64 with "
                                              "window 128 computes 0.246 of SmolLM2's causal scores at 1,024 tokens")
    drop: float = Field(0.0, ge=0, lt=1, description="fraction of each head's queries and keys dropped (smallest "
                                                     "norms; thresholds from --calibration text)")
    window: int = Field(128, ge=1, description="last tokens every query always sees (itself included)")
    sinks: int = Field(4, ge=0, description="first tokens every query always sees (attention sinks)")
    seed: int = Field(0, ge=0, description="seed of the hash rotations (layer l uses seed + l)")
    thresholds: dict[int, dict[str, list[float]]] | None = Field(
        None, description="set by convert from --calibration text when drop > 0: per layer the norm below which a "
                          "query [heads] or key [KV heads] is dropped; not given by hand")

    @model_validator(mode="after")
    def _even_buckets(self):
        if self.buckets > 1 and self.buckets % 2:
            raise ValueError("buckets must be 1 or even (the hash is an argmax over +-projections)")
        return self


@register
class Sparse(AttentionMethod):
    name = "sparse"
    uses_mask = False  # reads padding only; its band and sinks replace a layer's own window
    directions = frozenset({"causal"})
    summary = "sparse causal flash attention: hash buckets and query/key dropping + window and sinks (Triton)"
    Options = SparseOptions
    adds = "no new parameters (hash rotations from a seed, calibrated drop thresholds); adapt with finetune"

    def __init__(self, options, site, geometry, adapter):
        super().__init__(options, site, geometry, adapter)
        thr = (options.thresholds or {}).get(site.index)
        if options.drop > 0 and thr is None:
            raise AttnswapError(f"sparse: layer {site.index} has no calibrated drop thresholds; convert with "
                                "--calibration FILE (or drop: 0)")
        h, hk = geometry.num_heads, geometry.num_kv_heads
        if thr is not None and (len(thr["q"]) != h or len(thr["k"]) != hk):
            raise AttnswapError(f"sparse: the stored thresholds of layer {site.index} are for {len(thr['q'])} heads, "
                                f"this model has {h}")
        self.register_buffer("q_threshold", torch.tensor(thr["q"] if thr else [0.0] * h), persistent=False)
        self.register_buffer("k_threshold", torch.tensor(thr["k"] if thr else [0.0] * hk), persistent=False)

    @classmethod
    def prepare(cls, model, options, layers, calibration=None):
        if options.drop == 0 or options.thresholds is not None:
            return Prepared(options)
        require_calibration(calibration, "sparse measures its drop thresholds (drop > 0)")
        norms: dict[int, dict[str, list[torch.Tensor]]] = {}
        for _, layer, q, k, _, _ in recorded_qk(model, calibration.ids, layers):
            acc = norms.setdefault(layer, {"q": [], "k": []})
            acc["q"].append(q.norm(dim=-1))  # [H, T]
            acc["k"].append(k.norm(dim=-1))  # [Hk, T]
        thresholds = {layer: {n: [round(float(x), 6) for x in torch.cat(v, 1).quantile(options.drop, dim=1)]
                              for n, v in acc.items()} for layer, acc in norms.items()}
        record = {"calibration": calibration.describe()}
        return Prepared(options.model_copy(update={"thresholds": thresholds}), record)

    @classmethod
    def describe(cls, entry, prepared):
        o = entry["options"]
        lines = [f"{o.get('buckets', 64)} hash buckets, drop {o.get('drop', 0.0)}, window {o.get('window', 128)}, "
                 f"sinks {o.get('sinks', 4)}"]
        return lines + calibration_lines(prepared, "drop thresholds measured")

    def routing(self, query, key):
        """Bucket ids and keep masks per query head ([B, H, Tq] and [B, H, Tk]; None where unused)."""
        o = self.options
        h = query.shape[1]
        qb = kb = qk = kk = None
        if o.buckets > 1:
            seed = o.seed + self.layer_index
            qb = lsh_buckets(query, o.buckets, seed)
            kb = lsh_buckets(key, o.buckets, seed, heads=h)
        if o.drop > 0:
            qk = query.float().norm(dim=-1) >= self.q_threshold.view(1, -1, 1)
            kk = per_query_head(key.float().norm(dim=-1) >= self.k_threshold.view(1, -1, 1), h)
        return qb, kb, qk, kk

    def forward(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        o = self.options
        qb, kb, qk, kk = self.routing(query, key)
        out = sparse_attention(query, key, value, scale=scaling, q_bucket=qb, k_bucket=kb, q_keep=qk, k_keep=kk,
                               window=o.window, sinks=o.sinks, key_valid=key_padding_keep(attention_mask))
        return out.transpose(1, 2), None
