"""The `lln` attention method: moment-matched temperatures, linear's composition and decoding state."""
import pytest
import torch

import attnswap
from attnswap.config import DistillConfig
from attnswap.data import calibration
from attnswap.distill import distill
from attnswap.methods.attention.analysis import recording
from attnswap.methods.attention.lln import FIT_A, FIT_B
from attnswap.surgery import method_modules

from .conftest import WIKI_TRAIN, outputs, sample_ids
from .test_linear_decoding import decode_vs_parallel
from .test_linear_variant import dense_hybrid, random_qkv


def _converted(tiny_dirs, tiny_tokenizer, name="llama", **opts):
    model = attnswap.load_model(tiny_dirs[name])
    cal = calibration(tiny_tokenizer, str(WIKI_TRAIN), tokens=256, seq_len=64)
    return attnswap.convert(model, "lln", calibration=cal, **opts), cal


def test_moment_matching_on_gaussian_queries_and_keys():
    """The paper's premise: with q, k Gaussian and alpha sigma_q = beta sigma_k = sigma~ from the fit, the
    log of the LLN weights has the variance of the softmax logits (per query row; within the fit's 25 %)."""
    g = torch.Generator().manual_seed(0)
    d, t = 64, 1500
    for sq, sk in [(1.0, 1.0), (1.5, 1.2), (2.0, 1.5)]:
        q, k = torch.randn(t, d, generator=g) * sq, torch.randn(t, d, generator=g) * sk
        s = q @ k.T * d ** -0.5
        tilde = ((s.var() - FIT_B) / (2 * FIT_A)).sqrt()
        log_w = (torch.exp(tilde / sq * q) @ torch.exp(tilde / sk * k).T).log()
        var_sm = (s - s.mean(1, keepdim=True)).var()
        var_lln = (log_w - log_w.mean(1, keepdim=True)).var()
        assert 0.75 < float(var_lln / var_sm) < 1.25, (sq, sk, float(var_sm), float(var_lln))


def test_stored_temperatures_are_the_moment_match_of_the_measured_statistics(tiny_dirs, tiny_tokenizer):
    """alpha, beta and the centres in the plan, recomputed here from q and k recorded on the same windows."""
    original = attnswap.load_model(tiny_dirs["llama"])
    model, cal = _converted(tiny_dirs, tiny_tokenizer)
    stored = model.config.attnswap["plan"]["attention"][0]["options"]["calibration"]
    qs, ks, ss = {}, {}, {}
    for row in cal.ids:
        with torch.no_grad(), recording(original, inputs=True) as found:
            original(input_ids=row[None])
        for layer, [(_, q, k, _)] in found.items():
            q, k = q[0], k[0]
            kk = k.repeat_interleave(q.shape[0] // k.shape[0], 0)
            s = (q @ kk.transpose(1, 2)) * q.shape[-1] ** -0.5
            t = s.shape[-1]
            i, j = torch.tril_indices(t, t)
            qs.setdefault(layer, []).append(q.flatten(1))
            ks.setdefault(layer, []).append(k.flatten(1))
            ss.setdefault(layer, []).append(s[:, i, j])
    for layer in qs:
        q, k, s = torch.cat(qs[layer], 1), torch.cat(ks[layer], 1), torch.cat(ss[layer], 1)
        tilde = ((s.var(1, unbiased=False) - FIT_B) / (2 * FIT_A)).sqrt()
        alpha = tilde / q.std(1, unbiased=False)
        beta = tilde.view(k.shape[0], -1).mean(1) / k.std(1, unbiased=False)
        got = stored[str(layer)] if str(layer) in stored else stored[layer]
        assert got["alpha"] == pytest.approx(alpha.tolist(), rel=1e-4)
        assert got["beta"] == pytest.approx(beta.tolist(), rel=1e-4)
        assert got["q_centre"] == pytest.approx(q.mean(1).tolist(), abs=1e-5)
        assert got["k_centre"] == pytest.approx(k.mean(1).tolist(), abs=1e-5)


@pytest.mark.parametrize("opts", [dict(window=8, sinks=2), dict(window=0, sinks=0), dict(window=5, sinks=0, chunk=16)],
                         ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()))
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_lln_equals_the_dense_formula(tiny_dirs, tiny_tokenizer, name, opts):
    model, _ = _converted(tiny_dirs, tiny_tokenizer, name, **opts)
    variant = next(iter(method_modules(model).values()))
    geo = variant.geometry
    q, k, v = random_qkv(geo, t=45)
    scale = geo.head_dim ** -0.5
    want = dense_hybrid(variant, q, k, v, scale)
    got = variant.attend(q, k, v, scale)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    # the maps are exp(alpha (x - centre) - offset) per head
    fq = variant.phi_q(q)
    alpha, offset = variant.phi_q.log_t.exp().view(1, -1, 1, 1), variant.phi_q.offset.view(1, -1, 1, 1)
    assert torch.allclose(fq, torch.exp(alpha * (q - variant.phi_q.centre.view(1, -1, 1, 1)) - offset), rtol=1e-5)
    assert bool((offset != 0).any()) == variant.hybrid


