"""random: seeded uniform scores, the floor every policy should beat."""
import torch
from pydantic import Field

from . import register
from .base import CacheOptions, CachePolicy


class RandomOptions(CacheOptions):
    seed: int = Field(0, description="seed of the scores (differs per layer and eviction)")


@register
class Random(CachePolicy):
    name = "random"
    summary = "seeded uniform scores (the floor)"
    Options = RandomOptions

    def score(self, layer, rows):
        g = torch.Generator().manual_seed(self.options.seed * 1_000_003 + self.layer_index * 1009 + layer.evictions)
        return torch.rand(layer.pos.shape, generator=g).to(layer.pos.device)
