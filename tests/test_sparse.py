"""The `sparse` attention method and its kernels: the Triton kernels (under the interpreter), the compiled CPU
forward and the block-sparse CPU path against the reference, forward and backward, at odd lengths; exact at one bucket and no drop; the
method's conversion, decoding, calibration and round trip."""
import pytest
import torch
import torch.nn.functional as F

import attnswap
import attnswap_kernels
from attnswap.cli import main
from attnswap.data import calibration
from attnswap.errors import AttnswapError
from attnswap.surgery import method_modules
from attnswap_kernels import assert_close
from attnswap_kernels.sparse_attn import cpu as sparse_cpu
from attnswap_kernels.sparse_attn import lsh_buckets, sparse_attention, sparse_attention_reference

from .conftest import WIKI_TRAIN, decoding_error, outputs, sample_ids
from .test_reliability import one_line

# B, H, Hk, T, D, Dv, buckets, drop, window, sinks, padding
CASES = [
    (1, 2, 2, 37, 16, 16, 1, 0.0, 1, 0, False),
    (2, 4, 2, 37, 16, 16, 4, 0.0, 3, 2, False),
    (1, 2, 1, 70, 8, 12, 6, 0.3, 5, 1, False),
    (2, 2, 2, 45, 16, 16, 4, 0.2, 4, 2, True),
    (1, 3, 3, 1, 16, 16, 4, 0.5, 2, 1, False),
]


def _ids(c):
    return "B{}-H{}-Hk{}-T{}-D{}-V{}-nb{}-drop{}-w{}-s{}-pad{}".format(*c)


