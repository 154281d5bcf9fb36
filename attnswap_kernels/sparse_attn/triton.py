"""Sparse causal attention in Triton: one flash-attention kernel with two modes, forward and backward.

The definition is `reference.sparse_attention_reference`; the split of a row's keys is `blocked.py`'s. With
w = max(window, 1) and s sinks, query i sees two disjoint key sets, each computed by one launch of the same
kernels and merged by log-sum-exp (the backward launches take the merged log-sum-exp and delta = rowsum(dO o),
so the two parts' gradients add up to the exact ones):

- LOCAL (ROUTED = False), original order: the band i - w < j <= i and the sinks j < s with i - j >= w; a tile of
  BM queries loops over the sink keys, then over the key tiles of its band (contiguous ranges, no lookup).
- ROUTED (ROUTED = True), per (batch, query head) queries and keys sorted by (bucket, position), a key outside the
  routed set (sink, dropped, padding) in a bucket "none" after every real one and a dropped query in "none + 1"
  (the qk-drop mode: what is dropped is never loaded); query i sees the keys j of its bucket with s <= j <= i - w.
  A tile of BM sorted queries gathers its rows by position and loops over one contiguous range of sorted key
  tiles, from the first key of its first bucket to the last key of its last bucket at least w before its last
  query (the hash mode: tiles of other buckets are skipped, as in the paper's kernel). The ranges come from a
  searchsorted over the sorted codes (host side, on the device); the key tiles likewise know the range of sorted
  query tiles that see them (the dk/dv kernel).

Kernels: `sparse_fwd_kernel` (o and the row log-sum-exp of one part), `sparse_bwd_dq_kernel` (dq of one part),
`sparse_bwd_dkdv_kernel` (dk, dv of one part, one program per key tile). Tensors are per query head (K/V repeated
for grouped-query attention, dK/dV summed over the group afterwards), head dims padded to a power of 2 >= 16
inside the kernels by masked loads. Tolerance against the reference (relative RMS): fp32 <= 1e-5, fp16/bf16
<= 2e-2. A row with no key (padding only) is 0.
"""
import torch
import triton
import triton.language as tl

from .. import kernel_output, per_query_head
from .reference import sorted_codes

LOG2E = tl.constexpr(1.4426950408889634)  # kernels read globals only as constexpr
LN2 = tl.constexpr(0.6931471805599453)
# the bucket of keys outside the routed part (bucket ids must be smaller; dropped queries take NO_BUCKET + 1)
NO_BUCKET = 1 << 20


@triton.jit
def _rows(ptr, rows, n_rows, cols, n_cols, stride):
    """ptr[rows, cols] (row-major with `stride`), zero outside."""
    return tl.load(ptr + rows[:, None].to(tl.int64) * stride + cols[None, :],
                   mask=(rows[:, None] < n_rows) & (rows[:, None] >= 0) & (cols[None, :] < n_cols), other=0.0)


@triton.jit
def _sink_ok(i, j, T, S, W):
    return (j[None, :] < S) & (j[None, :] < T) & (i[:, None] - j[None, :] >= W)


@triton.jit
def _band_ok(i, j, T, W):
    d = i[:, None] - j[None, :]
    return (d >= 0) & (d < W) & (j[None, :] < T) & (j[None, :] >= 0)


@triton.jit
def _query_rows(qrow_ptr, qb_ptr, base, pid_m, T, BM: tl.constexpr, ROUTED: tl.constexpr):
    """A query tile's positions i (-1 past the end) and, when ROUTED, its buckets (tile of sorted queries)."""
    r = pid_m * BM + tl.arange(0, BM)
    if ROUTED:
        i = tl.load(qrow_ptr + base + r, mask=r < T, other=-1)
        qbk = tl.load(qb_ptr + base + r, mask=r < T, other=-1)
    else:
        i = tl.where(r < T, r, -1)
        qbk = i
    return i, qbk


