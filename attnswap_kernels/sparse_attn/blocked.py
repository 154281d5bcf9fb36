"""Sparse causal attention block-sparsely on the CPU: PyTorch's fused flash kernel over views and gathered key lists.

The same result as `reference.sparse_attention_reference` (causal, queries = keys: a full forward) in
O(T * (keys of a bucket + window + sinks)) time and memory, never T x T. With w = max(window, 1), a row i's keys
split into four disjoint parts, each computed by the flash kernel and merged by log-sum-exp (the split-KV form:
the backward of each part takes the merged output and log-sum-exp, `flash_cpu.flash_bwd`):

- *diagonal chunk* and *previous chunk*: the band i - w < j <= i. The sequence is cut into chunks of w tokens
  (views of q, k, v: no copy); a chunk's queries see their own chunk causally (the kernel's causal flag, no mask)
  and the previous chunk under one constant mask (key t of the previous chunk, query r: t > r), broadcast;
- *sinks*: j < s with i - j >= w, one call with a constant mask;
- *routed*: s <= j <= i - w, key j kept, in query i's bucket, query i kept. In each query head, queries and keys
  are sorted by (bucket, position); a key outside the routed part (sink, dropped, padding) carries bucket "none"
  (after every real bucket) and a dropped query "none + 1", so a block of `block` sorted queries sees one range of
  sorted keys: from the first key of its first bucket to the last key of its last bucket lying w before its last
  query. Keys are gathered per block; a bias masks the rest (0 or NEG). Blocks are sorted by key count and batched
  `step_elems` scores per flash call, so little is padded.

Key padding (key_valid) adds a per-key bias to the band and sink parts (materialised only then).
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from .. import per_query_head
from ..flash_cpu import NEG, flash, flash_bwd
from .reference import sorted_codes


def _routed(q_bucket, k_bucket, q_keep, k_keep, kvalid, *, s, w, block, b, h, t, dt):
    """The routed part's work items, each a run of at most `block` sorted queries of one bucket of one
    (batch, query head) and the prefix of that bucket's sorted keys its last query may see. Returns the items'
    costs (queries, keys) and gather(items) -> (query rows to read, query rows to write (the last = a dummy),
    key rows, bias [n, 1, R, L]), rows of the flat [B*H*T, E] tables."""
    bh = b * h
    nbk = 1 + max([int(x.max()) for x in (q_bucket, k_bucket) if x is not None], default=0)  # "none" = nbk
    qcode, qorder, kcode, korder, span = sorted_codes(q_bucket, k_bucket, q_keep, k_keep, kvalid, heads=h, sinks=s,
                                                      none=nbk)
    edges = torch.arange(nbk + 1) * span
    qbound = torch.searchsorted(qcode, edges.expand(bh, -1).contiguous())  # [bh, nbk + 1]
    kbound = torch.searchsorted(kcode, edges.expand(bh, -1).contiguous())
    qcnt = (qbound[:, 1:] - qbound[:, :-1]).reshape(-1)  # per (bh, bucket)
    n_sub = -(-qcnt // block)
    row = torch.repeat_interleave(torch.arange(bh * nbk), n_sub)
    sub = torch.arange(len(row)) - torch.repeat_interleave(torch.cumsum(n_sub, 0) - n_sub, n_sub)
    item_bh, item_bucket = row // nbk, row % nbk
    q_start = qbound[:, :-1].reshape(-1)[row] + sub * block
    q_len = torch.minimum(qcnt[row] - sub * block, torch.tensor(block))
    last_pos = qcode[item_bh, q_start + q_len - 1] % span
    k_start = kbound[:, :-1].reshape(-1)[row]
    k_end = torch.searchsorted(kcode[item_bh], (item_bucket * span + last_pos - w)[:, None], right=True)[:, 0]
    k_len = (k_end - k_start).clamp(min=0)
    dummy_q = bh * t

    def gather(it, n_q, n_k):
        rq = torch.arange(n_q)[None, :]
        okq = rq < q_len[it][:, None]
        pq = (q_start[it][:, None] + rq).clamp(max=t - 1)
        r = item_bh[it][:, None]
        src = r * t + qorder[r, pq]
        dst = torch.where(okq, src, dummy_q)
        qpos = torch.where(okq, qcode[r, pq] % span - w, -1)[:, :, None]
        rk = torch.arange(n_k)[None, :]
        okk = rk < k_len[it][:, None]
        pk = (k_start[it][:, None] + rk).clamp(max=t - 1)
        kidx = r * t + korder[r, pk]
        kpos = torch.where(okk, kcode[r, pk] % span, t)[:, None, :]
        return src, dst, kidx, torch.where(kpos <= qpos, 0.0, NEG).to(dt)[:, None]

    return q_len, k_len, gather


def _chunks(q_len, k_len, step_elems):
    """Batches of routed items of at most step_elems padded scores (items sorted by size, so little is padded);
    items without a key are skipped. Yields (items, queries, keys) with the batch's largest counts."""
    cost = q_len * k_len
    order = torch.argsort(k_len * (int(q_len.max()) + 1) + q_len, stable=True) if len(q_len) else q_len
    order = order[cost[order] > 0]
    qs, ks = q_len[order], k_len[order]
    s0 = 0
    while s0 < len(order):
        qmax = torch.cummax(qs[s0:], 0).values
        padded = torch.arange(1, len(order) - s0 + 1) * qmax * ks[s0:]
        n = max(1, int((padded <= step_elems).sum()))
        yield order[s0:s0 + n], int(qmax[n - 1]), int(ks[s0 + n - 1])
        s0 += n


