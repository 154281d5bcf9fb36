"""Cache policies (KV-cache pruning): exact when nothing is evicted, eviction only affects attendees, the
policies' choices, CMA-ES on known functions, evolution resume, CLI."""
import json

import numpy as np
import pytest
import torch

import attnswap
from attnswap.generation import make_cache
from attnswap.methods import kinds
from attnswap.methods.cache.cmaes import CMAES
from attnswap.surgery import method_modules

from .conftest import WIKI_TEST, outputs, sample_ids

SCORERS = sorted(kinds()["cache"].all())


def prune(model, scorer, **options):
    """Convert with cache policy `scorer`, passing only the options it has (window, sinks, ...)."""
    fields = kinds()["cache"].get(scorer).Options.model_fields
    return attnswap.convert(model, scorer, **{k: v for k, v in options.items() if k in fields})


def chunked_logits(model, ids, chunk):
    cache = make_cache(model)
    with torch.no_grad():
        out = [model(input_ids=c, cache=cache, use_cache=True).logits for c in ids.split(chunk, dim=1)]
    return torch.cat(out, dim=1), cache


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("scorer", SCORERS)
def test_nothing_evicted_equals_the_unpruned_model(tiny_dirs, name, scorer):
    model = attnswap.load_model(tiny_dirs[name])
    ids = sample_ids(model.config.vocab_size, batch=1, length=70)
    ref = outputs(model, ids)
    prune(model, scorer, budget=1.0, interval=16, window=4)
    got, cache = chunked_logits(model, ids, 16)
    assert (got - ref).abs().max() <= 1e-5
    assert all(layer.evictions == 4 and layer.kept() == layer.keys.shape[1] * 70 for layer in cache.layers)
    assert outputs(model, ids).sub(ref).abs().max() <= 1e-6  # without the pruning cache: the original


def test_generation_with_nothing_evicted_equals_the_original(tiny_dirs):
    from attnswap.generation import generate

    model = attnswap.load_model(tiny_dirs["llama"])
    ids = sample_ids(model.config.vocab_size, batch=1, length=12)
    want = generate(model, ids, 40)["ids"]
    prune(model, "h2o", budget=1.0, interval=8)
    assert torch.equal(generate(model, ids, 40)["ids"], want)
    attnswap.revert(model)
    prune(model, "h2o", budget=0.25, interval=8)
    assert not torch.equal(generate(model, ids, 40)["ids"], want)  # pruning does change what it generates


