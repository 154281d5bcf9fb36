"""Tasks under a pruned cache, built from local text: long-context perplexity and passkey retrieval.

Both feed the model in chunks of the memory variant's `interval` through `attnswap.generation.make_cache`,
so eviction happens during prefill exactly as it would in a long generation.
"""
from __future__ import annotations

import math
import random

import torch

from ..data import encode, read_text
from ..errors import AttnswapError
from ..generation import make_cache
from ..surgery import variant_modules


def _kept_fraction(cache) -> float:
    """Entries kept / tokens seen, averaged over layers and KV heads (1.0 for layers without pruning)."""
    fracs = []
    for layer in cache.layers:
        if hasattr(layer, "valid") and layer.valid is not None and layer.seen:
            fracs.append(layer.valid.float().sum(-1).mean().item() / layer.seen)
        else:
            fracs.append(1.0)
    return sum(fracs) / len(fracs)


def _interval(model) -> int:
    variants = list(variant_modules(model).values())
    return variants[0].options.interval if variants and hasattr(variants[0].options, "interval") else 512


def peak_bytes(cache) -> int:
    """Largest cache held so far: pruning layers report their peak (new tokens in, just before an eviction);
    other layers their current keys and values."""
    total = 0
    for layer in cache.layers:
        if hasattr(layer, "peak_bytes"):
            total += layer.peak_bytes
        else:
            total += sum(t.nbytes for t in (layer.keys, layer.values) if isinstance(t, torch.Tensor))
    return total


@torch.no_grad()
def run_chunked(model, ids: torch.Tensor, chunk: int | None = None, score_from: int | None = None):
    """Feed ids [1, T] chunk by chunk through a fresh (pruning) cache. Returns (nll sum over the targets at
    positions > score_from, targets, cache, peak cache bytes)."""
    chunk = chunk or _interval(model)
    cache = make_cache(model)
    nll, count, peak = 0.0, 0, 0
    for start in range(0, ids.shape[1], chunk):
        piece = ids[:, start:start + chunk]
        logits = model(input_ids=piece, cache=cache, use_cache=True).logits
        peak = max(peak, peak_bytes(cache))
        if score_from is None:
            continue
        target_pos = torch.arange(start + 1, start + 1 + piece.shape[1])  # what each logit predicts
        chosen = (target_pos >= score_from) & (target_pos < ids.shape[1])
        if chosen.any():
            lp = torch.log_softmax(logits[0, chosen].float(), dim=-1)
            nll -= float(lp.gather(-1, ids[0, target_pos[chosen]][:, None]).sum())
            count += int(chosen.sum())
    return nll, count, cache, peak


def long_context_perplexity(model, tokenizer, data: str, context: int = 8192, score_from: int = 4096,
                            documents: int = 1) -> dict:
    """Perplexity of tokens score_from..context of `documents` consecutive context-long stretches of `data`."""
    ids = encode(tokenizer, read_text(data, max_chars=6 * context * documents + 10_000))
    if len(ids) < context * documents:
        raise AttnswapError(f"{data} has {len(ids)} tokens; long-context perplexity needs {context * documents}")
    nll, count, kept, peak = 0.0, 0, [], 0
    for d in range(documents):
        doc = ids[d * context:(d + 1) * context][None]
        n, c, cache, p = run_chunked(model, doc, score_from=score_from)
        nll, count, peak = nll + n, count + c, max(peak, p)
        kept.append(_kept_fraction(cache))
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "predictions": count, "context": context,
            "score_from": score_from, "kept_fraction": sum(kept) / len(kept), "peak_cache_bytes": peak}


PASSKEY = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"


@torch.no_grad()
def passkey(model, tokenizer, data: str, context: int = 4096, depths=(0.1, 0.3, 0.5, 0.7, 0.9), trials: int = 2,
            seed: int = 0) -> dict:
    """Accuracy of recalling a 5-digit key hidden at each depth of `context` tokens of filler text."""
    filler = encode(tokenizer, read_text(data, max_chars=6 * context + 10_000))
    rng = random.Random(seed)
    question = encode(tokenizer, QUESTION)
    by_depth, kept, peak = {}, [], 0
    for depth in depths:
        hits = 0
        for t in range(trials):
            key = str(rng.randint(10000, 99999))
            needle = encode(tokenizer, " " + PASSKEY.format(key=key) + " ")
            room = context - len(needle) - len(question)
            offset = rng.randint(0, max(0, len(filler) - room))
            hay = filler[offset:offset + room]
            at = int(depth * len(hay))
            ids = torch.cat([hay[:at], needle, hay[at:], question])[None]
            _, _, cache, p = run_chunked(model, ids[:, :-1])
            peak = max(peak, p)
            last = ids[:, -1:]
            out = []
            for _ in range(8):
                logits = model(input_ids=last, cache=cache, use_cache=True).logits
                last = logits[:, -1:].argmax(-1)
                out.append(int(last))
            answer = tokenizer.decode(out)
            hits += int("".join(ch for ch in answer if ch.isdigit())[:5] == key)
            kept.append(_kept_fraction(cache))
        by_depth[str(depth)] = hits / trials
    return {"accuracy": sum(by_depth.values()) / len(by_depth), "by_depth": by_depth, "context": context,
            "trials": trials, "kept_fraction": sum(kept) / len(kept), "peak_cache_bytes": peak}
