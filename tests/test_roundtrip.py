import json

import pytest
import torch

import attnswap

from .conftest import outputs, sample_ids


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_convert_save_load_gives_the_same_outputs(tiny_dirs, tiny_tokenizer, tmp_path, name):
    model = attnswap.load_model(tiny_dirs[name])
    attnswap.convert(model, "sliding-window", window=5, sinks=1)
    ids = sample_ids(model.config.vocab_size, length=29)
    before = outputs(model, ids)
    attnswap.save(model, tmp_path / "ck", tokenizer=tiny_tokenizer)
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["attnswap"]["plan"]["attention"][0]["method"] == "sliding-window"
    assert cfg["attnswap"]["plan"]["attention"][0]["options"] == {"window": 5, "sinks": 1}
    assert cfg["attnswap"]["plan"]["attention"][0]["layers"] == [0, 1] and cfg["attnswap"]["schema"] == 2
    assert set(cfg["attnswap"]["versions"]) == {"attnswap", "torch", "transformers"}
    again = attnswap.load(tmp_path / "ck")
    assert again.config.attnswap["plan"]["attention"][0]["method"] == "sliding-window"
    assert (outputs(again, ids) - before).abs().max() <= 1e-5


@pytest.mark.slow
def test_smollm2_round_trip_and_full_window(smollm2_dir, tmp_path):
    """The real model: window >= length equals the original; convert -> save -> load is exact."""
    model = attnswap.load_model("smollm2-135m")
    ids = sample_ids(model.config.vocab_size, batch=1, length=64)
    original = outputs(model, ids)
    attnswap.convert(model, "sliding-window", window=64, sinks=0)
    assert (outputs(model, ids) - original).abs().max() <= 1e-4
    attnswap.revert(model)
    attnswap.convert(model, "sliding-window", window=16, sinks=4)
    converted = outputs(model, ids)
    assert (converted - original).abs().max() > 1e-2  # the window is really applied
    attnswap.save(model, tmp_path / "sm", tokenizer=attnswap.load_tokenizer("smollm2-135m"))
    again = attnswap.load(tmp_path / "sm")
    assert (outputs(again, ids) - converted).abs().max() <= 1e-5


def test_already_converted_is_refused(tiny_dirs):
    model = attnswap.load_model(tiny_dirs["llama"])
    attnswap.convert(model, "sliding-window")
    with pytest.raises(attnswap.AttnswapError, match="already converted"):
        attnswap.convert(model, "sliding-window")


@pytest.mark.slow
def test_minilm_alias_loads_and_converts():
    model = attnswap.load_model("minilm-l6")
    tok = attnswap.load_tokenizer("minilm-l6")
    batch = tok(["attention is all you need", "a sentence"], return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = model(**batch).last_hidden_state
    attnswap.convert(model, "sliding-window", window=64, sinks=0)
    with torch.no_grad():
        out = model(**batch).last_hidden_state
    # padding is honoured: the padded row's real tokens are unchanged too
    assert (out - ref).abs().max() <= 1e-4
