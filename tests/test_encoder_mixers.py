"""Token mixers for encoders (issue 19) on bidirectional models: `xca` (XCiT), `separable` (MobileViTv2),
`additive` (SwiftFormer), `linformer` and `soft` (SOFT, Nystrom + Newton-Schulz).
Each: its formula against a direct float64 implementation; on a converted tiny BERT, padding changes no real token,
save -> load -> the same outputs, gradients reach its parameters, distill lowers every layer's loss; causal
models refused in one line."""
import pytest
import torch
from torch.nn import functional as F

import attnswap
from attnswap.cli import main
from attnswap.config import DistillConfig
from attnswap.distill import distill
from attnswap.errors import AttnswapError
from attnswap.data import calibration
from attnswap.methods.attention.additive import additive
from attnswap.methods.attention.linformer import linformer, pooling_rows, resampled, sequence_moments
from attnswap.methods.attention.separable import separable
from attnswap.methods.attention.soft import newton_schulz_pinv, segment_means, soft
from attnswap.methods.attention.xca import xca
from attnswap.surgery import method_modules

from .conftest import WIKI_TRAIN, outputs, sample_ids
from .test_reliability import one_line

# the options each is converted with here (linformer's init: pca, which measures E and F on calibration text, is
# tested on its own below)
MIXERS = {"xca": {}, "separable": {}, "additive": {}, "linformer": {"rank": 8},
          "soft": {"landmarks": 6}}
LR = {"soft": 1e-2, "linformer": 1e-3}  # other than 5e-2: soft at 5e-2 sharpens its kernel past what its
# Nystrom form holds; linformer trains every entry of E and F (a step of 5e-2 is a fifth of a pooling weight)


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
    model = attnswap.convert(attnswap.load_model(tiny_dirs["bert"]), name, **MIXERS[name])
    assert len(method_modules(model)) == model.config.num_hidden_layers
    ids = sample_ids(model.config.vocab_size, batch=1, length=19)
    padded = torch.cat([ids, torch.zeros(1, 6, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 19, dtype=torch.long), torch.zeros(1, 6, dtype=torch.long)], 1)
    with torch.no_grad():  # in float64: the invariance is exact math, not a rounding bound (soft's pseudo-inverse
        model.double()      # amplifies fp32 rounding to 1.0e-5 here)
        alone = model(input_ids=ids).last_hidden_state
        both = model(input_ids=padded, attention_mask=mask).last_hidden_state[:, :19]
        model.float()
    assert alone.shape == (1, 19, model.config.hidden_size) and torch.isfinite(alone).all()
    assert (alone - both).abs().max() <= 1e-10
    model.save_pretrained(tmp_path / "m")
    again = attnswap.load(tmp_path / "m")
    assert torch.equal(outputs(again, ids), outputs(model, ids))


@pytest.mark.parametrize("name", MIXERS)
def test_gradients_are_finite_and_distill_lowers_every_layer_loss(tiny_dirs, tiny_tokenizer, name):
    model = attnswap.convert(attnswap.load_model(tiny_dirs["bert"]), name, **MIXERS[name])
    out = model(input_ids=sample_ids(model.config.vocab_size, length=23)).last_hidden_state
    out.pow(2).mean().backward()
    for m in method_modules(model).values():
        for p in m.trainable_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    model.zero_grad()
    r = distill(model, tiny_tokenizer, DistillConfig(data=str(WIKI_TRAIN), tokens=30 * 64, seq_len=64, lr=LR.get(name, 5e-2)),
                progress=False)
    for path in method_modules(model):
        assert r["layer_loss_final"][path] < r["layer_loss_start"][path], (path, r)


@pytest.mark.parametrize("name", MIXERS)
def test_causal_models_are_refused_in_one_line(tiny_dirs, name):
    with pytest.raises(AttnswapError, match=f"{name}' supports bidirectional attention only"):
        attnswap.convert(attnswap.load_model(tiny_dirs["llama"]), name)


