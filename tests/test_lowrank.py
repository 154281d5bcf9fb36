"""lowrank: each projection replaced by its rank-r PCA projection, measured on calibration text (LiteASR)."""
import pytest
import torch

import attnswap
from attnswap.cli import main
from attnswap.data import calibration
from attnswap.errors import AttnswapError
from attnswap.methods.tuners.lowrank import chosen_rank

from .conftest import WIKI_TRAIN, outputs, sample_ids


def _cal(tok, tokens=256):
    return calibration(tok, str(WIKI_TRAIN), tokens=tokens, seq_len=64)


def test_the_rank_is_the_smallest_that_holds_the_energy():
    lam = torch.tensor([4.0, 3.0, 2.0, 1.0])  # shares 0.4, 0.7, 0.9, 1.0
    assert [chosen_rank(lam, e) for e in (0.3, 0.4, 0.7, 0.71, 0.9, 0.95, 1.0)] == [1, 1, 2, 3, 3, 4, 4]
    assert chosen_rank(torch.tensor([5.0, 0.0, 0.0]), 1.0) == 1


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_full_rank_is_the_original_and_a_low_rank_is_not(tiny_dirs, tiny_tokenizer, name):
    model = attnswap.load_model(tiny_dirs[name])
    ids = sample_ids(model.config.vocab_size, length=23)
    ref = outputs(model, ids)
    attnswap.convert(model, "lowrank", calibration=_cal(tiny_tokenizer), rank=10_000)
    ranks = model.config.attnswap["plan"]["tuner"]["options"]["ranks"]
    assert ranks["0"]["q"] == 32 and ranks["0"]["o"] == 32  # min(rank, out features)
    assert (outputs(model, ids) - ref).abs().max() <= 1e-5
    low = attnswap.load_model(tiny_dirs[name])
    attnswap.convert(low, "lowrank", calibration=_cal(tiny_tokenizer), energy=0.8)
    assert (outputs(low, ids) - ref).abs().max() > 1e-2


def test_the_projection_is_the_pca_of_its_outputs(tiny_dirs, tiny_tokenizer):
    """Layer 1's q by hand: E[y y^T] over the calibration tokens, its top-r eigenvectors U, W' = U U^T W with r
    the smallest rank that holds the energy."""
    original = attnswap.load_model(tiny_dirs["llama"])
    cal = _cal(tiny_tokenizer)
    seen = []
    handle = original.model.layers[1].self_attn.q_proj.register_forward_hook(
        lambda m, a, out: seen.append(out.detach().reshape(-1, out.shape[-1]).double()))
    with torch.no_grad():
        for row in cal.ids:
            original(input_ids=row[None])
    handle.remove()
    y = torch.cat(seen)
    lam, u = torch.linalg.eigh(y.T @ y / len(y))
    lam, u = lam.flip(0), u.flip(1)
    share = lam.cumsum(0) / lam.sum()
    r = int((share < 0.95).sum()) + 1
    w = original.model.layers[1].self_attn.q_proj.weight.detach().double()
    want = u[:, :r] @ u[:, :r].T @ w
    model = attnswap.load_model(tiny_dirs["llama"])
    attnswap.convert(model, "lowrank", calibration=cal, energy=0.95, targets=["q"])
    assert model.config.attnswap["plan"]["tuner"]["options"]["ranks"]["1"] == {"q": r} and 1 < r < 32
    got = model.model.layers[1].self_attn.q_proj.weight.detach().double()
    assert (got - want).abs().max() <= 1e-5
    assert torch.equal(model.model.layers[1].self_attn.k_proj.weight, original.model.layers[1].self_attn.k_proj.weight)


