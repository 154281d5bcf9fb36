"""bitfit: a trainable bias on each target projection's output, zero at conversion (the model starts exact).

Ben Zaken, Ravfogel, Goldberg, "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked
Language-models" (ACL 2022, arXiv 2106.10199) trains only a model's bias terms. Llama-family projections have
no bias, so this tuner adds one per target (q, k, v, o by default): out + b, b [out] per layer and target. The
smallest tuner (about 2k parameters per SmolLM2 layer), and the template in docs/architecture.md.
"""
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ...errors import AttnswapError
from .. import Options
from . import register
from .base import TARGETS, Tuner


class BitFitOptions(Options):
    targets: list[Literal["q", "k", "v", "o"]] = Field(list(TARGETS), description="projections that get a bias")


@register
class BitFit(Tuner):
    name = "bitfit"
    summary = "a trainable bias on each q/k/v/o output, zero at conversion (BitFit)"
    Options = BitFitOptions
    adds = "a bias [out] per target projection (zero at conversion); trained by finetune"

    def __init__(self, options, site, geometry, adapter):
        super().__init__(options, site, geometry, adapter)
        self.bias = nn.ParameterDict({t: nn.Parameter(torch.zeros(self.dims(t)[1])) for t in options.targets})

    def delta(self, target, x):
        return self.bias[target].to(x.dtype).expand(*x.shape[:-1], -1)

    def merge(self, projections, member=0):
        for t in self.options.targets:
            if projections[t].bias is None:
                raise AttnswapError(f"bitfit: the {t} projection has no bias to fold the trained one into")
            projections[t].bias.add_(self.bias[t].to(projections[t].bias.dtype))
