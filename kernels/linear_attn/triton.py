"""Chunked causal linear attention in Triton: o_i = sum_{j <= i} (q_i . k_j) v_j.

One program per (value block, batch x query head) walks the chunks of the sequence in order, keeping
the running state S = sum k_j^T v_j [K, BV] in float32 registers: o_chunk = q S + tril(q k^T) v, then
S += k^T v. Grouped-query attention reads key/value head h // G without repeating K/V.

Backward reuses the same kernel (the op is bilinear):
    dq_i = sum_{j <= i} (do_i . v_j) k_j                  -> causal(do, v, k)
    dk_j = sum_{i >= j} (do_i . v_j) q_i  (summed over G) -> anti-causal(v, do, q)
    dv_j = sum_{i >= j} (q_i . k_j) do_i  (summed over G) -> anti-causal(k, q, do)
and anti-causal is the causal kernel on time-reversed inputs.

Tolerance against the reference (relative RMS error): fp32 <= 1e-5; fp16 <= 1e-2 and bf16 <= 2e-2
(inputs and the state are rounded to the half type for the tensor-core products; sums stay fp32).
The output is allocated with torch.empty: the tests would see unwritten rows as garbage.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def causal_linear_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr,
    T, H, G,
    s_qb, s_qh, s_qt,
    s_kb, s_kh, s_kt,
    s_vb, s_vh, s_vt,
    s_ob, s_oh, s_ot,
    K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    i_hk = i_h // G

    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V

    p_q0 = q_ptr + i_b * s_qb + i_h * s_qh
    p_k0 = k_ptr + i_b * s_kb + i_hk * s_kh
    p_v0 = v_ptr + i_b * s_vb + i_hk * s_vh
    p_o0 = o_ptr + i_b * s_ob + i_h * s_oh

    b_s = tl.zeros([BK, BV], dtype=tl.float32)
    for i_t in range(0, tl.cdiv(T, BT)):
        t = (i_t * BT + o_t).to(tl.int64)
        m_t = t < T
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        b_q = tl.load(p_q0 + t[:, None] * s_qt + o_k[None, :], mask=m_tk, other=0.0)  # [BT, BK]
        b_k = tl.load(p_k0 + t[:, None] * s_kt + o_k[None, :], mask=m_tk, other=0.0)  # [BT, BK]
        b_v = tl.load(p_v0 + t[:, None] * s_vt + o_v[None, :], mask=m_tv, other=0.0)  # [BT, BV]
        # older chunks through the state, this chunk through a masked product
        b_o = tl.dot(b_q, b_s.to(b_q.dtype), input_precision=PRECISION)  # [BT, BV]
        b_a = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION)  # [BT, BT]
        b_a = tl.where(o_t[:, None] >= o_t[None, :], b_a, 0.0)
        b_o += tl.dot(b_a.to(b_v.dtype), b_v, input_precision=PRECISION)
        tl.store(p_o0 + t[:, None] * s_ot + o_v[None, :], b_o.to(o_ptr.dtype.element_ty), mask=m_tv)
        b_s += tl.dot(tl.trans(b_k), b_v, input_precision=PRECISION)  # [BK, BV]


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


def causal_linear_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """q [B, H, T, K], k [B, Hk, T, K], v [B, Hk, T, V] -> o [B, H, T, V] (q's dtype)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    b, h, t, kd = q.shape
    hk, vd = k.shape[1], v.shape[-1]
    o = torch.empty(b, h, t, vd, dtype=q.dtype, device=q.device)
    bk, bv = _pow2(kd), min(_pow2(vd), 64)
    grid = (triton.cdiv(vd, bv), b * h)
    causal_linear_fwd_kernel[grid](
        q, k, v, o, t, h, h // hk,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        K=kd, V=vd, BT=chunk, BK=bk, BV=bv,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
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
