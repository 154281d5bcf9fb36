"""The compiled CPU kernels of sparse attention (`cpu.cpp`): the forward and the backward of the whole pattern
(band, sinks, routed) in one pass each, the same result as `reference.sparse_attention_reference` (causal, a full
forward), and the angular LSH. Float32 and float64; built on first use (`attnswap_kernels.native`).
`sparse_native` returns None where the library cannot be built, and the caller keeps its PyTorch path."""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from .. import kernel_output
from ..native import library, per_dtype, pointer

SOURCE = Path(__file__).with_name("cpu.cpp")
_I64, _INT, _DBL, _P = ctypes.c_int64, ctypes.c_int, ctypes.c_double, ctypes.c_void_p
_ARGS = [_P] * 8 + [_I64, _I64, _I64, _I64, _INT, _INT, _I64, _I64, _DBL, _INT, _P, _P]


@functools.lru_cache(maxsize=None)
def _functions():
    lib = library(SOURCE)
    if lib is None:
        return None
    fns = dict(per_dtype(lib, "attnswap_sparse_fwd", _ARGS))
    bwd = per_dtype(lib, "attnswap_sparse_bwd", [_P] * 11 + _ARGS[8:-2] + [_P, _P, _P])
    fns.update({("bwd", dtype): fn for dtype, fn in bwd.items()})
    fn = lib.attnswap_lsh_f32
    fn.argtypes, fn.restype = [_P, _P, _I64, _I64, _I64, _I64, _INT, _INT, _INT, _P], ctypes.c_int
    fns["lsh"] = fn
    return fns


def available() -> bool:
    return _functions() is not None


def _routing_args(b, h, t, q_bucket, k_bucket, q_keep, k_keep, key_valid):
    """The routing tensors as the kernel reads them: int64 buckets (both or neither), uint8 masks, contiguous."""
    if (q_bucket is None) != (k_bucket is None):  # one side hashed alone: the other is all in bucket 0
        zeros = torch.zeros(b, h, t, dtype=torch.long)
        q_bucket, k_bucket = (zeros if x is None else x for x in (q_bucket, k_bucket))
    qb, kb = (None if x is None else x.to(torch.long).contiguous() for x in (q_bucket, k_bucket))
    qk, kk, kv = (None if x is None else x.to(torch.uint8).contiguous() for x in (q_keep, k_keep, key_valid))
    return qb, kb, qk, kk, kv


class _SparseNative(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, route, shape):
        fns, dt = _functions(), q.dtype
        b, h, hk, t, d, dv, w, s, scale = shape
        o = kernel_output(b, h, t, dv, dtype=dt)
        lse = kernel_output(b, h, t, dtype=dt)
        rc = fns[dt](pointer(q), pointer(k), pointer(v), *map(pointer, route), b, h, hk, t, d, dv, w, s, scale,
                     torch.get_num_threads(), pointer(o), pointer(lse))
        if rc:
            raise RuntimeError(f"sparse CPU kernel failed ({rc})")
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.mark_non_differentiable(lse)
        ctx.route, ctx.shape = route, shape
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, o, lse = ctx.saved_tensors
        b, h, hk, t, d, dv, w, s, scale = ctx.shape
        do = do.to(q.dtype).contiguous()
        dq = kernel_output(b, h, t, d, dtype=q.dtype)
        dk = kernel_output(b, hk, t, d, dtype=q.dtype)
        dvv = kernel_output(b, hk, t, dv, dtype=q.dtype)
        rc = _functions()["bwd", q.dtype](
            pointer(q), pointer(k), pointer(v), pointer(o), pointer(lse), pointer(do), *map(pointer, ctx.route),
            b, h, hk, t, d, dv, w, s, scale, torch.get_num_threads(), pointer(dq), pointer(dk), pointer(dvv))
        if rc:
            raise RuntimeError(f"sparse CPU kernel failed ({rc})")
        return dq, dk, dvv, None, None


def sparse_native(q, k, v, *, scale: float, q_bucket=None, k_bucket=None, q_keep=None, k_keep=None,
                  window: int = 0, sinks: int = 0, key_valid=None):
    """(o [B, H, T, Dv], lse [B, H, T]) in float32 (float64 for float64 inputs), differentiable in q, k, v (the
    log-sum-exp is not), or None without the library. q [B, H, T, D], k/v [B, Hk, T, ·] on the CPU (Tq = Tk);
    buckets and keep masks per query head [B, H, T]."""
    if _functions() is None:
        return None
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    b, h, t, d = q.shape
    hk, dv = k.shape[1], v.shape[-1]
    route = _routing_args(b, h, t, q_bucket, k_bucket, q_keep, k_keep, key_valid)
    shape = (b, h, hk, t, d, dv, max(window, 1), min(sinks, t), float(scale))
    q, k, v = (x.to(dt).contiguous() for x in (q, k, v))
    return _SparseNative.apply(q, k, v, route, shape)


def lsh_native(x, rot, heads: int):
    """`reference.lsh_buckets` of x [B, Hx, T, D] for `heads` query heads with the rotations rot [heads, D, r]:
    bucket ids [B, heads, T], or None without the library."""
    fns = _functions()
    if fns is None:
        return None
    b, hx, t, d = x.shape
    x = x.detach().float().contiguous()
    rot = rot.float().contiguous()
    out = torch.empty(b, heads, t, dtype=torch.long)
    fns["lsh"](pointer(x), pointer(rot), b, heads, hx, t, d, rot.shape[-1], torch.get_num_threads(), pointer(out))
    return out
