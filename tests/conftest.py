"""Shared fixtures: tiny random models built from configs (no hub), and the real SmolLM2 / MiniLM."""
import os

# Triton kernels are tested on the CPU through Triton's interpreter, which must be chosen before
# triton is imported. Only the kernel tests call Triton entry points on CPU tensors; everything else
# dispatches CPU tensors to the PyTorch references, so this changes nothing for them.
os.environ.setdefault("TRITON_INTERPRET", "1")
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if not DATA.is_dir():  # CI clones next to shared/ as well; allow an override
    DATA = Path(os.environ.get("ATTNSWAP_DATA", "../shared/data")).resolve()
WIKI_TEST = DATA / "wikitext2-test.txt"
WIKI_TRAIN = DATA / "train-wikipedia-enwiki2021.txt"


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A 512-token byte-level BPE trained on a slice of the local WikiText text (a second, no network)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    text = WIKI_TEST.read_text(encoding="utf-8")[:200_000]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([text], vocab_size=512, min_frequency=2, special_tokens=["<|endoftext|>"], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    return tok


def _configs(vocab):
    # initializer_range 0.2 (not 0.02): peaked attention, so a changed attention shows in the outputs
    from transformers import BertConfig, GPT2Config, LlamaConfig

    return {
        "llama": LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=True,
                             initializer_range=0.2),
        "gpt2": GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=512,
                           bos_token_id=0, eos_token_id=0, initializer_range=0.2),
        "bert": BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=512, pad_token_id=0, initializer_range=0.2),
    }


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, tiny_tokenizer):
    """name -> directory of a saved tiny random model (+ tokenizer), one per architecture family."""
    from transformers import AutoModel, AutoModelForCausalLM

    out = {}
    for name, cfg in _configs(len(tiny_tokenizer)).items():
        torch.manual_seed(0)
        cls = AutoModel if name == "bert" else AutoModelForCausalLM
        model = cls.from_config(cfg)
        d = tmp_path_factory.mktemp(f"tiny-{name}")
        model.save_pretrained(d)
        tiny_tokenizer.save_pretrained(d)
        out[name] = d
    return out


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M as a cached HF directory (converted from its GGUF once)."""
    from attnswap.models import _gguf_cached_dir, resolve

    return _gguf_cached_dir(resolve("smollm2-135m"))


def sample_ids(vocab: int, batch: int = 2, length: int = 37, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (batch, length), generator=g)


def outputs(model, ids):
    """Logits of a causal LM, last hidden state of an encoder."""
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def decoding_error(model, ids, prefill: int) -> float:
    """Largest difference between the logits of decoding ids [1, T] one token at a time after a prefill of
    `prefill` tokens (with the model's cache) and a fresh full pass over the same prefix."""
    worst = 0.0
    with torch.no_grad():
        cache = model(input_ids=ids[:, :prefill], use_cache=True).cache
        for t in range(prefill, ids.shape[1]):
            step = model(input_ids=ids[:, t: t + 1], cache=cache, use_cache=True)
            cache = step.cache
            full = model(input_ids=ids[:, : t + 1]).logits[:, -1]
            worst = max(worst, float((step.logits[:, -1] - full).abs().max()))
    return worst


@pytest.fixture(autouse=True)
def poisoned_kernel_outputs(monkeypatch):
    """Every Triton kernel output buffer starts full of NaN in every test: an element a kernel fails to write
    fails the comparison with its reference (assert_close rejects NaN)."""
    import attnswap_kernels

    monkeypatch.setattr(attnswap_kernels, "POISON", True)