def test_linformer_against_a_direct_float64_loop_and_exact_at_identity_projections():
    (q, k, v), keep = _qkv(seed=5)
    b, h, t, d = q.shape
    g = torch.Generator().manual_seed(6)
    e, f = torch.randn(4, 15, generator=g, dtype=torch.float64), torch.randn(4, 15, generator=g, dtype=torch.float64)
    got = linformer(q, k, v, e, f, keep, scale=0.6)
    for bi in range(b):
        rows = keep[bi].nonzero().flatten().tolist()  # real token number n takes column n of E and F
        for hi in range(h):
            kp = sum(e[:, n:n + 1] * k[bi, hi, s] for n, s in enumerate(rows))  # [r, d]
            vp = sum(f[:, n:n + 1] * v[bi, hi, s] for n, s in enumerate(rows))
            for ti in rows:
                w = torch.softmax(torch.stack([0.6 * (q[bi, hi, ti] * kp[r]).sum() for r in range(4)]), 0)
                want = sum(w[r] * vp[r] for r in range(4))
                assert (got[bi, hi, ti] - want).abs().max() <= 1e-12
    eye = torch.eye(t, dtype=torch.float64)  # r = n = T, E = F = I: softmax attention itself
    assert (linformer(q, k, v, eye, eye) - F.scaled_dot_product_attention(q, k, v)).abs().max() <= 1e-12
    rows = pooling_rows(3, 8)  # segments of 2, 3, 3 positions, each a mean
    assert torch.equal(rows.sum(1), torch.ones(3)) and (rows > 0).sum(1).tolist() == [2, 3, 3]
    # lengths: adaptive: E and F resampled to the number of real tokens, then as above on the real tokens alone
    got = linformer(q, k, v, e, f, keep, scale=0.6, adaptive=True)
    for bi in range(b):
        rows = keep[bi].nonzero().flatten()
        n = len(rows)
        want = linformer(q[bi:bi + 1, :, rows], k[bi:bi + 1, :, rows], v[bi:bi + 1, :, rows], resampled(e, n),
                         resampled(f, n), scale=0.6)
        assert (got[bi:bi + 1, :, rows] - want).abs().max() <= 1e-12
    assert torch.equal(resampled(e, 15), e)  # n = T: unchanged
    half = resampled(e, 5)  # 15 -> 5: columns summed in threes
    assert (half - e.view(4, 5, 3).sum(-1)).abs().max() <= 1e-12
    for t in (4, 7, 22):  # any length: every row keeps its sum
        assert (resampled(e, t).sum(1) - e.sum(1)).abs().max() <= 1e-12


def test_linformer_pca_rows_are_the_calibration_principal_directions(tiny_dirs, tiny_tokenizer, tmp_path):
    model = attnswap.load_model(tiny_dirs["bert"])
    cal = calibration(tiny_tokenizer, str(WIKI_TRAIN), tokens=3 * 32, seq_len=32)
    moments = sequence_moments(model, cal.ids, [0, 1])
    attnswap.convert(model, "linformer", rank=5, length=32, init="pca", calibration=cal)
    for layer, m in enumerate(method_modules(model).values()):
        for rows, mom in ((m.e, moments[layer][0]), (m.f, moments[layer][1])):
            lam, u = torch.linalg.eigh(mom)
            top = u[:, -5:].flip(1).T.float()  # by hand: the 5 largest, unit L2 norm
            unit = rows / rows.norm(dim=1, keepdim=True)
            assert torch.allclose(unit.abs(), top.abs(), atol=1e-4)  # the same directions, up to sign
            assert torch.allclose(rows.abs().sum(1), torch.ones(5)) and (rows.detach().sum(1) >= 0).all()
    ids = sample_ids(model.config.vocab_size, batch=1, length=20)
    model.save_pretrained(tmp_path / "m")
    assert torch.equal(outputs(attnswap.load(tmp_path / "m"), ids), outputs(model, ids))
    with pytest.raises(AttnswapError, match="linformer projects at most 32 tokens, got 40"):
        model(input_ids=sample_ids(model.config.vocab_size, batch=1, length=40))


def test_linformer_one_line_errors(tiny_dirs, tiny_tokenizer, tmp_path, capsys):
    bert = tiny_dirs["bert"]
    with pytest.raises(AttnswapError, match="linformer init: pca measures E and F .* pass --calibration"):
        attnswap.convert(attnswap.load_model(bert), "linformer", init="pca")
    cal = calibration(tiny_tokenizer, str(WIKI_TRAIN), tokens=128, seq_len=64)
    with pytest.raises(AttnswapError, match="windows of its projection length 32: pass --calibration-seq-len 32"):
        attnswap.convert(attnswap.load_model(bert), "linformer", length=32, rank=4, init="pca", calibration=cal)
    with pytest.raises(AttnswapError, match="rank 40 is above the projection length 32"):
        attnswap.convert(attnswap.load_model(bert), "linformer", length=32, rank=40, init="pooling")
    capsys.readouterr()  # through the CLI: one line, nothing written
    code = main(["convert", str(bert), "--to", "linformer", "--set", "init=pca", "--calibration", str(WIKI_TRAIN),
                 "--calibration-seq-len", "64", "--out", str(tmp_path / "o")])
    one_line(code, capsys.readouterr().err, "pass --calibration-seq-len 512")
    assert not (tmp_path / "o").exists()


