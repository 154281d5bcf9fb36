"""Generation with the caches a plan asks for (a method's own state, a cache policy's pruned cache), with measurements."""
from __future__ import annotations

import time

import torch
from transformers.cache_utils import Cache, DynamicCache

from .arch import find_adapter
from .surgery import base_model, method_modules


def make_cache(model) -> Cache:
    """One cache layer per attention layer: the attention method's own where it has one, else the cache
    policy's pruned cache where the plan has one for the layer, else the model's own layer (a growing KV layer,
    or a sliding one where the model's layer attends a window)."""
    base = base_model(model)
    own = DynamicCache(config=base.config).layers
    adapter = find_adapter(base.config)
    if adapter is None:  # an architecture attnswap cannot convert: its own cache
        return Cache(layers=own)
    methods, policies = method_modules(base, "attention"), method_modules(base, "cache")
    layers = []
    for site in adapter.sites(base):
        method, policy = methods.get(site.path), policies.get(site.path)
        layer = method.make_cache_layer() if method is not None else None
        if layer is None and policy is not None:
            layer = policy.make_cache_layer()
        layers.append(layer if layer is not None else own[site.index])
    return Cache(layers=layers)


def layer_bytes(layer) -> int:
    """Bytes held by one cache layer's tensors (keys/values and any recurrent state)."""
    tensors = layer.tensors() if hasattr(layer, "tensors") else [layer.keys, layer.values]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def cache_bytes(cache: Cache) -> int:
    """Bytes held by the cache's tensors (keys/values and any recurrent state)."""
    return sum(layer_bytes(layer) for layer in cache.layers)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
             seed: int = 0, eos_token_id: int | None = None, record_every: int = 0) -> dict:
    """Greedy (temperature 0) or sampled decoding, one token per step after a parallel prefill.

    Returns the ids, timings (prefill, decode tokens/s) and cache bytes: after prefill, the peak, and every
    `record_every` generated tokens.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    model.eval()
    cache = make_cache(model)
    t0 = time.perf_counter()
    out = model(input_ids=input_ids, cache=cache, use_cache=True)
    prefill_s = time.perf_counter() - t0
    ids = input_ids
    after_prefill = peak = cache_bytes(cache)
    trace = []
    logits = out.logits[:, -1]
    t1 = time.perf_counter()
    for step in range(max_new_tokens):
        if temperature > 0:
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            nxt = torch.multinomial(probs.cpu(), 1, generator=gen).to(ids.device)
        else:
            nxt = logits.argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        if eos_token_id is not None and bool((nxt == eos_token_id).all()):
            break
        if step + 1 == max_new_tokens:
            break
        out = model(input_ids=nxt, cache=cache, use_cache=True)
        logits = out.logits[:, -1]
        size = cache_bytes(cache)
        peak = max(peak, size)
        if record_every and (step + 1) % record_every == 0:
            trace.append({"generated": step + 1, "cache_bytes": size})
    decode_s = time.perf_counter() - t1
    new = ids.shape[1] - input_ids.shape[1]
    return {
        "ids": ids,
        "new_tokens": new,
        "prefill_seconds": round(prefill_s, 3),
        "tokens_per_second": round(new / decode_s, 2) if decode_s > 0 else None,
        "cache_bytes_after_prefill": after_prefill,
        "peak_cache_bytes": peak,
        "cache_trace": trace,
    }