def test_round_trip_finetune_with_lora_and_the_plan_description(tiny_dirs, tiny_tokenizer, tmp_path, capsys):
    from attnswap.config import FinetuneConfig
    from attnswap.train import finetune

    model = attnswap.load_model(tiny_dirs["llama"])
    attnswap.convert(model, "lowrank", calibration=_cal(tiny_tokenizer), energy=0.9)
    ids = sample_ids(model.config.vocab_size, length=17)
    attnswap.save(model, tmp_path / "lr", tokenizer=tiny_tokenizer)
    again = attnswap.load(tmp_path / "lr")  # no calibration: the projected weights are in the checkpoint
    assert (outputs(again, ids) - outputs(model, ids)).abs().max() <= 1e-6
    assert main(["list", str(tmp_path / "lr")]) == 0
    shown = capsys.readouterr().out
    assert "tuner lowrank" in shown and "factorised form:" in shown
    cfg = FinetuneConfig(data=str(WIKI_TRAIN), steps=3, seq_len=32, lr=1e-2, warmup=0, lora_r=4)
    finetune(again, tiny_tokenizer, cfg, tmp_path / "ft", progress=False)
    assert (tmp_path / "ft" / "adapter").is_dir()  # PEFT LoRA on top: lowrank itself trains nothing
    tuned = attnswap.load(tmp_path / "ft")
    assert (outputs(tuned, ids) - outputs(again, ids)).abs().max() <= 1e-5
    assert (outputs(tuned, ids) - outputs(model, ids)).abs().max() > 1e-4  # LoRA moved it


def test_errors_are_one_line(tiny_dirs):
    model = attnswap.load_model(tiny_dirs["llama"])
    with pytest.raises(AttnswapError, match="lowrank measures each projection's outputs on calibration text"):
        attnswap.convert(model, "lowrank")


@pytest.mark.slow
def test_smollm2_full_rank_is_the_original(smollm2_dir):
    model = attnswap.load_model(smollm2_dir)
    tok = attnswap.load_tokenizer(smollm2_dir)
    ids = sample_ids(model.config.vocab_size, batch=1, length=48)
    ref = outputs(model, ids)
    attnswap.convert(model, "lowrank", calibration=calibration(tok, str(WIKI_TRAIN), tokens=1024, seq_len=256),
                     rank=10_000)
    assert (outputs(model, ids) - ref).abs().max() <= 1e-3


# --- attention: reduced (q.k in r dimensions per head, models without RoPE) ---

def _psd(d, rank, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(d, rank, generator=g, dtype=torch.float64) * torch.linspace(3, 0.1, rank, dtype=torch.float64)
    return x @ x.T / rank


def test_score_factors_are_exact_at_full_rank_and_optimal_below():
    """A B^T = I at full rank; at rank r the weighted score error ||Q^(1/2) (I - A_r B_r^T) K^(1/2)||_F^2 is the sum
    of the dropped S^2 (Eckart-Young), and no other rank-r choice tried does better: the top-r eigenvectors of K
    or of Q, and random orthonormal bases."""
    from attnswap.methods.tuners.lowrank import _sqrt_and_inverse, score_factors

    d = 12
    q, k = _psd(d, d, 1), _psd(d, d, 2)
    a, b, sv2 = score_factors(q, k)
    assert (a @ b.T - torch.eye(d, dtype=torch.float64)).abs().max() <= 1e-9
    qs, _ = _sqrt_and_inverse(q)
    ks, _ = _sqrt_and_inverse(k)

    def err(m):
        return float(((qs @ (torch.eye(d, dtype=torch.float64) - m) @ ks) ** 2).sum())

    g = torch.Generator().manual_seed(3)
    for r in (1, 4, 8):
        best = err(a[:, :r] @ b[:, :r].T)
        assert abs(best - float(sv2[r:].sum())) <= 1e-9 * float(sv2.sum())
        others = [torch.linalg.eigh(m)[1][:, -r:] for m in (q, k)]
        others += [torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))[0] for _ in range(5)]
        assert all(best <= err(p @ p.T) + 1e-12 for p in others)


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_reduced_full_rank_is_the_original(tiny_dirs, tiny_tokenizer, name):
    model = attnswap.load_model(tiny_dirs[name])
    ids = sample_ids(model.config.vocab_size, length=23)
    ref = outputs(model, ids)
    attnswap.convert(model, "lowrank", calibration=_cal(tiny_tokenizer), attention="reduced", rank=10_000,
                     targets=["q", "k"])
    assert model.config.attnswap["plan"]["tuner"]["options"]["qk_dims"] == {"0": 8, "1": 8}  # the head size
    assert (outputs(model, ids) - ref).abs().max() <= 1e-5


