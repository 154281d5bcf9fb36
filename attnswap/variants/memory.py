"""KV-cache memory pruning (NAMM and the classic presses) as a variant of causal models.

The attention itself stays exact softmax attention (SDPA) over whatever the cache keeps; with the cache of
`attnswap.generation.make_cache` (used by `generate` and `attnswap eval memory`) every layer scores its
cached tokens per KV head every `interval` tokens and evicts the low scorers (`attnswap.memory`). Without
that cache (a plain forward, training) it is the original model. Sources: SakanaAI/evo-memory (NAMM) and
NVIDIA/kvpress (the baselines); see attnswap/memory/scorers.py and namm.py.
"""
from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field, PrivateAttr, field_validator
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..errors import AttnswapError
from .base import Variant, VariantOptions
from .registry import register


class MemoryOptions(VariantOptions):
    scorer: str = Field("namm", description="namm, streaming, h2o, tova, snapkv, knorm or random")
    budget: float | None = Field(0.5, gt=0, le=1, description="fraction of the tokens seen that each layer and "
                                                              "KV head keeps (null: namm decides, score <= 0 "
                                                              "evicts)")
    interval: int = Field(512, ge=1, description="score and evict every N tokens")
    sinks: int = Field(4, ge=0, description="streaming: first tokens always kept")
    window: int = Field(32, ge=1, description="h2o recent tokens kept; snapkv observation window (kept)")
    seed: int = Field(0, description="random scorer seed")
    params: str | None = Field(None, description="namm: evolved parameters file (attnswap evolve), copied into "
                                                 "the model; default: the built-in starting vector")
    _theta: torch.Tensor | None = PrivateAttr(None)  # the file's parameters, read once by prepare()

    @field_validator("scorer")
    @classmethod
    def _known(cls, v):
        from ..errors import did_you_mean
        from ..memory.scorers import SCORERS

        _load_scorers()
        if v not in SCORERS:
            raise ValueError(f"unknown scorer '{v}'{did_you_mean(v, SCORERS)}; choose from {', '.join(SCORERS)}")
        return v


def _load_scorers():
    from ..memory import namm, scorers  # noqa: F401  (registers every scorer)


def load_params(path: str | Path) -> torch.Tensor:
    """The NAMM parameter vector from a file written by `attnswap evolve` (safetensors, key 'namm')."""
    from safetensors.torch import load_file

    from ..memory.namm import N_PARAMS

    p = Path(path)
    if not p.is_file():
        raise AttnswapError(f"namm parameters not found: {path} (write them with 'attnswap evolve')")
    try:
        theta = load_file(str(p))["namm"]
    except Exception:  # noqa: BLE001
        raise AttnswapError(f"{path} is not a namm parameters file (safetensors with a 'namm' tensor)") from None
    if theta.shape != (N_PARAMS,):
        raise AttnswapError(f"{path}: expected {N_PARAMS} namm parameters, found {tuple(theta.shape)}")
    return theta.float()


@register
class Memory(Variant):
    name = "memory"
    summary = "exact attention over a KV cache pruned every N tokens by a scorer (NAMM, H2O, SnapKV, ...)"
    Options = MemoryOptions
    directions = frozenset({"causal"})
    adds = "no trainable parameters; namm's scorer parameters (506, evolved) ride along as a buffer"

    @classmethod
    def prepare(cls, model, options, layers, calibration=None):
        """Read an evolved parameters file once: the vector becomes a buffer saved with the model, so the
        stored options carry no path and a saved model loads without the file."""
        if options.budget is None and options.scorer != "namm":
            raise AttnswapError(f"memory: scorer '{options.scorer}' needs a budget (only namm can run free)")
        if not options.params:
            return options, {}
        theta = load_params(options.params)
        resolved = options.model_copy(update={"params": None})
        resolved._theta = theta
        return resolved, {"namm_params_file": options.params}

    @classmethod
    def describe(cls, section):
        o = section["options"]
        budget = "free (score <= 0 evicts)" if o["budget"] is None else f"keeps {o['budget']} of the tokens seen"
        lines = [f"KV-cache pruning: scorer {o['scorer']}, {budget}, every {o['interval']} tokens"]
        if section.get("prepared", {}).get("namm_params_file"):
            lines.append(f"namm parameters from {section['prepared']['namm_params_file']} (saved in the model)")
        return lines

    def __init__(self, options, site, geometry, adapter):
        super().__init__(options, site, geometry, adapter)
        from ..memory.namm import default_params
        from ..memory.scorers import SCORERS

        theta = options._theta if options._theta is not None else default_params()
        self.register_buffer("namm_params", theta.clone())
        self.scorer = SCORERS[options.scorer](self)

    def trainable_parameters(self):
        return []

    def make_cache_layer(self):
        from ..memory.cache import PrunedLayer

        return PrunedLayer(self)

    def forward(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        layer = self.__dict__.pop("_pending_cache", None)  # set by PrunedLayer.update for this call
        if layer is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        n = query.shape[2]
        q_pos = torch.arange(layer.seen, layer.seen + n, device=query.device)
        mask = layer.allowed(q_pos, query.shape[1])
        kwargs.pop("is_causal", None)
        out, _ = sdpa_attention_forward(module, query, key, value, mask, is_causal=False, scaling=scale, **kwargs)
        layer.after_attend(query.detach(), scale)
        return out, None
