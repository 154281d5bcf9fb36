"""MRA's core compiled for the CPU (`cpu.cpp`), forward and backward: the result of `reference.mra_naive` from the
padded inputs, the block statistics and the selection, differentiable in the queries, keys, values and block
means. Float32 and float64 (other dtypes are computed in float32); built on first use
(`attnswap_kernels.native`). `mra_native` returns None where the library cannot be built."""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from .. import kernel_output, per_query_head
from ..native import library, per_dtype, pointer

SOURCE = Path(__file__).with_name("cpu.cpp")
_I64, _INT, _DBL, _P = ctypes.c_int64, ctypes.c_int, ctypes.c_double, ctypes.c_void_p
_SHAPE = [_I64] * 7 + [_INT] * 5 + [_DBL, _INT]  # B, H, HK, HS, nbq, nbk, i0, bs, d, dv, causal, full, scale, threads


@functools.lru_cache(maxsize=None)
def _functions():
    lib = library(SOURCE)
    if lib is None:
        return None
    fwd = per_dtype(lib, "attnswap_mra_fwd", [_P] * 8 + _SHAPE + [_P] * 2)
    bwd = per_dtype(lib, "attnswap_mra_bwd", [_P] * 8 + _SHAPE + [_P] * 8)
    return {dtype: (fwd[dtype], bwd[dtype]) for dtype in fwd}


def available() -> bool:
    return _functions() is not None


class _MraNative(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kbar, vbar, fixed, shape):
        b, h, nq, _ = q.shape
        o = kernel_output(b, h, nq, v.shape[-1], dtype=q.dtype)
        lse = kernel_output(b, h, nq, dtype=q.dtype)
        rc = _functions()[q.dtype][0](*map(pointer, (q, k, v, kbar, vbar, *fixed)), *shape, torch.get_num_threads(),
                                      pointer(o), pointer(lse))
        if rc:
            raise RuntimeError(f"MRA CPU kernel failed ({rc})")
        ctx.save_for_backward(q, k, v, kbar, vbar, o, lse)
        ctx.fixed, ctx.shape = fixed, shape
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, kbar, vbar, o, lse = ctx.saved_tensors
        do = do.to(q.dtype).contiguous()
        grads = [kernel_output(*x.shape, dtype=q.dtype) for x in (q, k, v, kbar, vbar)]
        rc = _functions()[q.dtype][1](*map(pointer, (q, k, v, kbar, vbar, *ctx.fixed)), *ctx.shape,
                                      torch.get_num_threads(), *map(pointer, (o, lse, do, *grads)))
        if rc:
            raise RuntimeError(f"MRA CPU kernel failed ({rc})")
        return (*grads, None, None)


def mra_native(qp, kp, vp, kbar, vbar, logn, sel, kvalid, lay, *, causal: bool, scale: float, approx: str = "full"):
    """`reference.mra_naive`'s arguments and result ([B, H, nbq * bs, Dv] in float32, float64 for float64 inputs),
    or None without the library."""
    if _functions() is None:
        return None
    dt = torch.float64 if qp.dtype == torch.float64 else torch.float32
    b, h, _, d = qp.shape
    hk, hs = kp.shape[1], sel.shape[1]
    q, k, v, kb, vb = (x.to(dt).contiguous() for x in (qp, kp, vp, kbar, vbar))
    fixed = (logn.detach().to(dt).contiguous(), sel.to(torch.uint8).contiguous(), kvalid.to(torch.uint8).contiguous())
    shape = (b, h, hk, hs, lay.nbq, lay.nbk, lay.i0, lay.bs, d, vp.shape[-1], int(causal), int(approx == "full"),
             float(scale))
    return _MraNative.apply(q, k, v, kb, vb, fixed, shape)