def _case(c, dtype=torch.float64, seed=0):
    b, h, hk, t, d, dv, nb, drop, w, s, pad = c
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(*shape, generator=g, dtype=dtype) for shape in ((b, h, t, d), (b, hk, t, d), (b, hk, t, dv)))
    do = torch.randn(b, h, t, dv, generator=g, dtype=dtype)
    kw = dict(window=w, sinks=s)
    if nb > 1:
        kw.update(q_bucket=lsh_buckets(q, nb), k_bucket=lsh_buckets(k.repeat_interleave(h // hk, 1), nb))
    if drop > 0:
        kw.update(q_keep=torch.rand(b, h, t, generator=g) >= drop, k_keep=torch.rand(b, h, t, generator=g) >= drop)
    if pad:
        keep = torch.ones(b, t, dtype=torch.bool)
        keep[1, :5] = False  # left padding in the second sequence
        kw["key_valid"] = keep
    return (q, k, v), do, kw


def _run(fn, qkv, do, **kw):
    q, k, v = (x.clone().requires_grad_() for x in qkv)
    o = fn(q, k, v, **kw)
    o.backward(do.to(o.dtype))
    return o.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_blocked_path_equals_the_reference_forward_and_backward(case):
    qkv, do, kw = _case(case)
    ref = _run(sparse_attention_reference, qkv, do, **kw)
    got = _run(sparse_attention, qkv, do, impl="blocked", **kw)
    for name, r, o in zip(("o", "dq", "dk", "dv"), ref, got):
        assert_close(name, r, o, ratio=1e-12)


# longer rows: several 256-key chunks of one online softmax (one bucket, small window), head sizes that are not
# multiples of the micro-kernels' 32 columns
LONG = [
    (1, 2, 1, 601, 16, 8, 1, 0.0, 3, 2, False),
    (2, 3, 3, 300, 72, 40, 2, 0.1, 40, 3, True),
]


@pytest.mark.parametrize("dtype,ratio", [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("case", CASES + LONG, ids=_ids)
def test_compiled_kernels_equal_the_reference_with_poisoned_outputs(case, dtype, ratio):
    """The compiled CPU forward and backward (`cpu.cpp`), and the forward without autograd."""
    assert sparse_cpu.available(), "the compiled CPU kernel did not build (is a C++ compiler installed?)"
    assert attnswap_kernels.POISON
    qkv, do, kw = _case(case)
    ref = _run(sparse_attention_reference, qkv, do, **kw)
    got = _run(sparse_attention, [x.to(dtype) for x in qkv], do, impl="native", **kw)
    with torch.no_grad():
        plain = sparse_attention(*[x.to(dtype) for x in qkv], impl="native", **kw)
    for name, r, o in zip(("o", "dq", "dk", "dv", "o without grad"), ref + ref[:1], got + (plain,)):
        assert torch.isfinite(o).all(), name
        assert_close(name, r, o.double(), ratio=ratio)


@pytest.mark.parametrize("h,hk,t,d,n", [(9, 3, 1024, 64, 64), (4, 4, 37, 16, 6), (6, 2, 100, 24, 10)])
def test_compiled_hash_equals_the_formula(h, hk, t, d, n):
    """`lsh_buckets` on CPU runs the compiled hash; keys of grouped-query attention are hashed per query head
    without being repeated. Rounding in another order may flip a near-tie: at most 1 in 1,000."""
    assert sparse_cpu.available()
    x = torch.randn(2, hk, t, d, generator=torch.Generator().manual_seed(t))
    got = lsh_buckets(x, n, 3, heads=h)
    want = lsh_buckets(x.repeat_interleave(h // hk, 1), n, 3, impl="torch")
    assert got.shape == want.shape == (2, h, t)
    assert (got == want).float().mean() >= 0.999


@pytest.mark.parametrize("dtype,ratio", [(torch.float32, 1e-5), (torch.float16, 1e-2)], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_triton_kernels_equal_the_reference_with_poisoned_outputs(case, dtype, ratio):
    assert attnswap_kernels.POISON  # conftest: every kernel output starts as NaN, so an unwritten row fails
    qkv, do, kw = _case(case)
    ref = _run(sparse_attention_reference, qkv, do, **kw)
    got = _run(sparse_attention, [x.to(dtype) for x in qkv], do, impl="triton", **kw)
    for name, r, o in zip(("o", "dq", "dk", "dv"), ref, got):
        assert torch.isfinite(o).all(), name
        assert_close(name, r, o.double(), ratio=ratio)


@pytest.mark.parametrize("impl", ["blocked", "native", "triton"])
@pytest.mark.parametrize("t", [2, 33, 64, 97])
def test_one_bucket_and_no_drop_is_causal_attention(impl, t):
    qkv, do, _ = _case((2, 4, 2, t, 16, 16, 1, 0.0, 1, 0, False), dtype=torch.float32, seed=t)
    keep = torch.ones(2, 4, t, dtype=torch.bool)
    kw = dict(q_bucket=torch.zeros(2, 4, t, dtype=torch.long), k_bucket=torch.zeros(2, 4, t, dtype=torch.long),
              q_keep=keep, k_keep=keep, window=3, sinks=2)
    want = _run(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), qkv, do)
    got = _run(sparse_attention, qkv, do, impl=impl, **kw)
    for name, r, o in zip(("o", "dq", "dk", "dv"), want, got):
        assert_close(name, r, o, ratio=1e-5)


def test_decoding_steps_take_the_reference_with_the_same_rule():
    """Tq < Tk (a decoding step or chunk): the dispatcher's reference path gives the last rows of the full pass."""
    qkv, _, kw = _case((1, 4, 2, 40, 16, 16, 4, 0.3, 3, 2, False), dtype=torch.float32)
    full = sparse_attention(*qkv, impl="blocked", **kw)
    q, k, v = qkv
    step = dict(kw, q_bucket=kw["q_bucket"][..., -5:], q_keep=kw["q_keep"][..., -5:])
    tail = sparse_attention(q[:, :, -5:], k, v, **step)
    assert (tail - full[:, :, -5:]).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_conversion_at_one_bucket_is_exact_and_hashing_changes_the_model(tiny_dirs, name):
    model = attnswap.load_model(tiny_dirs[name])
    ids = sample_ids(model.config.vocab_size, length=45)
    ref = outputs(model, ids)
    attnswap.convert(model, "sparse", buckets=1, window=1, sinks=0)
    assert (outputs(model, ids) - ref).abs().max() <= 1e-5
    attnswap.revert(model)
    attnswap.convert(model, "sparse", buckets=4, window=4, sinks=1)
    out = outputs(model, ids)
    assert torch.isfinite(out).all() and (out - ref).abs().max() > 1e-3


def test_decoding_with_a_cache_equals_the_full_pass(tiny_dirs, tiny_tokenizer):
    model = attnswap.load_model(tiny_dirs["llama"])
    cal = calibration(tiny_tokenizer, str(WIKI_TRAIN), tokens=256, seq_len=64)
    attnswap.convert(model, "sparse", buckets=4, drop=0.3, window=4, sinks=1, calibration=cal)
    ids = sample_ids(model.config.vocab_size, batch=1, length=30)
    assert decoding_error(model, ids, prefill=17) <= 1e-5


def test_drop_thresholds_are_quantiles_of_the_calibration_norms(tiny_dirs, tiny_tokenizer, tmp_path):
    from attnswap.methods.attention.analysis import recording

    original = attnswap.load_model(tiny_dirs["llama"])
    cal = calibration(tiny_tokenizer, str(WIKI_TRAIN), tokens=256, seq_len=64)
    model = attnswap.convert(attnswap.load_model(tiny_dirs["llama"]), "sparse", drop=0.25, calibration=cal)
    stored = model.config.attnswap["plan"]["attention"][0]["options"]["thresholds"]
    qn, kn = {}, {}
    for row in cal.ids:
        with torch.no_grad(), recording(original, inputs=True) as found:
            original(input_ids=row[None])
        for layer, [(_, q, k, _)] in found.items():
            qn.setdefault(layer, []).append(q[0].norm(dim=-1))
            kn.setdefault(layer, []).append(k[0].norm(dim=-1))
    for layer in qn:
        got = stored[str(layer)] if str(layer) in stored else stored[layer]
        assert got["q"] == pytest.approx(torch.cat(qn[layer], 1).quantile(0.25, dim=1).tolist(), abs=1e-5)
        assert got["k"] == pytest.approx(torch.cat(kn[layer], 1).quantile(0.25, dim=1).tolist(), abs=1e-5)
    # a quarter of the calibration queries fall below their head's threshold
    mod = next(iter(method_modules(model).values()))
    q = torch.cat(qn[0], 1)
    assert float((q < mod.q_threshold[:, None]).float().mean()) == pytest.approx(0.25, abs=0.02)
    model.save_pretrained(tmp_path / "m")
    again = attnswap.load(tmp_path / "m")
    ids = sample_ids(model.config.vocab_size, length=29)
    assert torch.equal(outputs(again, ids), outputs(model, ids))


def test_one_line_errors(tiny_dirs, tmp_path, capsys):
    model = attnswap.load_model(tiny_dirs["llama"])
    with pytest.raises(AttnswapError, match="--calibration"):
        attnswap.convert(model, "sparse", drop=0.5)
    with pytest.raises(AttnswapError, match="buckets must be 1 or even"):
        attnswap.convert(model, "sparse", buckets=5)
    with pytest.raises(AttnswapError, match="causal attention only"):
        attnswap.convert(attnswap.load_model(tiny_dirs["bert"]), "sparse")
    capsys.readouterr()
    code = main(["convert", str(tiny_dirs["llama"]), "--to", "sparse", "--set", "drop=0.5", "--out", str(tmp_path / "o")])
    one_line(code, capsys.readouterr().err, "--calibration")
    assert not (tmp_path / "o").exists()


def test_list_shows_the_options(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "sparse" in out and "hash buckets" in out


@pytest.mark.slow
def test_smollm2_one_bucket_is_exact_and_six_buckets_finite(smollm2_dir):
    model = attnswap.load_model(smollm2_dir)
    ids = sample_ids(model.config.vocab_size, batch=1, length=150)
    ref = outputs(model, ids)
    attnswap.convert(model, "sparse", buckets=1, window=1, sinks=0)
    assert (outputs(model, ids) - ref).abs().max() <= 1e-3
    attnswap.revert(model)
    attnswap.convert(model, "sparse", buckets=6)
    out = outputs(model, ids)
    assert torch.isfinite(out).all()
    assert decoding_error(model, ids[:, :90], prefill=80) <= 1e-3
