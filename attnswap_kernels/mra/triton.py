"""MRA attention in Triton: the block-sparse exact part, the block-mean correction and their merge.

Inputs come from `reference.prepare` and `reference.select_blocks` (padding, block means, low-resolution
scores and the top-k selection in PyTorch: one small matmul and a sort over the block grid). Kernels:

- `mra_fwd_kernel`, one program per (query block, batch x head): an online softmax over the exact keys of the
  selected key blocks (causal edge masked inside the diagonal block, padding masked), then over the virtual
  keys of the allowed, non-selected blocks (logit q.kbar * scale + log n, value vbar) when approx is "full";
  writes o and the row log-sum-exp.
- `mra_bwd_dq_kernel`, same grid: dq from both parts, p recomputed from the saved log-sum-exp.
- `mra_bwd_dkdv_kernel`, one program per (key block, batch x KV head): walks the query blocks that selected
  this key block (a column list built from the selection), over the G query heads of the group: dk, dv.
- `mra_bwd_lowres_kernel`, one program per (BJ key blocks, batch x KV head): d kbar, d vbar from every query
  block that approximated them; autograd takes them on through the block means to k and v.

Block size and head dims: the block size must be a power of 2 >= 16 (the variant falls back to the
reference otherwise); head dims are padded to a power of 2 >= 16 inside the kernels with masked loads.
Tolerance against the reference (relative RMS): fp32 <= 1e-5, fp16/bf16 <= 2e-2 (products of half inputs,
fp32 accumulation). Rows that see no key at all give 0, as in the reference.
"""
import torch
import triton
import triton.language as tl

from .. import kernel_output

LOG2E = 1.4426950408889634


@triton.jit
def _tile(ptr, rows, cols, n_rows, n_cols, stride):
    """Load ptr[rows, cols] (row-major with `stride`), zero outside [n_rows, n_cols)."""
    return tl.load(ptr + rows[:, None].to(tl.int64) * stride + cols[None, :],
                   mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)


