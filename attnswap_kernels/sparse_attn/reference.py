"""What sparse causal attention computes, densely (O(T^2) memory: the definition, not a fast path).

After Pagliardini, Paliotta, Jaggi, Fleuret, "Faster Causal Attention Over Large Sequences Through Sparse Flash
Attention" (arXiv 2306.01160; epfml/dynamic-sparse-flash-attention), two ways to skip score blocks:
- *hash*: queries and keys carry a bucket id (e.g. an LSH of their direction, `lsh_buckets`); query i attends
  to the keys j <= i of its own bucket;
- *qk-drop*: per head, some queries and keys are dropped; a kept query attends to the kept keys j <= i.
Both modes compose (a kept query attends to kept keys of its bucket). attnswap adds what a converted
pretrained model needs and what keeps every row defined: every query also attends to the first `sinks`
keys, to the keys within `window` positions before it, and to its own position (the diagonal), whatever its
bucket or drop status; a dropped query attends to those only (the cheap path). With one bucket and nothing
dropped this is causal softmax attention exactly.
"""
from __future__ import annotations

import functools

import torch

from .. import per_query_head


def lsh_buckets(x: torch.Tensor, n_buckets: int, seed: int = 0, heads: int | None = None,
                impl: str = "auto") -> torch.Tensor:
    """Angular LSH (as in Reformer): x [B, Hx, T, D] -> bucket ids [B, heads, T] in [0, n_buckets), from one random
    rotation per head, argmax over [xR, -xR] (the first maximum; + before - on a tie). heads (default Hx): hash
    for that many query heads, head h reading x head h // (heads // Hx) (keys of grouped-query attention, without
    repeating them). Queries and keys hashed with the same seed share the rotations. n_buckets must be even, or
    1 (every token in bucket 0). impl "auto" runs the compiled CPU kernel on CPU tensors where it is built (the
    same formula in float32, rounded in its own order), "torch" this formula."""
    b, hx, t, d = x.shape
    h = hx if heads is None else heads
    if n_buckets == 1:
        return torch.zeros(b, h, t, dtype=torch.long, device=x.device)
    if n_buckets % 2:
        raise ValueError("n_buckets must be even (or 1)")
    rot = _rotation(h, d, n_buckets // 2, seed, x.device)
    if impl == "auto" and x.device.type == "cpu":
        from .cpu import lsh_native

        out = lsh_native(x, rot[0], h)
        if out is not None:
            return out
    proj = per_query_head(x, h).float() @ rot  # [B, H, T, n/2]
    hi, lo = proj.max(-1), proj.min(-1)  # argmax over [xR, -xR] without forming it: -lo is the max of -xR
    return torch.where(hi.values >= -lo.values, hi.indices, lo.indices + n_buckets // 2)


@functools.lru_cache(maxsize=256)
def _rotation(h: int, d: int, r: int, seed: int, device) -> torch.Tensor:
    """The seeded random rotations [H, D, r] (drawn on the CPU, so every device hashes alike)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(h, d, r, generator=g).to(device)[None]


def allowed(tq: int, tk: int, *, q_bucket=None, k_bucket=None, q_keep=None, k_keep=None, window: int = 0,
            sinks: int = 0, causal: bool = True, key_valid=None, device=None) -> torch.Tensor:
    """Boolean [B or 1, H or 1, Tq, Tk], True where query i may attend key j. Queries are the last Tq positions
    of the Tk keys. Buckets [B, H, T] (query and key heads already matched), keep masks [B, H, T] (True = kept),
    key_valid [B, Tk] (False = padding: attended by no query)."""
    i = torch.arange(tk - tq, tk, device=device)[:, None]
    j = torch.arange(tk, device=device)[None, :]
    order = (j <= i) if causal else torch.ones(tq, tk, dtype=torch.bool, device=device)
    dense = torch.ones(1, 1, tq, tk, dtype=torch.bool, device=device)
    if q_bucket is not None:
        dense = dense & (q_bucket[..., :, None] == k_bucket[..., None, :])
    if k_keep is not None:
        dense = dense & k_keep[..., None, :]
    if q_keep is not None:
        dense = dense & q_keep[..., :, None]
    always = (j < sinks) | (j == i) | (((i - j) < window) & ((i - j) >= 0) if causal else (i - j).abs() < window)
    out = (dense | always) & order
    return out if key_valid is None else out & key_valid.bool()[:, None, None, :]


def sparse_attention_reference(q, k, v, *, scale: float | None = None, q_bucket=None, k_bucket=None, q_keep=None,
                               k_keep=None, window: int = 0, sinks: int = 0, causal: bool = True,
                               key_valid=None) -> torch.Tensor:
    """q [B, H, Tq, D], k/v [B, Hkv, Tk, D] (grouped-query: H a multiple of Hkv) -> [B, H, Tq, D] (float32 math at least).
    Bucket ids and keep masks are per query head ([B, H, T]; key ones as seen by each query head). A row that may
    attend no key (only possible with padding) is 0."""
    h = q.shape[1]
    k, v = per_query_head(k, h), per_query_head(v, h)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    mask = allowed(q.shape[2], k.shape[2], q_bucket=q_bucket, k_bucket=k_bucket, q_keep=q_keep, k_keep=k_keep,
                   window=window, sinks=sinks, causal=causal, key_valid=key_valid, device=q.device)
    math = torch.promote_types(q.dtype, torch.float32)
    s = (q.to(math) @ k.to(math).transpose(-1, -2)) * scale
    p = torch.softmax(s.masked_fill(~mask, -1e30), -1)  # finite: an empty row is uniform, then zeroed (no NaN grads)
    p = torch.where(mask.any(-1, keepdim=True), p, 0.0)
    return (p @ v.to(math)).to(q.dtype)


def sorted_codes(q_bucket, k_bucket, q_keep, k_keep, key_valid, *, heads: int, sinks: int, none: int):
    """How the fast paths order the routed part: per (batch, query head), queries and keys sorted by the code
    bucket x (T + 1) + position. Keys outside the routed part (sinks, dropped, padding) take bucket `none` (after
    every real bucket) and dropped queries `none + 1`, so a query's routed keys are one contiguous range of its
    bucket. Buckets and keep masks [B, H, T] (None: one bucket, all kept), key_valid [B, T] bool.
    Returns (qcode, qorder, kcode, korder) [B*H, T] and the span T + 1."""
    (b, t), h, dev = key_valid.shape, heads, key_valid.device
    j = torch.arange(t, device=dev)
    qb = torch.zeros(b, h, t, dtype=torch.long, device=dev) if q_bucket is None else q_bucket.long().to(dev)
    kb = torch.zeros(b, h, t, dtype=torch.long, device=dev) if k_bucket is None else k_bucket.long().to(dev)
    out = (j < sinks)[None, None, :] | ~key_valid[:, None, :]
    if k_keep is not None:
        out = out | ~k_keep.bool().to(dev)
    kb = torch.where(out, none, kb)
    if q_keep is not None:
        qb = torch.where(q_keep.bool().to(dev), qb, none + 1)
    span = t + 1
    kcode, korder = torch.sort((kb * span + j).reshape(-1, t), dim=-1)
    qcode, qorder = torch.sort((qb * span + j).reshape(-1, t), dim=-1)
    return qcode, qorder, kcode, korder, span