@triton.jit
def _key_range(rng_ptr, bh, NT, pid_m, part, T, W, S, BM: tl.constexpr, BN: tl.constexpr, ROUTED: tl.constexpr):
    """The key positions (sorted positions when ROUTED) a query tile loops over in a part: ROUTED its range;
    LOCAL part 0 the sinks, part 1 the band."""
    if ROUTED:
        lo = tl.load(rng_ptr + (bh.to(tl.int64) * NT + pid_m) * 2)
        hi = tl.load(rng_ptr + (bh.to(tl.int64) * NT + pid_m) * 2 + 1)
    elif part == 0:
        lo = pid_m * 0
        hi = lo + S
    else:
        lo = tl.maximum(pid_m * BM - W + 1, 0) // BN * BN
        hi = tl.minimum((pid_m + 1) * BM, T)
    return lo, hi


@triton.jit
def _key_tile(k_ptr, v_ptr, krow_ptr, kb_ptr, kvalid_ptr, base, b, n0, hi, i, qbk, part, T, W, S,
              D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BN: tl.constexpr,
              ROUTED: tl.constexpr):
    """Keys n0 .. n0 + BN of a loop (sorted ones when ROUTED): k, v tiles and which (query, key) pairs count."""
    c = n0 + tl.arange(0, BN)
    if ROUTED:
        j = tl.load(krow_ptr + base + c, mask=c < hi, other=-1)
        kbk = tl.load(kb_ptr + base + c, mask=c < hi, other=-2)
        ok = (kbk[None, :] == qbk[:, None]) & (j[None, :] <= i[:, None] - W) & (j[None, :] >= 0)
    else:
        j = c
        valid = tl.load(kvalid_ptr + b.to(tl.int64) * T + j, mask=j < T, other=0) != 0
        if part == 0:
            ok = _sink_ok(i, j, T, S, W) & valid[None, :]
        else:
            ok = _band_ok(i, j, T, W) & valid[None, :]
    ok = ok & (i[:, None] >= 0)
    kt = _rows(k_ptr + base * D, j, T, tl.arange(0, BD), D, D)
    vt = _rows(v_ptr + base * DV, j, T, tl.arange(0, BDV), DV, DV)
    return kt, vt, ok


@triton.jit
def sparse_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, qrow_ptr, krow_ptr, qb_ptr, kb_ptr, rng_ptr, kvalid_ptr,
                      T, H, NT, W, S, scale2,
                      D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BM: tl.constexpr,
                      BN: tl.constexpr, ROUTED: tl.constexpr, PRECISION: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    base, b = bh.to(tl.int64) * T, bh // H
    o_d, o_dv = tl.arange(0, BD), tl.arange(0, BDV)
    i, qbk = _query_rows(qrow_ptr, qb_ptr, base, pid_m, T, BM, ROUTED)
    q = _rows(q_ptr + base * D, i, T, o_d, D, D)
    m = tl.full([BM], float("-inf"), tl.float32)
    l = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BDV], tl.float32)
    for part in tl.static_range(1 if ROUTED else 2):
        lo, hi = _key_range(rng_ptr, bh, NT, pid_m, part, T, W, S, BM, BN, ROUTED)
        for n0 in range(lo, hi, BN):
            kt, vt, ok = _key_tile(k_ptr, v_ptr, krow_ptr, kb_ptr, kvalid_ptr, base, b, n0, hi, i, qbk, part, T, W, S,
                                   D, DV, BD, BDV, BN, ROUTED)
            s = tl.dot(q, tl.trans(kt), input_precision=PRECISION) * scale2
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m - m_safe)
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PRECISION)
            l = l * alpha + tl.sum(p, 1)
            m = m_new
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    lse = tl.where(l > 0, (m + tl.log2(tl.where(l > 0, l, 1.0))) * LN2, float("-inf"))
    keep = i >= 0
    tl.store(o_ptr + (base + i.to(tl.int64))[:, None] * DV + o_dv[None, :], out.to(o_ptr.dtype.element_ty),
             mask=keep[:, None] & (o_dv[None, :] < DV))
    tl.store(lse_ptr + base + i, lse, mask=keep)


