"""keydiff: keeps the keys least similar to the head's mean key (the template cache policy). Exactness at budget
1.0 is checked for every registered policy in test_memory.py."""
import torch

import attnswap
from attnswap.generation import make_cache

from .conftest import sample_ids


def chunked(model, ids, chunk):
    cache = make_cache(model)
    with torch.no_grad():
        for c in ids.split(chunk, dim=1):
            model(input_ids=c, cache=cache, use_cache=True)
    return None, cache


def test_keydiff_keeps_the_keys_least_like_the_mean_key(tiny_dirs):
    model = attnswap.load_model(tiny_dirs["llama"])
    ids = sample_ids(model.config.vocab_size, batch=1, length=32)
    attnswap.convert(model, "keydiff", budget=1.0, interval=1000)
    _, full = chunked(model, ids, 32)
    keys = torch.nn.functional.normalize(full.layers[0].keys[0].float(), dim=-1)  # [Hkv, 32, D]
    attnswap.revert(model)
    attnswap.convert(model, "keydiff", budget=0.25, interval=32)
    _, cache = chunked(model, ids, 32)
    for head in range(keys.shape[0]):
        mean = torch.nn.functional.normalize(keys[head].mean(0), dim=-1)
        want = sorted((-(keys[head] @ mean)).topk(8).indices.tolist())
        assert sorted(cache.layers[0].pos[0, head].tolist()) == want
