"""LoRA-Ensemble: N LoRA members on one frozen backbone, run together over a member axis.

Halbheer, Mühlematter et al., "LoRA-Ensemble: Efficient Uncertainty Modelling for Self-attention Networks"
(2024, https://arxiv.org/abs/2405.14438; code prs-eth/LoRA-Ensemble). Each member m has its own low-rank update
of the attention projections (q, k, v, o by default):

    y_m = x_m W^T + (x_m A_m) B_m * alpha / r,   A_m [in, r], B_m [r, out]

initialised as LoRA: B_m = 0 (so every member starts as the original model) and A_m uniform
(+-1/sqrt(in), PEFT's kaiming-uniform) from a per-member seed, so members differ. The backbone is shared and
frozen; all members are computed in one forward over N stacked copies of the batch (`members.MemberAxis`), with
the batched op `attnswap_kernels.batched_lora` (two bmm calls, no per-member passes). Predictions are the mean
of the members' softmax probabilities. A tuner: it composes with any attention methods and cache policy.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from attnswap_kernels.batched_lora import batched_lora

from .. import Options
from . import register
from .base import TARGETS, Tuner


class LoraEnsembleOptions(Options):
    members: int = Field(4, ge=1, le=64, description="ensemble members N")
    r: int = Field(8, ge=1, description="LoRA rank of each member")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha (the update is scaled by alpha / r)")
    targets: list[Literal["q", "k", "v", "o"]] = Field(
        list(TARGETS), description="projections each member adapts, e.g. 'q,v' (default q,k,v,o)")
    batch_mode: Literal["repeat", "split"] = Field(
        "repeat", description="training: every member sees the whole batch (repeat) or 1/N of it (split)")
    seed: int = Field(0, description="base seed of the members' A matrices (member m, layer l, target t differ)")

    @field_validator("targets", mode="before")
    @classmethod
    def _split(cls, v):
        if isinstance(v, str):
            v = [t.strip() for t in v.split(",") if t.strip()]
        if isinstance(v, (list, tuple)) and not v:
            raise ValueError("at least one target")
        if isinstance(v, (list, tuple)) and len(set(v)) != len(v):
            raise ValueError("targets repeat")
        return v


@register
class LoraEnsemble(Tuner):
    name = "lora-ensemble"
    summary = "N LoRA members on one frozen backbone in one batched forward; mean of member probabilities"
    Options = LoraEnsembleOptions
    adds = "per member and target: A [in, r], B [r, out] (B = 0 at conversion); trained by finetune"

    def __init__(self, options, site, geometry, adapter):
        super().__init__(options, site, geometry, adapter)
        n, r = options.members, options.r
        self.members = n
        self.scale = options.alpha / r
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for t in options.targets:
            fan_in, fan_out = self.dims(t)
            a = torch.empty(n, fan_in, r)
            bound = 1.0 / math.sqrt(fan_in)
            for m in range(n):
                g = torch.Generator().manual_seed(_member_seed(options.seed, m, site.index, t))
                a[m] = torch.rand(fan_in, r, generator=g) * (2 * bound) - bound
            self.lora_A[t] = nn.Parameter(a)
            self.lora_B[t] = nn.Parameter(torch.zeros(n, r, fan_out))

    @classmethod
    def describe(cls, entry, prepared):
        o = entry["options"]
        return [f"LoRA-Ensemble: {o['members']} members, r {o['r']}, alpha {o['alpha']}, targets "
                f"{','.join(o['targets'])}, batch_mode {o['batch_mode']}; predictions are the mean of the members' "
                f"probabilities (export --member k gives one member merged into a plain model)"]

    def delta(self, target: str, x: torch.Tensor) -> torch.Tensor:
        return batched_lora(x, self.lora_A[target], self.lora_B[target], self.scale)

    def merge(self, projections, member=0):
        for t in self.options.targets:
            w = projections[t].weight  # [out, in] view of the backbone parameter
            update = (self.lora_A[t][member] @ self.lora_B[t][member]).t() * self.scale
            w.add_(update.to(w.dtype))


def _member_seed(seed: int, member: int, layer: int, target: str) -> int:
    return ((seed * 1_000_003 + member) * 10_007 + layer) * 7 + TARGETS.index(target)
