"""The member axis: N members of one model (one frozen backbone, N small adapters) in one batched forward.

A converted model whose tuner carries N > 1 members (`Tuner.members`, e.g. a LoRA ensemble) runs every input
as N stacked copies [N*B, ...], member-major: rows m*B .. m*B+B-1 belong to member m, and each member's
adapter applies to its own rows. A hook on the model's forward does the stacking, so callers pass [B, ...]:

- eval mode: every member sees the whole batch; `logits` come back as the ensemble's mean distribution,
  log(mean_m softmax(logits_m)), with B rows (per token for causal LMs, per example for classifiers), and
  `loss` (when labels are given to a causal LM) is the NLL of that mean. Within `per_member(model)` the
  logits stay [N*B, ...], one block of rows per member.
- train mode, batch_mode "repeat": every member sees the whole batch; logits [N*B, ...] and the loss is the
  members' mean loss (each member trained on its own, as in LoRA-Ensemble).
- train mode, batch_mode "split": the batch is not copied; member m trains on rows m*B/N .. (m+1)*B/N - 1.

The KV cache of a causal LM holds N*B rows (the members' keys and values differ after the first adapted layer).
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from ...errors import AttnswapError
from ...surgery import base_model as _base, method_modules

# forward kwargs that are not batched along dim 0
_NOT_BATCHED = {"cache_position", "logits_to_keep"}


def member_count(model: nn.Module) -> int:
    """N: the members a converted model runs (1 for a single model)."""
    return max((t.members for t in method_modules(model, "tuner").values()), default=1)


class MemberAxis:
    """The forward hooks of the model's top-level module (installed by `Tuner.model_hooks` when members > 1)."""

    def __init__(self, members: int, split: bool):
        self.members = members
        self.split = split
        self.per_member = False

    def install(self, model: nn.Module) -> list:
        model._attnswap_member_axis = self
        return [model.register_forward_pre_hook(self.pre, with_kwargs=True),
                model.register_forward_hook(self.post, with_kwargs=True)]

    def _stacking(self, module) -> bool:
        return not (module.training and self.split)

    def pre(self, module, args, kwargs):
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        lead = first if first is not None else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        if lead is None:
            return None
        rows, n = lead.shape[0], self.members
        if not self._stacking(module):
            if rows % n:
                raise AttnswapError(f"batch_mode split: the batch of {rows} rows does not divide among {n} members; "
                                    f"use a batch size that is a multiple of {n}")
            return None

        def stack(t):
            return t.repeat(n, *[1] * (t.dim() - 1))

        args = tuple(stack(a) if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == rows else a for a in args)
        kwargs = {k: stack(v) if (k not in _NOT_BATCHED and isinstance(v, torch.Tensor) and v.dim()
                                  and v.shape[0] == rows) else v for k, v in kwargs.items()}
        return args, kwargs

    def post(self, module, args, kwargs, output):
        logits = getattr(output, "logits", None)
        if module.training or self.per_member or logits is None:
            return output
        combined = mean_distribution(logits, self.members)
        output.logits = combined
        labels = kwargs.get("labels")
        if labels is not None and combined.dim() == 3:
            labels = labels[: combined.shape[0]]
            logp = torch.log_softmax(combined[:, :-1].float(), dim=-1)
            target = labels[:, 1:]
            keep = target != -100
            nll = -logp.gather(-1, target.clamp_min(0)[..., None]).squeeze(-1)
            output.loss = (nll * keep).sum() / keep.sum().clamp_min(1)
        return output


def mean_distribution(logits: torch.Tensor, members: int) -> torch.Tensor:
    """[N*B, ...] member logits -> [B, ...] log of the members' mean softmax probabilities."""
    per = torch.log_softmax(logits.float().reshape(members, -1, *logits.shape[1:]), dim=-1)
    if members == 1:
        return per[0].to(logits.dtype)
    if torch.is_grad_enabled() and logits.requires_grad:
        return (torch.logsumexp(per, dim=0) - math.log(members)).to(logits.dtype)
    # no autograd: the same logsumexp in place (the [N, B, T, vocab] block is the big allocation here)
    top = per.amax(dim=0)
    out = per.sub_(top).exp_().sum(dim=0).log_().add_(top).sub_(math.log(members))
    return out.to(logits.dtype)


@contextlib.contextmanager
def per_member(model: nn.Module):
    """Within the block the model returns each member's logits ([N*B, ...], member-major), not their mean."""
    axis = getattr(_base(model), "_attnswap_member_axis", None)
    if axis is None:
        yield model
        return
    axis.per_member = True
    try:
        yield model
    finally:
        axis.per_member = False


def extract_member(model: nn.Module, member: int) -> nn.Module:
    """Fold member `member` of the tuner into the backbone weights and remove the plan: a plain model (in place).
    Only a plan whose sole part is a tuner with members can be unloaded this way."""
    from ...arch import adapter_for
    from ...surgery import plan_of, revert

    base = _base(model)
    tuners = method_modules(base, "tuner")
    n = member_count(base)
    if not tuners or n < 2:
        raise AttnswapError("--member: this model has no members (convert it with a tuner that has them, e.g. "
                            "'attnswap list' shows a tuner with a 'members' option)")
    if not 0 <= member < n:
        raise AttnswapError(f"--member {member}: this model has members 0-{n - 1}")
    plan, _ = plan_of(base)
    if plan.get("attention") or plan.get("cache"):
        raise AttnswapError("--member: the plan also has attention methods or a cache policy, which a plain model "
                            "cannot hold; export the whole model instead")
    adapter = adapter_for(base.config)
    with torch.no_grad():
        for site in adapter.sites(base):
            if site.path in tuners:
                tuners[site.path].merge(adapter.projections(base, site), member)
    return revert(model)
