import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import attnswap
from attnswap.evaluate import perplexity

from .conftest import WIKI_TEST
from .reference import reference_perplexity, register_reference


def test_protocol_on_a_tiny_model(tiny_dirs, tiny_tokenizer):
    model = attnswap.load_model(tiny_dirs["llama"])
    r = perplexity(model, tiny_tokenizer, str(WIKI_TEST), max_tokens=1000, seq_len=128, progress=False)
    assert r["windows"] == 7 and r["tokens"] == 7 * 127
    ref = reference_perplexity(model, tiny_tokenizer, WIKI_TEST.read_text(), 1000, 128)
    assert r["perplexity"] == pytest.approx(ref, rel=1e-5)
    # a random 512-token model is near-uniform: perplexity within a factor 2 of the vocabulary size
    assert 256 < r["perplexity"] < 1024


def test_perplexity_refuses_an_encoder(tiny_dirs, tiny_tokenizer):
    model = attnswap.load_model(tiny_dirs["bert"])
    with pytest.raises(attnswap.AttnswapError, match="causal language model"):
        perplexity(model, tiny_tokenizer, str(WIKI_TEST), max_tokens=100, seq_len=16)


@pytest.mark.slow
@pytest.mark.parametrize("window,sinks,expected", [(None, 0, 22.75), (256, 4, 26.62)])
def test_smollm2_perplexity_matches_an_independent_implementation(smollm2_dir, window, sinks, expected):
    """Acceptance: the CLI's protocol vs tests/reference.py (eager masked attention), 16,384 tokens, W=1024."""
    tok = attnswap.load_tokenizer("smollm2-135m")
    model = attnswap.load_model("smollm2-135m")
    if window is not None:
        attnswap.convert(model, "sliding-window", window=window, sinks=sinks)
    ours = perplexity(model, tok, str(WIKI_TEST), max_tokens=16384, seq_len=1024, progress=False)
    impl = register_reference(f"test-ref-{window}-{sinks}", window, sinks)
    ref_model = AutoModelForCausalLM.from_pretrained(smollm2_dir, attn_implementation=impl, dtype=torch.float32).eval()
    theirs = reference_perplexity(ref_model, tok, WIKI_TEST.read_text(encoding="utf-8"), 16384, 1024)
    assert ours["tokens"] == 16 * 1023
    assert abs(ours["perplexity"] / theirs - 1) <= 0.005
    assert ours["perplexity"] == pytest.approx(expected, rel=0.005)  # the numbers measured in MISSION.md
    assert math.isfinite(ours["nll"])
