"""The `dex` variant: exact at conversion, the formula once lambda is on, the annealing driven by finetune."""
import pytest
import torch

import attnswap
from attnswap.config import FinetuneConfig
from attnswap.surgery import variant_modules
from attnswap.train import _variant_schedules, finetune

from .conftest import WIKI_TRAIN, outputs, sample_ids


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_conversion_starts_as_the_original(tiny_dirs, name):
    model = attnswap.load_model(tiny_dirs[name])
    ids = sample_ids(model.config.vocab_size, length=33)
    ref = outputs(model, ids)
    attnswap.convert(model, "dex")
    assert (outputs(model, ids) - ref).abs().max() <= 1e-5


def test_smollm2_conversion_starts_as_the_original(smollm2_dir):
    model = attnswap.load_model(smollm2_dir)
    ids = sample_ids(model.config.vocab_size, batch=1, length=64)
    ref = outputs(model, ids)
    attnswap.convert(model, "dex", heads=[0, 4, 8])
    assert (outputs(model, ids) - ref).abs().max() <= 1e-5


def test_formula_on_selected_heads_only(tiny_dirs):
    model = attnswap.load_model(tiny_dirs["llama"])
    attnswap.convert(model, "dex", heads=[1, 3], lambda_max=0.3)
    v = next(iter(variant_modules(model).values()))
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
        want[:, :, head] = o[:, :, head] - 0.3 * o[:, :, head] @ v.weight[i].detach()
    assert (got - want).abs().max() <= 1e-5
    assert (got[:, :, [0, 2]] - o[:, :, [0, 2]]).abs().max() <= 1e-6  # the other heads are untouched


def test_lambda_is_annealed_by_finetune_and_saved(tiny_dirs, tiny_tokenizer, tmp_path):
    model = attnswap.load_model(tiny_dirs["llama"])
    ids = sample_ids(model.config.vocab_size, length=20)
    ref = outputs(model, ids)
    attnswap.convert(model, "dex", lambda_max=0.5, anneal_steps=4)
    variants = list(variant_modules(model).values())
    assert _variant_schedules(variants, 0, 10) == {"lambda": 0.0}
    assert _variant_schedules(variants, 2, 10) == {"lambda": pytest.approx(0.25)}
    _variant_schedules(variants, 0, 10)
    finetune(model, tiny_tokenizer, FinetuneConfig(data=str(WIKI_TRAIN), steps=6, seq_len=32, lr=1e-2), tmp_path / "ft",
             progress=False)
    loaded = attnswap.load(tmp_path / "ft", merge_lora=True)
    v = next(iter(variant_modules(loaded).values()))
    assert float(v.ramp) == 1.0  # the ramp reached its end and travels with the checkpoint
    assert not torch.allclose(v.lam, torch.full_like(v.lam, 0.5))  # lambda is learned
    assert (outputs(loaded, ids) - ref).abs().max() > 1e-3


def test_bad_heads_are_one_line_errors(tiny_dirs):
    model = attnswap.load_model(tiny_dirs["gpt2"])
    with pytest.raises(attnswap.AttnswapError, match="heads must be indices"):
        attnswap.convert(model, "dex", heads=[7])
