"""Plans: per-layer attention methods, a cache policy and a tuner in one model. Exact where the parts are exact,
the composition rule (a policy prunes the layers that read a KV cache), whole-plan validation, the CLI's
--plan and 'list SOURCE', save -> export -> load, and the example method of each kind."""
import json

import pytest
import torch
import yaml

import attnswap
from attnswap.cli import main
from attnswap.generation import generate, make_cache
from attnswap.methods.attention.linear import LinearStateLayer
from attnswap.methods.cache.pruned import PrunedLayer
from attnswap.surgery import method_modules

from .conftest import WIKI_TEST, outputs, sample_ids


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory, tiny_tokenizer):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tiny_tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      initializer_range=0.2)
    d = tmp_path_factory.mktemp("four-layers")
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


def chunked(model, ids, chunk):
    cache = make_cache(model)
    with torch.no_grad():
        logits = [model(input_ids=c, cache=cache, use_cache=True).logits for c in ids.split(chunk, dim=1)]
    return torch.cat(logits, 1), cache


EXACT = {"attention": [{"layers": "0-1", "method": "sliding-window", "options": {"window": 512, "sinks": 0}},
                       {"layers": "2-3", "method": "mra", "options": {"block_size": 16, "block_budget": 1.0}}],
         "cache": {"policy": "h2o", "budget": 1.0, "interval": 16}}


def test_a_plan_is_exact_where_its_parts_are(four_layers):
    # float64: the methods' kernels round differently from SDPA, by as much as SDPA's own float32 error (after
    # four peaked layers, ~1e-5 on the logits); in float64 "exact" is checked to 1e-9
    model = attnswap.load_model(four_layers).double()
    ids = sample_ids(model.config.vocab_size, batch=1, length=70)
    ref = outputs(model, ids)
    want = generate(model, ids[:, :12], 30)["ids"]
    attnswap.convert(model, EXACT)
    assert (outputs(model, ids) - ref).abs().max() <= 1e-9
    got, cache = chunked(model, ids, 16)  # through the pruned cache, on every layer (both methods read a KV cache)
    assert all(isinstance(layer, PrunedLayer) for layer in cache.layers)
    assert (got - ref).abs().max() <= 1e-9
    assert all(layer.evictions == 4 and layer.kept() == layer.keys.shape[1] * 70 for layer in cache.layers)
    assert torch.equal(generate(model, ids[:, :12], 30)["ids"], want)


def test_a_policy_prunes_only_the_layers_that_read_a_kv_cache(four_layers, tmp_path, tiny_tokenizer):
    """linear keeps its own constant-size state; the policy prunes the original layers 2-3 to a quarter."""
    model = attnswap.load_model(four_layers)
    plan = {"attention": [{"layers": "0-1", "method": "linear", "options": {"window": 8, "sinks": 2}}],
            "cache": {"policy": "h2o", "budget": 0.25, "interval": 16, "window": 4}}
    attnswap.convert(model, plan)
    assert model.config.attnswap["plan"]["cache"]["layers"] == [2, 3]
    ids = sample_ids(model.config.vocab_size, batch=1, length=64)
    _, cache = chunked(model, ids, 16)
    assert [type(layer) for layer in cache.layers] == [LinearStateLayer] * 2 + [PrunedLayer] * 2
    assert all(layer.kept_trace[-1] == (64, 0.25) for layer in cache.layers[2:])
    assert generate(model, ids[:, :10], 20)["new_tokens"] == 20
    attnswap.save(model, tmp_path / "ck", tokenizer=tiny_tokenizer)
    assert main(["export", str(tmp_path / "ck"), "--out", str(tmp_path / "exp")]) == 0
    again = attnswap.load(tmp_path / "exp")
    assert (outputs(again, ids) - outputs(model, ids)).abs().max() <= 1e-5
    assert again.config.attnswap["plan"] == model.config.attnswap["plan"]


def test_a_hybrid_decodes_through_its_caches_as_its_parallel_form(four_layers):
    """linear on 0-1 (its constant-size state), the original attention on 2-3 (a growing KV cache)."""
    model = attnswap.load_model(four_layers)
    attnswap.convert(model, {"attention": [{"layers": "0-1", "method": "linear", "options": {"window": 8}}]})
    ids = sample_ids(model.config.vocab_size, batch=1, length=70)
    got, cache = chunked(model, ids, 16)
    assert [type(layer).__name__ for layer in cache.layers] == ["LinearStateLayer"] * 2 + ["DynamicLayer"] * 2
    assert (got - outputs(model, ids)).abs().max() <= 1e-4