@triton.jit
def _exact_block(q, k0, v0, kvalid_ptr, i_b, j_blk, qpos, o_s, o_d, o_dv, NK, scale2,
                 D: tl.constexpr, DV: tl.constexpr, BS: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """Key block j_blk: its keys, values, base-2 logits [BS, BS] and the mask (padding, causal edge)."""
    kpos = j_blk * BS + o_s
    kt = _tile(k0, kpos, o_d, NK, D, D)
    vt = _tile(v0, kpos, o_dv, NK, DV, DV)
    s = tl.dot(q, tl.trans(kt), input_precision=PRECISION) * scale2
    ok = tl.load(kvalid_ptr + i_b.to(tl.int64) * NK + kpos) != 0
    ok = ok[None, :] & (qpos[:, None] >= 0)  # broadcast to [BS, BS]
    if CAUSAL:
        ok = ok & (kpos[None, :] <= qpos[:, None])
    return kt, vt, s, ok


@triton.jit
def _virtual_chunk(q, kb0, vb0, logn_ptr, selm_ptr, i_b, row, j0, n_j, o_d, o_dv, NBK, scale2,
                   D: tl.constexpr, DV: tl.constexpr, BJ: tl.constexpr, PRECISION: tl.constexpr):
    """Block means j0 .. j0 + BJ of one query-block row: keys, values, base-2 logits (+ log2 n) and the mask
    (allowed, not selected, not empty)."""
    jj = j0 + tl.arange(0, BJ)
    kb = _tile(kb0, jj, o_d, n_j, D, D)
    vb = _tile(vb0, jj, o_dv, n_j, DV, DV)
    ln = tl.load(logn_ptr + i_b.to(tl.int64) * NBK + jj, mask=jj < n_j, other=float("-inf"))
    chosen = tl.load(selm_ptr + row * NBK + jj, mask=jj < n_j, other=1)
    s = tl.dot(q, tl.trans(kb), input_precision=PRECISION) * scale2 + ln[None, :]
    ok = (chosen == 0) & (ln > float("-inf"))
    return kb, vb, s, ok


@triton.jit
def _online_softmax(m, l, acc, s, v, PRECISION: tl.constexpr):
    """Fold base-2 logits s [BS, N] (-inf = masked) with values v [N, DV] into the running max m, sum l and acc."""
    m_new = tl.maximum(m, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing yet: exp2(-inf) = 0, no NaN
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m - m_safe)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l * alpha + tl.sum(p, 1), acc


@triton.jit
def mra_fwd_kernel(
    q_ptr, k_ptr, v_ptr, kbar_ptr, vbar_ptr, logn_ptr, kvalid_ptr, idx_ptr, cnt_ptr, selm_ptr, o_ptr, lse_ptr,
    H, G, NQ, NK, NBQ, NBK, I0, KMAX, scale2,
    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BS: tl.constexpr, BJ: tl.constexpr,
    CAUSAL: tl.constexpr, FULL: tl.constexpr, PRECISION: tl.constexpr,
):
    i_q = tl.program_id(0)  # local query block
    i_bh = tl.program_id(1)
    i_b = i_bh // H
    i_hk = (i_bh % H) // G
    i_bhk = i_b * (H // G) + i_hk
    o_s = tl.arange(0, BS)
    o_d = tl.arange(0, BD)
    o_dv = tl.arange(0, BDV)
    rows = i_q * BS + o_s
    qpos = (I0 + i_q) * BS + o_s  # absolute positions
    q = _tile(q_ptr + i_bh.to(tl.int64) * NQ * D, rows, o_d, NQ, D, D)
    k0 = k_ptr + i_bhk.to(tl.int64) * NK * D
    v0 = v_ptr + i_bhk.to(tl.int64) * NK * DV

    m = tl.full([BS], float("-inf"), tl.float32)
    l = tl.zeros([BS], tl.float32)
    acc = tl.zeros([BS, BDV], tl.float32)
    row = i_bh.to(tl.int64) * NBQ + i_q
    n_sel = tl.load(cnt_ptr + row)
    for t in range(0, n_sel):
        j_blk = tl.load(idx_ptr + row * KMAX + t)
        kt, vt, s, ok = _exact_block(q, k0, v0, kvalid_ptr, i_b, j_blk, qpos, o_s, o_d, o_dv, NK, scale2,
                                     D, DV, BS, CAUSAL, PRECISION)
        m, l, acc = _online_softmax(m, l, acc, tl.where(ok, s, float("-inf")), vt, PRECISION)
    if FULL:
        n_j = NBK
        if CAUSAL:
            n_j = tl.minimum(I0 + i_q + 1, NBK)
        kb0 = kbar_ptr + i_bhk.to(tl.int64) * NBK * D
        vb0 = vbar_ptr + i_bhk.to(tl.int64) * NBK * DV
        for j0 in range(0, n_j, BJ):
            kb, vb, s, ok = _virtual_chunk(q, kb0, vb0, logn_ptr, selm_ptr, i_b, row, j0, n_j, o_d, o_dv, NBK,
                                           scale2, D, DV, BJ, PRECISION)
            m, l, acc = _online_softmax(m, l, acc, tl.where(ok[None, :], s, float("-inf")), vb, PRECISION)
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(o_ptr + i_bh.to(tl.int64) * NQ * DV + rows[:, None].to(tl.int64) * DV + o_dv[None, :],
             out.to(o_ptr.dtype.element_ty), mask=(rows[:, None] < NQ) & (o_dv[None, :] < DV))
    # base-2 log-sum-exp; +inf for a row without keys, so the backward's p = exp2(s - lse) is 0 there
    lse = tl.where(l > 0, m + tl.log2(tl.where(l > 0, l, 1.0)), float("inf"))
    tl.store(lse_ptr + i_bh.to(tl.int64) * NQ + rows, lse, mask=rows < NQ)


@triton.jit
def mra_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, kbar_ptr, vbar_ptr, logn_ptr, kvalid_ptr, idx_ptr, cnt_ptr, selm_ptr,
    do_ptr, lse_ptr, delta_ptr, dq_ptr,
    H, G, NQ, NK, NBQ, NBK, I0, KMAX, scale2, scale,
    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BS: tl.constexpr, BJ: tl.constexpr,
    CAUSAL: tl.constexpr, FULL: tl.constexpr, PRECISION: tl.constexpr,
):
    i_q = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // H
    i_hk = (i_bh % H) // G
    i_bhk = i_b * (H // G) + i_hk
    o_s = tl.arange(0, BS)
    o_d = tl.arange(0, BD)
    o_dv = tl.arange(0, BDV)
    rows = i_q * BS + o_s
    qpos = (I0 + i_q) * BS + o_s
    q = _tile(q_ptr + i_bh.to(tl.int64) * NQ * D, rows, o_d, NQ, D, D)
    do = _tile(do_ptr + i_bh.to(tl.int64) * NQ * DV, rows, o_dv, NQ, DV, DV)
    lse = tl.load(lse_ptr + i_bh.to(tl.int64) * NQ + rows, mask=rows < NQ, other=float("inf"))
    delta = tl.load(delta_ptr + i_bh.to(tl.int64) * NQ + rows, mask=rows < NQ, other=0.0)
    k0 = k_ptr + i_bhk.to(tl.int64) * NK * D
    v0 = v_ptr + i_bhk.to(tl.int64) * NK * DV
    dq = tl.zeros([BS, BD], tl.float32)
    row = i_bh.to(tl.int64) * NBQ + i_q
    n_sel = tl.load(cnt_ptr + row)
    for t in range(0, n_sel):
        j_blk = tl.load(idx_ptr + row * KMAX + t)
        kt, vt, s, ok = _exact_block(q, k0, v0, kvalid_ptr, i_b, j_blk, qpos, o_s, o_d, o_dv, NK, scale2,
                                     D, DV, BS, CAUSAL, PRECISION)
        p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(vt), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), kt, input_precision=PRECISION)
    if FULL:
        n_j = NBK
        if CAUSAL:
            n_j = tl.minimum(I0 + i_q + 1, NBK)
        kb0 = kbar_ptr + i_bhk.to(tl.int64) * NBK * D
        vb0 = vbar_ptr + i_bhk.to(tl.int64) * NBK * DV
        for j0 in range(0, n_j, BJ):
            kb, vb, s, ok = _virtual_chunk(q, kb0, vb0, logn_ptr, selm_ptr, i_b, row, j0, n_j, o_d, o_dv, NBK,
                                           scale2, D, DV, BJ, PRECISION)
            p = tl.where(ok[None, :], tl.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(vb), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(kb.dtype), kb, input_precision=PRECISION)
    tl.store(dq_ptr + i_bh.to(tl.int64) * NQ * D + rows[:, None].to(tl.int64) * D + o_d[None, :],
             (dq * scale).to(dq_ptr.dtype.element_ty), mask=(rows[:, None] < NQ) & (o_d[None, :] < D))