@triton.jit
def sparse_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, qrow_ptr, krow_ptr, qb_ptr, kb_ptr,
                         rng_ptr, kvalid_ptr, T, H, NT, W, S, scale2,
                         D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BM: tl.constexpr,
                         BN: tl.constexpr, ROUTED: tl.constexpr, PRECISION: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    base, b = bh.to(tl.int64) * T, bh // H
    o_d, o_dv = tl.arange(0, BD), tl.arange(0, BDV)
    i, qbk = _query_rows(qrow_ptr, qb_ptr, base, pid_m, T, BM, ROUTED)
    q = _rows(q_ptr + base * D, i, T, o_d, D, D)
    do = _rows(do_ptr + base * DV, i, T, o_dv, DV, DV)
    lse2 = tl.load(lse_ptr + base + i, mask=i >= 0, other=0.0) * LOG2E
    delta = tl.load(delta_ptr + base + i, mask=i >= 0, other=0.0)
    dq = tl.zeros([BM, BD], tl.float32)
    for part in tl.static_range(1 if ROUTED else 2):
        lo, hi = _key_range(rng_ptr, bh, NT, pid_m, part, T, W, S, BM, BN, ROUTED)
        for n0 in range(lo, hi, BN):
            kt, vt, ok = _key_tile(k_ptr, v_ptr, krow_ptr, kb_ptr, kvalid_ptr, base, b, n0, hi, i, qbk, part, T, W, S,
                                   D, DV, BD, BDV, BN, ROUTED)
            s = tl.dot(q, tl.trans(kt), input_precision=PRECISION) * scale2
            p = tl.where(ok, tl.exp2(s - lse2[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(vt), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(kt.dtype), kt, input_precision=PRECISION)
    tl.store(dq_ptr + (base + i.to(tl.int64))[:, None] * D + o_d[None, :], (dq * (scale2 * LN2)).to(dq_ptr.dtype.element_ty),
             mask=(i[:, None] >= 0) & (o_d[None, :] < D))


@triton.jit
def sparse_bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, qrow_ptr, krow_ptr,
                           qb_ptr, kb_ptr, rng_ptr, kvalid_ptr, T, H, NT, W, S, scale2,
                           D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BM: tl.constexpr,
                           BN: tl.constexpr, ROUTED: tl.constexpr, PRECISION: tl.constexpr):
    """One program per key tile of BN keys (sorted keys when ROUTED): dk, dv from the query tiles that see it."""
    pid_n, bh = tl.program_id(0), tl.program_id(1)
    base = bh.to(tl.int64) * T
    o_d, o_dv, c = tl.arange(0, BD), tl.arange(0, BDV), tl.arange(0, BN)
    b = bh // H
    if ROUTED:
        cs = pid_n * BN + c
        j = tl.load(krow_ptr + base + cs, mask=cs < T, other=-1)
        kbk = tl.load(kb_ptr + base + cs, mask=cs < T, other=-2)
        valid = j >= 0
        lo = tl.load(rng_ptr + (bh.to(tl.int64) * NT + pid_n) * 2)
        hi = tl.load(rng_ptr + (bh.to(tl.int64) * NT + pid_n) * 2 + 1)
    else:
        j = pid_n * BN + c
        j = tl.where(j < T, j, -1)
        valid = tl.load(kvalid_ptr + b.to(tl.int64) * T + j, mask=j >= 0, other=0) != 0
        lo = pid_n * BN // BM * BM
        hi = tl.minimum((pid_n + 1) * BN + W - 1, T)
    kt = _rows(k_ptr + base * D, j, T, o_d, D, D)
    vt = _rows(v_ptr + base * DV, j, T, o_dv, DV, DV)
    dk = tl.zeros([BN, BD], tl.float32)
    dv = tl.zeros([BN, BDV], tl.float32)
    for part in tl.static_range(1 if ROUTED else 2):
        if part == 1:  # LOCAL's sinks: the queries w and more after a sink, for a tile that holds sinks
            lo = (pid_n * BN + W) // BM * BM
            hi = tl.where(pid_n * BN < S, T, lo)
        for m0 in range(lo, hi, BM):
            rr = m0 + tl.arange(0, BM)
            if ROUTED:
                i = tl.load(qrow_ptr + base + rr, mask=rr < hi, other=-1)
                qbk = tl.load(qb_ptr + base + rr, mask=rr < hi, other=-1)
                okT = (kbk[:, None] == qbk[None, :]) & (j[:, None] <= i[None, :] - W) & (i[None, :] >= 0)
            else:
                i = tl.where(rr < T, rr, -1)
                if part == 0:
                    okT = tl.trans(_band_ok(i, j, T, W)) & (i[None, :] >= 0)
                else:
                    okT = tl.trans(_sink_ok(i, j, T, S, W)) & (i[None, :] >= 0)
            okT = okT & valid[:, None] & (j[:, None] >= 0)
            q = _rows(q_ptr + base * D, i, T, o_d, D, D)
            do = _rows(do_ptr + base * DV, i, T, o_dv, DV, DV)
            lse2 = tl.load(lse_ptr + base + i, mask=i >= 0, other=0.0) * LOG2E
            delta = tl.load(delta_ptr + base + i, mask=i >= 0, other=0.0)
            sT = tl.dot(kt, tl.trans(q), input_precision=PRECISION) * scale2
            pT = tl.where(okT, tl.exp2(sT - lse2[None, :]), 0.0)
            dv += tl.dot(pT.to(do.dtype), do, input_precision=PRECISION)
            dpT = tl.dot(vt, tl.trans(do), input_precision=PRECISION)
            dsT = pT * (dpT - delta[None, :])
            dk += tl.dot(dsT.to(q.dtype), q, input_precision=PRECISION)
    keep = j >= 0
    tl.store(dk_ptr + (base + j.to(tl.int64))[:, None] * D + o_d[None, :], (dk * (scale2 * LN2)).to(dk_ptr.dtype.element_ty),
             mask=keep[:, None] & (o_d[None, :] < D))
    tl.store(dv_ptr + (base + j.to(tl.int64))[:, None] * DV + o_dv[None, :], dv.to(dv_ptr.dtype.element_ty),
             mask=keep[:, None] & (o_dv[None, :] < DV))


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _routing(q_bucket, k_bucket, q_keep, k_keep, kvalid, *, b, h, t, s, w, bm, bn):
    """Sorted order and tile ranges of the routed part, all [B*H, ...] int32 on the inputs' device."""
    dev = kvalid.device
    none = NO_BUCKET  # a constant, not the largest bucket + 1: reading that would synchronise with the device
    qcode, qorder, kcode, korder, span = sorted_codes(q_bucket, k_bucket, q_keep, k_keep, kvalid, heads=h, sinks=s,
                                                      none=none)
    nt_q, nt_k = -(-t // bm), -(-t // bn)
    # query tiles -> ranges of sorted keys
    first = qcode[:, ::bm]
    last = qcode[:, (torch.arange(nt_q, device=dev) * bm + bm - 1).clamp(max=t - 1)]
    lb = last // span
    k_lo = torch.searchsorted(kcode, (first // span) * span)
    k_hi = torch.searchsorted(kcode, torch.where(lb < none, lb * span + last % span - w, none * span - 1), right=True)
    k_hi = torch.minimum(k_hi, torch.searchsorted(kcode, torch.full_like(k_hi, none * span)))
    k_rng = torch.stack([k_lo, torch.maximum(k_hi, k_lo)], -1)
    # key tiles -> ranges of sorted queries
    kf = kcode[:, ::bn]
    kl = kcode[:, (torch.arange(nt_k, device=dev) * bn + bn - 1).clamp(max=t - 1)]
    q_lo = torch.searchsorted(qcode, kf + w)
    q_hi = torch.searchsorted(qcode, ((kl // span).clamp(max=none - 1) + 1) * span)
    q_hi = torch.where(kf // span >= none, q_lo, torch.maximum(q_hi, q_lo))
    q_rng = torch.stack([q_lo, q_hi], -1)
    i32 = torch.int32
    return {"qrow": qorder.to(i32).contiguous(), "krow": korder.to(i32).contiguous(),
            "qb": (qcode // span).to(i32).contiguous(), "kb": (kcode // span).to(i32).contiguous(),
            "k_rng": k_rng.to(i32).contiguous(), "q_rng": q_rng.to(i32).contiguous(), "nt_q": nt_q, "nt_k": nt_k}


class _SparseTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, route, kvalid, h, w, s, scale, bm, bn):
        bh, t, d = q.shape
        dv = v.shape[-1]
        prec = "ieee" if q.dtype == torch.float32 else "tf32"
        consts = dict(D=d, DV=dv, BD=_pow2(d), BDV=_pow2(dv), BM=bm, BN=bn, PRECISION=prec)
        scale2 = scale * 1.4426950408889634
        nt = route["nt_q"]
        parts = []
        for routed in (False, True):
            o, lse = kernel_output(bh, t, dv, device=q.device), kernel_output(bh, t, device=q.device)
            sparse_fwd_kernel[(nt, bh)](q, k, v, o, lse, route["qrow"], route["krow"], route["qb"], route["kb"],
                                        route["k_rng"], kvalid, t, h, nt, w, s, scale2, ROUTED=routed, **consts)
            parts.append((o, lse))
        (o1, l1), (o2, l2) = parts
        lse = torch.logaddexp(l1, l2)
        finite = torch.isfinite(lse)
        safe = torch.where(finite, lse, 0.0)
        o = torch.where(finite[..., None],
                        o1 * torch.exp(l1 - safe)[..., None] + o2 * torch.exp(l2 - safe)[..., None], 0.0)
        ctx.save_for_backward(q, k, v, o, lse, kvalid, *(route[n] for n in ("qrow", "krow", "qb", "kb", "k_rng", "q_rng")))
        ctx.args = (h, w, s, scale2, consts, route["nt_q"], route["nt_k"])
        return o.to(q.dtype)

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, kvalid, qrow, krow, qb, kb, k_rng, q_rng = ctx.saved_tensors
        h, w, s, scale2, consts, nt_q, nt_k = ctx.args
        bh, t, d = q.shape
        do = do.contiguous()
        delta = (do.float() * o).sum(-1)
        lse = torch.where(torch.isfinite(lse), lse, 0.0)  # rows with no key: p = 0 everywhere anyway
        dq = torch.zeros(bh, t, d, device=q.device, dtype=torch.float32)
        dk = torch.zeros_like(dq)
        dv = torch.zeros(bh, t, v.shape[-1], device=q.device, dtype=torch.float32)
        for routed in (False, True):
            dq_p, dk_p, dv_p = (kernel_output(*x.shape, device=q.device) for x in (dq, dk, dv))
            sparse_bwd_dq_kernel[(nt_q, bh)](q, k, v, do, lse, delta, dq_p, qrow, krow, qb, kb, k_rng, kvalid,
                                             t, h, nt_q, w, s, scale2, ROUTED=routed, **consts)
            sparse_bwd_dkdv_kernel[(nt_k, bh)](q, k, v, do, lse, delta, dk_p, dv_p, qrow, krow, qb, kb, q_rng, kvalid,
                                               t, h, nt_k, w, s, scale2, ROUTED=routed, **consts)
            dq += dq_p
            dk += dk_p
            dv += dv_p
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None, None, None


def sparse_triton(q, k, v, *, scale: float | None = None, q_bucket=None, k_bucket=None, q_keep=None, k_keep=None,
                  window: int = 0, sinks: int = 0, key_valid=None, block_m: int = 64, block_n: int = 64):
    """Causal sparse attention of a full forward (Tq = Tk) by the Triton kernels; the arguments of
    `sparse_attention_reference`; differentiable in q, k, v."""
    b, h, t, d = q.shape
    if k.shape[2] != t:
        raise ValueError("sparse_triton computes a full forward (as many queries as keys)")
    w, s = max(window, 1), min(sinks, t)
    scale = d ** -0.5 if scale is None else scale
    kvalid = (torch.ones(b, t, dtype=torch.bool, device=q.device) if key_valid is None
              else key_valid.bool().to(q.device))
    route = _routing(q_bucket, k_bucket, q_keep, k_keep, kvalid, b=b, h=h, t=t, s=s, w=w, bm=block_m, bn=block_n)

    def per_head(x):
        return per_query_head(x, h).reshape(b * h, t, x.shape[-1]).contiguous()

    o = _SparseTriton.apply(per_head(q), per_head(k), per_head(v), route, kvalid.to(torch.int8).contiguous(),
                            h, w, s, scale, block_m, block_n)
    return o.view(b, h, t, -1)
