"""DEX: a differential operation on the value output of selected heads, reusing the pretrained scores.

Kong, Jang, Kwak, "Understanding Differential Transformer Unchains Pretrained Self-Attentions",
arXiv 2505.16333: keep the pretrained softmax scores A and O = A V; on selected heads subtract a learned
map of the head's own value output, with lambda annealed from 0 so the converted model starts as the original:

    D_h = O_h - lambda_h(t) f_h(O_h),   f_h(O) = O W_h,  W_h in R^{D x D} (initialised to the identity)
    O_h <- D_h * ||O_h|| / ||D_h||      (per token; keep_norm=true, the default)
    lambda_h(t) = ramp(t) * clamp(lambda_hat_h, 0, 0.9),  ramp = min(1, t / anneal_steps),  lambda_hat_h learned

Why this f: A V - lambda A (V W) = A (V - lambda V W): the difference of Diff attention moves from the scores
(two softmaxes) to the values, with the scores reused, so the head's effective value map I - lambda W can take
negative directions (the "negative attention" the paper finds behind Diff's gains) while the pretrained QK
circuit is untouched and no second softmax is computed; the cost is one D x D product per selected head and token.
Why the norm: Diff attention normalises each head's difference (RMSNorm, scaled by 1 - lambda_init) because
subtracting two attentions shrinks the output; here the difference keeps each token's original head-output
norm. That makes the map exact at W = I for every lambda (D = (1 - lambda) O, rescaled back to O), so the
conversion starts as the original and the ramp can run ahead of training without damage; and it makes f
nonlinear, where a bare linear O (I - lambda W) could be folded into the o-projection (it would be a block
update of W_o, nothing a LoRA on o could not learn). Without it (keep_norm=false) W = I is a common-mode
cancellation O (1 - lambda): measured on SmolLM2, ramping lambda to 0.5 over 3 steps lifted the perplexity
from 34.8 to 191 (docs/methods/dex.md).
ramp is a buffer saved with the model: 0 at conversion, advanced by `finetune` before every step through
`on_train_step`, 1 after `anneal_steps`; it scales how far a trained W can move the output.

Head selection (`heads` a fraction or count per layer): measured on calibration text before the swap
(`attnswap.analysis.head_scores`), chosen per layer, and stored in the options as {layer: [heads]} so a saved
model never measures again. `select=redundancy` adapts the heads whose outputs are most similar to the other
heads of their layer (the redundancy the differential is meant to break, and the heads whose loss costs the
least); `select=importance` adapts the heads whose masking raises the calibration loss least (the pretrained
circuit the model leans on most stays untouched); `select=all` adapts every head. Ties go to the lower index.
"""
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ...attention import exact_attention
from ...errors import AttnswapError
from .. import Options, Prepared
from . import register
from .base import AttentionMethod


class DexOptions(Options):
    heads: Literal["all"] | int | float | list[int] | dict[int, list[int]] = Field(
        "all", description="heads adapted per layer: all, a fraction (0.5) or count (3) chosen by `select` on "
                           "calibration text, a list of head indices, or {layer: [heads]}")
    select: Literal["redundancy", "importance", "all"] = Field(
        "redundancy", description="how a fraction/count of heads is chosen: redundancy, importance, or all heads")
    lambda_max: float = Field(0.5, gt=0, le=0.9, description="initial learned lambda, reached when the ramp ends")
    keep_norm: bool = Field(True, description="rescale each token's differential to the head's original norm")
    anneal_steps: int = Field(100, ge=1, description="finetune steps over which lambda rises linearly from 0")


