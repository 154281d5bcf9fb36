"""The `xca` attention method (XCiT cross-covariance attention) on bidirectional models."""
import pytest
import torch

import attnswap
from attnswap.config import DistillConfig
from attnswap.distill import distill
from attnswap.errors import AttnswapError
from attnswap.methods.attention.xca import xca
from attnswap.surgery import method_modules

from .conftest import WIKI_TRAIN, outputs, sample_ids


def test_the_formula_against_a_direct_float64_loop():
    g = torch.Generator().manual_seed(0)
    b, h, t, d = 2, 3, 11, 5
    q, k, v = (torch.randn(b, h, t, d, generator=g, dtype=torch.float64) for _ in range(3))
    tau = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    keep = torch.ones(b, t, dtype=torch.bool)
    keep[1, :4] = False
    got = xca(q, k, v, tau, keep)
    for bi in range(b):
        rows = keep[bi].nonzero().flatten()
        for hi in range(h):
            qq, kk = q[bi, hi, rows], k[bi, hi, rows]  # kept tokens only
            qn = qq / qq.norm(dim=0, keepdim=True)
            kn = kk / kk.norm(dim=0, keepdim=True)
            a = torch.empty(d, d, dtype=torch.float64)
            for i in range(d):
                logits = torch.stack([tau[hi] * (qn[:, i] * kn[:, j]).sum() for j in range(d)])
                a[i] = torch.softmax(logits, 0)
            for ti in rows.tolist():
                want = torch.stack([(a[i] * v[bi, hi, ti]).sum() for i in range(d)])
                assert (got[bi, hi, ti] - want).abs().max() <= 1e-10


def test_padding_changes_no_real_token_and_the_round_trip(tiny_dirs, tmp_path):
    model = attnswap.convert(attnswap.load_model(tiny_dirs["bert"]), "xca")
    assert len(method_modules(model)) == model.config.num_hidden_layers
    ids = sample_ids(model.config.vocab_size, batch=1, length=19)
    padded = torch.cat([ids, torch.zeros(1, 6, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 19, dtype=torch.long), torch.zeros(1, 6, dtype=torch.long)], 1)
    with torch.no_grad():
        alone = model(input_ids=ids).last_hidden_state
        both = model(input_ids=padded, attention_mask=mask).last_hidden_state[:, :19]
    assert alone.shape == (1, 19, model.config.hidden_size)
    assert (alone - both).abs().max() <= 1e-5
    model.save_pretrained(tmp_path / "m")
    again = attnswap.load(tmp_path / "m")
    assert torch.equal(outputs(again, ids), outputs(model, ids))


def test_gradients_are_finite_and_distill_lowers_every_layer_loss(tiny_dirs, tiny_tokenizer):
    model = attnswap.convert(attnswap.load_model(tiny_dirs["bert"]), "xca")
    out = model(input_ids=sample_ids(model.config.vocab_size, length=23)).last_hidden_state
    out.pow(2).mean().backward()
    for m in method_modules(model).values():
        assert m.tau.grad is not None and torch.isfinite(m.tau.grad).all() and m.tau.grad.abs().sum() > 0
    model.zero_grad()
    r = distill(model, tiny_tokenizer, DistillConfig(data=str(WIKI_TRAIN), tokens=30 * 64, seq_len=64, lr=5e-2),
                progress=False)
    for path in method_modules(model):
        assert r["layer_loss_final"][path] < r["layer_loss_start"][path], (path, r)


def test_causal_models_are_refused_in_one_line(tiny_dirs):
    with pytest.raises(AttnswapError, match="xca' supports bidirectional attention only"):
        attnswap.convert(attnswap.load_model(tiny_dirs["llama"]), "xca")