@triton.jit
def mra_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, kvalid_ptr, colidx_ptr, colcnt_ptr,
    do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    H, G, NQ, NK, NBQ, NBK, I0, CMAX, scale2, scale,
    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BS: tl.constexpr,
    CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
):
    j_blk = tl.program_id(0)
    i_bhk = tl.program_id(1)
    HK = H // G
    i_b = i_bhk // HK
    i_hk = i_bhk % HK
    o_s = tl.arange(0, BS)
    o_d = tl.arange(0, BD)
    o_dv = tl.arange(0, BDV)
    kpos = j_blk * BS + o_s
    kt = _tile(k_ptr + i_bhk.to(tl.int64) * NK * D, kpos, o_d, NK, D, D)
    vt = _tile(v_ptr + i_bhk.to(tl.int64) * NK * DV, kpos, o_dv, NK, DV, DV)
    kok = tl.load(kvalid_ptr + i_b.to(tl.int64) * NK + kpos) != 0
    dk = tl.zeros([BS, BD], tl.float32)
    dv = tl.zeros([BS, BDV], tl.float32)
    for g in range(0, G):
        i_bh = (i_b * H + i_hk * G + g).to(tl.int64)
        col = i_bh * NBK + j_blk
        n_col = tl.load(colcnt_ptr + col)
        for t in range(0, n_col):
            i_q = tl.load(colidx_ptr + col * CMAX + t)
            rows = i_q * BS + o_s
            qpos = (I0 + i_q) * BS + o_s
            q = _tile(q_ptr + i_bh * NQ * D, rows, o_d, NQ, D, D)
            do = _tile(do_ptr + i_bh * NQ * DV, rows, o_dv, NQ, DV, DV)
            lse = tl.load(lse_ptr + i_bh * NQ + rows, mask=rows < NQ, other=float("inf"))
            delta = tl.load(delta_ptr + i_bh * NQ + rows, mask=rows < NQ, other=0.0)
            s = tl.dot(q, tl.trans(kt), input_precision=PRECISION) * scale2  # [BS q, BS k]
            ok = kok[None, :] & (qpos[:, None] >= 0)
            if CAUSAL:
                ok = ok & (kpos[None, :] <= qpos[:, None])
            p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
            dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(vt), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
    tl.store(dk_ptr + i_bhk.to(tl.int64) * NK * D + kpos[:, None].to(tl.int64) * D + o_d[None, :],
             (dk * scale).to(dk_ptr.dtype.element_ty), mask=(kpos[:, None] < NK) & (o_d[None, :] < D))
    tl.store(dv_ptr + i_bhk.to(tl.int64) * NK * DV + kpos[:, None].to(tl.int64) * DV + o_dv[None, :],
             dv.to(dv_ptr.dtype.element_ty), mask=(kpos[:, None] < NK) & (o_dv[None, :] < DV))


