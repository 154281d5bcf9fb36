"""Causal linear attention: the specification (naive) and the fast CPU path (chunked), in plain PyTorch.

    o_i = sum_{j <= i} (q_i . k_j) v_j          q [B, H, T, K], k [B, Hk, T, K], v [B, Hk, T, V] -> o [B, H, T, V]

H = Hk * G (grouped-query attention: query head h reads key/value head h // G). Feature maps,
normalisers and windows are composed on top of this op (see `attnswap_kernels.linear_attn.hybrid`).
"""
import torch


def _group(q: torch.Tensor, hk: int) -> torch.Tensor:
    b, h, t, k = q.shape
    return q.view(b, hk, h // hk, t, k)  # [B, Hk, G, T, K]


def causal_linear_attn_naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """O(T^2) definition: scores = q k^T masked to j <= i, o = scores v."""
    hk = k.shape[1]
    qg = _group(q, hk)
    scores = torch.einsum("bhgik,bhjk->bhgij", qg, k)  # [B, Hk, G, T, T]
    t = q.shape[2]
    mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, 0.0)
    o = torch.einsum("bhgij,bhjv->bhgiv", scores, v)
    return o.reshape(q.shape[0], q.shape[1], t, v.shape[-1])


def causal_linear_attn_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """O(T C) chunked form: a prefix sum of per-chunk k^T v states plus a masked product inside each chunk.

    Computed in float32 (state sums lose precision in half types); returned in q's dtype.
    """
    dtype = q.dtype
    q, k, v = q.float(), k.float(), v.float()
    b, h, t, kd = q.shape
    hk, vd = k.shape[1], v.shape[-1]
    g = h // hk
    n = -(-t // chunk)
    pad = n * chunk - t
    if pad:
        q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    qc = q.view(b, hk, g, n, chunk, kd)
    kc = k.view(b, hk, n, chunk, kd)
    vc = v.view(b, hk, n, chunk, vd)
    kv = torch.einsum("bhnck,bhncv->bhnkv", kc, vc)  # [B, Hk, N, K, V]
    state = kv.cumsum(dim=2) - kv  # state before chunk n (exclusive prefix)
    inter = torch.einsum("bhgnck,bhnkv->bhgncv", qc, state)
    scores = torch.einsum("bhgnck,bhnsk->bhgncs", qc, kc)  # [B, Hk, G, N, C, C]
    mask = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    intra = torch.einsum("bhgncs,bhnsv->bhgncv", scores.masked_fill(~mask, 0.0), vc)
    o = (inter + intra).reshape(b, h, n * chunk, vd)[:, :, :t]
    return o.to(dtype)
