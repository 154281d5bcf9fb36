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
