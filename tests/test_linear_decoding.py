"""The linear variant's O(1) decoding cache: token-by-token decoding equals the parallel form."""
import json

import pytest
import torch

import attnswap
from attnswap.cli import main
from attnswap.generation import generate, make_cache

from .conftest import sample_ids

OPTIONS = [
    dict(feature_map="hedgehog", window=6, sinks=2),
    dict(feature_map="elu", window=0, sinks=0),
    dict(feature_map="hedgehog", window=5, sinks=0, tie_qk=True),
    dict(feature_map="relu", window=0, sinks=3),
]


def perturbed(model):
    # trained-looking feature maps, not the near-identity init
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 3:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


def decode_vs_parallel(model, ids, prefill, chunk=1):
    """Max relative error of cached logits (prefill, then `chunk` tokens per call) vs one parallel pass."""
    with torch.no_grad():
        full = model(input_ids=ids).logits
        cache = make_cache(model)
        out = model(input_ids=ids[:, :prefill], cache=cache, use_cache=True).logits
        errs = [(out - full[:, :prefill]).norm() / full[:, :prefill].norm()]
        for t in range(prefill, ids.shape[1], chunk):
            step = model(input_ids=ids[:, t : t + chunk], cache=cache, use_cache=True).logits
            want = full[:, t : t + chunk]
            errs.append((step - want).norm() / want.norm())
    return max(float(e) for e in errs), cache


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()))
@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("prefill,chunk", [(13, 1), (1, 1), (7, 5)])
def test_recurrent_decoding_equals_the_parallel_form(tiny_dirs, name, opts, prefill, chunk):
    model = perturbed(attnswap.convert(attnswap.load_model(tiny_dirs[name]), "linear", **opts))
    err, _ = decode_vs_parallel(model, sample_ids(model.config.vocab_size, length=40), prefill, chunk)
    assert err <= 1e-4


@pytest.mark.slow
def test_smollm2_recurrent_decoding_equals_the_parallel_form():
    model = attnswap.convert(attnswap.load_model("smollm2-135m"), "linear", feature_map="hedgehog", window=16, sinks=4)
    err, _ = decode_vs_parallel(perturbed(model), sample_ids(model.config.vocab_size, batch=1, length=48), 20)
    assert err <= 1e-4


def test_cache_size_does_not_grow_with_length(tiny_dirs):
    for opts, constant_after in ((dict(feature_map="elu", window=0, sinks=0), 1), (dict(window=6, sinks=2), 8)):
        model = attnswap.convert(attnswap.load_model(tiny_dirs["llama"]), "linear", **opts)
        r = generate(model, sample_ids(model.config.vocab_size, batch=1, length=3), 60, record_every=1)
        sizes = {p["generated"]: p["cache_bytes"] for p in r["cache_trace"]}
        later = [b for n, b in sizes.items() if n + 3 >= constant_after + 1]
        assert len(set(later)) == 1, sizes
    # the original model's KV cache grows with every token
    plain = attnswap.load_model(tiny_dirs["llama"])
    r = generate(plain, sample_ids(plain.config.vocab_size, batch=1, length=3), 20, record_every=1)
    assert r["cache_trace"][-1]["cache_bytes"] > r["cache_trace"][0]["cache_bytes"]


def test_generation_matches_greedy_argmax_of_the_parallel_form(tiny_dirs):
    model = perturbed(attnswap.convert(attnswap.load_model(tiny_dirs["gpt2"]), "linear", window=4, sinks=1))
    prompt = sample_ids(model.config.vocab_size, batch=1, length=5)
    ids = generate(model, prompt, 12)["ids"]
    with torch.no_grad():
        logits = model(input_ids=ids[:, :-1]).logits[0]
    assert torch.equal(logits[4:].argmax(-1), ids[0, 5:])


def test_generate_cli(tiny_dirs, tmp_path, capsys):
    assert main(["convert", str(tiny_dirs["llama"]), "--to", "linear", "--set", "window=0", "--set", "sinks=0",
                 "--out", str(tmp_path / "lin")]) == 0
    assert main(["generate", str(tmp_path / "lin"), "--prompt", "The history of", "--max-new-tokens", "20",
                 "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["new_tokens"] == 20 and r["tokens_per_second"] > 0
    assert r["peak_cache_bytes"] == r["cache_bytes_after_prefill"]
