"""Token mixers for encoders (issue 19) on bidirectional models: `xca` (XCiT), `separable` (MobileViTv2) and
`additive` (SwiftFormer).
Each: its formula against a direct float64 loop; on a converted tiny BERT, padding changes no real token,
save -> load -> the same outputs, gradients reach its parameters, distill lowers every layer's loss; causal
models refused in one line."""
import pytest
import torch

import attnswap
from attnswap.config import DistillConfig
from attnswap.distill import distill
from attnswap.errors import AttnswapError
from attnswap.methods.attention.additive import additive
from attnswap.methods.attention.separable import separable
from attnswap.methods.attention.xca import xca
from attnswap.surgery import method_modules

from .conftest import WIKI_TRAIN, outputs, sample_ids

MIXERS = ["xca", "separable", "additive"]


def _qkv(b=2, h=3, t=11, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    keep = torch.ones(b, t, dtype=torch.bool)
    keep[1, :4] = False
    return [torch.randn(b, h, t, d, generator=g, dtype=torch.float64) for _ in range(3)], keep


def test_xca_against_a_direct_float64_loop():
    (q, k, v), keep = _qkv()
    b, h, t, d = q.shape
    tau = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    got = xca(q, k, v, tau, keep)
    for bi in range(b):
        rows = keep[bi].nonzero().flatten()
        for hi in range(h):
            qq, kk = q[bi, hi, rows], k[bi, hi, rows]  # kept tokens only
            qn, kn = qq / qq.norm(dim=0, keepdim=True), kk / kk.norm(dim=0, keepdim=True)
            a = torch.empty(d, d, dtype=torch.float64)
            for i in range(d):
                a[i] = torch.softmax(torch.stack([tau[hi] * (qn[:, i] * kn[:, j]).sum() for j in range(d)]), 0)
            for ti in rows.tolist():
                want = torch.stack([(a[i] * v[bi, hi, ti]).sum() for i in range(d)])
                assert (got[bi, hi, ti] - want).abs().max() <= 1e-10


def test_separable_against_a_direct_float64_loop():
    (_, k, v), keep = _qkv(seed=1)
    b, h, t, d = k.shape
    g = torch.Generator().manual_seed(2)
    latent, gain = torch.randn(h, d, generator=g, dtype=torch.float64), torch.rand(h, d, generator=g, dtype=torch.float64)
    got = separable(k, v, latent, gain, keep, scale=0.7)
    for bi in range(b):
        rows = keep[bi].nonzero().flatten().tolist()
        for hi in range(h):
            w = torch.softmax(torch.stack([0.7 * (latent[hi] * k[bi, hi, s]).sum() for s in rows]), 0)
            context = sum(w[n] * k[bi, hi, s] for n, s in enumerate(rows)) * gain[hi]
            for ti in rows:
                want = torch.clamp(v[bi, hi, ti], min=0) * context
                assert (got[bi, hi, ti] - want).abs().max() <= 1e-12


def test_additive_against_a_direct_float64_loop():
    (q, k, _), keep = _qkv(seed=3)
    b, h, t, d = q.shape
    g = torch.Generator().manual_seed(4)
    w_g = torch.randn(h, d, generator=g, dtype=torch.float64)
    proj_w, proj_b = torch.randn(h, d, d, generator=g, dtype=torch.float64), torch.randn(h, d, generator=g, dtype=torch.float64)
    got = additive(q, k, w_g, proj_w, proj_b, keep)
    for bi in range(b):
        rows = keep[bi].nonzero().flatten().tolist()
        for hi in range(h):
            qn = {s: q[bi, hi, s] / q[bi, hi, s].norm() for s in rows}
            a = torch.stack([(qn[s] * w_g[hi]).sum() / d ** 0.5 for s in rows])
            a = a / a.norm()
            glob = sum(a[n] * qn[s] for n, s in enumerate(rows))
            for ti in rows:
                kn = k[bi, hi, ti] / k[bi, hi, ti].norm()
                want = proj_w[hi] @ (glob * kn) + proj_b[hi] + qn[ti]
                assert (got[bi, hi, ti] - want).abs().max() <= 1e-10


@pytest.mark.parametrize("name", MIXERS)
def test_padding_changes_no_real_token_and_the_round_trip(tiny_dirs, tmp_path, name):
    model = attnswap.convert(attnswap.load_model(tiny_dirs["bert"]), name)
    assert len(method_modules(model)) == model.config.num_hidden_layers
    ids = sample_ids(model.config.vocab_size, batch=1, length=19)
    padded = torch.cat([ids, torch.zeros(1, 6, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 19, dtype=torch.long), torch.zeros(1, 6, dtype=torch.long)], 1)
    with torch.no_grad():
        alone = model(input_ids=ids).last_hidden_state
        both = model(input_ids=padded, attention_mask=mask).last_hidden_state[:, :19]
    assert alone.shape == (1, 19, model.config.hidden_size) and torch.isfinite(alone).all()
    assert (alone - both).abs().max() <= 1e-5
    model.save_pretrained(tmp_path / "m")
    again = attnswap.load(tmp_path / "m")
    assert torch.equal(outputs(again, ids), outputs(model, ids))


@pytest.mark.parametrize("name", MIXERS)
def test_gradients_are_finite_and_distill_lowers_every_layer_loss(tiny_dirs, tiny_tokenizer, name):
    model = attnswap.convert(attnswap.load_model(tiny_dirs["bert"]), name)
    out = model(input_ids=sample_ids(model.config.vocab_size, length=23)).last_hidden_state
    out.pow(2).mean().backward()
    for m in method_modules(model).values():
        for p in m.trainable_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    model.zero_grad()
    r = distill(model, tiny_tokenizer, DistillConfig(data=str(WIKI_TRAIN), tokens=30 * 64, seq_len=64, lr=5e-2),
                progress=False)
    for path in method_modules(model):
        assert r["layer_loss_final"][path] < r["layer_loss_start"][path], (path, r)


@pytest.mark.parametrize("name", MIXERS)
def test_causal_models_are_refused_in_one_line(tiny_dirs, name):
    with pytest.raises(AttnswapError, match=f"{name}' supports bidirectional attention only"):
        attnswap.convert(attnswap.load_model(tiny_dirs["llama"]), name)
