"""LLN: Linear Log-Normal attention, temperatures moment-matched to the softmax on calibration text.

Source: Nahshan, Kampeas and Haleva, "Linear Log-Normal Attention with Unbiased Concentration" (ICLR 2024,
https://arxiv.org/abs/2311.13541; authors' code HuaweiSClab/LLN). The similarity of a query and a key is
phi_q(q) . phi_k(k) with phi_q(q) = exp(alpha q), phi_k(k) = exp(beta k) element-wise, so the attention
weights are sums of log-normal variables, like the softmax's. The paper matches the two distributions'
moments: with sigma_sm^2 the variance of the softmax's logits (q.k x scale), the LLN weights have the same
log-variance when alpha sigma_q = beta sigma_k = sigma~ with

    sigma~^2 = (sigma_sm^2 - b) / (2 a),    a = 0.14855178144710912, b = -0.35487039130661086

(the authors' fitted constants). The paper trains from scratch and recomputes sigma_q, sigma_k on every batch;
a converted causal model needs fixed values (decoding folds phi_k(k) into a state), so `prepare` measures
sigma_sm^2 (per query head, over causal pairs), sigma_q (per query head) and sigma_k (per KV head) on the
calibration text, on q and k as the attention receives them (after RoPE), and stores the resulting alpha,
beta and the centres of q and k in the plan. phi_q(q) = exp(alpha (q - centre_q)) (and phi_k likewise), the
exponent clamped at 30: constant shifts per head keep the weights' ratios (a shift per query would not, once
the exact window terms are mixed in), and the clamp keeps float32 finite. log alpha and log beta start at the
moment-matched values and are trained by `distill` / `finetune` (`train_temperature: false` keeps them).

Everything else is `linear`'s: the exact window + sinks mixed under one normaliser (LoLCATs; the paper's own
"LLN + Diag" adds a block-diagonal softmax for the same reason), the causal linear-attention kernel, and the
constant-size decoding state (`LinearStateLayer`).
"""
from __future__ import annotations

import torch
from pydantic import Field, model_validator
from torch import nn

from ...errors import AttnswapError
from .. import Options, Prepared, calibration_lines, require_calibration
from . import register
from .analysis import recorded_qk
from .linear import LinearAttention

# the authors' fit of the softmax logits' variance against the log-normal variance (see the docstring)
FIT_A, FIT_B = 0.14855178144710912, -0.35487039130661086
MAX_EXPONENT = 30.0


class LLNOptions(Options):
    window: int = Field(64, ge=0, description="exact softmax over the last w tokens (0: pure LLN attention)")
    sinks: int = Field(4, ge=0, description="first tokens kept exact for every query (attention sinks)")
    mix_init: float = Field(0.9, gt=0, lt=1, description="initial weight g of the exact (window) terms (0.9 "
                                                         "measured better untrained than 0.5 on SmolLM2, equal after "
                                                         "distillation: docs/methods/lln.md)")
    chunk: int = Field(64, ge=16, description="chunk length of the causal linear-attention kernel (power of 2)")
    train_temperature: bool = Field(True, description="alpha and beta train with distill / finetune (false: kept "
                                                      "at the moment-matched values)")
    temperature_scale: float = Field(1.0, gt=0, description="multiplies the moment-matched alpha and beta (the "
                                                            "paper's temperature: > 1 concentrates the attention)")
    calibration: dict[int, dict[str, list[float]]] | None = Field(
        None, description="set by convert from --calibration text: per layer alpha [heads], beta [KV heads], the "
                          "centres of q and k and the queries' offset (the kernel on the softmax's scale); not given "
                          "by hand")

    @model_validator(mode="after")
    def _chunk_pow2(self):
        if self.chunk & (self.chunk - 1):
            raise ValueError("chunk must be a power of 2")
        return self


