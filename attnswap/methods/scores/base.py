"""The score-modifier interface: one subclass per file, registered by name in `scores.REGISTRY`.

A modifier is attached to an attention module as its `attnswap_scores` submodule. The attention that layer
runs (the original softmax attention, or an attention method that forms explicit scores: `takes_scores`) calls
`modify(scores, q_pos, k_pos)` on its scaled logits [B, H, Tq, Tk] before the mask and the softmax. Positions
are the indices of the queries and keys in the layer's key sequence (queries are its last Tq), so relative
distances hold under left padding and while decoding with a growing cache (not under a pruned one: a plan
refuses a cache policy beside a modifier). Its parameters are trained by `finetune`.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import Method, Options


class ScoreModifier(Method, nn.Module):
    kind = "scores"

    def __init__(self, options: Options, site, geometry, adapter):
        super().__init__()
        self.options = options
        self.layer_index = site.index
        self.geometry = geometry

    def modify(self, scores: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """scores [B, H, Tq, Tk] (scaled logits), q_pos [Tq], k_pos [Tk] -> modified scores, same shape."""
        raise NotImplementedError

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.options.model_dump().items())
