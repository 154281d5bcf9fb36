"""Chunked causal linear attention in Triton: o_i = sum_{j <= i} (q_i . k_j) v_j.

Two passes. `chunk_state_fwd_kernel` scans the chunks of each key/value head once and stores the state
before every chunk, h_n = sum_{chunks m < n} k_m^T v_m (float32, [B, Hk, NT, K, V]); then
`chunk_output_fwd_kernel` computes every chunk in parallel, o_n = q_n h_n + tril(q_n k_n^T) v_n.
Grouped-query attention: query head h reads key/value head h // G (states are computed once per KV head,
K/V are never repeated).

Backward reuses the same kernel (the op is bilinear):
    dq_i = sum_{j <= i} (do_i . v_j) k_j                  -> causal(do, v, k)
    dk_j = sum_{i >= j} (do_i . v_j) q_i  (summed over G) -> anti-causal(v, do, q)
    dv_j = sum_{i >= j} (q_i . k_j) do_i  (summed over G) -> anti-causal(k, q, do)
and anti-causal is the causal kernel on time-reversed inputs.

Tolerance against the reference (relative RMS error): fp32 <= 1e-5; fp16 <= 1e-2 and bf16 <= 2e-2
(inputs and the state are rounded to the half type for the tensor-core products; sums stay fp32).
Outputs are allocated uninitialised (`kernel_output`): the tests fill them with NaN first (`POISON`).
"""
import torch
import triton
import triton.language as tl

from .. import kernel_output


@triton.jit
def chunk_state_fwd_kernel(
    k_ptr, v_ptr, h_ptr,
    T, HK, NT,
    s_kb, s_kh, s_kt,
    s_vb, s_vh, s_vt,
    s_hb, s_hh, s_hn,
    K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Pass 1: h_n = sum of k^T v over the chunks before n, per key/value head. h [B, Hk, NT, K, V] fp32."""
    i_k = tl.program_id(0)
    i_v = tl.program_id(1)
    i_bh = tl.program_id(2)
    i_b = (i_bh // HK).to(tl.int64)
    i_h = (i_bh % HK).to(tl.int64)

    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    p_k0 = k_ptr + i_b * s_kb + i_h * s_kh
    p_v0 = v_ptr + i_b * s_vb + i_h * s_vh
    p_h0 = h_ptr + i_b * s_hb + i_h * s_hh

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    for i_t in range(0, NT):
        tl.store(p_h0 + i_t * s_hn + o_k[:, None] * V + o_v[None, :], b_h, mask=m_k[:, None] & m_v[None, :])
        t = (i_t * BT + o_t).to(tl.int64)
        m_t = t < T
        b_k = tl.load(p_k0 + t[:, None] * s_kt + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)  # [BT, BK]
        b_v = tl.load(p_v0 + t[:, None] * s_vt + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)  # [BT, BV]
        b_h += tl.dot(tl.trans(b_k), b_v, input_precision=PRECISION)


@triton.jit
def chunk_output_fwd_kernel(
    q_ptr, k_ptr, v_ptr, h_ptr, o_ptr,
    T, H, G,
    s_qb, s_qh, s_qt,
    s_kb, s_kh, s_kt,
    s_vb, s_vh, s_vt,
    s_hb, s_hh, s_hn,
    s_ob, s_oh, s_ot,
    K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Pass 2, every chunk in parallel: o_n = q_n h_n + tril(q_n k_n^T) v_n."""
    i_v = tl.program_id(0)
    i_t = tl.program_id(1)
    i_bh = tl.program_id(2)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    i_hk = i_h // G

    o_t = tl.arange(0, BT)
    t = (i_t * BT + o_t).to(tl.int64)
    m_t = t < T
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    p_q0 = q_ptr + i_b * s_qb + i_h * s_qh
    p_k0 = k_ptr + i_b * s_kb + i_hk * s_kh
    p_v0 = v_ptr + i_b * s_vb + i_hk * s_vh
    p_h0 = h_ptr + i_b * s_hb + i_hk * s_hh + i_t * s_hn

    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    b_a = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_q = tl.load(p_q0 + t[:, None] * s_qt + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)  # [BT, BK]
        b_k = tl.load(p_k0 + t[:, None] * s_kt + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)  # [BT, BK]
        b_h = tl.load(p_h0 + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.0)  # [BK, BV]
        b_o += tl.dot(b_q, b_h.to(b_q.dtype), input_precision=PRECISION)
        b_a += tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION)
    b_a = tl.where(o_t[:, None] >= o_t[None, :], b_a, 0.0)
    b_v = tl.load(p_v0 + t[:, None] * s_vt + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)  # [BT, BV]
    b_o += tl.dot(b_a.to(b_v.dtype), b_v, input_precision=PRECISION)
    tl.store(o_ptr + i_b * s_ob + i_h * s_oh + t[:, None] * s_ot + o_v[None, :], b_o.to(o_ptr.dtype.element_ty),
             mask=m_t[:, None] & m_v[None, :])


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


def causal_linear_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """q [B, H, T, K], k [B, Hk, T, K], v [B, Hk, T, V] -> o [B, H, T, V] (q's dtype)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    b, h, t, kd = q.shape
    hk, vd = k.shape[1], v.shape[-1]
    nt = triton.cdiv(t, chunk)
    bk, bv = min(_pow2(kd), 64), min(_pow2(vd), 64)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    states = kernel_output(b, hk, nt, kd, vd, dtype=torch.float32, device=q.device)  # [B, Hk, NT, K, V]
    chunk_state_fwd_kernel[(triton.cdiv(kd, bk), triton.cdiv(vd, bv), b * hk)](
        k, v, states, t, hk, nt,
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        states.stride(0), states.stride(1), states.stride(2),
        K=kd, V=vd, BT=chunk, BK=bk, BV=bv, PRECISION=precision,
    )
    o = kernel_output(b, h, t, vd, dtype=q.dtype, device=q.device)
    chunk_output_fwd_kernel[(triton.cdiv(vd, bv), nt, b * h)](
        q, k, v, states, o, t, h, h // hk,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        states.stride(0), states.stride(1), states.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        K=kd, V=vd, BT=chunk, BK=bk, BV=bv, PRECISION=precision,
    )
    return o


def _anticausal(q, k, v, chunk):
    return causal_linear_fwd(q.flip(2), k.flip(2), v.flip(2), chunk).flip(2)


def _sum_groups(x: torch.Tensor, hk: int) -> torch.Tensor:
    b, h, t, d = x.shape
    return x.view(b, hk, h // hk, t, d).sum(2)


class CausalLinearAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, chunk):
        ctx.save_for_backward(q, k, v)
        ctx.chunk = chunk
        return causal_linear_fwd(q, k, v, chunk)

    @staticmethod
    def backward(ctx, do):
        q, k, v = ctx.saved_tensors
        chunk, hk, g = ctx.chunk, k.shape[1], q.shape[1] // k.shape[1]
        do = do.contiguous()
        dq = causal_linear_fwd(do, v, k, chunk)
        # key/value-side gradients are per query head, then summed over each group
        k_h = k.repeat_interleave(g, dim=1) if g > 1 else k
        v_h = v.repeat_interleave(g, dim=1) if g > 1 else v
        dk = _sum_groups(_anticausal(v_h, do, q, chunk).float(), hk).to(k.dtype)
        dv = _sum_groups(_anticausal(k_h, q, do, chunk).float(), hk).to(v.dtype)
        return dq, dk, dv, None


def causal_linear_attn_triton(q, k, v, chunk: int = 64):
    return CausalLinearAttnFunction.apply(q, k, v, chunk)
