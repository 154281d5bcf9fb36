"""The compiled CPU forward of sparse attention (`cpu.cpp`): the whole pattern (band, sinks, routed) in one pass,
the same result as `reference.sparse_attention_reference` (causal, a full forward) with its log-sum-exp. Float32
and float64; built on first use (`attnswap_kernels.native`). `sparse_native` returns None where the library
cannot be built, and the caller keeps its PyTorch path."""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from .. import kernel_output
from ..native import library, pointer

SOURCE = Path(__file__).with_name("cpu.cpp")
_I64, _INT, _DBL, _P = ctypes.c_int64, ctypes.c_int, ctypes.c_double, ctypes.c_void_p
_ARGS = [_P] * 8 + [_I64, _I64, _I64, _I64, _INT, _INT, _I64, _I64, _DBL, _INT, _P, _P]


@functools.lru_cache(maxsize=None)
def _functions():
    lib = library(SOURCE)
    if lib is None:
        return None
    fns = {}
    for dtype, name in ((torch.float32, "attnswap_sparse_fwd_f32"), (torch.float64, "attnswap_sparse_fwd_f64")):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = _ARGS, ctypes.c_int
        fns[dtype] = fn
    fn = lib.attnswap_lsh_f32
    fn.argtypes, fn.restype = [_P, _P, _I64, _I64, _I64, _I64, _INT, _INT, _INT, _P], ctypes.c_int
    fns["lsh"] = fn
    return fns


def available() -> bool:
    return _functions() is not None


def sparse_native(q, k, v, *, scale: float, q_bucket=None, k_bucket=None, q_keep=None, k_keep=None,
                  window: int = 0, sinks: int = 0, key_valid=None):
    """(o [B, H, T, Dv], lse [B, H, T]) in float32 (float64 for float64 inputs), or None without the library.
    q [B, H, T, D], k/v [B, Hk, T, ·] on the CPU (Tq = Tk); buckets and keep masks per query head [B, H, T]."""
    fns = _functions()
    if fns is None:
        return None
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    b, h, t, d = q.shape
    hk, dv = k.shape[1], v.shape[-1]
    q, k, v = (x.detach().to(dt).contiguous() for x in (q, k, v))
    if (q_bucket is None) != (k_bucket is None):  # one side hashed alone: the other is all in bucket 0
        zeros = torch.zeros(b, h, t, dtype=torch.long)
        q_bucket, k_bucket = (zeros if x is None else x for x in (q_bucket, k_bucket))
    qb, kb = (None if x is None else x.to(torch.long).contiguous() for x in (q_bucket, k_bucket))
    qk, kk = (None if x is None else x.to(torch.uint8).contiguous() for x in (q_keep, k_keep))
    kv = None if key_valid is None else key_valid.to(torch.uint8).contiguous()
    o = kernel_output(b, h, t, dv, dtype=dt)
    lse = kernel_output(b, h, t, dtype=dt)
    rc = fns[dt](pointer(q), pointer(k), pointer(v), pointer(qb), pointer(kb), pointer(qk), pointer(kk), pointer(kv),
                 b, h, hk, t, d, dv, max(window, 1), min(sinks, t), float(scale), torch.get_num_threads(),
                 pointer(o), pointer(lse))
    if rc:
        raise RuntimeError(f"sparse CPU kernel failed ({rc})")
    return o, lse


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
