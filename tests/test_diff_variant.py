"""The `diff` variant (Differential attention from pretrained q/k halves)."""
import math

import pytest
import torch

import attnswap
from attnswap.surgery import method_modules
from attnswap.methods.attention.diff import half_indices, lambda_init_for

from .conftest import outputs, sample_ids


def _rope(x, pos, base=10000.0):
    """transformers' rotate-half RoPE on [..., T, D] at integer positions."""
    d = x.shape[-1]
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos[:, None].double() * inv[None, :]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    rot = torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1)
    return x * cos + rot * sin


def test_halves_split_scores_and_keep_rope_relative():
    d = 16
    first, second = half_indices(d)
    assert sorted(first.tolist() + second.tolist()) == list(range(d))
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, d, generator=g, dtype=torch.float64), torch.randn(1, d, generator=g, dtype=torch.float64)
    # q1.k1 + q2.k2 = q.k
    assert torch.allclose((q[:, first] * k[:, first]).sum() + (q[:, second] * k[:, second]).sum(), (q * k).sum())
    # each half's score depends on the relative position only (whole rotation pairs in each half)
    for idx in (first, second):
        s1 = (_rope(q, torch.tensor([7]))[:, idx] * _rope(k, torch.tensor([3]))[:, idx]).sum()
        s2 = (_rope(q, torch.tensor([27]))[:, idx] * _rope(k, torch.tensor([23]))[:, idx]).sum()
        assert abs(float(s1 - s2)) <= 1e-10


def test_lambda_init_schedule():
    assert lambda_init_for(1) == pytest.approx(0.2)
    assert lambda_init_for(30) == pytest.approx(0.8 - 0.6 * math.exp(-0.3 * 29))


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_output_equals_the_formula(tiny_dirs, name):
    """A converted layer against the docstring's formula, written densely (GQA, causal or not)."""
    model = attnswap.load_model(tiny_dirs[name])
    attnswap.convert(model, "diff")
    v = next(iter(method_modules(model).values()))
    with torch.no_grad():
        v.lambdas.normal_(0, 0.3)
        v.norm_weight.uniform_(0.5, 1.5)
    geo = v.geometry
    b, t, d, h, hk = 2, 19, geo.head_dim, geo.num_heads, geo.num_kv_heads
    g = torch.Generator().manual_seed(3)
    q, k, val = torch.randn(b, h, t, d, generator=g), torch.randn(b, hk, t, d, generator=g), torch.randn(b, hk, t, d, generator=g)
    module = type("M", (), {"num_key_value_groups": h // hk, "is_causal": v.causal, "training": False})()
    got, _ = v(module, q, k, val, None)
    kk, vv = k.repeat_interleave(h // hk, 1), val.repeat_interleave(h // hk, 1)
    mask = torch.ones(t, t, dtype=torch.bool).tril() if v.causal else torch.ones(t, t, dtype=torch.bool)
    first, second = half_indices(d)
    a = [torch.softmax((q[..., i] @ kk[..., i].transpose(-1, -2) * (d // 2) ** -0.5).masked_fill(~mask, -torch.inf), -1)
         for i in (first, second)]
    lq1, lk1, lq2, lk2 = v.lambdas.detach()
    lam = torch.exp(lq1 @ lk1) - torch.exp(lq2 @ lk2) + v.lambda_init
    o = (a[0] - lam * a[1]) @ vv
    o = o / o.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt() * v.norm_weight.detach() * (1 - v.lambda_init)
    assert (got - o.transpose(1, 2)).abs().max() <= 1e-5


def test_convert_save_load_and_train(tiny_dirs, tiny_tokenizer, tmp_path):
    model = attnswap.load_model(tiny_dirs["llama"])
    ids = sample_ids(model.config.vocab_size, length=23)
    ref = outputs(model, ids)
    attnswap.convert(model, "diff")
    assert torch.isfinite(outputs(model, ids)).all() and (outputs(model, ids) - ref).abs().max() > 1e-3  # not the original
    variant = next(iter(method_modules(model).values()))
    assert {p.shape for p in variant.trainable_parameters()} == {torch.Size([4, 4]), torch.Size([8])}
    with torch.no_grad():  # as if trained: the saved checkpoint must carry these values, not re-draw them
        for v in method_modules(model).values():
            v.lambdas.normal_(0, 0.5)
            v.norm_weight.uniform_(0.5, 1.5)
    got = outputs(model, ids)
    attnswap.save(model, tmp_path / "d", tokenizer=tiny_tokenizer)
    assert (outputs(attnswap.load(tmp_path / "d"), ids) - got).abs().max() <= 1e-5