def _reduced_gpt2(tiny_dirs, tiny_tokenizer, energy=0.8):
    model = attnswap.load_model(tiny_dirs["gpt2"])
    attnswap.convert(model, "lowrank", calibration=_cal(tiny_tokenizer), attention="reduced", energy=energy,
                     targets=["q", "k"])
    return model


def test_reduced_layers_carry_their_scores_in_the_first_r_dims(tiny_dirs, tiny_tokenizer):
    """Below full rank: each head's q and k rows beyond r are zero, the model is no longer the original, and the
    scores of layer 0 equal q^T A_r B_r^T k of the original projections on the calibration text's moments."""
    from attnswap.methods.tuners.lowrank import score_factors, second_moments
    from attnswap.arch import adapter_for

    original = attnswap.load_model(tiny_dirs["gpt2"])
    cal = _cal(tiny_tokenizer)
    adapter = adapter_for(original.config)
    moments = second_moments(original, adapter, [0], ["q", "k"], cal.ids)
    model = _reduced_gpt2(tiny_dirs, tiny_tokenizer)
    r = model.config.attnswap["plan"]["tuner"]["options"]["qk_dims"]["0"]
    assert 1 <= r < 8
    ids = sample_ids(model.config.vocab_size, length=19)
    assert (outputs(model, ids) - outputs(original, ids)).abs().max() > 1e-3
    old = adapter.projections(original.transformer, adapter.sites(original.transformer)[0])
    new = adapter.projections(model.transformer, adapter.sites(model.transformer)[0])
    x = torch.randn(5, 32, dtype=torch.float64)
    for h in range(4):
        sl = slice(8 * h, 8 * h + 8)
        (mq, nq), (mk, nk) = moments[(0, "q")], moments[(0, "k")]
        a, b, _ = score_factors(mq[sl, sl] / nq, mk[sl, sl] / nk)
        tail = slice(8 * h + r, 8 * h + 8)
        assert new["q"].weight[tail].abs().max() == 0 and new["k"].weight[tail].abs().max() == 0
        assert new["q"].bias[tail].abs().max() == 0 and new["k"].bias[tail].abs().max() == 0

        def proj(p, rows):
            return x @ p.weight[rows].double().T + p.bias[rows].double()

        want = proj(old["q"], sl) @ a[:, :r] @ b[:, :r].T @ proj(old["k"], sl).T
        got = proj(new["q"], sl) @ proj(new["k"], sl).T
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_reduced_attention_paths_agree_and_the_tail_is_ignored(tiny_dirs, tiny_tokenizer, monkeypatch):
    """The compiled kernel in r dims (full causal forward), SDPA on zero-padded q/k (padding mask; the kernel
    unavailable), a KV-cache decode, and weights with random rows beyond r (what a LoRA on q/k adds): the same
    logits. The first r dimensions define the scores."""
    import attnswap_kernels.sparse_attn as sparse_attn
    from attnswap_kernels.sparse_attn import cpu as sparse_cpu
    from transformers import DynamicCache

    model = _reduced_gpt2(tiny_dirs, tiny_tokenizer)
    ids = sample_ids(model.config.vocab_size, batch=1, length=29)
    calls = []
    window = sparse_attn.window_attention
    monkeypatch.setattr(sparse_attn, "window_attention",
                        lambda q, k, v, **kw: calls.append(q.shape) or window(q, k, v, **kw))
    kernel = outputs(model, ids)
    r = model.config.attnswap["plan"]["tuner"]["options"]["qk_dims"]["0"]
    assert calls[0] == (1, 4, 29, r)  # the compiled kernel ran in the reduced size
    with torch.no_grad():
        masked = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        cache = DynamicCache(config=model.config)
        model(input_ids=ids[:, :-3], cache=cache, use_cache=True)
        decoded = [model(input_ids=ids[:, i:i + 1], cache=cache, use_cache=True).logits for i in range(26, 29)]
    assert (masked - kernel).abs().max() <= 1e-5
    assert (torch.cat(decoded, 1) - kernel[:, -3:]).abs().max() <= 1e-4
    monkeypatch.setattr(sparse_cpu, "available", lambda: False)
    assert (outputs(model, ids) - kernel).abs().max() <= 1e-5
    monkeypatch.undo()
    with torch.no_grad():
        w = model.transformer.h[0].attn.c_attn.weight  # Conv1D [in, q|k|v]
        for h in range(4):
            w[:, 8 * h + r:8 * h + 8] = torch.randn(32, 8 - r)  # q's tail
            w[:, 32 + 8 * h + r:32 + 8 * h + 8] = torch.randn(32, 8 - r)  # k's tail
    assert (outputs(model, ids) - kernel).abs().max() <= 1e-5


