"""MRA attention: exact attention in the top-scoring blocks, block means elsewhere (Triton on CUDA, compiled C++ on
CPU, PyTorch as the reference and fallback)."""
from .. import use_triton
from .reference import (
    Layout,
    block_stats,
    exact_attention,
    mra_blocked,
    mra_naive,
    prepare,
    select_blocks,
)


def mra_attention(q, k, v, *, causal: bool, block_size: int = 32, budget: float = 0.5, approx: str = "full",
                  selection: str = "global", diagonal_blocks: int = 1, first_blocks: int = 1, key_valid=None,
                  scale: float | None = None, shared_selection: bool = True, impl: str = "auto"):
    """q [B, H, Tq, D], k [B, Hk, Tk, D], v [B, Hk, Tk, Dv] -> [B, H, Tq, Dv]; differentiable in q, k, v.

    Queries are the last Tq of the Tk positions; key_valid [B, Tk] (False = padding) or None. See reference.py
    for the definition. impl "auto": CUDA tensors with a power-of-2 block size >= 16 run the Triton kernels, CPU
    tensors the compiled CPU core ("native", `cpu.cpp`; the block-sparse PyTorch path where it cannot be built),
    anything else the block-sparse PyTorch path ("blocked"); "naive" (dense, the specification) chooses the
    definition.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    lay = Layout(block_size, q.shape[2], k.shape[2])
    qp, kp, vp, kvalid, kbar, vbar, logn = prepare(q, k, v, key_valid, lay)
    sel = select_blocks(q, kbar, logn, kvalid, lay, causal=causal, budget=budget, selection=selection,
                        diagonal_blocks=diagonal_blocks, first_blocks=first_blocks, scale=scale,
                        shared=shared_selection)
    if impl == "auto":
        pow2 = block_size >= 16 and not block_size & (block_size - 1)
        impl = "triton" if use_triton(q, k, v) and pow2 else "native" if q.device.type == "cpu" else "blocked"
    if impl == "triton":
        from .triton import mra_core_triton as core
    elif impl == "native":
        from .cpu import mra_native

        def core(*args, **kw):  # the PyTorch path where the compiled kernel cannot be built
            out = mra_native(*args, **kw)
            return mra_blocked(*args, **kw) if out is None else out
    else:
        core = {"blocked": mra_blocked, "naive": mra_naive}[impl]
    o = core(qp, kp, vp, kbar, vbar, logn, sel, kvalid, lay, causal=causal, scale=scale, approx=approx)
    return lay.unpad_queries(o).to(q.dtype)


__all__ = ["Layout", "block_stats", "exact_attention", "mra_attention", "mra_blocked",
           "mra_naive", "prepare", "select_blocks"]