def test_offset_puts_the_kernel_on_the_softmax_scale(tiny_dirs, tiny_tokenizer):
    """On the calibration windows, per layer and head, the mean over queries of log(kernel mass of the linear
    keys / softmax mass exp(s - m) of the same keys) is 0 with the converted maps (by construction), and was not
    before the offset."""
    original = attnswap.load_model(tiny_dirs["llama"])
    model, cal = _converted(tiny_dirs, tiny_tokenizer, window=8, sinks=2)
    methods = {m.layer_index: m for m in method_modules(model).values()}
    ratios, raw = {}, {}
    for row in cal.ids:
        with torch.no_grad(), recording(original, inputs=True) as found:
            original(input_ids=row[None])
        for layer, [(_, q, k, _)] in found.items():
            m = methods[layer]
            h, t, d = q.shape[1:]
            kk = k.repeat_interleave(h // k.shape[1], 1)
            s = (q @ kk.transpose(2, 3))[0].double() * d ** -0.5
            i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
            exact = (j <= i) & (((i - j) < 8) | (j < 2))
            linear = (j <= i) & ~exact
            rows = linear.any(1)
            soft = torch.exp(s - s.masked_fill(~exact, float("-inf")).amax(-1, keepdim=True)) * linear
            fk = m.phi_k(k).double().repeat_interleave(h // k.shape[1], 1)
            kern = (m.phi_q(q).double() @ fk.transpose(2, 3))[0] * linear
            log_ratio = (kern.sum(-1)[:, rows].log() - soft.sum(-1)[:, rows].log()).mean(1)
            ratios.setdefault(layer, []).append(log_ratio)
            raw.setdefault(layer, []).append(log_ratio + m.phi_q.offset.double())
    for layer in ratios:
        assert torch.stack(ratios[layer]).mean(0).abs().max() < 1e-4
        assert torch.stack(raw[layer]).mean(0).abs().min() > 0.1


@pytest.mark.parametrize("prefill,chunk", [(13, 1), (1, 1), (7, 5)])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_lln_decoding_equals_the_parallel_form(tiny_dirs, tiny_tokenizer, name, prefill, chunk):
    model, _ = _converted(tiny_dirs, tiny_tokenizer, name, window=6, sinks=2)
    err, cache = decode_vs_parallel(model, sample_ids(model.config.vocab_size, length=40), prefill, chunk)
    assert err < 1e-4
    assert type(cache.layers[0]).__name__ == "LinearStateLayer"


def test_lln_round_trip_and_frozen_temperatures(tiny_dirs, tiny_tokenizer, tmp_path):
    model, _ = _converted(tiny_dirs, tiny_tokenizer, window=4, sinks=1)
    with torch.no_grad():  # trained-looking values: the saved tensors, not the calibrated options, must come back
        for m in method_modules(model).values():
            m.phi_q.log_t.add_(0.1)
            m.mix.add_(0.5)
    ids = sample_ids(model.config.vocab_size, length=30)
    attnswap.save(model, tmp_path / "m", tokenizer=tiny_tokenizer)
    loaded = attnswap.load(tmp_path / "m")
    assert torch.equal(outputs(loaded, ids), outputs(model, ids))
    frozen, _ = _converted(tiny_dirs, tiny_tokenizer, window=0, sinks=0, train_temperature=False)
    assert [p for m in method_modules(frozen).values() for p in m.trainable_parameters()] == []
    trained = [n for m in method_modules(model).values() for n, _ in m.named_parameters()]
    assert sorted(set(trained)) == ["mix", "phi_k.log_t", "phi_q.log_t"]


def test_lln_needs_calibration_text(tiny_dirs):
    with pytest.raises(attnswap.AttnswapError, match="lln measures its temperatures on calibration text"):
        attnswap.convert(attnswap.load_model(tiny_dirs["llama"]), "lln")


def test_distill_trains_the_temperatures_and_lowers_every_layer_loss(tiny_dirs, tiny_tokenizer):
    # mix 0.5: the kernel carries half the weight, so its temperatures get the gradient to move in 30 steps
    model, _ = _converted(tiny_dirs, tiny_tokenizer, window=4, sinks=1, mix_init=0.5)
    before = {p: m.phi_q.log_t.detach().clone() for p, m in method_modules(model).items()}
    r = distill(model, tiny_tokenizer, DistillConfig(data=str(WIKI_TRAIN), tokens=30 * 64, seq_len=64, lr=3e-2),
                progress=False)
    for path, m in method_modules(model).items():
        assert r["layer_loss_final"][path] < 0.9 * r["layer_loss_start"][path], (path, r)
        assert not torch.equal(m.phi_q.log_t, before[path])


def test_encoder_pure_lln(tiny_dirs, tiny_tokenizer):
    """Bidirectional (BERT): pure LLN (window 0) runs; a window is refused in one line, naming lln."""
    model = attnswap.load_model(tiny_dirs["bert"])
    cal = calibration(tiny_tokenizer, str(WIKI_TRAIN), tokens=256, seq_len=64)
    with pytest.raises(attnswap.AttnswapError, match="^lln: window > 0 is implemented for causal models only"):
        attnswap.convert(model, "lln", calibration=cal)
    attnswap.convert(model, "lln", calibration=cal, window=0, sinks=0)
    ids = sample_ids(model.config.vocab_size, length=30)
    out = outputs(model, ids)
    assert torch.isfinite(out).all()


@pytest.mark.slow
def test_smollm2_lln_decodes_as_its_parallel_form_and_starts_usable(smollm2_dir):
    """On the real model: 30 converted layers decode from the constant-size state with the logits of the
    parallel form, and the calibrated start is a usable language model (the benchmark measures 98.3 on the
    standard protocol; without the offset it was in the thousands)."""
    from attnswap.data import encode, read_text
    from attnswap.evaluate import perplexity

    from .conftest import WIKI_TEST

    model = attnswap.load_model(smollm2_dir)
    tok = attnswap.load_tokenizer(smollm2_dir)
    cal = calibration(tok, str(WIKI_TRAIN), tokens=1024, seq_len=256)
    attnswap.convert(model, "lln", calibration=cal, window=16, sinks=4)
    ids = encode(tok, read_text(WIKI_TEST))[:48][None]
    err, _ = decode_vs_parallel(model, ids, prefill=40)
    assert err <= 1e-4
    ppl = perplexity(model, tok, str(WIKI_TEST), max_tokens=1024, seq_len=256, progress=False)["perplexity"]
    assert 10 < ppl < 500
