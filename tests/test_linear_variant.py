"""The `linear` variant: its composition against a dense implementation of the formula, closeness, options."""
import pytest
import torch

import attnswap
from attnswap.surgery import method_modules
from attnswap_kernels import assert_close
from attnswap_kernels.window_attn import window_softmax_naive, window_softmax_terms

from .conftest import outputs, sample_ids


@pytest.mark.parametrize("t,w,s", [(63, 16, 4), (100, 7, 0), (5, 16, 2), (64, 16, 0), (50, 0, 3), (33, 1, 1)])
def test_blockwise_window_terms_equal_the_dense_definition(t, w, s):
    g = torch.Generator().manual_seed(t)
    q, k, v = torch.randn(2, 6, t, 8, generator=g), torch.randn(2, 2, t, 8, generator=g), torch.randn(2, 2, t, 5, generator=g)
    a, c, m = window_softmax_terms(q, k, v, w, s, 0.3)
    a2, c2, m2 = window_softmax_naive(q, k, v, w, s, 0.3)
    assert_close("m", m2, m, 1e-6)
    assert_close("o", a2 / c2[..., None], a / c[..., None], 1e-6)


def random_qkv(geo, t: int, batch: int = 2, seed: int = 1):
    """q [B, H, T, D], k and v [B, Hkv, T, D] from N(0, 1) at a layer's geometry."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, geo.num_heads, t, geo.head_dim, generator=g)
    k, v = (torch.randn(batch, geo.num_kv_heads, t, geo.head_dim, generator=g) for _ in range(2))
    return q, k, v


def dense_hybrid(variant, q, k, v, scale):
    """The module docstring's formula with T x T masks: an independent check of the composition."""
    o = variant.options
    b, h, t, d = q.shape
    g = h // k.shape[1]
    kk, vv = k.repeat_interleave(g, 1).float(), v.repeat_interleave(g, 1).float()
    fq = variant._phi_q(q).float()
    fk = variant.phi_k(k).float().repeat_interleave(g, 1)
    i = torch.arange(t).view(t, 1)
    j = torch.arange(t).view(1, t)
    causal = j <= i if variant.causal else torch.ones(t, t, dtype=torch.bool)
    exact = causal & (((i - j < o.window) & (i - j >= 0)) | (j < o.sinks))
    lin = causal & ~exact
    kern = torch.einsum("bhif,bhjf->bhij", fq, fk) * lin
    num, den = kern @ vv, kern.sum(-1)
    if not variant.hybrid:
        return num / (den[..., None] + 1e-6)
    sc = (torch.einsum("bhid,bhjd->bhij", q.float(), kk) * scale).masked_fill(~exact, float("-inf"))
    p = torch.exp(sc - sc.amax(-1, keepdim=True))
    mix = torch.sigmoid(variant.mix).view(1, h, 1, 1)
    return (mix * (p @ vv) + (1 - mix) * num) / (mix * p.sum(-1, keepdim=True) + (1 - mix) * den[..., None] + 1e-6)


@pytest.mark.parametrize("opts", [
    dict(feature_map="hedgehog", window=8, sinks=2),
    dict(feature_map="hedgehog", window=5, sinks=0, tie_qk=True),
    dict(feature_map="elu", window=0, sinks=0),
    dict(feature_map="relu", window=0, sinks=3, chunk=16),
    dict(feature_map="hedgehog", window=16, sinks=4, feature_dim=12, chunk=16),
], ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()))
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_causal_composition_equals_the_dense_formula(tiny_dirs, name, opts):
    model = attnswap.load_model(tiny_dirs[name])
    attnswap.convert(model, "linear", **opts)
    variant = next(iter(method_modules(model).values()))
    geo = variant.geometry
    q, k, v = random_qkv(geo, t=45)
    with torch.no_grad():
        got = variant.attend(q, k, v, 0.35)
        want = dense_hybrid(variant, q, k, v, 0.35)
    assert_close("o", want, got, 1e-5)


def test_bidirectional_linear_equals_the_dense_formula(tiny_dirs):
    model = attnswap.load_model(tiny_dirs["bert"])
    attnswap.convert(model, "linear", feature_map="hedgehog", window=0, sinks=2)
    variant = next(iter(method_modules(model).values()))
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 4, 30, 8, generator=g) for _ in range(3))
    with torch.no_grad():
        assert_close("o", dense_hybrid(variant, q, k, v, 0.35), variant.attend(q, k, v, 0.35), 1e-5)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_window_covering_the_sequence_equals_the_original(tiny_dirs, name):
    """With w >= T the linear set is empty and the output is exact softmax attention."""
    model = attnswap.load_model(tiny_dirs[name])
    ids = sample_ids(model.config.vocab_size, length=40)
    ref = outputs(model, ids)
    attnswap.convert(model, "linear", window=64, sinks=0)
    assert (outputs(model, ids) - ref).abs().max() <= 1e-4


def test_feature_maps_and_mix_get_gradients(tiny_dirs):
    model = attnswap.load_model(tiny_dirs["llama"])
    attnswap.convert(model, "linear", window=8, sinks=2)
    ids = sample_ids(model.config.vocab_size, length=40)
    model(input_ids=ids, labels=ids).loss.backward()
    for path, variant in method_modules(model).items():
        params = dict(variant.named_parameters())
        assert set(params) == {"phi_k.weight", "phi_q.weight", "mix"}, params.keys()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values()), path


def test_linear_round_trip(tiny_dirs, tiny_tokenizer, tmp_path):
    model = attnswap.load_model(tiny_dirs["llama"])
    attnswap.convert(model, "linear", window=8, sinks=2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.dim() == 3:
                p.add_(0.1 * torch.randn_like(p))  # the saved feature maps are not the init
    ids = sample_ids(model.config.vocab_size, length=33)
    attnswap.save(model, tmp_path / "lin", tokenizer=tiny_tokenizer)
    assert (outputs(attnswap.load(tmp_path / "lin"), ids) - outputs(model, ids)).abs().max() <= 1e-5


@pytest.mark.parametrize("setting,fragment", [
    (dict(feature_map="cosine"), "feature_map"),
    (dict(window=-1), "window"),
    (dict(sinks=-2), "sinks"),
    (dict(chunk=48), "power of 2"),
    (dict(feature_dim=0), "feature_dim"),
    (dict(mix_init=1.5), "mix_init"),
])
def test_options_are_validated(tiny_dirs, setting, fragment):
    model = attnswap.load_model(tiny_dirs["llama"])
    with pytest.raises(attnswap.AttnswapError, match=fragment):
        attnswap.convert(model, "linear", **setting)


def test_window_on_an_encoder_is_a_one_line_error(tiny_dirs):
    model = attnswap.load_model(tiny_dirs["bert"])
    with pytest.raises(attnswap.AttnswapError, match="window > 0 is implemented for causal models only"):
        attnswap.convert(model, "linear", window=8)


def test_padding_does_not_leak_into_an_encoder(tiny_dirs):
    """A padded batch row gives the same real-token outputs as the row alone."""
    model = attnswap.load_model(tiny_dirs["bert"])
    attnswap.convert(model, "linear", feature_map="hedgehog", window=0, sinks=2)
    ids = sample_ids(model.config.vocab_size, batch=1, length=20)
    padded = torch.cat([ids, torch.zeros(1, 7, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 20, dtype=torch.long), torch.zeros(1, 7, dtype=torch.long)], dim=1)
    with torch.no_grad():
        alone = model(input_ids=ids).last_hidden_state
        batched = model(input_ids=padded, attention_mask=mask).last_hidden_state[:, :20]
    assert (alone - batched).abs().max() <= 1e-5
