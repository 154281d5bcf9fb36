"""The `dex` variant: exact at conversion, the formula once lambda is on, the annealing driven by finetune."""
import pytest
import torch

import attnswap
from attnswap.config import FinetuneConfig
from attnswap.surgery import method_modules
from attnswap.train import _method_schedules, finetune

from .conftest import WIKI_TRAIN, outputs, sample_ids


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_conversion_starts_as_the_original(tiny_dirs, name):
    model = attnswap.load_model(tiny_dirs[name])
    ids = sample_ids(model.config.vocab_size, length=33)
    ref = outputs(model, ids)
    attnswap.convert(model, "dex")
    assert (outputs(model, ids) - ref).abs().max() <= 1e-5


@pytest.mark.slow
def test_smollm2_conversion_starts_as_the_original(smollm2_dir):
    model = attnswap.load_model(smollm2_dir)
    ids = sample_ids(model.config.vocab_size, batch=1, length=64)
    ref = outputs(model, ids)
    attnswap.convert(model, "dex", heads=[0, 4, 8])
    assert (outputs(model, ids) - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("keep_norm", [True, False])
def test_formula_on_selected_heads_only(tiny_dirs, keep_norm):
    model = attnswap.load_model(tiny_dirs["llama"])
    attnswap.convert(model, "dex", heads=[1, 3], lambda_max=0.3, keep_norm=keep_norm)
    v = next(iter(method_modules(model).values()))
    with torch.no_grad():
        v.weight.normal_(0, 0.5)
        v.ramp.fill_(1.0)
    b, t, h, hk, d = 2, 9, 4, 2, v.geometry.head_dim
    g = torch.Generator().manual_seed(0)
    q, k, val = torch.randn(b, h, t, d, generator=g), torch.randn(b, hk, t, d, generator=g), torch.randn(b, hk, t, d, generator=g)
    module = type("M", (), {"num_key_value_groups": h // hk, "is_causal": True, "training": False})()
    got, _ = v(module, q, k, val, None)
    mask = torch.ones(t, t, dtype=torch.bool).tril()
    a = torch.softmax((q @ k.repeat_interleave(2, 1).transpose(-1, -2) * d ** -0.5).masked_fill(~mask, -torch.inf), -1)
    o = (a @ val.repeat_interleave(2, 1)).transpose(1, 2)  # [B, T, H, D]
    want = o.clone()
    for i, head in enumerate([1, 3]):
        diff = o[:, :, head] - 0.3 * o[:, :, head] @ v.weight[i].detach()
        if keep_norm:
            diff = diff * o[:, :, head].norm(dim=-1, keepdim=True) / diff.norm(dim=-1, keepdim=True)
        want[:, :, head] = diff
    assert (got - want).abs().max() <= 1e-5
    assert (got[:, :, [0, 2]] - o[:, :, [0, 2]]).abs().max() <= 1e-6  # the other heads are untouched


def test_identity_map_is_exact_at_any_lambda_when_the_norm_is_kept(tiny_dirs):
    """W = I: the difference (1 - lambda) O is rescaled back to O, so the ramp alone changes nothing."""
    model = attnswap.load_model(tiny_dirs["gpt2"])
    ids = sample_ids(model.config.vocab_size, length=29)
    ref = outputs(model, ids)
    attnswap.convert(model, "dex", lambda_max=0.9)
    for v in method_modules(model).values():
        v.ramp.fill_(1.0)
    assert (outputs(model, ids) - ref).abs().max() <= 1e-5
    attnswap.revert(model)
    attnswap.convert(model, "dex", lambda_max=0.5, keep_norm=False)
    for v in method_modules(model).values():
        v.ramp.fill_(1.0)
    assert (outputs(model, ids) - ref).abs().max() > 1e-2  # without the norm: O (1 - lambda)


def test_lambda_is_annealed_by_finetune_and_saved(tiny_dirs, tiny_tokenizer, tmp_path):
    model = attnswap.load_model(tiny_dirs["llama"])
    ids = sample_ids(model.config.vocab_size, length=20)
    ref = outputs(model, ids)
    attnswap.convert(model, "dex", lambda_max=0.5, anneal_steps=4)
    variants = list(method_modules(model).values())
    assert _method_schedules(variants, 0, 10) == {"lambda": 0.0}
    assert _method_schedules(variants, 2, 10) == {"lambda": pytest.approx(0.25)}
    _method_schedules(variants, 0, 10)
    finetune(model, tiny_tokenizer, FinetuneConfig(data=str(WIKI_TRAIN), steps=6, seq_len=32, lr=1e-3, variant_lr=1e-2),
             tmp_path / "ft", progress=False)
    loaded = attnswap.load(tmp_path / "ft", merge_lora=True)
    v = next(iter(method_modules(loaded).values()))
    assert float(v.ramp) == 1.0  # the ramp reached its end and travels with the checkpoint
    assert not torch.allclose(v.lam, torch.full_like(v.lam, 0.5))  # lambda is learned
    assert not torch.allclose(v.weight, torch.eye(v.weight.shape[-1]).expand_as(v.weight))  # and the map
    assert (outputs(loaded, ids) - ref).abs().max() > 1e-3


def test_bad_heads_are_one_line_errors(tiny_dirs):
    model = attnswap.load_model(tiny_dirs["gpt2"])
    with pytest.raises(attnswap.AttnswapError, match="heads must be indices"):
        attnswap.convert(model, "dex", heads=[7])


def _calibration(tok, seed=0, tokens=96):
    from attnswap.data import calibration

    return calibration(tok, str(WIKI_TRAIN), tokens=tokens, seq_len=32, seed=seed)


def test_calibration_windows_are_seeded(tiny_tokenizer):
    a, b, c = _calibration(tiny_tokenizer), _calibration(tiny_tokenizer), _calibration(tiny_tokenizer, seed=1)
    assert a.ids.shape == (3, 32) and torch.equal(a.ids, b.ids) and not torch.equal(a.ids, c.ids)
    assert a.describe() == {"data": str(WIKI_TRAIN), "windows": 3, "seq_len": 32, "tokens": 96, "seed": 0}


@pytest.mark.parametrize("select", ["redundancy", "importance"])
@pytest.mark.parametrize("name", ["llama", "bert"])
def test_head_selection_is_measured_and_deterministic(tiny_dirs, tiny_tokenizer, name, select):
    from attnswap.methods.attention.analysis import head_scores

    cal = _calibration(tiny_tokenizer)
    chosen = []
    for _ in range(2):
        model = attnswap.load_model(tiny_dirs[name])
        attnswap.convert(model, "dex", heads=0.5, select=select, calibration=cal)
        chosen.append(model.config.attnswap)
    assert chosen[0]["plan"]["attention"][0]["options"]["heads"] == chosen[1]["plan"]["attention"][0]["options"]["heads"]
    assert chosen[0]["prepared"] == chosen[1]["prepared"]
    scores = head_scores(attnswap.load_model(tiny_dirs[name]), cal.ids, select)
    for layer, s in scores.items():
        order = torch.argsort(-s if select == "redundancy" else s, stable=True)
        assert chosen[0]["plan"]["attention"][0]["options"]["heads"][str(layer)] == sorted(order[:2].tolist())
        assert chosen[0]["prepared"]["attention.0"]["scores"][str(layer)] == pytest.approx(s.tolist(), abs=1e-6)
    variants = method_modules(model)
    assert [v.heads.tolist() for v in variants.values()] == [sorted(order[:2].tolist()) for order in
                                                             (torch.argsort(-s if select == "redundancy" else s,
                                                                            stable=True) for s in scores.values())]


def test_importance_is_the_loss_increase_when_one_head_is_masked(tiny_dirs, tiny_tokenizer):
    """Checked against masking the head's slice of the o-projection input, a route that shares no code."""
    from attnswap.methods.attention.analysis import head_scores

    model = attnswap.load_model(tiny_dirs["llama"])
    cal = _calibration(tiny_tokenizer)
    scores = head_scores(model, cal.ids, "importance")
    proj = model.model.layers[1].self_attn.o_proj

    def loss():
        with torch.no_grad():
            return float(model(input_ids=cal.ids, labels=cal.ids).loss)

    base = loss()
    d = model.config.hidden_size // model.config.num_attention_heads
    hook = proj.register_forward_pre_hook(lambda m, args: (args[0].index_fill(-1, torch.arange(2 * d, 3 * d), 0.0),))
    masked = loss()
    hook.remove()
    assert scores[1][2].item() == pytest.approx(masked - base, abs=1e-5)
    assert scores[1].abs().max() > 1e-4


def test_selected_heads_travel_with_the_checkpoint_and_show_in_list_and_card(tiny_dirs, tiny_tokenizer, tmp_path,
                                                                              capsys):
    from attnswap.cli import main

    cal = tmp_path / "cal.txt"
    cal.write_text(WIKI_TRAIN.read_text(encoding="utf-8")[:20_000])
    out = tmp_path / "dex"
    rc = main(["convert", str(tiny_dirs["gpt2"]), "--to", "dex", "--set", "heads=2", "--calibration", str(cal),
               "--calibration-tokens", "64", "--calibration-seq-len", "32", "--out", str(out), "--json"])
    assert rc == 0
    import json

    result = json.loads(capsys.readouterr().out)
    heads = result["plan"]["attention"][0]["options"]["heads"]
    assert sorted(heads) == ["0", "1"] and all(len(h) == 2 for h in heads.values())
    assert result["prepared"]["attention.0"]["calibration"] == {"data": str(cal), "windows": 2, "seq_len": 32, "tokens": 64, "seed": 0}
    loaded = attnswap.load(out)
    assert [v.heads.tolist() for v in method_modules(loaded).values()] == [heads["0"], heads["1"]]
    assert loaded.config.attnswap["prepared"] == result["prepared"]
    assert main(["list", str(out)]) == 0
    listed = capsys.readouterr().out
    assert f"adapted heads (layer: heads): 0: {heads['0']}; 1: {heads['1']}" in listed
    assert "chosen by redundancy (2 per layer) on 64 tokens" in listed
    assert main(["export", str(out), "--out", str(tmp_path / "exp")]) == 0
    card = (tmp_path / "exp" / "README.md").read_text()
    assert f"adapted heads (layer: heads): 0: {heads['0']}; 1: {heads['1']}" in card


@pytest.mark.parametrize("options, message", [
    ({"heads": 0.5}, "pass --calibration FILE"),
    ({"heads": 0.5, "select": "all"}, "select=all adapts every head"),
    ({"heads": 1.5}, "fraction of heads must be in"),
    ({"heads": 9}, "count of heads must be in 1..4"),
])
def test_selection_errors_are_one_line(tiny_dirs, options, message):
    model = attnswap.load_model(tiny_dirs["llama"])
    with pytest.raises(attnswap.AttnswapError, match=message):
        attnswap.convert(model, "dex", **options)
    assert not getattr(model.config, "attnswap", None)
