"""KV-cache memory pruning: a cache layer that scores and evicts cached tokens every `interval` tokens.

- `cache.PrunedLayer`: the per-layer cache (keys, values, original positions, validity), eviction by score.
- `scorers`: one small class per scorer (namm and the kvpress-style baselines), registered by name.
- `namm`: the NAMM feature extractor (STFT of attention columns, EMA, recency) and its tiny network.
- `cmaes`: a small CMA-ES; `evolve`: evolution of the NAMM parameters with checkpoints and resume.
- `tasks`: long-context perplexity and passkey retrieval under a pruned cache.
The `memory` variant (attnswap/variants/memory.py) attaches a scorer to every attention layer.
"""
