"""Architecture families beyond GPT-2 / Llama / BERT, each a tiny random model built from its config.

For every family: the exact setting (`none`, the original attention through attnswap's path) gives the
original logits; a real method gives finite outputs that differ, and save -> load gives them back exactly;
the adapter's q/k/v/o reproduce the module's own projections where the family has separable ones. A family
without an adapter (StarCoder2) is evaluated as-is and refused by convert with a one-line error.
"""
import pytest
import torch

import attnswap
from attnswap.arch import adapter_for, find_adapter
from attnswap.cli import main

from .conftest import WIKI_TEST, sample_ids

SMALL = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, max_position_embeddings=256,
             initializer_range=0.2)


def _configs(vocab):
    from transformers import (DistilBertConfig, Gemma2Config, Gemma3TextConfig, GPTNeoXConfig, GraniteConfig,
                              ModernBertConfig, Olmo2Config, Phi3Config)

    kv = dict(num_key_value_heads=2, head_dim=8)
    return {
        # local layers of 8 tokens alternate with global ones, logits soft-capped at 5 (peaked: it matters)
        "gemma2": Gemma2Config(vocab_size=vocab, num_hidden_layers=2, sliding_window=8, attn_logit_softcapping=5.0,
                               query_pre_attn_scalar=16, **kv, **SMALL),
        "gemma3_text": Gemma3TextConfig(vocab_size=vocab, num_hidden_layers=3, sliding_window=8,
                                        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                        query_pre_attn_scalar=16, **kv, **SMALL),
        "phi3": Phi3Config(vocab_size=vocab, num_hidden_layers=2, sliding_window=None, pad_token_id=0, **SMALL,
                           num_key_value_heads=2),
        "olmo2": Olmo2Config(vocab_size=vocab, num_hidden_layers=2, num_key_value_heads=2, **SMALL),
        "gpt_neox": GPTNeoXConfig(vocab_size=vocab, num_hidden_layers=2, rotary_pct=0.5, **SMALL),
        "granite": GraniteConfig(vocab_size=vocab, num_hidden_layers=2, num_key_value_heads=2,
                                 attention_multiplier=0.3, **SMALL),
        "modernbert": ModernBertConfig(vocab_size=vocab, num_hidden_layers=3, global_attn_every_n_layers=3,
                                       local_attention=8, pad_token_id=0, bos_token_id=0, eos_token_id=0,
                                       cls_token_id=0, sep_token_id=0, **SMALL),
        "distilbert": DistilBertConfig(vocab_size=vocab, n_layers=2, n_heads=4, dim=32, hidden_dim=64,
                                       max_position_embeddings=256, initializer_range=0.2),
    }


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, tiny_tokenizer):
    from transformers import AutoModel, AutoModelForCausalLM

    out = {}
    for name, cfg in _configs(len(tiny_tokenizer)).items():
        torch.manual_seed(0)
        encoder = name in ("modernbert", "distilbert")
        model = (AutoModel if encoder else AutoModelForCausalLM).from_config(cfg)
        d = tmp_path_factory.mktemp(f"family-{name}")
        model.save_pretrained(d)
        tiny_tokenizer.save_pretrained(d)
        out[name] = d
    return out