def test_reduced_round_trip_and_one_line_errors(tiny_dirs, tiny_tokenizer, tmp_path, capsys):
    model = _reduced_gpt2(tiny_dirs, tiny_tokenizer)
    ids = sample_ids(model.config.vocab_size, length=17)
    attnswap.save(model, tmp_path / "red", tokenizer=tiny_tokenizer)
    again = attnswap.load(tmp_path / "red")
    assert (outputs(again, ids) - outputs(model, ids)).abs().max() <= 1e-6
    assert main(["list", str(tmp_path / "red")]) == 0
    assert "q/k head size in the scores:" in capsys.readouterr().out
    with pytest.raises(AttnswapError, match="RoPE"):
        attnswap.convert(attnswap.load_model(tiny_dirs["llama"]), "lowrank", calibration=_cal(tiny_tokenizer),
                         attention="reduced")
    code = main(["convert", str(tiny_dirs["llama"]), "--to", "lowrank", "--set", "attention=reduced",
                 "--calibration", str(WIKI_TRAIN), "--out", str(tmp_path / "no")])
    err = capsys.readouterr().err
    assert code == 2 and "RoPE" in err and "Traceback" not in err and not (tmp_path / "no").exists()


def test_reduced_beside_an_attention_method_zeroes_the_tail(tiny_dirs, tiny_tokenizer):
    """With an attention method on layer 1 (sliding-window wider than the input: exact attention), that layer's
    q and k reach the method with the dimensions past r zeroed: the same logits as the reduced model alone, also
    with random weights there."""
    tuner = {"method": "lowrank", "options": {"attention": "reduced", "energy": 0.8, "targets": ["q", "k"]}}
    alone = _reduced_gpt2(tiny_dirs, tiny_tokenizer)
    model = attnswap.load_model(tiny_dirs["gpt2"])
    attnswap.convert(model, {"attention": [{"layers": 1, "method": "sliding-window", "options": {"window": 64}}],
                             "tuner": tuner}, calibration=_cal(tiny_tokenizer))
    ids = sample_ids(model.config.vocab_size, batch=1, length=29)
    want = outputs(alone, ids)
    assert (outputs(model, ids) - want).abs().max() <= 1e-5
    r = model.config.attnswap["plan"]["tuner"]["options"]["qk_dims"]["1"]
    assert r < 8
    with torch.no_grad():
        w = model.transformer.h[1].attn.c_attn.weight
        for h in range(4):
            w[:, 8 * h + r:8 * h + 8] = torch.randn(32, 8 - r)
            w[:, 32 + 8 * h + r:32 + 8 * h + 8] = torch.randn(32, 8 - r)
    assert (outputs(model, ids) - want).abs().max() <= 1e-5