class LogNormalMap(nn.Module):
    """phi(x) = exp(min(t (x - c) - o, 30)) per head: x [B, H, T, D] -> [B, H, T, D]; t = exp(log_t) [H], the
    centre c and the offset o fixed."""

    def __init__(self, temperature: list[float], centre: list[float], trainable: bool, offset: list[float] | None = None):
        super().__init__()
        log_t = torch.tensor(temperature, dtype=torch.float32).log()
        if trainable:
            self.log_t = nn.Parameter(log_t)
        else:
            self.register_buffer("log_t", log_t)
        self.register_buffer("centre", torch.tensor(centre, dtype=torch.float32))
        self.register_buffer("offset", torch.tensor(offset if offset is not None else [0.0] * len(centre)))

    def forward(self, x):
        t = self.log_t.exp().view(1, -1, 1, 1)
        z = t * (x.float() - self.centre.view(1, -1, 1, 1)) - self.offset.view(1, -1, 1, 1)
        return torch.exp(z.clamp(max=MAX_EXPONENT))


@register
class LLNAttention(LinearAttention):
    name = "lln"
    summary = "Linear Log-Normal attention: exp feature maps, temperatures moment-matched to the softmax (LLN)"
    Options = LLNOptions
    adds = "per-head temperatures alpha, beta (moment-matched at conversion) and mix factors; trained by distill"

    @classmethod
    def prepare(cls, model, options, layers, calibration=None):
        if options.calibration is not None:
            return Prepared(options)
        require_calibration(calibration, "lln measures its temperatures")
        stats = measure(model, calibration.ids, layers)
        resolved = {}
        for layer, s in stats.items():
            tilde = ((s["score_var"] - FIT_B) / (2 * FIT_A)).sqrt()  # [H]
            alpha = tilde / s["q_std"]
            groups = len(alpha) // len(s["k_std"])
            beta = tilde.view(-1, groups).mean(1) / s["k_std"]
            scale = options.temperature_scale
            resolved[layer] = {"alpha": _floats(alpha * scale), "beta": _floats(beta * scale),
                               "q_centre": _floats(s["q_mean"]), "k_centre": _floats(s["k_mean"])}
        for layer, o in offsets(model, calibration.ids, resolved, options.window, options.sinks).items():
            resolved[layer]["q_offset"] = _floats(o)
        record = {"calibration": calibration.describe(),
                  "score_var": {str(layer): _floats(s["score_var"]) for layer, s in stats.items()}}
        return Prepared(options.model_copy(update={"calibration": resolved}), record)

    @classmethod
    def describe(cls, entry, prepared):
        cal = entry["options"].get("calibration") or {}
        if not cal:
            return []
        alphas = [a for v in cal.values() for a in v["alpha"]]
        lines = [f"moment-matched alpha {min(alphas):.3g}..{max(alphas):.3g} over {len(cal)} layers"]
        return lines + calibration_lines(prepared)

    @classmethod
    def reference_parameters(cls, geometry, adapter) -> int:
        """Per layer: alpha per head and beta per KV head (when trained), a mix factor per head (window > 0)."""
        o = cls.Options()
        h, hk = geometry.num_heads, geometry.num_kv_heads
        return (h + hk) * o.train_temperature + h * (o.window > 0 or o.sinks > 0)

    def feature_maps(self, options, site, geometry):
        cal = (options.calibration or {}).get(site.index)
        if cal is None:
            raise AttnswapError(f"lln: layer {site.index} has no calibrated temperatures; convert with --calibration")
        h, hk = geometry.num_heads, geometry.num_kv_heads
        if len(cal["alpha"]) != h or len(cal["beta"]) != hk:
            raise AttnswapError(f"lln: the stored temperatures of layer {site.index} are for {len(cal['alpha'])} "
                                f"heads, this model has {h}")
        return (LogNormalMap(cal["alpha"], cal["q_centre"], options.train_temperature, cal.get("q_offset")),
                LogNormalMap(cal["beta"], cal["k_centre"], options.train_temperature))

    def _phi_q(self, query):
        return self.phi_q(query)


def _floats(t: torch.Tensor) -> list[float]:
    return [round(float(x), 6) for x in t]


