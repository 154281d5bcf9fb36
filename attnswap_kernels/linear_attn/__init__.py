"""Causal linear attention o_i = sum_{j <= i} (q_i . k_j) v_j: Triton on CUDA, chunked PyTorch on CPU."""
from .. import use_triton
from .reference import causal_linear_attn_chunked, causal_linear_attn_naive


def causal_linear_attn(q, k, v, chunk: int = 64):
    """q [B, H, T, K], k [B, Hk, T, K], v [B, Hk, T, V] -> [B, H, T, V]; differentiable on both paths."""
    if use_triton(q, k, v):
        from .triton import causal_linear_attn_triton

        return causal_linear_attn_triton(q, k, v, chunk)
    return causal_linear_attn_chunked(q, k, v, chunk)


__all__ = ["causal_linear_attn", "causal_linear_attn_chunked", "causal_linear_attn_naive"]