def _out(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


# a real method per family, on layers it can take (Gemma: the global layers; the local ones hold a window)
REAL = {"gemma2": ("sliding-window", {"window": 4, "sinks": 1}, None),
        "gemma3_text": ("linear", {"window": 4, "sinks": 1}, "1"),
        "phi3": ("linear", {"window": 4, "sinks": 1}, None),
        "olmo2": ("mra", {"block_size": 8, "block_budget": 0.5}, None),
        "gpt_neox": ("linear", {"window": 4, "sinks": 1}, None),
        "granite": ("linear", {"window": 4, "sinks": 1}, None),
        "modernbert": ("mra", {"block_size": 8, "block_budget": 0.5}, "0"),
        "distilbert": ("sliding-window", {"window": 4, "sinks": 1}, None)}


@pytest.mark.parametrize("name", list(REAL))
def test_family_exact_real_and_round_trip(family_dirs, name, tmp_path):
    model = attnswap.load_model(family_dirs[name])
    assert find_adapter(model.config) is not None
    ids = sample_ids(model.config.vocab_size, length=40)
    ref = _out(model, ids)
    attnswap.convert(model, "none")
    assert (_out(model, ids) - ref).abs().max() <= 1e-5, "the exact setting must give the original outputs"
    attnswap.revert(model)
    method, options, layers = REAL[name]
    attnswap.convert(model, method, layers=layers, **options)
    got = _out(model, ids)
    assert torch.isfinite(got).all()
    assert (got - ref).abs().max() > 1e-3, "a real method changes the outputs"
    attnswap.save(model, tmp_path / "conv")
    again = attnswap.load_model(tmp_path / "conv")
    assert torch.equal(_out(again, ids), got)


def test_gemma2_softcap_matters_and_the_exact_path_applies_it(family_dirs):
    """Soft-capping at 5 changes this model: an exact path that dropped it would not match."""
    model = attnswap.load_model(family_dirs["gemma2"])
    ids = sample_ids(model.config.vocab_size, length=40)
    ref = _out(model, ids)
    model.config.attn_logit_softcapping = None
    for layer in model.model.layers:
        layer.self_attn.attn_logit_softcapping = None
    assert (_out(model, ids) - ref).abs().max() > 1e-3


@pytest.mark.parametrize("name, method, layers, match", [
    ("gemma3_text", "linear", None, r"linear cannot keep layer 0's own sliding window of 8 tokens .*--layers 1"),
    ("gemma2", "linear", "1", r"linear cannot apply the soft-capping of the attention logits \(at 5.0\)"),
    ("modernbert", "mra", None, r"mra cannot keep layer 1.s own sliding window of 8 tokens .*--layers 0\)"),
])
def test_a_method_that_cannot_honour_the_layer_says_so(family_dirs, name, method, layers, match):
    model = attnswap.load_model(family_dirs[name])
    with pytest.raises(attnswap.AttnswapError, match=match):
        attnswap.convert(model, method, layers=layers)


def test_gpt_neox_refuses_row_tuners_in_one_line(family_dirs):
    model = attnswap.load_model(family_dirs["gpt_neox"])
    with pytest.raises(attnswap.AttnswapError, match="gpt_neox interleaves q|k|v per head"):
        attnswap.convert(model, {"tuner": {"method": "bitfit"}})


@pytest.mark.parametrize("name, fused", [("phi3", "qkv_proj"), ("modernbert", "Wqkv"), ("distilbert", None)])
def test_adapter_projections_reproduce_the_module(family_dirs, name, fused):
    model = attnswap.load_model(family_dirs[name])
    adapter = adapter_for(model.config)
    site = adapter.sites(model)[0]
    g = adapter.geometry(model.config)
    x = torch.randn(2, 5, g.hidden_size)
    with torch.no_grad():
        for target, (module, sl) in adapter.projection_modules(model, site).items():
            p = adapter.projections(model, site)[target]
            want = module(x)[..., sl]
            got = torch.nn.functional.linear(x, p.weight, p.bias)
            assert torch.allclose(got, want, atol=1e-6), target
    if fused:
        assert adapter.projection_modules(model, site)["k"][0] is getattr(site.module, fused)


@pytest.fixture(scope="module")
def starcoder2_dir(tmp_path_factory, tiny_tokenizer):
    from transformers import AutoModelForCausalLM, Starcoder2Config

    torch.manual_seed(0)
    cfg = Starcoder2Config(vocab_size=len(tiny_tokenizer), num_hidden_layers=2, num_key_value_heads=2, **SMALL)
    d = tmp_path_factory.mktemp("starcoder2")
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


def test_a_family_without_adapter_evaluates_as_is_and_convert_refuses(starcoder2_dir, capsys, tmp_path):
    import json
    import math

    assert find_adapter(attnswap.load_model(starcoder2_dir).config) is None
    assert main(["eval", "perplexity", str(starcoder2_dir), "--data", str(WIKI_TEST), "--max-tokens", "300",
                 "--seq-len", "64", "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert math.isfinite(r["perplexity"]) and r["perplexity"] > 1
    code = main(["convert", str(starcoder2_dir), "--to", "linear", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1
    assert "cannot convert architecture 'starcoder2'" in err[0] and "gemma3_text" in err[0]
    assert not (tmp_path / "out").exists()
