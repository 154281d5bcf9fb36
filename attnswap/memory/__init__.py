"""KV-cache memory pruning: a cache layer that scores and evicts cached tokens every `interval` tokens.

- `cache.PrunedLayer`: the per-layer cache (keys, values, original positions, validity), eviction by score.
- `scorers`: one small class per scorer (namm and the kvpress-style baselines), registered by name.
- `namm`: the NAMM feature extractor (STFT of attention columns, EMA, recency) and its tiny network.
- `cmaes`: CMA-ES from the `cmaes` library with a pickle-free, replayable state; `evolve`: evolution of the NAMM parameters with checkpoints and resume.
- `tasks`: long-context perplexity and passkey retrieval under a pruned cache.
The `memory` variant (attnswap/variants/memory.py) attaches a scorer to every attention layer;
`memory_model` loads a model with it (what `attnswap eval memory` and `attnswap evolve` use).
"""
from __future__ import annotations


def memory_model(source: str, scorer: str | None, budget: tuple[bool, float | None], interval: int | None,
                 params: str | None):
    """SOURCE converted to `memory` (or, if it already is, with the given options changed; its evolved namm
    parameters are kept unless `params` names a file). budget = (given, value), value None = namm runs free."""
    from ..errors import AttnswapError
    from ..models import load_model
    from ..surgery import convert, revert

    model = load_model(source, merge_lora=True)
    section = getattr(model.config, "attnswap", None)
    options = {}
    if section:
        if section["variant"] != "memory":
            raise AttnswapError(f"{source} is converted to '{section['variant']}'; eval memory needs the original "
                                "model or a 'memory' checkpoint")
        options = dict(section["options"])
        theta = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("attnswap.namm_params")}
        revert(model)
    options.update({k: v for k, v in (("scorer", scorer), ("interval", interval), ("params", params)) if v is not None})
    if budget[0]:
        options["budget"] = budget[1]
    convert(model, "memory", **options)
    if section and not params:
        model.load_state_dict(theta, strict=False)  # keep the checkpoint's (evolved) namm parameters
    return model

