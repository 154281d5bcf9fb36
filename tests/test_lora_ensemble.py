"""lora-ensemble: N LoRA members on one backbone in one batched forward; calibration metrics for any model."""
import json
import math

import pytest
import torch

import attnswap
from attnswap.config import FinetuneConfig
from attnswap.methods.tuners.members import extract_member, member_count, per_member
from attnswap.surgery import method_modules
from attnswap.train import finetune
from attnswap_kernels.batched_lora import batched_lora, batched_lora_naive

from .conftest import WIKI_TEST, WIKI_TRAIN, outputs, sample_ids


def _randomise(model, std=0.3, seed=0):
    """Give every member a different non-zero B (as training would), so members differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for v in method_modules(model, "tuner").values():
            for p in v.lora_B.values():
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _single_member(original, ensemble, k):
    """A one-member model holding member k's A and B: the 'separate forward' of member k."""
    import copy

    one = copy.deepcopy(original)
    opts = dict(ensemble.config.attnswap["plan"]["tuner"]["options"], members=1)
    attnswap.convert(one, "lora-ensemble", **opts)
    mine = method_modules(one, "tuner")
    with torch.no_grad():
        for path, v in method_modules(ensemble, "tuner").items():
            for t in v.lora_A:
                mine[path].lora_A[t].copy_(v.lora_A[t][k : k + 1])
                mine[path].lora_B[t].copy_(v.lora_B[t][k : k + 1])
    return one


def _raw(model, ids):
    with per_member(model):
        return outputs(model, ids)


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_one_member_with_b_zero_equals_the_original(tiny_dirs, name):
    model = attnswap.load_model(tiny_dirs[name])
    ids = sample_ids(model.config.vocab_size, length=31)
    ref = outputs(model, ids)
    attnswap.convert(model, "lora-ensemble", members=1)
    assert (_raw(model, ids) - ref).abs().max() <= 1e-5
    if name != "bert":  # the mean distribution of one member is its own softmax
        got = outputs(model, ids)
        assert (got - torch.log_softmax(ref, -1)).abs().max() <= 1e-5


@pytest.mark.slow
def test_smollm2_members_start_as_the_original(smollm2_dir):
    model = attnswap.load_model(smollm2_dir)
    ids = sample_ids(model.config.vocab_size, batch=1, length=64)
    ref = outputs(model, ids)
    attnswap.convert(model, "lora-ensemble", members=2)
    per = _raw(model, ids)
    assert (per - ref.expand_as(per)).abs().max() <= 1e-5  # B = 0: both members are the original
    assert (outputs(model, ids) - torch.log_softmax(ref, -1)).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_batched_members_equal_separate_single_member_forwards(tiny_dirs, name):
    original = attnswap.load_model(tiny_dirs[name])
    ids = sample_ids(original.config.vocab_size, batch=2, length=29)
    import copy

    model = attnswap.convert(copy.deepcopy(original), "lora-ensemble", members=3, r=4)
    _randomise(model)
    per = _raw(model, ids)  # [3 * 2, T, ...]
    assert per.shape[0] == 6 and member_count(model) == 3
    separate = [_raw(_single_member(original, model, k), ids) for k in range(3)]
    for k in range(3):
        assert (per[2 * k : 2 * k + 2] - separate[k]).abs().max() <= 1e-5
    assert (separate[0] - separate[1]).abs().max() > 1e-2  # the members really differ
    if name != "bert":
        mean = torch.logsumexp(torch.stack([torch.log_softmax(s, -1) for s in separate]), 0) - math.log(3)
        assert (outputs(model, ids) - mean).abs().max() <= 1e-5


def test_targets_limit_what_is_adapted(tiny_dirs):
    model = attnswap.load_model(tiny_dirs["gpt2"])  # fused q|k|v: the update lands in the v slice only
    attnswap.convert(model, "lora-ensemble", members=2, targets="v")
    v = next(iter(method_modules(model, "tuner").values()))
    assert set(v.lora_A) == {"v"} and v.lora_B["v"].shape == (2, 8, 32)
    _randomise(model)
    attn = model.transformer.h[0].attn
    x = torch.randn(2, 5, 32)
    got = attn.c_attn(x)
    plain = torch.nn.functional.linear(x, attn.c_attn.weight.t(), attn.c_attn.bias)
    assert (got[..., :64] - plain[..., :64]).abs().max() == 0
    assert (got[..., 64:] - plain[..., 64:]).abs().max() > 1e-3
    with pytest.raises(attnswap.AttnswapError, match="targets"):
        attnswap.convert(attnswap.load_model(tiny_dirs["gpt2"]), "lora-ensemble", targets="q,x")


