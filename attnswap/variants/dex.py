"""DEX: a differential operation on the value output of selected heads, reusing the pretrained scores.

Kong, Jang, Kwak, "Understanding Differential Transformer Unchains Pretrained Self-Attentions",
arXiv 2505.16333: keep the pretrained softmax scores A and O = A V; on selected heads subtract a learned
map of the head's own value output, with lambda annealed from 0 so the converted model starts as the original:

    O_h <- O_h - lambda_h(t) f_h(O_h),    f_h(O) = O W_h,  W_h in R^{D x D} (initialised to the identity)
    lambda_h(t) = ramp(t) * lambda_hat_h,  ramp = min(1, t / anneal_steps),  lambda_hat_h learned (init lambda_max)

Why this f: A V - lambda A (V W) = A (V - lambda V W): the difference of Diff attention moves from the scores
(two softmaxes) to the values, with the scores reused, so the head's effective value map can take negative
directions (the "negative attention" the paper finds behind Diff's gains) while the pretrained QK circuit is
untouched and no second softmax is computed; the cost is one D x D product per selected head and token.
W = I makes the first differential a common-mode cancellation, O (1 - lambda), which training then reshapes.
ramp is a buffer saved with the model: 0 at conversion (exact original), advanced by `finetune` before every
step through `on_train_step`, 1 after `anneal_steps`.

Head selection here: `heads` = "all" or an explicit list of head indices per layer (the measured selection by
redundancy or importance on calibration text is not implemented yet).
"""
from typing import Literal

import torch
from pydantic import Field
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..errors import AttnswapError
from .base import Variant, VariantOptions
from .registry import register


class DexOptions(VariantOptions):
    heads: Literal["all"] | list[int] = Field("all", description="heads adapted in every layer: all, or a list")
    lambda_max: float = Field(0.5, gt=0, le=1, description="initial learned lambda, reached when the ramp ends")
    anneal_steps: int = Field(100, ge=1, description="finetune steps over which lambda rises linearly from 0")


@register
class Dex(Variant):
    name = "dex"
    summary = "DEX: O - lambda * O W on selected heads, lambda annealed from 0 (starts as the original)"
    Options = DexOptions
    adds = "a D x D map and a lambda per adapted head; lambda annealed by finetune"

    def __init__(self, options, site, geometry, adapter):
        super().__init__(options, site, geometry, adapter)
        h, d = geometry.num_heads, geometry.head_dim
        heads = list(range(h)) if options.heads == "all" else sorted(set(options.heads))
        if not heads or heads[0] < 0 or heads[-1] >= h:
            raise AttnswapError(f"dex: heads must be indices in 0..{h - 1}, got {options.heads}")
        self.register_buffer("heads", torch.tensor(heads), persistent=False)
        self.weight = nn.Parameter(torch.eye(d).repeat(len(heads), 1, 1))  # [S, D, D]
        self.lam = nn.Parameter(torch.full((len(heads),), float(options.lambda_max)))
        self.register_buffer("ramp", torch.zeros(()))  # saved: a trained model keeps its lambda

    def on_train_step(self, step, total):
        self.ramp.fill_(min(1.0, step / self.options.anneal_steps))
        return {"lambda": float(self.ramp * self.lam.detach().mean())}

    def forward(self, module, query, key, value, attention_mask, **kwargs):
        out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)  # [B, T, H, D]
        sel = out[:, :, self.heads].float()
        f = torch.einsum("bthd,hde->bthe", sel, self.weight.float())
        lam = (self.ramp * self.lam.float()).view(1, 1, -1, 1)
        return out.index_copy(2, self.heads, (sel - lam * f).to(out.dtype)), weights