def test_newton_schulz_pinv_and_its_gradient_match_torch_pinv_in_float64():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    for b in (torch.randn(5, 5, generator=g, dtype=torch.float64) + 3 * torch.eye(5, dtype=torch.float64),
              x @ x.T + 0.5 * torch.eye(6, dtype=torch.float64),  # a Gram matrix, as the shared q = k gives
              torch.randn(4, 7, generator=g, dtype=torch.float64)):  # not square
        assert (newton_schulz_pinv(b, 60) - torch.linalg.pinv(b)).abs().max() <= 1e-10
        w = torch.randn(b.shape[1], b.shape[0], generator=g, dtype=torch.float64)
        grads = []
        for fn in (lambda m: newton_schulz_pinv(m, 60), torch.linalg.pinv):
            m = b.clone().requires_grad_(True)
            (fn(m) * w).sum().backward()
            grads.append(m.grad)
        assert (grads[0] - grads[1]).abs().max() <= 1e-8 * grads[1].abs().max()
    # rank-deficient (a repeated landmark): still the pseudo-inverse, a finite gradient
    y = torch.randn(3, 4, generator=g, dtype=torch.float64)
    low = torch.cat([y, y[:1]]) @ torch.cat([y, y[:1]]).T  # 4 x 4 of rank 3
    assert (newton_schulz_pinv(low, 80) - torch.linalg.pinv(low, hermitian=True)).abs().max() <= 1e-9
    m = low.clone().requires_grad_(True)
    newton_schulz_pinv(m, 80).sum().backward()
    assert torch.isfinite(m.grad).all()


def test_soft_is_softmax_attention_with_every_token_a_landmark_and_matches_a_dense_kernel():
    (q, k, v), keep = _qkv(seed=8)
    b, h, t, d = q.shape
    tau = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    for kp in (None, keep):  # normalize: exactly softmax attention (scale x tau) when the Nystrom form is exact
        got = soft(q, k, v, tau, kp, landmarks=t, iterations=100, scale=0.4)
        for hi in range(h):
            s = 0.4 * tau[hi]
            att = (q[:, hi] @ k[:, hi].transpose(-1, -2) * s)
            if kp is not None:
                att = att.masked_fill(~kp[:, None, :], float("-inf"))
            want = torch.softmax(att, -1) @ v[:, hi]
            real = slice(None) if kp is None else keep[:, :, None].expand(b, t, d)
            assert (got[:, hi] - want)[real].abs().max() <= 1e-9
    # normalize: false, every token a landmark: the dense Gaussian kernel times the values
    got = soft(q, k, v, tau, None, landmarks=t, iterations=100, scale=0.4, normalize=False)
    for hi in range(h):
        dense = torch.exp(-0.5 * 0.4 * tau[hi] * torch.cdist(q[:, hi], k[:, hi]) ** 2)
        assert (got[:, hi] - dense @ v[:, hi]).abs().max() <= 1e-9
    # fewer landmarks: segment means of the real tokens (n = 7 real tokens, 3 landmarks: 2, 2 and 3 tokens)
    lm, used = segment_means(q, keep, 3)
    assert used.all()
    rows = keep[1].nonzero().flatten()
    for j, seg in enumerate((rows[0:2], rows[2:4], rows[4:7])):
        assert (lm[1, :, j] - q[1, :, seg].mean(1)).abs().max() <= 1e-12
    # a sink landmark: the first real token on its own, then 3 segments of the 6 others (2 tokens each)
    lm, _ = segment_means(q, keep, 4, sinks=1)
    for j, seg in enumerate((rows[0:1], rows[1:3], rows[3:5], rows[5:7])):
        assert (lm[1, :, j] - q[1, :, seg].mean(1)).abs().max() <= 1e-12
    # every token a landmark, the first as a sink: still exactly softmax attention
    got = soft(q, k, v, tau, None, landmarks=t, iterations=100, scale=0.4, sinks=1)
    want = torch.softmax(q @ k.transpose(-1, -2) * 0.4 * tau.view(1, -1, 1, 1), -1) @ v
    assert (got - want).abs().max() <= 1e-9
    # more landmarks than real tokens (7 and 11 of 20): every real token is one, the rest unused; exact again
    lm, used = segment_means(q, keep, 20, sinks=1)
    assert used.sum(1).tolist() == [11, 7] and lm[1, :, 7:].abs().max() == 0
    assert torch.equal(lm[1, :, :7], q[1, :, rows])
    got = soft(q, k, v, tau, keep, landmarks=20, iterations=100, scale=0.4, sinks=1)
    att = (q @ k.transpose(-1, -2) * 0.4 * tau.view(1, -1, 1, 1)).masked_fill(~keep[:, None, None, :], float("-inf"))
    want = torch.softmax(att, -1) @ v
    assert (got - want)[keep[:, None, :, None].expand_as(got)].abs().max() <= 1e-9
