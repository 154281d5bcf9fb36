"""What an architecture adapter tells the rest of attnswap: where attention lives and what it looks like."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn


@dataclass(frozen=True)
class Geometry:
    """Shapes of one attention layer."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int

    @property
    def kv_groups(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass
class Site:
    """One self-attention module of a model: the unit surgery swaps."""

    index: int  # layer number
    path: str  # dotted module path inside the model
    module: nn.Module


@dataclass
class Projection:
    """A projection in nn.Linear layout: y = x @ weight.T + bias, weight [out, in]."""

    weight: torch.Tensor
    bias: torch.Tensor | None


class ArchAdapter:
    """One architecture family. Subclasses fill the class variables and the three methods below."""

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    causal: ClassVar[bool]  # causal LM (True) or bidirectional encoder (False)
    positions: ClassVar[str]  # "rope" (applied before the attention function) or "absolute"
    # regex on module paths: group 1 is the layer index
    attention_path: ClassVar[str]
    # module-name suffixes PEFT's LoRA targets for q, k, v, o
    lora_targets: ClassVar[tuple[str, ...]]

    @property
    def direction(self) -> str:
        return "causal" if self.causal else "bidirectional"

    def sites(self, model: nn.Module) -> list[Site]:
        pattern = re.compile(self.attention_path)
        found = []
        for path, module in model.named_modules():
            m = pattern.search(path)
            if m and m.end() == len(path):
                found.append(Site(int(m.group(1)), path, module))
        return sorted(found, key=lambda s: s.index)

    def geometry(self, config) -> Geometry:
        """Heads, KV heads (GQA; all heads when the config names none), head size (the config's `head_dim`,
        else hidden / heads), hidden size, read through transformers' standard config names."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return Geometry(config.num_attention_heads, kv, head_dim, config.hidden_size)

    def projections(self, model: nn.Module, site: Site) -> dict[str, Projection]:
        """q, k, v, o of one site as nn.Linear-layout weights (views, not copies): each projection module's
        rows of its slice (a family with other layouts, e.g. GPT-2's Conv1D, overrides this)."""
        out = {}
        for target, (module, sl) in self.projection_modules(model, site).items():
            out[target] = Projection(module.weight[sl], None if module.bias is None else module.bias[sl])
        return out

    def layer_window(self, site: Site) -> int | None:
        """The layer's own sliding window in tokens (Gemma's, ModernBERT's local layers, Mistral/Phi-3's
        window), or None for a layer that attends the whole context. Transformers passes it in the mask."""
        module = site.module
        if hasattr(module, "sliding_window"):
            return module.sliding_window
        config = getattr(module, "config", None)
        types = getattr(config, "layer_types", None)
        if types is not None:
            return config.sliding_window if types[site.index] == "sliding_attention" else None
        return getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None

    def softcap(self, site: Site) -> float | None:
        """The tanh soft-capping of the attention logits the model applies (Gemma 2), or None."""
        return getattr(site.module, "attn_logit_softcapping", None)

    def projection_modules(self, model: nn.Module, site: Site) -> dict[str, tuple[nn.Module, slice]]:
        """q, k, v, o of one site as (module computing it, slice of that module's output features).

        The slice is the whole output except for fused projections (GPT-2's q|k|v `c_attn`); a forward hook on
        the module sees the projection's input and can add to its slice of the output.
        """
        raise NotImplementedError
