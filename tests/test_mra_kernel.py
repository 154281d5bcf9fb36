"""MRA attention: the block-sparse PyTorch path, the compiled CPU core and the Triton kernel against the dense
definition and exact attention."""
import pytest
import torch

import attnswap_kernels
from attnswap_kernels import assert_close, rel_rms_error
from attnswap_kernels.mra import cpu as mra_cpu
from attnswap_kernels.mra import Layout, exact_attention, mra_attention, prepare, select_blocks

# B, H, Hk, Tq, Tk, D, Dv: odd lengths, grouped-query heads, K != V dims, decoding (Tq < Tk) with a query
# block that starts mid-block
SHAPES = [
    (1, 2, 2, 1, 1, 8, 8),
    (2, 4, 2, 37, 37, 8, 24),
    (1, 3, 1, 100, 100, 16, 17),
    (2, 4, 2, 3, 70, 8, 8),
]
OPTIONS = [  # budget, approx, selection, diagonal, first, shared selection per KV group
    (0.5, "full", "row", 1, 1, False),
    (0.25, "full", "global", 0, 0, True),
    (0.5, "sparse", "row", 2, 0, True),
    (2, "full", "global", 1, 1, False),
]


def _ids(shape):
    return "B{}-H{}-Hk{}-Tq{}-Tk{}-D{}-V{}".format(*shape)


def _inputs(shape, dtype=torch.float32, seed=0, padded=True):
    b, h, hk, tq, tk, d, dv = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, tq, d, generator=g).to(dtype)
    k = torch.randn(b, hk, tk, d, generator=g).to(dtype)
    v = torch.randn(b, hk, tk, dv, generator=g).to(dtype)
    do = torch.randn(b, h, tq, dv, generator=g).to(dtype)
    keep = torch.ones(b, tk, dtype=torch.bool)
    if padded and b > 1 and tk > 4:
        keep[1, :10 if tk > 20 else 3] = False  # left padding in the second sequence: a whole block of 8 at T > 20
    return q, k, v, do, keep


