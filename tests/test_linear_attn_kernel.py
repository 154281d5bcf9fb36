"""Chunked causal linear attention: chunked reference and Triton kernel against the naive definition."""
import pytest
import torch

from attnswap_kernels import assert_close
from attnswap_kernels.linear_attn import causal_linear_attn, causal_linear_attn_chunked, causal_linear_attn_naive

SHAPES = [  # B, H, Hk, T, K, V
    (1, 2, 2, 1, 16, 16),
    (2, 3, 1, 63, 16, 24),
    (1, 4, 2, 100, 32, 17),
    (1, 2, 2, 500, 16, 16),
]


def _ids(shape):
    b, h, hk, t, k, v = shape
    return f"B{b}-H{h}-Hk{hk}-T{t}-K{k}-V{v}"


def _inputs(shape, dtype=torch.float32, seed=0):
    b, h, hk, t, k, v = shape
    g = torch.Generator().manual_seed(seed)
    # non-negative features, as a feature map produces
    q = torch.rand(b, h, t, k, generator=g).to(dtype).requires_grad_()
    kk = torch.rand(b, hk, t, k, generator=g).to(dtype).requires_grad_()
    vv = torch.randn(b, hk, t, v, generator=g).to(dtype).requires_grad_()
    do = torch.randn(b, h, t, v, generator=g).to(dtype)
    return q, kk, vv, do


def _run(fn, q, k, v, do):
    for x in (q, k, v):
        x.grad = None
    o = fn(q, k, v)
    o.backward(do)
    return o.detach(), q.grad.clone(), k.grad.clone(), v.grad.clone()


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("chunk", [16, 64])
def test_chunked_reference_equals_naive(shape, chunk):
    q, k, v, do = _inputs(shape, torch.float64)
    ref = _run(causal_linear_attn_naive, q, k, v, do)
    got = _run(lambda *a: causal_linear_attn_chunked(*a, chunk=chunk), q, k, v, do)
    for name, r, o in zip(("o", "dq", "dk", "dv"), ref, got):
        assert_close(name, r, o, ratio=1e-6)


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_triton_kernel_equals_naive_fp32(shape):
    from attnswap_kernels.linear_attn.triton import causal_linear_attn_triton

    q, k, v, do = _inputs(shape)
    ref = _run(causal_linear_attn_naive, q, k, v, do)
    got = _run(lambda *a: causal_linear_attn_triton(*a, chunk=16), q, k, v, do)
    for name, r, o in zip(("o", "dq", "dk", "dv"), ref, got):
        assert_close(name, r, o, ratio=1e-5)


# Half precision under the interpreter is fp16: its tl.dot multiplies bf16 bit patterns (triton-lang/triton
# #11584, unsupported there). bf16 is checked on a GPU by benchmarks/linear_attn.py --check.
@pytest.mark.parametrize("shape", SHAPES[1:3], ids=_ids)
def test_triton_kernel_fp16(shape):
    from attnswap_kernels.linear_attn.triton import causal_linear_attn_triton

    q, k, v, do = _inputs(shape, torch.float16)
    ref = _run(causal_linear_attn_naive, *(x.detach().float().requires_grad_() for x in (q, k, v)), do.float())
    got = _run(lambda *a: causal_linear_attn_triton(*a, chunk=16), q, k, v, do)
    for name, r, o in zip(("o", "dq", "dk", "dv"), ref, got):
        assert o.dtype == torch.float16
        assert_close(name, r, o.float(), ratio=1e-2)


def test_dispatch_uses_the_reference_on_cpu():
    q, k, v, do = _inputs(SHAPES[1])
    assert torch.equal(causal_linear_attn(q, k, v), causal_linear_attn_chunked(q, k, v))
