import pytest
import torch

import attnswap
from attnswap.methods.attention.sliding_window import band_mask
from attnswap_kernels.sparse_attn import window_attention

from .conftest import decoding_error, outputs, sample_ids
from .reference import register_reference, window_allowed


MASK_CASES = [(7, 7, 3, 0), (7, 7, 3, 2), (1, 9, 4, 1), (3, 11, 5, 2), (6, 6, 10, 0)]


# encoders see the whole sequence at once, so only square cases apply to them
@pytest.mark.parametrize("causal,q_len,kv_len,window,sinks",
                         [(True, *c) for c in MASK_CASES] + [(False, *c) for c in MASK_CASES if c[0] == c[1]])
def test_band_mask_is_the_rule(causal, q_len, kv_len, window, sinks):
    got = band_mask(q_len, kv_len, window, sinks, causal, "cpu")[0, 0]
    off = kv_len - q_len
    want = torch.tensor([[window_allowed(i + off, j, window, sinks, causal) for j in range(kv_len)] for i in range(q_len)])
    assert torch.equal(got, want)


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_window_covering_the_sequence_equals_the_original(tiny_dirs, name):
    model = attnswap.load_model(tiny_dirs[name])
    ids = sample_ids(model.config.vocab_size, length=37)
    ref = outputs(model, ids)
    attnswap.convert(model, "sliding-window", window=37, sinks=0)
    assert (outputs(model, ids) - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_small_window_matches_an_explicit_masked_attention(tiny_dirs, name):
    """Against an eager attention written independently (tests/reference.py), on a tiny causal model."""
    from transformers import AutoModelForCausalLM

    ref_model = AutoModelForCausalLM.from_pretrained(tiny_dirs[name], attn_implementation=register_reference(
        "test-ref-w5-s2", window=5, sinks=2)).eval()
    model = attnswap.load_model(tiny_dirs[name])
    ids = sample_ids(model.config.vocab_size, length=41)
    attnswap.convert(model, "sliding-window", window=5, sinks=2)
    assert (outputs(model, ids) - outputs(ref_model, ids)).abs().max() <= 1e-5


def test_layers_option_converts_only_those_layers(tiny_dirs):
    model = attnswap.load_model(tiny_dirs["llama"])
    attnswap.convert(model, "sliding-window", layers="1", window=4)
    assert model.config.attnswap["plan"]["attention"][0]["layers"] == [1]
    assert not hasattr(model.model.layers[0].self_attn, "attnswap")
    assert hasattr(model.model.layers[1].self_attn, "attnswap")


def test_cached_generation_equals_full_recompute(tiny_dirs):
    """Decoding with a DynamicCache applies the window by cache index: same logits as a fresh full pass."""
    model = attnswap.load_model(tiny_dirs["llama"])
    attnswap.convert(model, "sliding-window", window=6, sinks=2)
    ids = sample_ids(model.config.vocab_size, batch=1, length=20)
    assert decoding_error(model, ids, prefill=12) <= 1e-5


def test_generate_runs_and_is_greedy_consistent(tiny_dirs):
    model = attnswap.load_model(tiny_dirs["gpt2"])
    attnswap.convert(model, "sliding-window", window=8, sinks=1)
    ids = sample_ids(model.config.vocab_size, batch=1, length=10)
    gen = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert gen.shape == (1, 16)
    with torch.no_grad():
        nxt = model(input_ids=gen[:, :-1]).logits[0, -1].argmax()
    assert int(nxt) == int(gen[0, -1])


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_band_kernel_equals_the_masked_path_forward_and_backward(tiny_dirs, name, monkeypatch):
    """A causal full forward on the CPU runs the compiled band kernel; it gives SDPA-with-the-band-mask's logits
    and gradients."""
    from attnswap.methods.attention import sliding_window as sw

    model = attnswap.load_model(tiny_dirs[name])
    attnswap.convert(model, "sliding-window", window=5, sinks=2)
    ids = sample_ids(model.config.vocab_size, length=45)
    calls = []
    monkeypatch.setattr(sw, "window_attention", lambda *a, **kw: calls.append(1) or window_attention(*a, **kw))

    def run():
        model.zero_grad()
        logits = model(input_ids=ids).logits
        logits.square().mean().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        return logits.detach(), grads

    fast, fast_grads = run()
    assert len(calls) == model.config.num_hidden_layers  # every layer took the kernel
    monkeypatch.setattr(sw.SlidingWindow, "band_kernel", lambda *a: False)
    masked, masked_grads = run()
    assert len(calls) == model.config.num_hidden_layers
    assert (fast - masked).abs().max() <= 1e-5
    assert len(fast_grads) == len(masked_grads) > 0
    for a, b in zip(fast_grads, masked_grads):
        assert (a - b).abs().max() <= 1e-5 * max(1.0, float(b.abs().max()))