def _run(q, k, v, do, **kw):
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    o = mra_attention(q, k, v, **kw)
    o.backward(do)
    return o.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("impl", ["blocked", "native"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(map(str, o)))
def test_cpu_paths_equal_the_dense_definition(shape, causal, opts, impl):
    """The block-sparse PyTorch path and the compiled CPU core (`cpu.cpp`) in float64, outputs and gradients."""
    if impl == "native":
        assert mra_cpu.available(), "the compiled CPU kernel did not build (is a C++ compiler installed?)"
    budget, approx, selection, diag, first, shared = opts
    q, k, v, do, keep = _inputs(shape, torch.float64)
    kw = dict(causal=causal, block_size=8, budget=budget, approx=approx, selection=selection,
              diagonal_blocks=diag, first_blocks=first, shared_selection=shared, key_valid=keep)
    ref = _run(q, k, v, do, impl="naive", **kw)
    got = _run(q, k, v, do, impl=impl, **kw)
    for name, r, o in zip(("o", "dq", "dk", "dv"), ref, got):
        assert_close(name, r, o, ratio=1e-10)


@pytest.mark.parametrize("block_size", [32, 64], ids=["bs32", "bs64"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_compiled_core_fp32_with_poisoned_outputs(causal, block_size):
    """float32 against the float64 definition, at blocks of one and of two 32-row tiles, with every kernel output
    allocated full of NaN first."""
    assert mra_cpu.available() and attnswap_kernels.POISON
    q, k, v, do, keep = _inputs((2, 6, 3, 301, 301, 24, 40), torch.float64)
    kw = dict(causal=causal, block_size=block_size, budget=0.3, key_valid=keep)
    ref = _run(q, k, v, do, impl="naive", **kw)
    got = _run(q.float(), k.float(), v.float(), do.float(), impl="native", **kw)
    for name, r, o in zip(("o", "dq", "dk", "dv"), ref, got):
        assert torch.isfinite(o).all(), name
        assert_close(name, r, o.double(), ratio=1e-5)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("impl", ["naive", "blocked", "native", "triton"])
def test_full_budget_is_exact_attention(shape, causal, impl):
    q, k, v, do, keep = _inputs(shape, torch.float64 if impl != "triton" else torch.float32)
    bs = 16 if impl == "triton" else 8
    exact = exact_attention(q, k, v, causal=causal, key_valid=keep)
    got = mra_attention(q, k, v, causal=causal, block_size=bs, budget=1.0, approx="full", key_valid=keep, impl=impl)
    # query blocks of padding only are outside the budget (they select nothing): compare the real queries
    real = keep[:, None, keep.shape[1] - q.shape[2]:, None]
    exact, got = exact * real, got * real
    err = rel_rms_error(exact, got)
    bound = 1e-12 if q.dtype == torch.float64 else 1e-5  # what the implementations actually reach
    assert err <= bound, f"full budget differs from exact attention: {err:.2e}"


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("opts", OPTIONS[:3], ids=lambda o: "-".join(map(str, o)))
def test_triton_kernel_equals_the_reference_fp32(shape, causal, opts):
    budget, approx, selection, diag, first, shared = opts
    q, k, v, do, keep = _inputs(shape)
    kw = dict(causal=causal, block_size=16, budget=budget, approx=approx, selection=selection,
              diagonal_blocks=diag, first_blocks=first, shared_selection=shared, key_valid=keep)
    ref = _run(q, k, v, do, impl="blocked", **kw)
    got = _run(q, k, v, do, impl="triton", **kw)
    for name, r, o in zip(("o", "dq", "dk", "dv"), ref, got):
        assert_close(name, r, o, ratio=1e-5)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_triton_kernel_fp16(causal):
    q, k, v, do, keep = _inputs((2, 4, 2, 45, 45, 16, 16), torch.float16)
    kw = dict(causal=causal, block_size=16, budget=0.5, key_valid=keep)
    ref = _run(q.float(), k.float(), v.float(), do.float(), impl="blocked", **kw)
    got = _run(q, k, v, do, impl="triton", **kw)
    for name, r, o in zip(("o", "dq", "dk", "dv"), ref, got):
        assert_close(name, r, o.float(), ratio=2e-2)


def test_budget_counts_and_priors():
    """The selection: forced priors, the diagonal in causal rows, the rounded-up fraction, nothing above it."""
    t, bs = 64, 8  # 8 blocks
    q, k, v, _, _ = _inputs((1, 2, 1, t, t, 8, 8), padded=False)
    lay = Layout(bs, t, t)
    _, _, _, kvalid, kbar, _, logn = prepare(q, k, v, None, lay)
    sel = select_blocks(q, kbar, logn, kvalid, lay, causal=True, budget=0.5, selection="row", diagonal_blocks=1,
                        first_blocks=1)
    rows = torch.arange(8)
    assert not torch.triu(sel[0, 0].int(), diagonal=1).any()  # block-causal
    assert sel[0, :, rows, rows].all() and sel[0, :, :, 0].all()  # diagonal and first block
    allowed = rows + 1
    expect = torch.maximum(torch.ceil(allowed * 0.5), torch.minimum(allowed, torch.tensor(2))).long()
    assert torch.equal(sel[0, 0].sum(-1), expect)
    sel_b = select_blocks(q, kbar, logn, kvalid, lay, causal=False, budget=3, selection="row", diagonal_blocks=0,
                          first_blocks=0)
    assert torch.equal(sel_b.sum(-1), torch.full((1, 2, 8), 3))  # a count: 3 blocks per row
    sel_g = select_blocks(q, kbar, logn, kvalid, lay, causal=False, budget=0.25, selection="global", diagonal_blocks=0,
                          first_blocks=0)
    assert sel_g.sum((-1, -2)).tolist() == [[16, 16]]  # a quarter of the 64 pairs, per head
    sel_s = select_blocks(q, kbar, logn, kvalid, lay, causal=True, budget=0.25, first_blocks=0, shared=True)
    assert sel_s.shape == (1, 1, 8, 8) and int(sel_s.sum()) == 9  # one selection for the KV group: ceil(36 / 4)


def test_no_zero_or_nan_output_for_odd_lengths_and_padding():
    """Lengths that are not a multiple of the block size are padded inside the op: no zero rows, no NaN."""
    for t in (1, 31, 33, 65):
        q, k, v, _, keep = _inputs((2, 2, 2, t, t, 8, 8))
        for causal in (True, False):
            o = mra_attention(q, k, v, causal=causal, block_size=32, budget=0.25, key_valid=keep)
            assert o.shape == (2, 2, t, 8) and torch.isfinite(o).all()
            real = o[0] if causal else o  # causal rows of padding in sequence 1 see no key: 0 by definition
            assert (real.abs().sum(-1) > 0).all()


def test_split_key_parts_math_path_equals_the_flash_kernel(monkeypatch):
    """The blocked path's non-CPU fallback (plain math for each key part) gives the CPU flash kernel's result."""
    from attnswap_kernels.mra import reference

    q, k, v, do, keep = _inputs((2, 4, 2, 45, 45, 16, 16), torch.float64)
    kw = dict(causal=True, block_size=8, budget=0.5, key_valid=keep, impl="blocked")
    flash = _run(q, k, v, do, **kw)
    calls = []
    lse = torch.logsumexp
    monkeypatch.setattr(torch.Tensor, "is_cpu", property(lambda self: False))
    monkeypatch.setattr(reference.torch, "logsumexp", lambda *a, **k: calls.append(1) or lse(*a, **k))
    math = _run(q, k, v, do, **kw)
    assert calls  # the math path ran
    for name, r, o in zip(("o", "dq", "dk", "dv"), flash, math):
        assert_close(name, r, o, ratio=1e-10)
