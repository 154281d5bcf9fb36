"""Sparse causal attention (Pagliardini et al.: hash buckets, query/key dropping): the PyTorch reference that
defines it (`reference.py`), the compiled CPU forward (`cpu.cpp`, `cpu.py`), the block-sparse PyTorch CPU path
(`blocked.py`) and the Triton kernels (`triton.py`)."""
import torch

from .. import use_triton
from .blocked import sparse_blocked
from .reference import allowed, lsh_buckets, sparse_attention_reference


def sparse_attention(q, k, v, *, scale: float | None = None, q_bucket=None, k_bucket=None, q_keep=None,
                     k_keep=None, window: int = 0, sinks: int = 0, key_valid=None, impl: str = "auto"):
    """Causal sparse attention, q [B, H, Tq, D], k/v [B, Hk, Tk, ·] -> [B, H, Tq, Dv]; the arguments of
    `sparse_attention_reference`. impl "auto": a full forward (Tq = Tk) runs the Triton kernels on CUDA and the
    compiled forward on CPU (`cpu.cpp`; the block-sparse PyTorch path where it cannot be built, and for the
    backward); decoding steps and chunks (Tq < Tk) the reference, whose dense mask is then only Tq x Tk.
    "reference", "blocked" (PyTorch only), "native" and "triton" choose one."""
    kw = dict(scale=scale, q_bucket=q_bucket, k_bucket=k_bucket, q_keep=q_keep, k_keep=k_keep, window=window,
              sinks=sinks, key_valid=key_valid)
    if impl == "auto":
        full = q.shape[2] == k.shape[2]
        impl = ("triton" if use_triton(q, k, v) else "native") if full else "reference"
    if impl == "triton":
        from .triton import sparse_triton

        return sparse_triton(q, k, v, **kw)
    if impl in ("blocked", "native"):
        return sparse_blocked(q, k, v, native=impl == "native", **kw)
    return sparse_attention_reference(q, k, v, causal=True, **kw)


def window_attention(q, k, v, *, window: int, sinks: int = 0, scale: float | None = None, impl: str = "auto"):
    """Causal sliding-window attention of a full forward (Tq = Tk): query i attends the keys i - window < j <= i
    and the first `sinks` keys. It is `sparse_attention` with every query dropped from routing, whose cheap path
    is exactly the band and the sinks: O(T (window + sinks)) with the compiled CPU kernels."""
    b, h, t, _ = q.shape
    keep = torch.zeros(b, h, t, dtype=torch.bool, device=q.device)
    return sparse_attention(q, k, v, scale=scale, q_keep=keep, window=window, sinks=sinks, impl=impl)


__all__ = ["allowed", "lsh_buckets", "sparse_attention", "sparse_attention_reference", "sparse_blocked",
           "window_attention"]
