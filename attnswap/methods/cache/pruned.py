"""The pruned KV cache of one attention layer.

Stores keys/values [B, Hkv, N, D] with each entry's original position and a validity flag (entries are
padded per head when heads keep different numbers of tokens). transformers calls `update` with the new
keys/values (RoPE already applied at their true positions, so evicting never shifts a position); the
attention function then calls `attend` with this layer as an explicit argument: exact attention over the kept
entries (SDPA with a mask from positions and validity), or the layer's attention method over them (in position
order, with that mask). Then `after_attend`: every `interval` tokens it recomputes the attention rows the
policy needs (the queries since the last eviction against the kept keys), has the policy score every entry
per KV head and keeps the best (`budget` x tokens seen) or, with no budget, those scoring above 0.
"""
from __future__ import annotations

import math

import torch
from transformers.cache_utils import CacheLayerMixin

from ...attention import exact_attention


class PrunedLayer(CacheLayerMixin):
    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, policy):
        super().__init__()
        self.policy = policy
        self.seen = 0  # tokens processed (positions 0 .. seen - 1)
        self.evictions = 0
        self.pos = self.valid = None  # [B, Hkv, N] long / bool
        self.stats: dict[str, torch.Tensor] = {}  # scorer state aligned with entries on dim 2
        self.recent_q = self.recent_pos = None  # queries since the last eviction [B, H, R, D], [R]
        self.kept_trace: list[tuple[int, float]] = []  # (tokens seen, kept fraction) after each eviction
        self.peak_bytes = 0  # largest keys + values held, new tokens included (just before an eviction)

    def lazy_initialization(self, key_states, value_states):
        b, hk, _, d = key_states.shape
        self.device = key_states.device
        self.keys = key_states.new_zeros(b, hk, 0, d)
        self.values = value_states.new_zeros(b, hk, 0, value_states.shape[-1])
        self.pos = torch.zeros(b, hk, 0, dtype=torch.long, device=self.device)
        self.valid = torch.zeros(b, hk, 0, dtype=torch.bool, device=self.device)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, hk, n, _ = key_states.shape
        new_pos = torch.arange(self.seen, self.seen + n, device=self.device).expand(b, hk, n)
        self.keys = torch.cat([self.keys, key_states], dim=2)
        self.values = torch.cat([self.values, value_states], dim=2)
        self.pos = torch.cat([self.pos, new_pos], dim=2)
        self.valid = torch.cat([self.valid, torch.ones(b, hk, n, dtype=torch.bool, device=self.device)], dim=2)
        for k, t in self.stats.items():
            pad = t.new_zeros(*t.shape[:2], n, *t.shape[3:])
            self.stats[k] = torch.cat([t, pad], dim=2)
        self.peak_bytes = max(self.peak_bytes, self.keys.nbytes + self.values.nbytes)
        return self.keys, self.values

    def attend(self, module, query, key, value, attention_mask, method=None, scaling=None, **kwargs):
        """The layer's attention over the kept entries (called by the attention function after `update`):
        exact SDPA, or the layer's attention `method`, under a mask from the entries' positions and validity;
        then remember the queries and evict when an interval is complete."""
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        q_pos = torch.arange(self.seen, self.seen + query.shape[2], device=query.device)
        mask = self.allowed(q_pos, query.shape[1])
        kwargs.pop("is_causal", None)
        if method is None:
            out = exact_attention(module, query, key, value, mask, is_causal=False, scaling=scale, **kwargs)
        else:
            out = method(module, query, key, value, mask, scaling=scaling, **kwargs)
        self.after_attend(query.detach(), scale)
        return out[0], None

    def allowed(self, q_pos: torch.Tensor, heads: int) -> torch.Tensor:
        """[B, H, Tq, N] True where a query (positions q_pos) may attend an entry: kept and not in its future."""
        ok = self.valid[:, :, None, :] & (self.pos[:, :, None, :] <= q_pos.view(1, 1, -1, 1))
        return ok.repeat_interleave(heads // ok.shape[1], dim=1)

    def attention_rows(self, query: torch.Tensor, q_pos: torch.Tensor, scale: float) -> torch.Tensor:
        """Softmax rows of `query` [B, H, R, D] over the kept entries, averaged over each KV group: [B, Hkv, R, N]."""
        b, h, r, _ = query.shape
        hk = self.keys.shape[1]
        k = self.keys.float().repeat_interleave(h // hk, dim=1)
        logits = (query.float() @ k.transpose(-1, -2)) * scale
        logits = logits.masked_fill(~self.allowed(q_pos, h), -torch.inf)
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
        return probs.view(b, hk, h // hk, r, -1).mean(2)

    def after_attend(self, query: torch.Tensor, scale: float) -> None:
        """Remember the new queries; every `interval` tokens, score and evict."""
        n = query.shape[2]
        q_pos = torch.arange(self.seen, self.seen + n, device=query.device)
        policy = self.policy
        if policy.rows:
            keep_q = policy.options.interval + n
            self.recent_q = query if self.recent_q is None else torch.cat([self.recent_q, query], dim=2)[:, :, -keep_q:]
            self.recent_pos = q_pos if self.recent_pos is None else torch.cat([self.recent_pos, q_pos])[-keep_q:]
        before = self.seen
        self.seen += n
        interval = self.policy.options.interval
        if self.seen // interval > before // interval:
            self.evict(scale)

    @torch.no_grad()
    def evict(self, scale: float) -> None:
        policy, budget = self.policy, self.policy.options.budget
        rows = None
        if policy.rows:
            rows = self.attention_rows(self.recent_q, self.recent_pos, scale)
        score = policy.score(self, rows).float()  # [B, Hkv, N], higher = keep
        if budget is not None:
            k = min(self.keys.shape[2], max(1, math.ceil(budget * self.seen)))
            keep = torch.zeros_like(self.valid)
            top = score.masked_fill(~self.valid, -torch.inf).topk(k, dim=-1).indices
            keep.scatter_(-1, top, True)
            keep &= self.valid
        else:
            keep = self.valid & (score > 0)
        self._gather(keep)
        self.recent_q = self.recent_pos = None
        self.evictions += 1
        self.kept_trace.append((self.seen, float(self.valid.sum(-1).float().mean()) / self.seen))

    def _gather(self, keep: torch.Tensor) -> None:
        """Keep the flagged entries in position order, padding heads that keep fewer (invalid entries)."""
        n = int(keep.sum(-1).max())
        big = self.pos.max() + 1 if self.pos.numel() else 1
        order = torch.where(keep, self.pos, self.pos + big).argsort(dim=-1)[..., :n]  # kept first, by position

        def take(t):
            idx = order.view(*order.shape, *([1] * (t.dim() - 3))).expand(*order.shape, *t.shape[3:])
            return t.gather(2, idx)

        self.keys, self.values = take(self.keys), take(self.values)
        self.pos, self.valid = take(self.pos), take(keep)
        self.stats = {k: take(t) for k, t in self.stats.items()}

    def kept(self) -> int:
        """Entries kept, summed over batch and KV heads."""
        return int(self.valid.sum()) if self.valid is not None else 0

    def tensors(self):
        return [self.keys, self.values]

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        held = 0 if self.keys is None else self.keys.shape[2]
        return held + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.__init__(self.policy)