def test_evicting_a_token_changes_only_what_attends_to_it(tiny_dirs):
    """One layer: after key 5 is evicted, new queries equal attention with key 5 masked for them alone."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, initializer_range=0.2)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ids = sample_ids(128, batch=1, length=24)
    full = outputs(model, ids)
    mask = torch.ones(24, 24, dtype=torch.bool).tril()
    mask[20:, 5] = False
    with torch.no_grad():
        masked = model(input_ids=ids, attention_mask=mask[None, None]).logits
    prune(model, "knorm", budget=1.0, interval=1000)
    cache = make_cache(model)
    with torch.no_grad():
        prompt = model(input_ids=ids[:, :20], cache=cache, use_cache=True).logits
        layer = cache.layers[0]
        layer._gather(layer.pos != 5)
        new = model(input_ids=ids[:, 20:], cache=cache, use_cache=True).logits
    assert (prompt - full[:, :20]).abs().max() <= 1e-5
    assert (new - masked[:, 20:]).abs().max() <= 1e-5
    assert (new - full[:, 20:]).abs().max() > 1e-3


def _fill(model, ids, scorer, **options):
    attnswap.revert(model)
    prune(model, scorer, **options)
    return chunked_logits(model, ids, options.get("interval", 16))[1]


def test_budget_sets_the_kept_fraction_and_the_cache_bytes(tiny_dirs):
    from attnswap.generation import cache_bytes

    model = attnswap.load_model(tiny_dirs["llama"])
    ids = sample_ids(model.config.vocab_size, batch=1, length=128)
    sizes, peaks = {}, {}
    for budget in (1.0, 0.5, 0.25):
        cache = _fill(model, ids, scorer="h2o", budget=budget, interval=16, window=4)
        assert all(layer.kept_trace[-1] == (128, budget) for layer in cache.layers)
        sizes[budget] = cache_bytes(cache)
        peaks[budget] = cache.layers[0].peak_bytes
    assert sizes[0.5] == sizes[1.0] // 2 and sizes[0.25] == sizes[1.0] // 4
    # the peak is just before the last eviction: ceil(budget x 112) kept + 16 new entries, of 128
    assert peaks[0.5] == peaks[1.0] * (56 + 16) // 128 and peaks[0.25] == peaks[1.0] * (28 + 16) // 128


def test_scorers_keep_what_they_promise(tiny_dirs):
    model = attnswap.load_model(tiny_dirs["llama"])
    ids = sample_ids(model.config.vocab_size, batch=1, length=64)
    layer = _fill(model, ids, scorer="streaming", budget=0.25, interval=64, sinks=4).layers[0]
    assert layer.pos[0, 0].tolist() == [0, 1, 2, 3] + list(range(52, 64))
    # knorm: the kept keys are the lowest-norm ones of the unpruned cache
    full = _fill(model, ids, scorer="knorm", budget=1.0, interval=64).layers[0]
    norms = full.keys.norm(dim=-1)[0]  # [Hkv, 64]
    layer = _fill(model, ids, scorer="knorm", budget=0.25, interval=64).layers[0]
    for h in range(norms.shape[0]):
        assert sorted(layer.pos[0, h].tolist()) == sorted(norms[h].argsort()[:16].tolist())


def _rows(model, ids):
    """Layer 0's softmax attention of the unpruned model, averaged over each KV group: [Hkv, T, T]."""
    from attnswap.methods.attention.analysis import recording

    with recording(model, inputs=True) as rec:
        outputs(model, ids)
    _, q, k, _ = rec[0][0]
    h, hk, t = q.shape[1], k.shape[1], q.shape[2]
    logits = (q @ k.repeat_interleave(h // hk, 1).transpose(-1, -2)) * q.shape[-1] ** -0.5
    a = torch.softmax(logits.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), -torch.inf), -1)
    return a.view(hk, h // hk, t, t).mean(1)


def test_attention_scorers_keep_the_top_of_their_statistic(tiny_dirs):
    """One eviction at 32 tokens, budget 0.5: h2o keeps the top of the attention summed over all queries,
    tova of the last query's, snapkv of the last-window mean max-pooled over 7 positions (window kept)."""
    model = attnswap.load_model(tiny_dirs["llama"])
    ids = sample_ids(model.config.vocab_size, batch=1, length=32)
    a = _rows(model, ids)
    window = 4
    pooled = torch.nn.functional.max_pool1d(a[:, -window:].mean(1)[:, None], 7, stride=1, padding=3)[:, 0]
    stats = {"h2o": (a.sum(1), 1), "tova": (a[:, -1], 0), "snapkv": (pooled, window)}
    for scorer, (stat, protect) in stats.items():
        layer = _fill(model, ids, scorer=scorer, budget=0.5, interval=32, window=max(protect, 1)).layers[0]
        for head in range(a.shape[0]):
            s = stat[head].clone()
            if protect:
                s[32 - protect:] = torch.inf
            assert sorted(layer.pos[0, head].tolist()) == sorted(s.topk(16).indices.tolist()), scorer
    full = _fill(model, ids, scorer="h2o", budget=1.0, interval=8).layers[0]
    assert torch.allclose(full.stats["h2o"][0], a.sum(1), atol=1e-5)  # accumulated over the evictions


def test_namm_runs_free_and_capped(tiny_dirs):
    model = attnswap.load_model(tiny_dirs["gpt2"])
    ids = sample_ids(model.config.vocab_size, batch=1, length=96)
    free = _fill(model, ids, scorer="namm", budget=None, interval=32)
    fractions = [layer.kept_trace[-1][1] for layer in free.layers]
    assert all(0 < f < 1 for f in fractions)
    capped = _fill(model, ids, scorer="namm", budget=0.25, interval=32)
    assert all(layer.kept_trace[-1] == (96, 0.25) for layer in capped.layers)
    with pytest.raises(attnswap.AttnswapError, match="needs a budget"):
        _fill(model, ids, scorer="h2o", budget=None)


def test_namm_keeps_entries_younger_than_one_stft_window(tiny_dirs):
    """Entries younger than n_fft (32) tokens have no full spectrogram frame: namm keeps them at any budget."""
    from attnswap.methods.cache.namm.model import N_FFT

    model = attnswap.load_model(tiny_dirs["llama"])
    ids = sample_ids(model.config.vocab_size, batch=1, length=128)
    layer = _fill(model, ids, scorer="namm", budget=0.3, interval=64).layers[0]
    assert layer.kept_trace[-1] == (128, 39 / 128)  # ceil(0.3 x 128) per head
    young = set(range(128 - N_FFT + 1, 128))  # ages 1..31
    for head in range(layer.pos.shape[1]):
        kept = set(layer.pos[0, head].tolist())
        assert young <= kept
        assert len(kept - young) == 39 - (N_FFT - 1)


def test_cmaes_converges_on_known_functions():
    shift = np.linspace(-2, 2, 20)
    es = CMAES(np.zeros(20), 1.0, seed=0)
    while es.generation < 600 and es.best_f > 1e-10:
        xs = es.ask()
        es.tell(xs, [float(((x - shift) ** 2).sum()) for x in xs])
    assert es.best_f <= 1e-10 and np.abs(es.best_x - shift).max() < 1e-4

    def rosenbrock(x):
        return float((100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum())

    es = CMAES(np.zeros(10), 0.5, seed=1)
    while es.generation < 3000 and es.best_f > 1e-8:
        xs = es.ask()
        es.tell(xs, [rosenbrock(x) for x in xs])
    assert es.best_f <= 1e-8 and np.abs(es.best_x - 1).max() < 1e-3


def test_cmaes_state_round_trips():
    es = CMAES(np.ones(5), 0.3, seed=3)
    for _ in range(3):
        xs = es.ask()
        es.tell(xs, [float((x ** 2).sum()) for x in xs])
    again = CMAES.from_state(json.loads(json.dumps(es.state())))
    assert np.array_equal(es.ask(), again.ask())


def _evolve(model, tok, out, generations, resume=False):
    from attnswap.methods.cache.evolve import evolve

    return evolve(model, tok, task="ppl", data=str(WIKI_TEST), out=out, generations=generations, population=4,
                  sigma=0.5, seed=0, resume=resume, progress=False, task_kw={"context": 96, "score_from": 48})


def test_evolution_resumes_to_the_same_result(tiny_dirs, tiny_tokenizer, tmp_path):
    model = attnswap.load_model(tiny_dirs["llama"])
    prune(model, "namm", budget=0.25, interval=16)
    straight = _evolve(model, tiny_tokenizer, tmp_path / "a", 3)
    _evolve(model, tiny_tokenizer, tmp_path / "b", 1)
    resumed = _evolve(model, tiny_tokenizer, tmp_path / "b", 3, resume=True)
    def timeless(history):
        return [{k: v for k, v in h.items() if k != "seconds"} for h in history]

    assert len(straight["history"]) == 4 and timeless(straight["history"]) == timeless(resumed["history"])
    a = (tmp_path / "a" / "namm.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "namm.safetensors").read_bytes()
    with pytest.raises(attnswap.AttnswapError, match="already exists"):
        _evolve(model, tiny_tokenizer, tmp_path / "a", 3)


def test_evolution_starts_from_an_init_vector(tiny_dirs, tiny_tokenizer, tmp_path):
    """--init: generation 0 is the given vector's fitness; a missing file is refused before anything is written."""
    from attnswap.methods.cache.evolve import evolve, fitness

    model = attnswap.load_model(tiny_dirs["llama"])
    prune(model, "namm", budget=0.25, interval=16)
    first = _evolve(model, tiny_tokenizer, tmp_path / "a", 2)
    kw = {"context": 96, "score_from": 48}
    again = evolve(model, tiny_tokenizer, task="ppl", data=str(WIKI_TEST), out=tmp_path / "b", generations=1,
                   population=4, sigma=0.5, progress=False, task_kw=kw, init=first["params"])
    assert again["history"][0]["start"] == first["best"]  # the same vector, the same (deterministic) fitness
    theta = kinds()["cache"].get("namm").load_params(first["params"]).double().numpy()
    assert fitness(model, tiny_tokenizer, "ppl", str(WIKI_TEST), theta, **kw)[0] == first["best"]
    with pytest.raises(attnswap.AttnswapError, match="not found"):
        evolve(model, tiny_tokenizer, task="ppl", data=str(WIKI_TEST), out=tmp_path / "c", generations=1,
               population=4, progress=False, task_kw=kw, init=tmp_path / "missing.safetensors")
    assert not (tmp_path / "c").exists()


def test_evolved_parameters_load_and_travel_with_the_checkpoint(tiny_dirs, tiny_tokenizer, tmp_path):
    from safetensors.torch import save_file

    from attnswap.cli import main

    theta = torch.randn(506)
    save_file({"namm": theta}, str(tmp_path / "namm.safetensors"))
    out = tmp_path / "mem"
    assert main(["convert", str(tiny_dirs["llama"]), "--to", "namm", "--set",
                 f"params={tmp_path / 'namm.safetensors'}", "--set", "budget=0.25", "--out", str(out)]) == 0
    (tmp_path / "namm.safetensors").unlink()  # the checkpoint must not need the file any more
    loaded = attnswap.load(out)
    assert all(torch.equal(v.namm_params, theta) for v in method_modules(loaded, "cache").values())
    assert loaded.config.attnswap["plan"]["cache"]["options"]["params"] is None
    assert main(["export", str(out), "--out", str(tmp_path / "exp")]) == 0
    card = (tmp_path / "exp" / "README.md").read_text()
    assert "cache policy namm: keeps 0.25 of the tokens seen, every 512 tokens" in card
    assert "namm parameters from" in card


def test_eval_memory_cli(tiny_dirs, capsys):
    from attnswap.cli import main

    args = ["eval", "memory", str(tiny_dirs["llama"]), "--data", str(WIKI_TEST), "--context", "128", "--score-from",
            "64", "--interval", "32", "--passkey-context", "96", "--depths", "0.5", "--trials", "1", "--json"]
    assert main(args + ["--policy", "h2o", "--budget", "1.0"]) == 0
    full = json.loads(capsys.readouterr().out)
    assert main(args + ["--policy", "h2o", "--budget", "0.25"]) == 0
    pruned = json.loads(capsys.readouterr().out)
    assert full["ppl"]["kept_fraction"] == 1.0 and pruned["ppl"]["kept_fraction"] == 0.25
    assert pruned["ppl"]["peak_cache_bytes"] < full["ppl"]["peak_cache_bytes"]
    assert set(pruned["passkey"]) >= {"accuracy", "by_depth", "kept_fraction", "peak_cache_bytes"}
    assert main(args + ["--policy", "h2o", "--budget", "0.25", "--tasks", "ppl", "--documents", "2"]) == 0
    two = json.loads(capsys.readouterr().out)
    assert two["ppl"]["predictions"] == 2 * pruned["ppl"]["predictions"] == 128
    assert main(args + ["--budget", "2"]) == 2
    assert "bad --budget" in capsys.readouterr().err
    assert main(args + ["--policy", "nope"]) == 2
    assert "unknown cache method 'nope'" in capsys.readouterr().err
    assert main(args) == 0  # no policy: the full cache
    assert json.loads(capsys.readouterr().out)["ppl"]["kept_fraction"] is None


def test_namm_backward_attention_fast_path_equals_the_masked_one():
    """Entries in position order use causal SDPA on the reversed sequence; with padding, an explicit mask."""
    from attnswap.methods.cache.namm import model as namm

    g = torch.Generator().manual_seed(0)
    n = 50
    x = torch.randn(1, 2, n, namm.IN, generator=g)
    pos = torch.arange(n).expand(1, 2, n)
    theta = namm.default_params() + 0.3 * torch.randn(namm.N_PARAMS, generator=g)
    fast = namm.network(theta, x, pos, torch.ones(1, 2, n, dtype=torch.bool))
    padded = namm.network(theta, torch.cat([x, torch.zeros(1, 2, 1, namm.IN)], 2),
                          torch.cat([pos, torch.full((1, 2, 1), 10 ** 6)], 2),
                          torch.cat([torch.ones(1, 2, n, dtype=torch.bool), torch.zeros(1, 2, 1, dtype=torch.bool)], 2))
    assert (fast - padded[..., :n]).abs().max() <= 1e-5
    # by hand: entry i attends to entries j >= i
    p = namm.unpack(theta)
    h = x @ p["w_in"] + p["b_in"]
    att = (h @ p["wq"]) @ (h @ p["wk"]).transpose(-1, -2) * namm.HIDDEN ** -0.5
    att = torch.softmax(att.masked_fill(~torch.ones(n, n, dtype=torch.bool).triu(), -torch.inf), -1)
    h = h + att @ (h @ p["wv"])
    want = torch.relu(h @ p["w1"] + p["b1"]) @ p["w_out"] + x @ p["w_lin"] + p["b_out"]
    assert (fast - want).abs().max() <= 1e-5


def test_long_context_perplexity_pools_documents(tiny_dirs, tiny_tokenizer):
    """documents=2 scores two consecutive stretches: its NLL is the mean of the two scored separately."""
    import math

    from attnswap.data import encode, read_text
    from attnswap.methods.cache.tasks import long_context_perplexity, run_chunked

    model = attnswap.load_model(tiny_dirs["llama"])
    prune(model, "h2o", budget=0.5, interval=16)
    both = long_context_perplexity(model, tiny_tokenizer, str(WIKI_TEST), context=64, score_from=32, documents=2)
    ids = encode(tiny_tokenizer, read_text(str(WIKI_TEST), max_chars=6 * 128 + 10_000))
    parts = [run_chunked(model, ids[i * 64:(i + 1) * 64][None], score_from=32)[:2] for i in range(2)]
    assert both["predictions"] == 64 == sum(c for _, c in parts)
    assert both["nll"] == pytest.approx(sum(n for n, _ in parts) / 64, abs=1e-9)
    assert both["perplexity"] == pytest.approx(math.exp(both["nll"]))


def test_long_context_cache_bytes_count_a_linear_state(tiny_dirs, tiny_tokenizer):
    """The peak cache bytes of a linear model are its sinks + window keys/values plus its state, by shape (tiny
    Llama: 2 layers, 2 KV heads of 8 dims, hedgehog phi of 2 x 8 dims, float32)."""
    from attnswap.methods.cache.tasks import long_context_perplexity

    model = attnswap.load_model(tiny_dirs["llama"])
    attnswap.convert(model, "linear", window=8, sinks=2)
    r = long_context_perplexity(model, tiny_tokenizer, str(WIKI_TEST), context=64, score_from=32, chunk=16)
    kv = 2 * 2 * (8 + 2) * 8 * 4  # keys and values, heads, tokens, dims, bytes
    state = 2 * (2 * 8) * (8 + 1) * 4  # heads, phi dims, dims + normaliser, bytes
    assert r["peak_cache_bytes"] == 2 * (kv + state)


def test_two_process_evolve_equals_one_process(tiny_dirs, tmp_path):
    """torchrun --nproc_per_node 2: each generation's candidates split over the ranks, the same CMA-ES step on
    both; with the threads pinned, the history (less wall times) and the parameters file equal one process's,
    byte for byte, and rank 0 alone writes."""
    import subprocess
    import sys

    args = ["evolve", str(tiny_dirs["llama"]), "--data", str(WIKI_TEST), "--task", "ppl", "--context", "96",
            "--score-from", "48", "--budget", "0.25", "--interval", "16", "--population", "5", "--generations", "2",
            "--sigma", "0.5", "--seed", "0", "--threads", "1", "--json"]
    launch = {1: [sys.executable, "-m", "attnswap"],
              2: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29521",
                  "-m", "attnswap"]}
    runs = {}
    for n, cmd in launch.items():
        proc = subprocess.run([*cmd, *args, "--out", str(tmp_path / f"ev{n}")], capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[n] = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert sorted((r["world_size"], r["rank"]) for r in runs[2]) == [(2, 0), (2, 1)]
    assert runs[1][0]["evaluations"] == runs[2][0]["evaluations"] and runs[1][0]["generations"] == 2

    def timeless(d):
        return [{k: v for k, v in h.items() if k != "seconds"} for h in json.loads((d / "evolve.json").read_text())["history"]]

    assert timeless(tmp_path / "ev2") == timeless(tmp_path / "ev1")
    assert (tmp_path / "ev2" / "namm.safetensors").read_bytes() == (tmp_path / "ev1" / "namm.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ev1", "ev2"]  # no second output, no leftovers


def _kvpress_layer(n):
    from types import SimpleNamespace

    return SimpleNamespace(pos=torch.arange(n).expand(1, 2, n), seen=n, valid=torch.ones(1, 2, n, dtype=torch.bool),
                           stats={})


@pytest.mark.parametrize("name", ["snapkv", "tova", "h2o"])
def test_kvpress_convention_keeps_what_kvpress_formulas_keep(name):
    """`convention: kvpress` against kvpress's scoring written out (SnapKVPress, TOVAPress, ObservedAttentionPress)
    on hand-built attention of 4 query heads in 2 KV groups: the same kept sets at every budget above the window."""
    from types import SimpleNamespace

    import torch.nn.functional as F

    g = torch.Generator().manual_seed(7)
    n, h, hk, w = 40, 4, 2, 8
    a = torch.softmax(torch.randn(1, h, n, n, generator=g, dtype=torch.float64) * 2, -1)
    a = a * torch.ones(n, n, dtype=torch.float64).tril()
    a = a / a.sum(-1, keepdim=True)  # causal rows
    if name == "snapkv":
        s = a[..., -w:, : n - w].mean(-2)
        s = F.avg_pool1d(s, kernel_size=5, padding=2, stride=1)
        want = F.pad(s.view(1, hk, h // hk, n - w).mean(2), (0, w), value=s.max().item())
        opts, rows = {"window": w}, a[..., -w:, :]
    elif name == "tova":
        s = a[..., -1:, :-1].mean(1).repeat(1, hk, 1)
        want = F.pad(s, (0, 1), value=s.max().item())
        opts, rows = {}, a[..., -1:, :]
    else:
        s = a.sum(2) / torch.arange(n, 0, -1, dtype=torch.float64)
        want = s.view(1, hk, h // hk, n).mean(2)
        opts, rows = {}, a
    cls = kinds()["cache"].get(name)
    policy = cls(cls.Options(convention="kvpress", **opts), SimpleNamespace(index=0), None, None)
    got = policy.score(_kvpress_layer(n), rows.view(1, hk, h // hk, *rows.shape[2:]).mean(2))
    assert got.shape == want.shape
    for k in range(w + 2, n, 5):
        assert torch.equal(got.topk(k).indices.sort(-1).values, want.topk(k).indices.sort(-1).values), k
    finite = torch.isfinite(got)
    assert torch.allclose(got[finite], want[finite], atol=1e-12)  # and the same numbers outside the kept window
    # the default convention keeps a different set (max pooling over 7, a recent set of 32 for h2o)
    default = cls(cls.Options(**opts), SimpleNamespace(index=0), None, None).score(_kvpress_layer(n), rows.view(
        1, hk, h // hk, *rows.shape[2:]).mean(2))
    assert not torch.equal(default.topk(20).indices.sort(-1).values, want.topk(20).indices.sort(-1).values)
