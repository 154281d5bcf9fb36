"""Exact softmax terms over a causal local window plus sink tokens, blockwise: O(T (2w + s)) memory.

For query i the exact set is E(i) = {j : 0 <= i - j < w} U {j < s, j <= i}. Returned unnormalised, so a
caller can merge them with other terms under one normaliser:

    m_i = max_{j in E(i)} score_ij,  a_i = sum_{j in E(i)} exp(score_ij - m_i) v_j,  c_i = sum exp(score_ij - m_i)

q [B, H, T, D], k/v [B, Hk, T, D(v)] -> a [B, H, T, Dv], c [B, H, T], m [B, H, T] (float32).
Queries are processed in blocks of w; block n sees keys [(n - 1) w, (n + 1) w), never a T x T tensor.
"""
import torch
from torch.nn import functional as F


def window_softmax_terms(q, k, v, window: int, sinks: int, scale: float):
    b, h, t, d = q.shape
    hk, dv = k.shape[1], v.shape[-1]
    g = h // hk
    q, k, v = q.float(), k.float(), v.float()
    neg = torch.finfo(torch.float32).min
    qg = q.view(b, hk, g, t, d)
    parts_s, parts_v = [], []  # scores [B, Hk, G, T, *] and their values
    if window > 0:
        w = window
        n = -(-t // w)
        pad_end = n * w - t
        qb = F.pad(qg, (0, 0, 0, pad_end)).view(b, hk, g, n, w, d)
        # keys padded by one block in front: block n's candidates are rows [n w, n w + 2 w) of the padded keys
        kp = F.pad(k, (0, 0, w, pad_end))
        vp = F.pad(v, (0, 0, w, pad_end))
        kw = kp.unfold(2, 2 * w, w).transpose(-1, -2)  # [B, Hk, N, 2w, D]
        vw = vp.unfold(2, 2 * w, w).transpose(-1, -2)  # [B, Hk, N, 2w, Dv]
        s = torch.einsum("bhgnid,bhnjd->bhgnij", qb, kw) * scale  # [B, Hk, G, N, w, 2w]
        i = torch.arange(n * w, device=q.device).view(n, w, 1)
        j = (torch.arange(n, device=q.device).view(n, 1, 1) - 1) * w + torch.arange(2 * w, device=q.device).view(1, 1, 2 * w)
        ok = (j <= i) & (i - j < w) & (j >= 0)  # [N, w, 2w]
        s = s.masked_fill(~ok, neg)
        parts_s.append(("window", s, vw))
    if sinks > 0:
        ns = min(sinks, t)
        s2 = torch.einsum("bhgid,bhjd->bhgij", qg, k[:, :, :ns]) * scale  # [B, Hk, G, T, s]
        i = torch.arange(t, device=q.device).view(t, 1)
        j = torch.arange(ns, device=q.device).view(1, ns)
        # a sink already inside the window is counted there
        ok = (j <= i) & ((i - j >= window) if window > 0 else torch.ones_like(j, dtype=torch.bool))
        s2 = s2.masked_fill(~ok, neg)
        parts_v.append((s2, v[:, :, :ns]))
    # row maxima over both parts
    m = torch.full((b, hk, g, t), neg, device=q.device)
    for _, s, _ in parts_s:
        m = torch.maximum(m, s.amax(-1).reshape(b, hk, g, -1)[..., :t])
    for s2, _ in parts_v:
        m = torch.maximum(m, s2.amax(-1))
    a = torch.zeros(b, hk, g, t, dv, device=q.device)
    c = torch.zeros(b, hk, g, t, device=q.device)
    for _, s, vw in parts_s:
        n, w = s.shape[3], s.shape[4]
        mb = F.pad(m, (0, n * w - t)).view(b, hk, g, n, w, 1)
        p = torch.exp(s - mb)  # masked entries underflow to 0
        a = a + torch.einsum("bhgnij,bhnjd->bhgnid", p, vw).reshape(b, hk, g, n * w, dv)[..., :t, :]
        c = c + p.sum(-1).reshape(b, hk, g, n * w)[..., :t]
    for s2, vs in parts_v:
        p = torch.exp(s2 - m.unsqueeze(-1))
        a = a + torch.einsum("bhgij,bhjd->bhgid", p, vs)
        c = c + p.sum(-1)
    return a.reshape(b, h, t, dv), c.reshape(b, h, t), m.reshape(b, h, t)


def window_softmax_naive(q, k, v, window: int, sinks: int, scale: float):
    """The same terms from a dense T x T score matrix (the specification, for tests)."""
    b, h, t, d = q.shape
    g = h // k.shape[1]
    kk = k.float().repeat_interleave(g, 1)
    vv = v.float().repeat_interleave(g, 1)
    s = torch.einsum("bhid,bhjd->bhij", q.float(), kk) * scale
    i = torch.arange(t).view(t, 1)
    j = torch.arange(t).view(1, t)
    ok = (j <= i) & ((i - j < window) | (j < sinks))
    s = s.masked_fill(~ok, float("-inf"))
    m = s.amax(-1)
    p = torch.exp(s - m.unsqueeze(-1))
    return p @ vv, p.sum(-1), m