@triton.jit
def mra_bwd_lowres_kernel(
    q_ptr, kbar_ptr, vbar_ptr, logn_ptr, selm_ptr,
    do_ptr, lse_ptr, delta_ptr, dkbar_ptr, dvbar_ptr,
    H, G, NQ, NBQ, NBK, I0, scale2, scale,
    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BS: tl.constexpr, BJ: tl.constexpr,
    CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
):
    j0 = tl.program_id(0) * BJ
    i_bhk = tl.program_id(1)
    HK = H // G
    i_b = i_bhk // HK
    i_hk = i_bhk % HK
    o_s = tl.arange(0, BS)
    o_d = tl.arange(0, BD)
    o_dv = tl.arange(0, BDV)
    jj = j0 + tl.arange(0, BJ)
    kb = _tile(kbar_ptr + i_bhk.to(tl.int64) * NBK * D, jj, o_d, NBK, D, D)
    vb = _tile(vbar_ptr + i_bhk.to(tl.int64) * NBK * DV, jj, o_dv, NBK, DV, DV)
    ln = tl.load(logn_ptr + i_b.to(tl.int64) * NBK + jj, mask=jj < NBK, other=float("-inf"))
    dkb = tl.zeros([BJ, BD], tl.float32)
    dvb = tl.zeros([BJ, BDV], tl.float32)
    i_start = 0
    if CAUSAL:
        i_start = tl.maximum(j0 - I0, 0)  # query blocks before j0 see none of these key blocks
    for g in range(0, G):
        i_bh = (i_b * H + i_hk * G + g).to(tl.int64)
        for i_q in range(i_start, NBQ):
            rows = i_q * BS + o_s
            q = _tile(q_ptr + i_bh * NQ * D, rows, o_d, NQ, D, D)
            do = _tile(do_ptr + i_bh * NQ * DV, rows, o_dv, NQ, DV, DV)
            lse = tl.load(lse_ptr + i_bh * NQ + rows, mask=rows < NQ, other=float("inf"))
            delta = tl.load(delta_ptr + i_bh * NQ + rows, mask=rows < NQ, other=0.0)
            chosen = tl.load(selm_ptr + (i_bh * NBQ + i_q) * NBK + jj, mask=jj < NBK, other=1)
            ok = (chosen == 0) & (ln > float("-inf"))
            if CAUSAL:
                ok = ok & (jj <= I0 + i_q)
            s = tl.dot(q, tl.trans(kb), input_precision=PRECISION) * scale2 + ln[None, :]  # [BS, BJ]
            p = tl.where(ok[None, :], tl.exp2(s - lse[:, None]), 0.0)
            dvb += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(vb), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dkb += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
    tl.store(dkbar_ptr + i_bhk.to(tl.int64) * NBK * D + jj[:, None].to(tl.int64) * D + o_d[None, :],
             dkb * scale, mask=(jj[:, None] < NBK) & (o_d[None, :] < D))
    tl.store(dvbar_ptr + i_bhk.to(tl.int64) * NBK * DV + jj[:, None].to(tl.int64) * DV + o_dv[None, :],
             dvb, mask=(jj[:, None] < NBK) & (o_dv[None, :] < DV))


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


def _lists(mask: torch.Tensor):
    """Row-wise index lists of a boolean [..., N] mask: (indices int32 [..., max count], counts int32 [...])."""
    cnt = mask.sum(-1)
    width = max(int(cnt.max()) if cnt.numel() else 0, 1)
    idx = mask.to(torch.int8).argsort(dim=-1, descending=True, stable=True)[..., :width]
    return idx.to(torch.int32).contiguous(), cnt.to(torch.int32).contiguous()


class MRAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qp, kp, vp, kbar, vbar, logn, kvalid, sel, i0, bs, causal, scale, full):
        qp, kp, vp = qp.contiguous(), kp.contiguous(), vp.contiguous()
        b, h, nq, d = qp.shape
        hk, nk, dv = kp.shape[1], kp.shape[2], vp.shape[-1]
        nbq, nbk = nq // bs, nk // bs
        # block means in the inputs' dtype for the tensor-core products (fp32 for fp32 inputs)
        kbar_c = kbar.to(qp.dtype).contiguous()
        vbar_c = vbar.to(qp.dtype).contiguous()
        logn2 = (logn.float() * LOG2E).contiguous()
        kvalid8 = kvalid.to(torch.int8).contiguous()
        idx, cnt = _lists(sel)
        selm = sel.to(torch.int8).contiguous()
        o = kernel_output(b, h, nq, dv, dtype=qp.dtype, device=qp.device)
        lse = kernel_output(b, h, nq, dtype=torch.float32, device=qp.device)
        meta = dict(D=d, DV=dv, BD=_pow2(d), BDV=_pow2(dv), BS=bs, CAUSAL=causal,
                    PRECISION="ieee" if qp.dtype == torch.float32 else "tf32")
        mra_fwd_kernel[(nbq, b * h)](
            qp, kp, vp, kbar_c, vbar_c, logn2, kvalid8, idx, cnt, selm, o, lse,
            h, h // hk, nq, nk, nbq, nbk, i0, idx.shape[-1], scale * LOG2E, BJ=32, FULL=full, **meta)
        ctx.save_for_backward(qp, kp, vp, kbar_c, vbar_c, logn2, kvalid8, idx, cnt, selm, sel, o, lse)
        ctx.cfg = (i0, scale, full, meta)
        return o

    @staticmethod
    def backward(ctx, do):
        qp, kp, vp, kbar_c, vbar_c, logn2, kvalid8, idx, cnt, selm, sel, o, lse = ctx.saved_tensors
        i0, scale, full, meta = ctx.cfg
        b, h, nq, d = qp.shape
        hk, nk, dv = kp.shape[1], kp.shape[2], vp.shape[-1]
        g, bs = h // hk, meta["BS"]
        nbq, nbk = nq // bs, nk // bs
        do = do.contiguous()
        delta = (do.float() * o.float()).sum(-1).contiguous()
        dq = kernel_output(*qp.shape, dtype=qp.dtype, device=qp.device)
        mra_bwd_dq_kernel[(nbq, b * h)](
            qp, kp, vp, kbar_c, vbar_c, logn2, kvalid8, idx, cnt, selm, do, lse, delta, dq,
            h, g, nq, nk, nbq, nbk, i0, idx.shape[-1], scale * LOG2E, scale, BJ=32, FULL=full, **meta)
        colidx, colcnt = _lists(sel.transpose(-1, -2))  # per key block: the query blocks that selected it
        dk = kernel_output(*kp.shape, dtype=kp.dtype, device=kp.device)
        dvv = kernel_output(*vp.shape, dtype=vp.dtype, device=vp.device)
        mra_bwd_dkdv_kernel[(nbk, b * hk)](
            qp, kp, vp, kvalid8, colidx, colcnt, do, lse, delta, dk, dvv,
            h, g, nq, nk, nbq, nbk, i0, colidx.shape[-1], scale * LOG2E, scale, **meta)
        dkbar = dvbar = None
        if full:
            dkbar = kernel_output(b, hk, nbk, d, dtype=torch.float32, device=qp.device)
            dvbar = kernel_output(b, hk, nbk, dv, dtype=torch.float32, device=qp.device)
            bj = 32
            mra_bwd_lowres_kernel[(triton.cdiv(nbk, bj), b * hk)](
                qp, kbar_c, vbar_c, logn2, selm, do, lse, delta, dkbar, dvbar,
                h, g, nq, nbq, nbk, i0, scale * LOG2E, scale, BJ=bj, **meta)
        return dq, dk, dvv, dkbar, dvbar, None, None, None, None, None, None, None, None


def mra_core_triton(qp, kp, vp, kbar, vbar, logn, sel, kvalid, lay, *, causal: bool, scale: float, approx: str = "full"):
    """Drop-in for `reference.mra_blocked` (same arguments, same result)."""
    if lay.bs < 16 or lay.bs & (lay.bs - 1):
        raise ValueError(f"the Triton MRA kernel needs a power-of-2 block size >= 16, got {lay.bs}")
    if sel.shape[1] != qp.shape[1]:  # one selection per KV group: every query head of the group uses it
        sel = sel.repeat_interleave(qp.shape[1] // sel.shape[1], dim=1)
    return MRAFunction.apply(qp, kp, vp, kbar, vbar, logn, kvalid, sel, lay.i0, lay.bs, causal, scale,
                             approx == "full")
