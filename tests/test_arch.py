import pytest
import torch
from torch.nn import functional as F

import attnswap
from attnswap.arch import adapter_for

from .conftest import sample_ids


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_sites_and_projections_reproduce_the_module(tiny_dirs, name):
    """q/k/v/o read through the adapter (GPT-2's fused c_attn split) give the module's own projections."""
    model = attnswap.load_model(tiny_dirs[name])
    adapter = adapter_for(model.config)
    sites = adapter.sites(model)
    assert [s.index for s in sites] == [0, 1]
    geo = adapter.geometry(model.config)
    x = torch.randn(2, 5, geo.hidden_size)
    proj = adapter.projections(model, sites[0])
    a = sites[0].module
    with torch.no_grad():
        if name == "gpt2":
            fused = a.c_attn(x).split(geo.hidden_size, dim=2)
            expected = dict(zip("qkv", fused)) | {"o": a.c_proj(x)}
        elif name == "llama":
            expected = {n: getattr(a, f"{n}_proj")(x) for n in "qkvo"}
        else:
            dense = model.get_submodule(sites[0].path.rsplit(".", 1)[0] + ".output.dense")
            expected = {"q": a.query(x), "k": a.key(x), "v": a.value(x), "o": dense(x)}
        for n, p in proj.items():
            got = F.linear(x if n != "o" else x[..., : p.weight.shape[1]], p.weight, p.bias)
            assert torch.allclose(got, expected[n], atol=1e-6), n


def test_geometry_of_gqa_llama(tiny_dirs):
    config = attnswap.load_model(tiny_dirs["llama"]).config
    geo = adapter_for(config).geometry(config)
    assert (geo.num_heads, geo.num_kv_heads, geo.head_dim, geo.kv_groups) == (4, 2, 8, 2)


def test_unsupported_architecture_is_one_line():
    from transformers import T5Config

    with pytest.raises(attnswap.AttnswapError, match="cannot convert architecture 't5'"):
        adapter_for(T5Config())


def test_revert_restores_the_original(tiny_dirs):
    model = attnswap.load_model(tiny_dirs["llama"])
    ids = sample_ids(model.config.vocab_size)
    ref = model(input_ids=ids).logits
    attnswap.convert(model, "sliding-window", window=3, sinks=0)
    assert not torch.allclose(model(input_ids=ids).logits, ref)
    attnswap.revert(model)
    assert torch.equal(model(input_ids=ids).logits, ref)
    assert not hasattr(model.config, "attnswap")