@register
class Dex(AttentionMethod):
    name = "dex"
    softcap = True
    summary = "DEX: O - lambda * O W (norm kept) on selected heads, lambda annealed from 0; starts as the original"
    Options = DexOptions
    adds = "a D x D map and a lambda per adapted head; lambda annealed by finetune"

    @classmethod
    def _count(cls, heads, h: int) -> int | None:
        """Heads per layer asked for by a fraction or count (None when heads are given another way)."""
        if isinstance(heads, bool) or not isinstance(heads, (int, float)):
            return None
        if isinstance(heads, float):
            if not 0 < heads <= 1:
                raise AttnswapError(f"dex: a fraction of heads must be in (0, 1], got {heads}")
            return max(1, int(heads * h + 0.5))
        if not 1 <= heads <= h:
            raise AttnswapError(f"dex: a count of heads must be in 1..{h}, got {heads}")
        return heads

    @classmethod
    def prepare(cls, model, options, layers, calibration=None):
        from .analysis import head_scores
        from ...arch import adapter_for
        from ...surgery import base_model as _base

        config = _base(model).config
        h = adapter_for(config).geometry(config).num_heads
        if options.select == "all":
            if options.heads != "all":
                raise AttnswapError("dex: select=all adapts every head; leave heads unset or choose "
                                    "select=redundancy or select=importance")
            return Prepared(options)
        k = cls._count(options.heads, h)
        if k is None:
            return Prepared(options)
        if calibration is None:
            raise AttnswapError(f"dex: heads={options.heads} with select={options.select} measures the heads on "
                                "calibration text: pass --calibration FILE (API: calibration=attnswap.data."
                                "calibration(tokenizer, FILE))")
        scores = head_scores(model, calibration.ids, options.select, layers)
        # redundancy: most redundant first; importance: least loss increase first; ties: lower index first
        sign = -1.0 if options.select == "redundancy" else 1.0
        chosen = {layer: sorted(sorted(range(h), key=lambda i: (sign * float(s[i]), i))[:k])
                  for layer, s in scores.items()}
        record = {"select": options.select, "heads_per_layer": k, "calibration": calibration.describe(),
                  "scores": {str(layer): [round(float(v), 6) for v in s] for layer, s in scores.items()}}
        return Prepared(options.model_copy(update={"heads": chosen}), record)

    @classmethod
    def describe(cls, entry, prepared):
        heads = entry["options"]["heads"]
        lines = []
        if isinstance(heads, dict):
            ordered = sorted(heads.items(), key=lambda kv: int(kv[0]))
            lines.append("adapted heads (layer: heads): " + "; ".join(f"{k}: {v}" for k, v in ordered))
        else:
            lines.append(f"adapted heads: {heads} in layers {entry['layers']}")
        prep = prepared
        if prep:
            c = prep["calibration"]
            lines.append(f"chosen by {prep['select']} ({prep['heads_per_layer']} per layer) on {c['tokens']} tokens "
                         f"of {c['data']} ({c['windows']} windows of {c['seq_len']}, seed {c['seed']})")
        return lines

    def __init__(self, options, site, geometry, adapter):
        super().__init__(options, site, geometry, adapter)
        h, d = geometry.num_heads, geometry.head_dim
        if self._count(options.heads, h) is not None:
            raise AttnswapError(f"dex: heads={options.heads} must be resolved by attnswap.convert (calibration)")
        if options.heads == "all":
            heads = list(range(h))
        elif isinstance(options.heads, dict):
            heads = sorted(set(options.heads.get(site.index, [])))
        else:
            heads = sorted(set(options.heads))
        if heads and (heads[0] < 0 or heads[-1] >= h):
            raise AttnswapError(f"dex: heads must be indices in 0..{h - 1}, got {options.heads}")
        self.register_buffer("heads", torch.tensor(heads), persistent=False)
        self.weight = nn.Parameter(torch.eye(d).repeat(len(heads), 1, 1))  # [S, D, D]
        self.lam = nn.Parameter(torch.full((len(heads),), float(options.lambda_max)))
        self.register_buffer("ramp", torch.zeros(()))  # saved: a trained model keeps its lambda

    def on_train_step(self, step, total):
        self.ramp.fill_(min(1.0, step / self.options.anneal_steps))
        return {"lambda": float(self.effective_lambda().detach().mean())} if len(self.lam) else {}

    def forward(self, module, query, key, value, attention_mask, **kwargs):
        out, weights = exact_attention(module, query, key, value, attention_mask, **kwargs)  # [B, T, H, D]
        if not len(self.heads):
            return out, weights
        sel = out[:, :, self.heads].float()
        f = torch.einsum("bthd,hde->bthe", sel, self.weight.float())
        diff = sel - self.effective_lambda().view(1, 1, -1, 1) * f
        if self.options.keep_norm:
            diff = diff * (sel.norm(dim=-1, keepdim=True) / diff.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        return out.index_copy(2, self.heads, diff.to(out.dtype)), weights

    def effective_lambda(self) -> torch.Tensor:
        """[S] lambda of each adapted head now: the ramp times the learned lambda, kept in [0, 0.9]."""
        return self.ramp * self.lam.float().clamp(0.0, 0.9)

    def value_maps(self) -> torch.Tensor:
        """[S, D, D] the adapted heads' effective value maps I - lambda W (up to the positive norm rescale)."""
        eye = torch.eye(self.weight.shape[-1], device=self.weight.device)
        return eye - self.effective_lambda().view(-1, 1, 1) * self.weight.float()