@pytest.mark.parametrize("shape", [(6, 7, 13), (4, 1, 5), (9, 33)])
def test_batched_lora_op_equals_the_reference_forward_and_backward(shape):
    n, r, out = 3 if shape[0] % 3 == 0 else 2, 5, 11
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    a = torch.randn(n, shape[-1], r, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(n, r, out, generator=g, dtype=torch.float64, requires_grad=True)
    got, want = batched_lora(x, a, b, 0.5), batched_lora_naive(x, a, b, 0.5)
    assert got.shape == (*shape[:-1], out) and (got - want).abs().max() <= 1e-12
    w = torch.randn(got.shape, generator=g, dtype=torch.float64)
    g1 = torch.autograd.grad((got * w).sum(), (x, a, b))
    g2 = torch.autograd.grad((want * w).sum(), (x, a, b))
    assert all((p - q).abs().max() <= 1e-12 for p, q in zip(g1, g2))
    with pytest.raises(ValueError, match="multiple"):
        batched_lora(x[:1], a, b, 0.5)


def test_members_start_with_different_a_and_the_same_output(tiny_dirs):
    model = attnswap.convert(attnswap.load_model(tiny_dirs["llama"]), "lora-ensemble", members=4, seed=7)
    v = next(iter(method_modules(model, "tuner").values()))
    a = v.lora_A["q"]
    assert all((a[0] - a[m]).abs().max() > 1e-3 for m in range(1, 4))
    assert all(float(b.detach().abs().max()) == 0 for b in v.lora_B.values())
    again = attnswap.convert(attnswap.load_model(tiny_dirs["llama"]), "lora-ensemble", members=4, seed=7)
    assert torch.equal(next(iter(method_modules(again, "tuner").values())).lora_A["q"], a)  # per-member seeds: reproducible


@pytest.mark.parametrize("mode", ["repeat", "split"])
def test_training_updates_every_member_in_one_step_and_members_differ(tiny_dirs, tiny_tokenizer, tmp_path, mode):
    model = attnswap.convert(attnswap.load_model(tiny_dirs["llama"]), "lora-ensemble", members=2, batch_mode=mode)
    cfg = FinetuneConfig(data=str(WIKI_TRAIN), steps=4, lr=1e-2, seq_len=32, batch_size=2, warmup=0)
    result = finetune(model, tiny_tokenizer, cfg, tmp_path / "ft", progress=False)
    assert result["tokens"] == 4 * 2 * 32
    for v in method_modules(model, "tuner").values():
        for b in v.lora_B.values():
            assert all(float(b[m].detach().abs().max()) > 0 for m in range(2))  # both members trained
            assert (b[0] - b[1]).abs().max() > 1e-4  # and they differ
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    ids = sample_ids(model.config.vocab_size, batch=1, length=20)
    per = _raw(model, ids)
    assert (per[0] - per[1]).abs().max() > 1e-3
    loaded = attnswap.load(tmp_path / "ft")  # the checkpoint keeps every member
    assert (_raw(loaded, ids) - per).abs().max() <= 1e-5


def test_split_mode_gives_each_member_its_share_of_the_batch(tiny_dirs):
    import copy

    original = attnswap.load_model(tiny_dirs["llama"])
    model = attnswap.convert(copy.deepcopy(original), "lora-ensemble", members=2, batch_mode="split")
    _randomise(model)
    ids = sample_ids(model.config.vocab_size, batch=4, length=17)
    model.train()
    with torch.no_grad():
        got = model(input_ids=ids).logits  # [4, T, V]: rows 0-1 member 0, rows 2-3 member 1
    for k in range(2):
        want = _raw(_single_member(original, model, k), ids[2 * k : 2 * k + 2])
        assert (got[2 * k : 2 * k + 2] - want).abs().max() <= 1e-5
    with pytest.raises(attnswap.AttnswapError, match="multiple of 2"):
        model(input_ids=ids[:3])
    model.eval()
    assert model(input_ids=ids[:3]).logits.shape[0] == 3  # evaluation: every member sees every row


def test_generation_uses_the_ensemble_mean(tiny_dirs):
    from attnswap.generation import generate

    model = attnswap.convert(attnswap.load_model(tiny_dirs["llama"]), "lora-ensemble", members=3)
    _randomise(model, std=0.5)
    prompt = sample_ids(model.config.vocab_size, batch=1, length=9)
    r = generate(model, prompt, 12)
    ids = prompt
    for _ in range(12):  # greedy on the mean distribution, recomputed from scratch each step
        with torch.no_grad():
            nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
    assert torch.equal(r["ids"], ids)
    single = attnswap.load_model(tiny_dirs["llama"])
    assert r["peak_cache_bytes"] == 3 * generate(single, prompt, 12)["peak_cache_bytes"]  # N rows of cache


def test_save_load_export_and_extract_one_member(tiny_dirs, tmp_path, capsys):
    from attnswap.cli import main

    original = attnswap.load_model(tiny_dirs["gpt2"])
    tok = attnswap.load_tokenizer(tiny_dirs["gpt2"])
    import copy

    model = attnswap.convert(copy.deepcopy(original), "lora-ensemble", members=3, r=4)
    _randomise(model)
    attnswap.save(model, tmp_path / "ens", tokenizer=tok)
    ids = sample_ids(model.config.vocab_size, length=23)
    assert (_raw(attnswap.load(tmp_path / "ens"), ids) - _raw(model, ids)).abs().max() <= 1e-6
    assert main(["export", str(tmp_path / "ens"), "--out", str(tmp_path / "exp")]) == 0
    assert (_raw(attnswap.load(tmp_path / "exp"), ids) - _raw(model, ids)).abs().max() <= 1e-6
    assert "LoRA-Ensemble: 3 members, r 4" in (tmp_path / "exp" / "README.md").read_text()
    assert main(["export", str(tmp_path / "ens"), "--out", str(tmp_path / "m1"), "--member", "1"]) == 0
    plain = attnswap.load(tmp_path / "m1")
    assert getattr(plain.config, "attnswap", None) is None and not method_modules(plain, "tuner")
    want = _raw(_single_member(original, model, 1), ids)
    assert (outputs(plain, ids) - want).abs().max() <= 1e-4  # merged weights: float32 re-association only
    assert "Member 1 of 3" in (tmp_path / "m1" / "README.md").read_text()
    capsys.readouterr()
    assert main(["export", str(tmp_path / "ens"), "--out", str(tmp_path / "m9"), "--member", "9"]) == 2
    assert "members 0-2" in capsys.readouterr().err and not (tmp_path / "m9").exists()
    assert main(["export", str(tiny_dirs["gpt2"]), "--out", str(tmp_path / "m0"), "--member", "0"]) == 2
    assert "has no members" in capsys.readouterr().err and not (tmp_path / "m0").exists()
    dex = attnswap.convert(copy.deepcopy(original), "dex")
    with pytest.raises(attnswap.AttnswapError, match="no members"):
        extract_member(dex, 0)


def test_calibration_metrics_equal_their_definitions():
    from attnswap.methods.tuners.calibration import _Tally

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 7, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, 7, (500,), generator=g)
    logp = torch.log_softmax(logits, -1)
    t = _Tally()
    t.add(logp[:123], y[:123], full=True)
    t.add(logp[123:], y[123:], full=True)
    p = logp.exp()
    conf, pred = p.max(-1)
    hit = (pred == y).double()
    ece = 0.0
    for b in range(10):
        sel = (conf >= b / 10) & (conf < (b + 1) / 10)
        if sel.any():
            ece += sel.sum().item() / 500 * abs(hit[sel].mean().item() - conf[sel].mean().item())
    onehot = torch.nn.functional.one_hot(y, 7).double()
    assert abs(t.ece() - ece) <= 1e-12
    assert abs(t.brier / t.n - ((p - onehot) ** 2).sum(-1).mean().item()) <= 1e-12
    assert abs(t.entropy / t.n - (-(p * logp).sum(-1)).mean().item()) <= 1e-12
    assert abs(t.summary()["nll"] + logp.gather(-1, y[:, None]).mean().item()) <= 1e-12
    assert t.summary()["accuracy"] == hit.mean().item()