def _merge_into(o, lse, o2, l2):
    """Fold a part's (o2, l2) into the running (o, lse) in place (views allowed): the log-sum-exp merge."""
    new = torch.logaddexp(lse, l2)
    o.mul_(torch.exp(lse - new)[..., None]).add_(o2 * torch.exp(l2 - new)[..., None])
    lse.copy_(new)


class _Band:
    """The diagonal chunk (causal) or the previous chunk (key t of it is within w of query r iff t > r): chunks
    of w tokens as heads, [BH, Tp/w, w, E] views (strided for the previous chunk: chunks 1.. against 0..); one flash
    call each."""

    def __init__(self, ctl, prev: bool):
        self.ctl, self.prev = ctl, prev

    def _views(self, bh, tp, *xs):
        w = self.ctl["w"]
        return [x.view(bh, tp // w, w, *x.shape[2:]) for x in xs]

    def _args(self, q, k, v):
        c = self.ctl
        bh, tp, e = q.shape
        w, kb = c["w"], c["kbias"]
        q4, k4, v4 = self._views(bh, tp, q, k, v)
        if self.prev:
            q4, k4, v4 = q4[:, 1:], k4[:, :-1], v4[:, :-1]
            mask = c["upper"][None].expand(1, q4.shape[1], w, w)
            if kb is not None:
                mask = mask + kb.view(bh, tp // w, 1, w)[:, :-1]
            return q4, k4, v4, mask, False
        if kb is None:
            return q4, k4, v4, None, True
        return q4, k4, v4, c["tri"] + kb.view(bh, tp // w, 1, w), False

    def forward(self, q, k, v, o, lse):
        q4, k4, v4, mask, causal = self._args(q, k, v)
        o2, l2 = flash(q4, k4, v4, mask, self.ctl["scale"], causal=causal)
        if o is None:
            return o2.reshape(q.shape), l2.reshape(q.shape[:2])
        bh, tp, _ = q.shape
        o4, l4 = self._views(bh, tp, o, lse)
        _merge_into(o4[:, 1:], l4[:, 1:], o2, l2)
        return o, lse

    def backward(self, q, k, v, o, lse, do, dq, dk, dv):
        q4, k4, v4, mask, causal = self._args(q, k, v)
        bh, tp, _ = q.shape
        do4, o4, l4, dq4, dk4, dv4 = self._views(bh, tp, do, o, lse, dq, dk, dv)
        if self.prev:
            do4, o4, l4, dq4, dk4, dv4 = do4[:, 1:], o4[:, 1:], l4[:, 1:], dq4[:, 1:], dk4[:, :-1], dv4[:, :-1]
        g = flash_bwd(do4, q4, k4, v4, o4, l4, mask, self.ctl["scale"], causal=causal)
        dq4 += g[0]
        dk4 += g[1]
        dv4 += g[2]


class _Sinks:
    """Keys j < s for the queries i >= j + w: s columns, plain math."""

    def __init__(self, ctl):
        self.ctl = ctl

    def _scores(self, q, k):
        c = self.ctl
        sc = torch.baddbmm(c["sink"], q, k[:, :c["s"]].transpose(1, 2), alpha=c["scale"])
        if c["kbias"] is not None:
            sc = sc + c["kbias"][:, None, :c["s"]]
        return sc

    def forward(self, q, k, v, o, lse):
        sc = self._scores(q, k)
        l2 = torch.logsumexp(sc, -1)
        _merge_into(o, lse, torch.exp(sc - l2[..., None]) @ v[:, :self.ctl["s"]], l2)
        return o, lse

    def backward(self, q, k, v, o, lse, do, dq, dk, dv):
        s, scale = self.ctl["s"], self.ctl["scale"]
        p = torch.exp(self._scores(q, k) - lse[..., None])  # [BH, Tp, s]
        ds = p * (do @ v[:, :s].transpose(1, 2) - (do * o).sum(-1, keepdim=True))
        dq += ds @ k[:, :s] * scale
        dk[:, :s] += ds.transpose(1, 2) @ q * scale
        dv[:, :s] += p.transpose(1, 2) @ do


class _Routed:
    """Same-bucket keys s <= j <= i - w: work items gathered from flat tables (see `_routed`)."""

    def __init__(self, ctl):
        self.ctl = ctl

    def forward(self, q, k, v, o, lse):
        c = self.ctl
        t, (bh, tp, e) = c["t"], q.shape
        q_len, k_len, gather = c["routed"]
        qt, kt, vt = (x[:, :t].reshape(-1, e) for x in (q, k, v))
        o_r, lse_r = qt.new_zeros(qt.shape[0] + 1, e), qt.new_full((qt.shape[0] + 1,), NEG)
        for it, nq, nk in _chunks(q_len, k_len, c["step"]):
            src, dst, kidx, bias = gather(it, nq, nk)
            n = len(it)
            oc, lc = flash(qt.index_select(0, src.view(-1)).view(n, 1, nq, e),
                           kt.index_select(0, kidx.view(-1)).view(n, 1, nk, e),
                           vt.index_select(0, kidx.view(-1)).view(n, 1, nk, e), bias, c["scale"])
            o_r.index_copy_(0, dst.view(-1), oc.reshape(-1, e))
            lse_r.index_copy_(0, dst.view(-1), lc.reshape(-1))
        _merge_into(o[:, :t], lse[:, :t], o_r[:-1].view(bh, t, e), lse_r[:-1].view(bh, t))
        return o, lse

    def backward(self, q, k, v, o, lse, do, dq, dk, dv):
        c = self.ctl
        t, (bh, tp, e) = c["t"], q.shape
        q_len, k_len, gather = c["routed"]
        qt, kt, vt, ot, dot = (x[:, :t].reshape(-1, e) for x in (q, k, v, o, do))
        lt = lse[:, :t].reshape(-1)
        dqt, dkt, dvt = (torch.zeros(x.shape[0] + 1, e, dtype=x.dtype) for x in (qt, kt, vt))
        for it, nq, nk in _chunks(q_len, k_len, c["step"]):
            src, dst, kidx, bias = gather(it, nq, nk)
            n, si, ki = len(it), src.view(-1), kidx.view(-1)
            g = flash_bwd(dot.index_select(0, si).view(n, 1, nq, e), qt.index_select(0, si).view(n, 1, nq, e),
                          kt.index_select(0, ki).view(n, 1, nk, e), vt.index_select(0, ki).view(n, 1, nk, e),
                          ot.index_select(0, si).view(n, 1, nq, e), lt.index_select(0, si).view(n, 1, nq), bias,
                          c["scale"])
            dqt.index_add_(0, dst.view(-1), g[0].reshape(-1, e))
            dkt.index_add_(0, ki, g[1].reshape(-1, e))
            dvt.index_add_(0, ki, g[2].reshape(-1, e))
        dq[:, :t] += dqt[:-1].view(bh, t, e)
        dk[:, :t] += dkt[:-1].view(bh, t, e)
        dv[:, :t] += dvt[:-1].view(bh, t, e)


class _SparseBlocked(torch.autograd.Function):
    """Inputs are per query head and padded: q, k, v [BH, Tp, E] (Tp a multiple of w); returns [BH, Tp, E]."""

    @staticmethod
    def forward(ctx, q, k, v, parts):
        o = lse = None
        for p in parts:
            o, lse = p.forward(q, k, v, o, lse)
        empty = lse <= NEG / 2  # a row with no key at all (padding only): 0, as in the definition
        o = torch.where(empty[..., None], 0.0, o)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.parts = parts
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        do = torch.where((lse <= NEG / 2)[..., None], 0.0, do.contiguous())
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for p in ctx.parts:
            p.backward(q, k, v, o, lse, do, dq, dk, dv)
        return dq, dk, dv, None


def sparse_blocked(q, k, v, *, scale: float | None = None, q_bucket=None, k_bucket=None, q_keep=None, k_keep=None,
                   window: int = 0, sinks: int = 0, key_valid=None, block: int = 64, step_elems: int | None = None,
                   native: bool = False):
    """Causal sparse attention of a full forward (Tq = Tk), same arguments and result as
    `sparse_attention_reference` (causal=True); CPU tensors; differentiable in q, k, v. step_elems (padded scores
    per routed flash call) defaults to 64 T within [2^15, 2^20]: measured fastest at 1,024 and 16,384 tokens.
    native: the compiled kernels instead (`cpu.sparse_native`) where they are built."""
    b, h, t, d = q.shape
    dv = v.shape[-1]
    if k.shape[2] != t:
        raise ValueError("sparse_blocked computes a full forward (as many queries as keys)")
    w, s = max(window, 1), min(sinks, t)
    scale = d ** -0.5 if scale is None else scale
    if native:
        from .cpu import sparse_native

        out = sparse_native(q, k, v, scale=scale, q_bucket=q_bucket, k_bucket=k_bucket, q_keep=q_keep,
                            k_keep=k_keep, window=window, sinks=sinks, key_valid=key_valid)
        if out is not None:
            return out[0].to(q.dtype)
    step_elems = min(max(64 * t, 1 << 15), 1 << 20) if step_elems is None else step_elems
    dt = torch.promote_types(q.dtype, torch.float32)
    e, tp = max(d, dv), -(-t // w) * w

    def per_head(x):  # [b, n, t, ·] -> [b*h, Tp, E] in the compute dtype
        return per_query_head(F.pad(x.to(dt), (0, e - x.shape[-1], 0, tp - t)), h).reshape(b * h, tp, e)

    kvalid = torch.ones(b, t, dtype=torch.bool) if key_valid is None else key_valid.bool().cpu()
    kbias = None
    if key_valid is not None and not bool(kvalid.all()):
        kbias = F.pad(torch.where(kvalid, 0.0, NEG).to(dt), (0, tp - t), value=NEG).repeat_interleave(h, 0)
    r = torch.arange(w)
    i = torch.arange(tp)[:, None]
    ctl = {"w": w, "s": s, "t": t, "scale": scale, "kbias": kbias, "step": step_elems,
           "tri": torch.where(r[None, :] <= r[:, None], 0.0, NEG).to(dt),
           "upper": torch.where(r[None, :] > r[:, None], 0.0, NEG).to(dt)[None],
           "sink": torch.where(i - torch.arange(s)[None, :] >= w, 0.0, NEG).to(dt)[None],
           "routed": None}
    if t > w:
        ctl["routed"] = _routed(q_bucket, k_bucket, q_keep, k_keep, kvalid, s=s, w=w, block=block, b=b, h=h, t=t,
                                dt=dt)
    parts = [_Band(ctl, prev=False)] + ([_Band(ctl, prev=True)] if tp > w else [])
    if s and tp > w:
        parts.append(_Sinks(ctl))
    if ctl["routed"] is not None:
        parts.append(_Routed(ctl))
    o = _SparseBlocked.apply(per_head(q), per_head(k), per_head(v), parts)
    return o[:, :t, :dv].reshape(b, h, t, dv).to(q.dtype)