def test_eval_memory_reports_the_pruned_layers(four_layers, tmp_path, capsys):
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"attention": [{"layers": "0-1", "method": "linear"}],
                                    "cache": {"policy": "h2o", "budget": 0.25, "interval": 32}}))
    out = tmp_path / "hybrid"
    assert main(["convert", str(four_layers), "--plan", str(plan), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", "memory", str(out), "--data", str(WIKI_TEST), "--tasks", "ppl", "--context", "128",
                 "--score-from", "64", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)["ppl"]
    assert r["pruned_layers"] == 2 and r["layers"] == 4 and r["kept_fraction"] == 0.25
    assert main(["list", str(out)]) == 0
    listed = capsys.readouterr().out
    assert "attention linear on layers 0-1" in listed and "cache policy h2o: keeps 0.25" in listed
    assert "on layers 2-3" in listed


@pytest.mark.parametrize("plan, message", [
    ({"attention": [{"layers": "0-2", "method": "mra"}, {"layers": "2-3", "method": "linear"}]},
     "layer 2 is in two attention entries"),
    ({"attention": [{"layers": "0-1", "method": "lineer"}]}, "did you mean 'linear'"),
    ({"attention": [{"layers": "0-9", "method": "mra"}]}, "the model has layers 0-3"),
    ({"attention": [{"method": "linear"}], "cache": {"policy": "h2o"}}, "would prune no layer"),
    ({"attention": [{"layers": 0, "method": "mra"}], "cache": {"policy": "namm", "budget": None}},
     "without a budget"),
    ({"cache": {"policy": "h2o", "budget": None}}, "needs a budget"),
    ({"attention": [{"method": "mra", "options": {"block_budget": 0}}]}, "block_budget"),
    ({"cache": {"policy": "h2o", "windw": 3}}, "unknown option 'windw'"),
    ({"tuner": {"method": "mra"}}, "unknown tuner method 'mra'"),
    ({}, "the plan is empty"),
    ({"attention": {"method": "mra"}}, "bad plan at 'attention'"),
])
def test_a_plan_is_validated_as_a_whole_before_anything_runs(four_layers, tmp_path, capsys, plan, message):
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    code = main(["convert", str(four_layers), "--plan", str(path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_the_free_budget_applies_to_exact_layers(four_layers):
    """namm without a budget on a plan whose other layers are `none` (the original attention, written down)."""
    model = attnswap.load_model(four_layers)
    attnswap.convert(model, {"attention": [{"layers": "0-3", "method": "none"}],
                             "cache": {"policy": "namm", "budget": None, "interval": 32}})
    ids = sample_ids(model.config.vocab_size, batch=1, length=96)
    _, cache = chunked(model, ids, 32)
    assert all(isinstance(layer, PrunedLayer) and 0 < layer.kept_trace[-1][1] < 1 for layer in cache.layers)


def test_cache_policies_need_a_causal_model_and_take_no_layers(tiny_dirs, tmp_path, capsys):
    assert main(["convert", str(tiny_dirs["bert"]), "--to", "h2o", "--out", str(tmp_path / "o")]) == 2
    assert "supports causal attention only" in capsys.readouterr().err
    assert main(["convert", str(tiny_dirs["llama"]), "--to", "h2o", "--layers", "0", "--out", str(tmp_path / "o")]) == 2
    assert "--layers does not apply to cache policy 'h2o'" in capsys.readouterr().err
    assert main(["convert", str(tiny_dirs["llama"]), "--to", "mra", "--plan", "x.yaml", "--out", str(tmp_path / "o")]) == 2
    assert "exactly one of --to METHOD and --plan FILE" in capsys.readouterr().err


def test_a_tuner_composes_with_attention_methods_and_the_member_axis(tiny_dirs):
    model = attnswap.load_model(tiny_dirs["llama"])
    ids = sample_ids(model.config.vocab_size, length=17)
    ref = torch.log_softmax(outputs(model, ids), -1)
    attnswap.convert(model, {"attention": [{"layers": 0, "method": "mra", "options": {"block_size": 16,
                                                                                      "block_budget": 1.0}}],
                             "tuner": {"method": "lora-ensemble", "options": {"members": 3}}})
    assert (outputs(model, ids) - ref).abs().max() <= 1e-5  # B = 0: every member is the original
    assert len(method_modules(model, "tuner")) == 2 and len(method_modules(model)) == 1


def test_the_shipped_plans_resolve_against_smollm2_shapes():
    from pathlib import Path

    from transformers import LlamaConfig

    from attnswap import plan as plans
    from attnswap.arch import adapter_for

    adapter = adapter_for(LlamaConfig())
    for path in sorted((Path(__file__).resolve().parents[1] / "recipes" / "plans").glob("*.yaml")):
        resolved = plans.resolve(plans.read(path), adapter, 30)
        assert resolved.attention or resolved.cache, path
