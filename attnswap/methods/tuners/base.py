"""The tuner interface (after PEFT's BaseTuner / BaseTunerLayer: inject, merge, unload).

A tuner instance is attached to each adapted attention module as its `attnswap_tuner` submodule and holds that
layer's new parameters. `model_hooks` injects it: a forward hook on each target projection module adds
`delta(target, x)` to the projection's output (its slice of a fused projection). `merge(projections, member)`
folds the update into the backbone weights (what `export --member` and unloading do); a tuner with N > 1
`members` runs every input as N stacked copies (`members.MemberAxis`). `finetune` of a model whose plan has a
tuner trains the tuner's parameters (and the attention methods' own), with no PEFT LoRA on top.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from .. import Method, Options

TARGETS = ("q", "k", "v", "o")


class Tuner(Method, nn.Module):
    kind = "tuner"
    # True: the tuner is the fine-tuning adapter (`finetune` trains it and adds no PEFT LoRA); False for a tuner
    # that only rewrites the weights at conversion (lowrank), after which `finetune` adds LoRA as usual
    adapts: ClassVar[bool] = True

    def __init__(self, options: Options, site, geometry, adapter):
        super().__init__()
        self.options = options
        self.layer_index = site.index
        self.geometry = geometry
        # models whose tuner carries N > 1 members run every input as N stacked copies (members.MemberAxis)
        self.members = 1

    # projections the tuner adapts (a subset of q, k, v, o), from its options by default
    def targets(self) -> list[str]:
        return list(getattr(self.options, "targets", TARGETS))

    def dims(self, target: str) -> tuple[int, int]:
        """(in, out) features of a projection."""
        g = self.geometry
        h, d = g.hidden_size, g.head_dim
        return {"q": (h, g.num_heads * d), "k": (h, g.num_kv_heads * d), "v": (h, g.num_kv_heads * d),
                "o": (g.num_heads * d, h)}[target]

    def delta(self, target: str, x: torch.Tensor) -> torch.Tensor:
        """What the tuner adds to projection `target`'s output for input x [..., in] -> [..., out]."""
        raise NotImplementedError

    def merge(self, projections: dict, member: int = 0) -> None:
        """Fold (member `member`'s) update into the backbone `projections` (arch `projections()` views)."""
        raise NotImplementedError

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())

    @classmethod
    def model_hooks(cls, model: nn.Module, adapter, options) -> list:
        """Inject: forward hooks on the target projections of every adapted layer (and the member axis)."""
        from ...surgery import method_modules
        from .members import MemberAxis

        tuners = method_modules(model, "tuner")
        handles = []
        for site in adapter.sites(model):
            tuner = tuners.get(site.path)
            if tuner is None:
                continue
            for module, parts in grouped_projections(adapter, model, site, tuner.targets()):
                handles.append(module.register_forward_hook(ProjectionHook(tuner, parts)))
        if hasattr(options, "members"):  # a tuner with a member axis (even of one member: the same outputs)
            split = getattr(options, "batch_mode", "repeat") == "split"
            handles += MemberAxis(options.members, split).install(model)
        return handles

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.options.model_dump().items())


def grouped_projections(adapter, model: nn.Module, site, targets) -> list[tuple[nn.Module, list[tuple[str, slice]]]]:
    """The target projections of a site grouped by the module computing them: [(module, [(target, slice)])],
    so that one hook per module sees every slice it computes (GPT-2 fuses q|k|v in one)."""
    grouped: list[tuple[nn.Module, list]] = []
    for t, (module, sl) in adapter.projection_modules(model, site).items():
        if t in targets:
            group = next((g for g in grouped if g[0] is module), None)
            if group is None:
                grouped.append(group := (module, []))
            group[1].append((t, sl))
    return grouped


class ProjectionHook:
    """Forward hook of one projection module: adds the tuner's update to its slice of the output."""

    order: ClassVar[int] = 0

    def __init__(self, tuner: Tuner, parts: list[tuple[str, slice]]):
        self.tuner = tuner
        self.parts = parts

    def __call__(self, module, args, output):
        x = args[0]
        total = output.shape[-1]
        for target, sl in self.parts:
            delta = self.tuner.delta(target, x)
            if sl != slice(None):
                delta = nn.functional.pad(delta, (sl.start, total - sl.stop))
            output = output + delta
        return output