@torch.no_grad()
def measure(model, ids: torch.Tensor, layers) -> dict[int, dict[str, torch.Tensor]]:
    """Per layer, on `ids` [N, T]: score_var [H] (variance of q.k x scale over the pairs the model attends: j <= i
    in a causal one), q_mean / q_std [H] (over tokens and dimensions), k_mean / k_std [KV heads]."""
    sums: dict[int, dict[str, torch.Tensor]] = {}
    for _, layer, q, k, scale, causal in recorded_qk(model, ids, layers):
        h, t, _ = q.shape
        s = torch.einsum("htd,hsd->hts", q, k.repeat_interleave(h // k.shape[0], 0)) * scale
        pairs = torch.ones(t, t, dtype=torch.bool, device=s.device)
        s = s[:, pairs.tril() if causal else pairs]  # [H, pairs]
        acc = sums.setdefault(layer, {})
        for name, x in (("s", s), ("q", q.reshape(h, -1)), ("k", k.reshape(k.shape[0], -1))):
            acc[name + "1"] = acc.get(name + "1", 0) + x.sum(1).double()
            acc[name + "2"] = acc.get(name + "2", 0) + x.pow(2).sum(1).double()
            acc[name + "n"] = acc.get(name + "n", 0) + x.shape[1]
    out = {}
    for layer, a in sorted(sums.items()):
        stat = {}
        for name in ("s", "q", "k"):
            mean = a[name + "1"] / a[name + "n"]
            var = (a[name + "2"] / a[name + "n"] - mean.pow(2)).clamp_min(1e-12)
            stat[name] = (mean.float(), var.float())
        out[layer] = {"score_var": stat["s"][1], "q_mean": stat["q"][0], "q_std": stat["q"][1].sqrt(),
                      "k_mean": stat["k"][0], "k_std": stat["k"][1].sqrt()}
    return out


@torch.no_grad()
def offsets(model, ids: torch.Tensor, resolved: dict, window: int, sinks: int) -> dict[int, torch.Tensor]:
    """Per layer [H]: the mean over queries of log(sum over the query's linear keys of phi_q . phi_k) minus
    log(sum over the same keys of exp(q.k x scale - m)), m the maximum over its exact keys (window + sinks): what
    the attention's exact terms are measured in (`window_softmax_terms`). Subtracted from the queries' exponent, it
    puts the kernel on the softmax's scale, so a mix of 0.5 would weigh the two parts as the original's one softmax
    does."""
    if window == 0 and sinks == 0:
        return {}  # no exact terms: the kernel's scale cancels in its own normaliser
    sums: dict[int, torch.Tensor] = {}
    for _, layer, q, k, scale, causal in recorded_qk(model, ids, resolved):
        cal = resolved[layer]
        h, t, _ = q.shape
        g = h // k.shape[0]
        kk = k.repeat_interleave(g, 0)
        s = torch.einsum("htd,hsd->hts", q, kk).double() * scale
        i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
        seen = j <= i if causal else torch.ones(t, t, dtype=torch.bool)
        exact = seen & ((((i - j) < window) & ((i - j) >= 0)) | (j < sinks))
        linear = seen & ~exact
        rows = linear.any(1)
        if not rows.any():
            continue
        m = s.masked_fill(~exact, float("-inf")).amax(-1, keepdim=True)
        soft = torch.exp(s - m).masked_fill(~linear, 0).sum(-1)  # [H, T]
        # the maps the layer will run (without the offset being measured), their products summed in float64
        fq = LogNormalMap(cal["alpha"], cal["q_centre"], False)(q[None])[0].double()
        fk = LogNormalMap(cal["beta"], cal["k_centre"], False)(k[None])[0].double().repeat_interleave(g, 0)
        kern = (fq @ fk.transpose(1, 2)).masked_fill(~linear, 0).sum(-1)
        diff = (kern[:, rows].log() - soft[:, rows].log()).mean(1)  # [H]
        sums[layer] = sums.get(layer, 0) + diff
    n = len(ids)
    return {layer: (v / n).float() for layer, v in sums.items()}
