"""Tasks under a pruned cache, built from local text: long-context perplexity and passkey retrieval.

Both feed the model in chunks of the cache policy's `interval` (512 without one) through
`attnswap.generation.make_cache`, so eviction happens during prefill exactly as it would in a long generation.
"""
from __future__ import annotations

import math
import random

import torch

from ...data import encode, read_text
from ...errors import AttnswapError
from ...generation import make_cache
from ...surgery import method_modules
from .base import CacheOptions


def _kept_fraction(cache) -> float | None:
    """Entries kept / tokens seen, averaged over the pruned layers and their KV heads (None: no layer is pruned;
    layers a policy does not prune, by the plan's composition rule, are not in the average)."""
    fracs = [layer.valid.float().sum(-1).mean().item() / layer.seen for layer in cache.layers
             if getattr(layer, "valid", None) is not None and layer.seen]
    return sum(fracs) / len(fracs) if fracs else None


def _pruned_layers(cache) -> int:
    return sum(1 for layer in cache.layers if hasattr(layer, "valid"))


def _interval(model) -> int:
    policies = list(method_modules(model, "cache").values())
    return policies[0].options.interval if policies else CacheOptions.model_fields["interval"].default


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def peak_bytes(cache) -> int:
    """Largest cache held so far: pruning layers report their peak (new tokens in, just before an eviction);
    other layers the tensors they hold now (keys and values, a linear state)."""
    from ...generation import layer_bytes

    return sum(layer.peak_bytes if hasattr(layer, "peak_bytes") else layer_bytes(layer) for layer in cache.layers)


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
                            documents: int = 1, chunk: int | None = None) -> dict:
    """Perplexity of tokens score_from..context of `documents` consecutive context-long stretches of `data`."""
    ids = encode(tokenizer, read_text(data, max_chars=6 * context * documents + 10_000))
    if len(ids) < context * documents:
        raise AttnswapError(f"{data} has {len(ids)} tokens; long-context perplexity needs {context * documents}")
    nll, count, kept, peak = 0.0, 0, [], 0
    for d in range(documents):
        doc = ids[d * context:(d + 1) * context][None]
        n, c, cache, p = run_chunked(model, doc, chunk, score_from=score_from)
        nll, count, peak = nll + n, count + c, max(peak, p)
        kept.append(_kept_fraction(cache))
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "predictions": count, "context": context,
            "score_from": score_from, "kept_fraction": _mean(kept), "pruned_layers": _pruned_layers(cache),
            "layers": len(cache.layers), "peak_cache_bytes": peak}


PASSKEY = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"


@torch.no_grad()
def passkey(model, tokenizer, data: str, context: int = 4096, depths=(0.1, 0.3, 0.5, 0.7, 0.9), trials: int = 2,
            seed: int = 0, chunk: int | None = None) -> dict:
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
            _, _, cache, p = run_chunked(model, ids[:, :-1], chunk)
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
            "trials": trials, "kept_fraction": _mean(kept), "pruned_layers": _pruned_layers(cache),
            "layers": len(cache.layers), "peak_cache_bytes": peak}