def test_ece_floor_is_the_expected_ece_of_a_calibrated_model():
    from attnswap.methods.tuners.calibration import ece_floor

    # one bin of 100 predictions at confidence 0.5: E|Binomial(100, 0.5) / 100 - 0.5| = 50 C(100, 50) / 2^100 / 100
    exact = 50 * math.comb(100, 50) / 2**100 / 100
    assert abs(ece_floor([{"count": 100, "confidence": 0.5}], samples=20000) - exact) <= 1e-3
    small = [{"count": 100, "confidence": c} for c in (0.2, 0.5, 0.9)]
    big = [{"count": 10000, "confidence": c} for c in (0.2, 0.5, 0.9)]
    assert ece_floor(big) < ece_floor(small) / 5  # shrinks as 1 / sqrt(n)


def test_eval_calibration_cli_single_and_ensemble(tiny_dirs, tmp_path, capsys):
    from attnswap.cli import main
    from attnswap.evaluate import perplexity

    args = ["--data", str(WIKI_TEST), "--max-tokens", "300", "--seq-len", "64", "--json"]
    assert main(["eval", "calibration", str(tiny_dirs["llama"]), *args, "--plot", str(tmp_path / "r.png")]) == 0
    single = json.loads(capsys.readouterr().out)
    assert {"accuracy", "nll", "ece", "brier", "entropy", "disagreement"} <= set(single)
    assert single["members"] == 1 and single["disagreement"] == 0 and single["tokens"] == 4 * 63
    assert (tmp_path / "r.png").stat().st_size > 1000
    model, tok = attnswap.load_model(tiny_dirs["llama"]), attnswap.load_tokenizer(tiny_dirs["llama"])
    ppl = perplexity(model, tok, str(WIKI_TEST), max_tokens=300, seq_len=64, progress=False)
    assert abs(single["nll"] - ppl["nll"]) <= 1e-5  # the same predictions as the perplexity protocol

    model = attnswap.convert(model, "lora-ensemble", members=3)
    _randomise(model, std=0.5)
    attnswap.save(model, tmp_path / "ens", tokenizer=tok)
    assert main(["eval", "calibration", str(tmp_path / "ens"), *args]) == 0
    ens = json.loads(capsys.readouterr().out)
    assert ens["members"] == 3 and len(ens["member_scores"]) == 3 and 0 < ens["disagreement"] < 1
    ppl = perplexity(model, tok, str(WIKI_TEST), max_tokens=300, seq_len=64, progress=False)
    assert abs(ens["nll"] - ppl["nll"]) <= 1e-5  # perplexity of an ensemble is that of its mean distribution
    assert ens["nll"] <= sum(m["nll"] for m in ens["member_scores"]) / 3 + 1e-9  # Jensen: mixture beats the mean NLL
    assert main(["eval", "calibration", str(tmp_path / "ens"), *args, "--plot", str(tmp_path / "r.png")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_convert_seed_reaches_the_members_initialisation(tiny_dirs, capsys, tmp_path):
    """convert(..., seed=s) and `convert --seed s` seed the members' A matrices (lora-ensemble's own `seed`
    option) unless the options give it: separately converted single members differ."""
    from attnswap.cli import main

    def first_a(model):
        return next(iter(method_modules(model, "tuner").values())).lora_A["q"].detach().clone()

    a = [first_a(attnswap.convert(attnswap.load_model(tiny_dirs["llama"]), "lora-ensemble", members=1, seed=s))
         for s in (0, 1)]
    assert (a[0] - a[1]).abs().max() > 1e-3
    given = attnswap.convert(attnswap.load_model(tiny_dirs["llama"]), "lora-ensemble", members=1, seed=1,
                             **{"r": 8})
    assert given.config.attnswap["plan"]["tuner"]["options"]["seed"] == 1
    assert main(["convert", str(tiny_dirs["llama"]), "--to", "lora-ensemble", "--set", "members=1", "--seed", "1",
                 "--out", str(tmp_path / "s1")]) == 0
    assert (first_a(attnswap.load_model(tmp_path / "s1")) - a[1]).abs().max() == 0
    assert main(["convert", str(tiny_dirs["llama"]), "--to", "lora-ensemble", "--set", "members=1", "--set", "seed=0",
                 "--seed", "1", "--out", str(tmp_path / "s0")]) == 0
    assert (first_a(attnswap.load_model(tmp_path / "s0")) - a[0]).abs().max() == 0
