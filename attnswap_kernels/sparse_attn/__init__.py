"""Sparse causal attention (Pagliardini et al.: hash buckets, query/key dropping): the PyTorch reference that
defines it (`reference.py`), the block-sparse CPU path (`blocked.py`) and the Triton kernels (`triton.py`)."""
from .. import use_triton
from .blocked import sparse_blocked
from .reference import allowed, lsh_buckets, sparse_attention_reference


def sparse_attention(q, k, v, *, scale: float | None = None, q_bucket=None, k_bucket=None, q_keep=None,
                     k_keep=None, window: int = 0, sinks: int = 0, key_valid=None, impl: str = "auto"):
    """Causal sparse attention, q [B, H, Tq, D], k/v [B, Hk, Tk, ·] -> [B, H, Tq, Dv]; the arguments of
    `sparse_attention_reference`. impl "auto": a full forward (Tq = Tk) runs the Triton kernels on CUDA and the
    block-sparse path on CPU; decoding steps and chunks (Tq < Tk) the reference, whose dense mask is then only
    Tq x Tk. "reference", "blocked" and "triton" choose one."""
    kw = dict(scale=scale, q_bucket=q_bucket, k_bucket=k_bucket, q_keep=q_keep, k_keep=k_keep, window=window,
              sinks=sinks, key_valid=key_valid)
    if impl == "auto":
        full = q.shape[2] == k.shape[2]
        impl = ("triton" if use_triton(q, k, v) else "blocked") if full else "reference"
    if impl == "triton":
        from .triton import sparse_triton

        return sparse_triton(q, k, v, **kw)
    if impl == "blocked":
        return sparse_blocked(q, k, v, **kw)
    return sparse_attention_reference(q, k, v, causal=True, **kw)


__all__ = ["allowed", "lsh_buckets", "sparse_attention", "sparse_attention_reference", "sparse_blocked"]
