"""gmm-mask: a Gaussian-mixture locality mask on the attention scores (the score-modifier kind). Exact at
conversion, the paper's formula against a direct float64 computation, relative positions under decoding and
left padding, trained by finetune, saved and loaded; refused beside attention without scores."""
import math

import pytest
import torch

import attnswap
from attnswap.attention import SCORE_MODIFIER, exact_attention
from attnswap.cli import main
from attnswap.errors import AttnswapError
from attnswap.surgery import method_modules

from .conftest import WIKI_TRAIN, decoding_error, outputs, sample_ids


def perturb(model, seed=0):
    """Non-zero amplitudes and varied widths, so the mask changes the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in method_modules(model, "scores").values():
            m.amplitude.copy_(torch.randn(m.amplitude.shape, generator=g) * 0.8)
            m.log_sigma.add_(torch.randn(m.log_sigma.shape, generator=g) * 0.3)


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_conversion_is_exact_and_a_trained_mask_changes_the_model(tiny_dirs, name):
    model = attnswap.load_model(tiny_dirs[name])
    ids = sample_ids(model.config.vocab_size, length=23)
    ref = outputs(model, ids)
    attnswap.convert(model, "gmm-mask")
    assert len(method_modules(model, "scores")) == model.config.num_hidden_layers
    assert (outputs(model, ids) - ref).abs().max() <= 1e-5
    perturb(model)
    assert (outputs(model, ids) - ref).abs().max() > 1e-3


@pytest.mark.slow
def test_smollm2_conversion_is_exact(smollm2_dir):
    model = attnswap.load_model(smollm2_dir)
    ids = sample_ids(model.config.vocab_size, batch=1, length=64)
    ref = outputs(model, ids)
    attnswap.convert(model, {"attention": [{"layers": "0-14", "method": "sliding-window", "options": {"window": 512}}],
                             "scores": {"method": "gmm-mask", "options": {"gaussians": 4}}})
    assert (outputs(model, ids) - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("mode", ["multiply", "add"])
@pytest.mark.parametrize("causal", [True, False])
def test_the_formula_against_a_direct_float64_computation(tiny_dirs, mode, causal):
    model = attnswap.load_model(tiny_dirs["llama" if causal else "bert"])
    attnswap.convert(model, "gmm-mask", mode=mode, gaussians=2)
    perturb(model, seed=3)
    mod = next(iter(method_modules(model, "scores").values())).double()
    module = torch.nn.Module()
    module.is_causal = causal
    g = torch.Generator().manual_seed(1)
    b, h, hkv, tq, tk, d = 2, 4, 2, 5, 13, 8
    q = torch.randn(b, h, tq, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(b, hkv, tk, d, generator=g, dtype=torch.float64) for _ in range(2))
    out, _ = exact_attention(module, q, k, v, None, scaling=0.3, **{SCORE_MODIFIER: mod})
    # by hand, one entry at a time
    a, sig = mod.amplitude.detach(), mod.log_sigma.detach().exp()
    want = torch.zeros(b, tq, h, d, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for i in range(tq):
                pos = tk - tq + i
                s = []
                for j in range(tk):
                    raw = float(q[bi, hi, i] @ k[bi, hi // 2, j]) * 0.3
                    mix = sum(float(a[n, hi]) * math.exp(-(pos - j) ** 2 / (2 * float(sig[n, hi]) ** 2))
                              for n in range(a.shape[0]))
                    val = raw * (1 + mix) if mode == "multiply" else raw + mix
                    s.append(val if (j <= pos or not causal) else -math.inf)
                w = torch.softmax(torch.tensor(s, dtype=torch.float64), 0)
                want[bi, i, hi] = w @ v[bi, hi // 2]
    assert (out - want).abs().max() <= 1e-12


def test_decoding_with_a_cache_equals_the_full_pass(tiny_dirs):
    model = attnswap.load_model(tiny_dirs["llama"])
    attnswap.convert(model, {"attention": [{"layers": 1, "method": "sliding-window", "options": {"window": 5}}],
                             "scores": {"method": "gmm-mask"}})
    perturb(model)
    ids = sample_ids(model.config.vocab_size, batch=1, length=19)
    assert decoding_error(model, ids, prefill=11) <= 1e-5
    gen = model.generate(ids[:, :8], max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert int(model(input_ids=gen[:, :-1]).logits[0, -1].argmax()) == int(gen[0, -1])


def test_left_padding_keeps_relative_positions(tiny_dirs):
    model = attnswap.load_model(tiny_dirs["llama"])
    attnswap.convert(model, "gmm-mask")
    perturb(model)
    ids = sample_ids(model.config.vocab_size, batch=1, length=12)
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 12, dtype=torch.long)], 1)
    with torch.no_grad():
        alone = model(input_ids=ids).logits
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        both = model(input_ids=padded, attention_mask=mask, position_ids=pos).logits[:, 5:]
    assert (alone - both).abs().max() <= 1e-4


def test_plans_refuse_attention_without_scores_and_a_cache_policy(tiny_dirs):
    model = attnswap.load_model(tiny_dirs["llama"])
    with pytest.raises(AttnswapError, match="layer 0 runs 'linear', which forms none"):
        attnswap.convert(model, {"attention": [{"layers": 0, "method": "linear"}], "scores": {"method": "gmm-mask"}})
    with pytest.raises(AttnswapError, match="pruned KV cache"):
        attnswap.convert(model, {"cache": {"policy": "h2o", "budget": 0.5}, "scores": {"method": "gmm-mask"}})
    with pytest.raises(AttnswapError, match="sigma_max must be at least sigma_min"):
        attnswap.convert(model, "gmm-mask", sigma_min=8, sigma_max=2)
    # a linear layer beside a masked one is fine
    attnswap.convert(model, {"attention": [{"layers": 0, "method": "linear"}],
                             "scores": {"method": "gmm-mask", "layers": 1}})
    assert list(method_modules(model, "scores")) == ["model.layers.1.self_attn"]


def test_cli_error_is_one_line(tiny_dirs, tmp_path, capsys):
    plan = tmp_path / "plan.yaml"
    plan.write_text("attention: [{layers: 0, method: mra}]\nscores: {method: gmm-mask, layers: 0}\n")
    assert main(["convert", str(tiny_dirs["llama"]), "--plan", str(plan), "--out", str(tmp_path / "o")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs softmax scores" in err[0] and not (tmp_path / "o").exists()


def test_finetune_trains_the_mixture_and_the_checkpoint_loads(tiny_dirs, tiny_tokenizer, tmp_path):
    from attnswap.config import FinetuneConfig
    from attnswap.train import finetune

    model = attnswap.load_model(tiny_dirs["llama"])
    attnswap.convert(model, {"attention": [{"layers": 1, "method": "sliding-window", "options": {"window": 8}}],
                             "scores": {"method": "gmm-mask", "options": {"mode": "add"}}})
    cfg = FinetuneConfig(data=str(WIKI_TRAIN), steps=4, seq_len=32, lr=5e-2, warmup=0)
    finetune(model, tiny_tokenizer, cfg, tmp_path / "ft", progress=False)
    mods = list(method_modules(model, "scores").values())
    assert all(m.amplitude.abs().min() > 0 for m in mods)  # every head's every Gaussian moved from 0
    assert any((m.log_sigma - m.log_sigma[:, :1]).abs().max() > 0 for m in mods)  # widths trained per head
    again = attnswap.load(tmp_path / "ft")
    assert attnswap.surgery.plan_of(again)[0]["scores"]["options"]["mode"] == "add"
    ids = sample_ids(model.config.vocab_size, length=21)
    assert (outputs(again, ids) - outputs(model, ids)).abs().max() <= 1e-5
    attnswap.surgery.revert(again)
    assert not method_modules(again, "scores")
