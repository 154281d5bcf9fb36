"""Linear attention with learned feature maps, optionally hybrid with an exact window and sinks.

Sources: Katharopoulos et al., "Transformers are RNNs" (ICML 2020, https://arxiv.org/abs/2006.16236),
phi = elu + 1; Zhang et al., "The Hedgehog & the Porcupine" (ICLR 2024, https://arxiv.org/abs/2402.04347),
phi(x) = [softmax(x W), softmax(-x W)] per head; Zhang et al., "LoLCATs" (ICLR 2025,
https://arxiv.org/abs/2410.10254), softmax over the last w tokens + linear attention over older ones
under one normaliser with a learned per-head mixing factor; Xiao et al., StreamingLLM, sink tokens.

For query i (causal), with exact set E(i) = {i - w < j <= i} U {j < s} and linear set L(i) = the
other j <= i:

    a_i = sum_{E(i)} exp(q_i.k_j * scale - m_i) v_j      c_i = sum_{E(i)} exp(q_i.k_j * scale - m_i)
    b_i = sum_{L(i)} (phi(q_i).phi(k_j)) v_j              d_i = sum_{L(i)} phi(q_i).phi(k_j)
    o_i = (g a_i + (1 - g) b_i) / (g c_i + (1 - g) d_i),  g = sigmoid(mix) per head

and with w = s = 0, o_i = b_i / d_i. q, k arrive after RoPE (Llama family), so feature maps see rotated
vectors. Shapes: query [B, H, T, D], key/value [B, Hk, T, D], output [B, T, H, D].
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.nn import functional as F
from transformers.cache_utils import CacheLayerMixin

from attnswap_kernels.linear_attn import causal_linear_attn
from attnswap_kernels.window_attn import window_softmax_terms

from ...errors import AttnswapError
from .. import Options
from . import register
from .base import AttentionMethod, key_padding_keep

EPS = 1e-6


class LinearOptions(Options):
    feature_map: Literal["elu", "hedgehog", "relu", "identity"] = Field(
        "hedgehog", description="phi: elu (elu+1), hedgehog (learned [softmax(xW), softmax(-xW)]), relu, identity")
    window: int = Field(64, ge=0, description="exact softmax over the last w tokens (0: pure linear attention)")
    sinks: int = Field(4, ge=0, description="first tokens kept exact for every query (attention sinks)")
    feature_dim: int | None = Field(None, ge=1, description="hedgehog projection size F (phi has 2F dims); default head_dim")
    tie_qk: bool = Field(False, description="one feature map per KV head shared by queries and keys")
    mix_init: float = Field(0.9, gt=0, lt=1, description="initial weight g of the exact (window) terms")
    chunk: int = Field(64, ge=16, description="chunk length of the causal linear-attention kernel (power of 2)")

    @model_validator(mode="after")
    def _chunk_pow2(self):
        if self.chunk & (self.chunk - 1):
            raise ValueError("chunk must be a power of 2")
        return self


class FeatureMap(nn.Module):
    """phi per head: x [B, H, T, D] -> [B, H, T, F']."""

    def __init__(self, kind: str, heads: int, head_dim: int, feature_dim: int | None):
        super().__init__()
        self.kind = kind
        if kind == "hedgehog":
            f = feature_dim or head_dim
            # near identity: softmax(x W) starts as a softmax over the input's own coordinates
            w = torch.eye(head_dim, f).repeat(heads, 1, 1) + 0.01 * torch.randn(heads, head_dim, f)
            self.weight = nn.Parameter(w)  # [H, D, F]

    def forward(self, x):
        if self.kind == "elu":
            return F.elu(x) + 1
        if self.kind == "relu":
            return F.relu(x)
        if self.kind == "identity":
            return x
        z = torch.matmul(x, self.weight.to(x.dtype))  # [B, H, T, D] @ [H, D, F] -> [B, H, T, F]
        return torch.cat([torch.softmax(z, -1), torch.softmax(-z, -1)], dim=-1)


@register
class LinearAttention(AttentionMethod):
    name = "linear"
    uses_mask = False
    summary = "linear attention with learned feature maps, hybrid with an exact window + sinks (Hedgehog, LoLCATs)"
    Options = LinearOptions
    prunable = False  # decodes from a constant-size state of its own (LinearStateLayer)
    adds = "feature maps (hedgehog) and per-head mix factors; trained by 'attnswap distill' then finetune"

    @classmethod
    def check_supported(cls, adapter, options=None):
        super().check_supported(adapter, options)
        if options is not None and not adapter.causal and options.window > 0:
            raise AttnswapError(f"{cls.name}: window > 0 is implemented for causal models only; use --set window=0 "
                                f"on {adapter.name} (bidirectional) models")

    def __init__(self, options, site, geometry, adapter):
        super().__init__(options, site, geometry, adapter)
        phi_q, phi_k = self.feature_maps(options, site, geometry)
        self.phi_k = phi_k
        self.phi_q = phi_q
        self.hybrid = options.window > 0 or options.sinks > 0
        if self.hybrid:
            g = options.mix_init
            self.mix = nn.Parameter(torch.full((geometry.num_heads,), float(torch.logit(torch.tensor(g)))))

    def feature_maps(self, options, site, geometry) -> tuple[nn.Module, nn.Module]:
        """(phi_q, phi_k) of this layer: [B, H, T, D] -> [B, H, T, F] each (a subclass brings its own maps)."""
        h, hk, d = geometry.num_heads, geometry.num_kv_heads, geometry.head_dim
        phi_k = FeatureMap(options.feature_map, hk, d, options.feature_dim)
        return (phi_k if options.tie_qk else FeatureMap(options.feature_map, h, d, options.feature_dim)), phi_k

    def _phi_q(self, query):
        if self.options.tie_qk and self.geometry.kv_groups > 1:
            b, h, t, d = query.shape
            hk = self.geometry.num_kv_heads
            # query head h = kv * G + r uses the map of KV head kv: rows (r, t) stacked per KV head
            grouped = query.reshape(b, hk, h // hk * t, d)
            return self.phi_k(grouped).reshape(b, h, t, -1)
        return self.phi_q(query)

    def forward(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        # with the linear-state cache, the attention function calls `LinearStateLayer.attend` instead
        if query.shape[2] != key.shape[2]:
            raise AttnswapError(f"{self.name}: decoding needs the linear-state cache (attnswap.generation.make_cache); "
                                "a plain KV cache holds no feature-map state")
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = self.attend(query, key, value, scale, key_padding_keep(attention_mask))  # [B, H, T, D]
        return out.transpose(1, 2).to(query.dtype), None

    def make_cache_layer(self):
        return LinearStateLayer(self)

    def merge(self, h, a, c, num, den):
        """The shared normaliser: o = (g a + (1 - g) b) / (g c + (1 - g) d), or b / d without exact terms."""
        if not self.hybrid:
            return num / (den[..., None] + EPS)
        g = torch.sigmoid(self.mix).view(1, h, 1)
        return (g[..., None] * a + (1 - g[..., None]) * num) / (g * c + (1 - g) * den + EPS)[..., None]

    def attend(self, query, key, value, scale, key_keep=None):
        """Parallel form. key_keep [B, T] (False = padding) removes padded keys from every term."""
        o = self.options
        b, h, t, d = query.shape
        fq, fk = self._phi_q(query), self.phi_k(key)
        if key_keep is not None:
            fk = fk * key_keep[:, None, :, None].to(fk.dtype)
        ones = torch.ones(*value.shape[:-1], 1, dtype=value.dtype, device=value.device)
        v_ext = torch.cat([value, ones], dim=-1)  # [B, Hk, T, Dv + 1]: the last column sums the normaliser
        if o.sinks:
            keep = (torch.arange(t, device=key.device) >= o.sinks).to(fk.dtype)
            fk = fk * keep[:, None]
        if not self.causal:
            lin = self._bidirectional(fq, fk, v_ext)
        elif o.window == 0:
            lin = causal_linear_attn(fq, fk, v_ext, o.chunk)
        else:
            # L(i) = {j <= i - w}: causal linear attention of the query at i over keys shifted by w
            w = min(o.window, t)
            shifted = causal_linear_attn(fq[:, :, w:], fk[:, :, : t - w], v_ext[:, :, : t - w], o.chunk)
            lin = F.pad(shifted.float(), (0, 0, w, 0))  # the first w queries have no linear part
        num, den = lin[..., :d].float(), lin[..., d].float()
        if not self.hybrid:
            return self.merge(h, None, None, num, den)
        if self.causal:
            a, c, _ = window_softmax_terms(query, key, value, o.window, o.sinks, scale)
        else:
            a, c = _sink_terms(query, key, value, o.sinks, scale, key_keep)
        return self.merge(h, a, c, num, den)

    def _bidirectional(self, fq, fk, v_ext):
        hk = fk.shape[1]
        b, h, t, f = fq.shape
        state = torch.einsum("bhtf,bhtv->bhfv", fk.float(), v_ext.float())  # [B, Hk, F, V + 1]
        return torch.einsum("bhgtf,bhfv->bhgtv", fq.float().view(b, hk, h // hk, t, f), state).reshape(b, h, t, -1)


def _sink_terms(query, key, value, sinks, scale, key_keep=None):
    """Bidirectional exact terms: every query sees the first `sinks` keys. -> a [B, H, T, Dv], c [B, H, T]."""
    b, h, t, d = query.shape
    hk = key.shape[1]
    qg = query.float().view(b, hk, h // hk, t, d)
    s = torch.einsum("bhgid,bhjd->bhgij", qg, key[:, :, :sinks].float()) * scale
    if key_keep is not None:
        s = s.masked_fill(~key_keep[:, None, None, None, :sinks], torch.finfo(torch.float32).min)
    m = s.amax(-1)
    p = torch.exp(s - m.unsqueeze(-1))
    if key_keep is not None:
        p = p * key_keep[:, None, None, None, :sinks]
    a = torch.einsum("bhgij,bhjd->bhgid", p, value[:, :, :sinks].float())
    return a.reshape(b, h, t, -1), p.sum(-1).reshape(b, h, t)


class LinearStateLayer(CacheLayerMixin):
    """Decoding cache of one `linear` layer: constant size, whatever the length.

    Holds the first `sinks` keys/values, the last `window` other keys/values, and the linear state of
    every older token, S = sum phi(k_j) [v_j, 1]^T  [B, Hk, F, D + 1] (float32). transformers calls
    `update` with the new keys/values; the attention function then calls `attend`, which computes the new
    queries' outputs from these pieces and folds the tokens that leave the window into S.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, method: LinearAttention):
        super().__init__()
        self.method = method
        self.seen = 0  # tokens processed so far (positions 0 .. seen - 1)
        self.sink_k = self.sink_v = self.win_k = self.win_v = self.state = None

    def lazy_initialization(self, key_states, value_states):
        b, hk, _, d = key_states.shape
        self.device = key_states.device
        empty = key_states.new_zeros(b, hk, 0, d)
        self.sink_k, self.sink_v, self.win_k, self.win_v = empty, empty.clone(), empty.clone(), empty.clone()
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.new_k, self.new_v = key_states, value_states
        keys = torch.cat([self.sink_k, self.win_k, key_states], dim=2)
        values = torch.cat([self.sink_v, self.win_v, value_states], dim=2)
        return keys, values

    def attend(self, module, query, key, value, attention_mask, method: LinearAttention, scaling=None, **kwargs):
        """Outputs of the new queries (positions seen .. seen + n - 1), then advance the state. Called by the
        attention function with this layer and the layer's method as explicit arguments."""
        o = method.options
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        n = query.shape[2]
        if self.seen == 0:
            out = method.attend(query, self.new_k, self.new_v, scale)  # prefill: the parallel form
        else:
            out = self._attend_recurrent(method, query, key, value, scale)
        self._advance(method, o.sinks, o.window)
        self.seen += n
        return out.transpose(1, 2).to(query.dtype), None

    def _positions(self, n):
        dev = self.new_k.device
        ns, nw = self.sink_k.shape[2], self.win_k.shape[2]
        sink_pos = torch.arange(ns, device=dev)
        win_pos = torch.arange(self.seen - nw, self.seen, device=dev)
        new_pos = torch.arange(self.seen, self.seen + n, device=dev)
        return torch.cat([sink_pos, win_pos, new_pos]), new_pos

    def _attend_recurrent(self, method, query, key, value, scale):
        o = method.options
        b, h, n, d = query.shape
        hk = key.shape[1]
        g = h // hk
        pos_k, pos_q = self._positions(n)
        qi, kj = pos_q[:, None], pos_k[None, :]
        causal = kj <= qi
        exact = causal & (((qi - kj) < o.window) | (kj < o.sinks))
        linear = causal & ~exact
        qg = query.float().view(b, hk, g, n, d)
        fq = method._phi_q(query).float().view(b, hk, g, n, -1)
        fk = method.phi_k(key).float()  # [B, Hk, R + n, F]
        v_ext = torch.cat([value.float(), torch.ones_like(value[..., :1], dtype=torch.float32)], dim=-1)
        kern = torch.einsum("bhgqf,bhkf->bhgqk", fq, fk) * linear
        lin = kern @ v_ext[:, :, None]  # [B, Hk, G, n, D + 1]
        if self.state is not None:
            lin = lin + torch.einsum("bhgqf,bhfv->bhgqv", fq, self.state)
        lin = lin.reshape(b, h, n, d + 1)
        num, den = lin[..., :d], lin[..., d]
        if not method.hybrid:
            return method.merge(h, None, None, num, den)
        scores = torch.einsum("bhgqd,bhkd->bhgqk", qg, key.float()) * scale
        scores = scores.masked_fill(~exact, torch.finfo(torch.float32).min)
        p = torch.exp(scores - scores.amax(-1, keepdim=True)) * exact
        a = (p @ value.float()[:, :, None]).reshape(b, h, n, d)
        c = p.sum(-1).reshape(b, h, n)
        return method.merge(h, a, c, num, den)

    @torch.no_grad()
    def _advance(self, method, sinks, window):
        """New tokens join the sinks (while fewer than `sinks` were seen) or the window; the overflow of the
        window is folded into the linear state."""
        new_k, new_v = self.new_k, self.new_v
        take = max(0, min(sinks - self.seen, new_k.shape[2]))
        if take:
            self.sink_k = torch.cat([self.sink_k, new_k[:, :, :take]], dim=2)
            self.sink_v = torch.cat([self.sink_v, new_v[:, :, :take]], dim=2)
            new_k, new_v = new_k[:, :, take:], new_v[:, :, take:]
        win_k = torch.cat([self.win_k, new_k], dim=2)
        win_v = torch.cat([self.win_v, new_v], dim=2)
        spill = win_k.shape[2] - window
        if spill > 0:
            fk = method.phi_k(win_k[:, :, :spill]).float()
            v_ext = torch.cat([win_v[:, :, :spill].float(), torch.ones_like(win_v[:, :, :spill, :1], dtype=torch.float32)], -1)
            add = torch.einsum("bhtf,bhtv->bhfv", fk, v_ext)
            self.state = add if self.state is None else self.state + add
            win_k, win_v = win_k[:, :, spill:], win_v[:, :, spill:]
        self.win_k, self.win_v = win_k, win_v
        del self.new_k, self.new_v

    def tensors(self):
        return [self.sink_k, self.sink_v, self.win_k, self.win_v, self.state]

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # `attend` builds no mask from transformers' (it knows its pieces' positions); the mask transformers
        # builds from the first layer's sizes is then the right one for layers of a hybrid plan that keep a
        # full KV cache: as long as every token seen
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.seen = 0
        self.sink_k = self.sink_v = self.win_k = self.win_v = self.state = None
        self.is_initialized = False
