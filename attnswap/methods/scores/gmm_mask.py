"""Gaussian mixture locality mask on the attention scores.

After "Toward a Deeper Understanding: RetNet Viewed through Convolution" (Li et al., arXiv 2309.05375; authors'
code CatworldLee/Gaussian-Mixture-Mask-Attention), which multiplies a ViT's scaled attention logits by a
learnable mixture of Gaussians of the distance between patches, so that attention gains the locality prior
that RetNet's decay gives. For text the distance is the relative position d = i - j of query i and key j:

    M_h(d) = 1 + sum_n a_{n,h} exp(-d^2 / (2 sigma_{n,h}^2))          (2 parameters per Gaussian per head)
    multiply (the paper's form):  s'_{hij} = s_{hij} * M_h(i - j)
    add (a bias, like ALiBi's):   s'_{hij} = s_{hij} + (M_h(i - j) - 1)

with a = 0 at conversion, so the converted model is the original exactly; `finetune` trains a and log sigma
(beside LoRA or a tuner). The sigmas start spread geometrically over [sigma_min, sigma_max] (the paper draws
them at random; a spread start covers short and long ranges from step 0).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from .. import Options
from . import register
from .base import ScoreModifier


class GMMMaskOptions(Options):
    gaussians: int = Field(3, ge=1, le=16, description="Gaussians in the mixture (each: an amplitude and a width "
                                                        "per head)")
    sigma_min: float = Field(2.0, gt=0, description="initial width of the narrowest Gaussian, in tokens")
    sigma_max: float = Field(64.0, gt=0, description="initial width of the widest Gaussian, in tokens (the "
                                                      "others spread geometrically between)")
    mode: Literal["multiply", "add"] = Field("multiply", description="multiply the scores by 1 + mixture (the "
                                             "paper's form) or add the mixture to them (a locality bias)")

    @model_validator(mode="after")
    def _widths(self):
        if self.sigma_max < self.sigma_min:
            raise ValueError("sigma_max must be at least sigma_min")
        return self


@register
class GMMMask(ScoreModifier):
    name = "gmm-mask"
    summary = "learned Gaussian-mixture locality mask on the attention scores, exact at conversion (GMM-Mask)"
    Options = GMMMaskOptions
    adds = "per head and Gaussian an amplitude (0 at conversion) and a width (trained by finetune)"

    def __init__(self, options, site, geometry, adapter):
        super().__init__(options, site, geometry, adapter)
        n, h = options.gaussians, geometry.num_heads
        log_sigma = torch.linspace(math.log(options.sigma_min), math.log(options.sigma_max), n)  # geometric
        self.amplitude = nn.Parameter(torch.zeros(n, h))
        self.log_sigma = nn.Parameter(log_sigma[:, None].repeat(1, h))

    def mixture(self, q_pos: torch.Tensor, k_pos: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """sum_n a_n G_n(i - j): [H, Tq, Tk], in float32 at least (`dtype` where wider)."""
        dtype = torch.promote_types(dtype, torch.float32)
        d = (q_pos[:, None] - k_pos[None, :]).to(dtype)  # [Tq, Tk]
        inv = torch.exp(-2 * self.log_sigma.to(dtype))[..., None, None]  # [n, H, 1, 1]: 1 / sigma^2
        g = torch.exp(-0.5 * d.square() * inv)  # [n, H, Tq, Tk]
        return (self.amplitude.to(dtype)[..., None, None] * g).sum(0)

    def modify(self, scores, q_pos, k_pos):
        m = self.mixture(q_pos, k_pos, scores.dtype).to(scores.dtype)
        return scores * (1 + m) if self.options.mode == "multiply" else scores + m
