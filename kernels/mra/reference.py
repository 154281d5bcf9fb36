"""MRA attention (multi-resolution approximation), PyTorch reference: the specification of the Triton kernel.

Zeng et al., "Multi Resolution Analysis (MRA) for Approximate Self-Attention", ICML 2022,
https://arxiv.org/abs/2207.10284 (mlpen/mra-attention; transformers `models/mra`). Keys and queries are cut
into blocks of `bs` tokens. Every block pair (I, J) gets a low-resolution score from block means; the
top-scoring pairs are computed exactly, the rest are approximated from block means, and both parts share one
softmax normaliser (a log-sum-exp merge). For query i in block I:

    exact keys    j in J for every selected (I, J):        logit q_i.k_j * scale,               value v_j
    virtual keys  one per allowed, non-selected (I, J):     logit q_i.kbar_J * scale + log n_J,  value vbar_J
    o_i = softmax over the union of both sets (approx_mode "sparse": the exact keys only)

kbar_J, vbar_J are the means of the n_J valid keys/values of block J, so a virtual key stands for the n_J keys
it replaces as if each scored q_i.kbar_J. The original MRA scores virtual keys with the query block mean
qbar_I; here each query row uses its own q_i (same cost order, T x T/bs products, and a closer
approximation); qbar_I is used only to *select* blocks, so a query block shares one block list.

Causal models use the block-causal form: allowed pairs are J <= I, the diagonal block is always exact and
masked inside (j <= i), and no block above the diagonal is selected or approximated. Bidirectional models
allow every pair. Keys that are padding (key_valid False, or the rows added to reach a multiple of bs) are in
no block's mean and masked in exact blocks. A block selection covering every allowed pair is exact attention.

Shapes: q [B, H, Tq, D] for the last Tq of Tk positions (Tq = Tk for a full forward, Tq < Tk while decoding
with a cache), k [B, Hk, Tk, D], v [B, Hk, Tk, Dv], H a multiple of Hk (grouped-query attention).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F


@dataclass(frozen=True)
class Layout:
    """Where queries and keys sit in the block grid. Queries are padded in front to start on a block."""

    bs: int
    tq: int
    tk: int

    @property
    def q_offset(self) -> int:  # absolute position of the first query
        return self.tk - self.tq

    @property
    def i0(self) -> int:  # absolute index of the first query block
        return self.q_offset // self.bs

    @property
    def front(self) -> int:  # padded rows before the first query
        return self.q_offset % self.bs

    @property
    def nbq(self) -> int:
        return -(-(self.front + self.tq) // self.bs)

    @property
    def nbk(self) -> int:
        return -(-self.tk // self.bs)

    def pad_queries(self, q: torch.Tensor) -> torch.Tensor:
        return F.pad(q, (0, 0, self.front, self.nbq * self.bs - self.front - self.tq))

    def unpad_queries(self, o: torch.Tensor) -> torch.Tensor:
        return o[:, :, self.front:self.front + self.tq]

    def pad_keys(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (0, 0, 0, self.nbk * self.bs - self.tk))

    def key_valid(self, key_valid: torch.Tensor | None, batch: int, device) -> torch.Tensor:
        """[B, nbk * bs] bool: real, non-padding keys."""
        if key_valid is None:
            key_valid = torch.ones(batch, self.tk, dtype=torch.bool, device=device)
        return F.pad(key_valid.bool(), (0, self.nbk * self.bs - self.tk), value=False)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def block_stats(kp: torch.Tensor, vp: torch.Tensor, kvalid: torch.Tensor, bs: int):
    """Block means of the valid keys/values (differentiable) and log counts (-inf for an empty block).

    kp [B, Hk, N, D], vp [B, Hk, N, Dv], kvalid [B, N] -> kbar [B, Hk, nbk, D], vbar [B, Hk, nbk, Dv], logn [B, nbk].
    """
    b, hk, n, d = kp.shape
    dt = _compute_dtype(kp)
    w = kvalid.view(b, 1, n // bs, bs, 1).to(dt)
    cnt = w.sum(-2)  # [B, 1, nbk, 1]
    kbar = (kp.to(dt).view(b, hk, n // bs, bs, d) * w).sum(-2) / cnt.clamp(min=1)
    vbar = (vp.to(dt).view(b, hk, n // bs, bs, -1) * w).sum(-2) / cnt.clamp(min=1)
    logn = torch.log(cnt[:, 0, :, 0])  # log 0 = -inf
    return kbar, vbar, logn


def allowed_blocks(logn: torch.Tensor, lay: Layout, causal: bool) -> torch.Tensor:
    """[B, 1, nbq, nbk] bool: block pairs a query block may use (non-empty, and J <= I when causal)."""
    ok = torch.isfinite(logn)[:, None, None, :].expand(-1, 1, lay.nbq, -1)
    if causal:
        qi = torch.arange(lay.i0, lay.i0 + lay.nbq, device=logn.device)[:, None]
        kj = torch.arange(lay.nbk, device=logn.device)[None, :]
        ok = ok & (kj <= qi)
    return ok


def forced_blocks(lay: Layout, causal: bool, diagonal_blocks: int, first_blocks: int, device) -> torch.Tensor:
    """[nbq, nbk] bool: the priors, always exact: a band of diagonal blocks and the first blocks."""
    qi = torch.arange(lay.i0, lay.i0 + lay.nbq, device=device)[:, None]
    kj = torch.arange(lay.nbk, device=device)[None, :]
    if causal:
        # the diagonal block holds the causal edge: it is exact whatever the prior says
        band = (qi - kj >= 0) & (qi - kj < max(diagonal_blocks, 1))
    else:
        band = (qi - kj).abs() < diagonal_blocks
    return band | (kj < first_blocks)


def select_blocks(
    q: torch.Tensor,
    kbar: torch.Tensor,
    logn: torch.Tensor,
    kvalid: torch.Tensor,
    lay: Layout,
    *,
    causal: bool,
    budget: float,
    selection: str = "row",
    diagonal_blocks: int = 1,
    first_blocks: int = 1,
    scale: float | None = None,
) -> torch.Tensor:
    """The block pairs computed exactly: [B, H, nbq, nbk] bool (not differentiable).

    Low-resolution scores qbar_I . kbar_J rank the allowed pairs (qbar_I: mean of the block's real queries;
    kvalid [B, nbk*bs] from `prepare` marks padding, which is in no mean). `budget` <= 1 is the fraction of allowed pairs
    (rounded up) and > 1 a count of blocks per query-block row; "row" selection spends it in every query-block
    row, "global" over each head's whole grid (rows with peaked scores take fewer blocks). The priors are added
    first and count towards the budget.
    """
    b, h, _, d = q.shape
    hk = kbar.shape[1]
    scale = d ** -0.5 if scale is None else scale
    with torch.no_grad():
        qp = lay.pad_queries(q.detach().to(_compute_dtype(q)))
        rows = lay.pad_queries(kvalid[:, None, lay.q_offset:lay.tk, None].to(qp.dtype))  # [B, 1, nbq*bs, 1]
        rows = rows.view(b, 1, lay.nbq, lay.bs, 1)
        qbar = (qp.view(b, h, lay.nbq, lay.bs, d) * rows).sum(-2) / rows.sum(-2).clamp(min=1)  # [B, H, nbq, D]
        kb = kbar.detach().to(qbar.dtype).repeat_interleave(h // hk, dim=1)
        score = torch.einsum("bhid,bhjd->bhij", qbar, kb) * scale
        allowed = allowed_blocks(logn, lay, causal).expand(b, h, -1, -1)
        forced = forced_blocks(lay, causal, diagonal_blocks, first_blocks, q.device) & allowed
        score = score.masked_fill(forced, float("inf")).masked_fill(~allowed, float("-inf"))
        if selection == "global":
            score = score.reshape(b, h, 1, -1)
            allowed_f, forced_f = allowed.reshape(b, h, 1, -1), forced.reshape(b, h, 1, -1)
            per_unit = lay.nbq  # a count budget is blocks per row: nbq rows
        elif selection == "row":
            allowed_f, forced_f, per_unit = allowed, forced, 1
        else:
            raise ValueError(f"selection must be 'row' or 'global', got {selection!r}")
        n_allowed = allowed_f.sum(-1, keepdim=True)
        if budget <= 1:
            k = torch.ceil(n_allowed.double() * budget - 1e-9).long()
        else:
            k = torch.clamp(torch.full_like(n_allowed, int(round(budget)) * per_unit), max=n_allowed)
        k = torch.maximum(k, forced_f.sum(-1, keepdim=True))
        order = score.argsort(dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=q.device).expand_as(order))
        sel = (rank < k) & allowed_f
        return sel.reshape(b, h, lay.nbq, lay.nbk)


def _per_query_head(x: torch.Tensor, h: int) -> torch.Tensor:
    return x if x.shape[1] == h else x.repeat_interleave(h // x.shape[1], dim=1)


def mra_naive(qp, kp, vp, kbar, vbar, logn, sel, kvalid, lay: Layout, *, causal: bool, scale: float, approx: str = "full"):
    """The definition on dense tensors (small shapes only): one softmax over exact and virtual keys.

    Padded inputs qp [B, H, nbq*bs, D], kp/vp [B, Hk, nbk*bs, *]; returns [B, H, nbq*bs, Dv] (rows without any
    allowed key are 0).
    """
    b, h, nq, d = qp.shape
    bs = lay.bs
    dt = _compute_dtype(qp)
    k, v = _per_query_head(kp, h).to(dt), _per_query_head(vp, h).to(dt)
    kb, vb = _per_query_head(kbar, h).to(dt), _per_query_head(vbar, h).to(dt)
    qp = qp.to(dt)
    i = lay.i0 * bs + torch.arange(nq, device=qp.device)  # absolute query positions
    j = torch.arange(kp.shape[2], device=qp.device)
    # exact keys: pair selected, key valid, causal edge
    sel_tok = sel.repeat_interleave(bs, dim=2).repeat_interleave(bs, dim=3)  # [B, H, Nq, Nk]
    ok = sel_tok & kvalid[:, None, None, :]
    if causal:
        ok = ok & (j[None, :] <= i[:, None])
    s = torch.einsum("bhid,bhjd->bhij", qp, k) * scale
    s = s.masked_fill(~ok, float("-inf"))
    parts_s, parts_v = [s], [v]
    if approx == "full":
        virt = allowed_blocks(logn, lay, causal).repeat_interleave(bs, dim=2) & ~sel.repeat_interleave(bs, dim=2)
        sv = torch.einsum("bhid,bhjd->bhij", qp, kb) * scale + logn[:, None, None, :].to(dt)
        parts_s.append(sv.masked_fill(~virt, float("-inf")))
        parts_v.append(vb)
    s_all = torch.cat(parts_s, dim=-1)
    m = s_all.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s_all - m)
    den = p.sum(-1, keepdim=True)
    num = p @ torch.cat(parts_v, dim=2)
    return num / torch.where(den > 0, den, torch.ones_like(den))


def mra_blocked(qp, kp, vp, kbar, vbar, logn, sel, kvalid, lay: Layout, *, causal: bool, scale: float,
                approx: str = "full", rows_per_step: int = 16):
    """The same result computed block-sparsely: O(T * (selected blocks * bs + nbk)) time and memory.

    Query blocks are processed `rows_per_step` at a time; each gathers its selected key blocks (a padded list,
    slots past its count masked) and the block means of the virtual keys, and takes one softmax over both.
    """
    b, h, nq, d = qp.shape
    hk, dv, bs = kp.shape[1], vp.shape[-1], lay.bs
    g = h // hk
    dt = _compute_dtype(qp)
    nbk = lay.nbk
    kb = kp.to(dt).view(b, hk, nbk, bs, d)
    vb = vp.to(dt).view(b, hk, nbk, bs, dv)
    kvb = kvalid.view(b, nbk, bs)
    kbar_h, vbar_h = _per_query_head(kbar, h).to(dt), _per_query_head(vbar, h).to(dt)
    allowed = allowed_blocks(logn, lay, causal)
    cnt = sel.sum(-1)  # [B, H, nbq]
    idx = sel.to(torch.int8).argsort(dim=-1, descending=True, stable=True)  # selected block indices first
    bi = torch.arange(b, device=qp.device).view(b, 1, 1, 1)
    hi = (torch.arange(h, device=qp.device) // g).view(1, h, 1, 1)
    qblocks = qp.to(dt).view(b, h, lay.nbq, bs, d)
    out = []
    for c0 in range(0, lay.nbq, rows_per_step):
        c1 = min(c0 + rows_per_step, lay.nbq)
        q_c = qblocks[:, :, c0:c1]  # [B, H, C, bs, D]
        kmax = max(int(cnt[:, :, c0:c1].max()), 1)
        ix = idx[:, :, c0:c1, :kmax]  # [B, H, C, kmax]
        slot = torch.arange(kmax, device=qp.device) < cnt[:, :, c0:c1, None]
        kg, vg = kb[bi, hi, ix], vb[bi, hi, ix]  # [B, H, C, kmax, bs, *]
        s = torch.einsum("bhcid,bhckjd->bhcikj", q_c, kg) * scale  # [B, H, C, bs, kmax, bs]
        ok = slot[:, :, :, None, :, None] & kvb[bi, ix][:, :, :, None]  # [B, H, C, 1, kmax, bs]
        if causal:
            qpos = ((lay.i0 + c0 + torch.arange(c1 - c0, device=qp.device)) * bs).view(-1, 1, 1, 1) \
                + torch.arange(bs, device=qp.device).view(1, bs, 1, 1)  # [C, bs, 1, 1]
            kpos = ix[:, :, :, None, :, None] * bs + torch.arange(bs, device=qp.device)  # [B, H, C, 1, kmax, bs]
            ok = ok & (kpos <= qpos)
        s = s.masked_fill(~ok, float("-inf")).flatten(-2)  # [B, H, C, bs, kmax*bs]
        m = s.amax(-1)
        if approx == "full":
            jend = min(lay.i0 + c1, nbk) if causal else nbk  # causal rows never see later blocks
            virt = allowed[:, :, c0:c1, :jend] & ~sel[:, :, c0:c1, :jend]  # [B, H, C, jend]
            sv = torch.einsum("bhcid,bhjd->bhcij", q_c, kbar_h[:, :, :jend]) * scale + logn[:, None, None, None, :jend].to(dt)
            sv = sv.masked_fill(~virt[:, :, :, None, :], float("-inf"))
            m = torch.maximum(m, sv.amax(-1))
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).unsqueeze(-1)
        p = torch.exp(s - m)
        num = torch.einsum("bhcik,bhckd->bhcid", p, vg.flatten(3, 4))
        den = p.sum(-1)
        if approx == "full":
            pv = torch.exp(sv - m)
            num = num + torch.einsum("bhcij,bhjd->bhcid", pv, vbar_h[:, :, :jend])
            den = den + pv.sum(-1)
        den = torch.where(den > 0, den, torch.ones_like(den))
        out.append(num / den.unsqueeze(-1))
    return torch.cat(out, dim=2).reshape(b, h, nq, dv)


def prepare(q, k, v, key_valid, lay: Layout):
    """Padding, key validity and block statistics shared by every implementation."""
    qp, kp, vp = lay.pad_queries(q), lay.pad_keys(k), lay.pad_keys(v)
    kvalid = lay.key_valid(key_valid, q.shape[0], q.device)
    kbar, vbar, logn = block_stats(kp, vp, kvalid, lay.bs)
    return qp, kp, vp, kvalid, kbar, vbar, logn


def exact_attention(q, k, v, *, causal: bool, key_valid=None, scale: float | None = None):
    """Plain softmax attention in float64-capable PyTorch (the target of a full budget), rows w/o keys -> 0."""
    b, h, tq, d = q.shape
    tk = k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    dt = _compute_dtype(q)
    s = torch.einsum("bhid,bhjd->bhij", q.to(dt), _per_query_head(k, h).to(dt)) * scale
    ok = torch.ones(b, 1, tq, tk, dtype=torch.bool, device=q.device)
    if key_valid is not None:
        ok = ok & key_valid.bool()[:, None, None, :]
    if causal:
        ok = ok & (torch.arange(tk, device=q.device)[None, :] <= torch.arange(tk - tq, tk, device=q.device)[:, None])
    s = s.masked_fill(~ok, float("-inf"))
    m = s.amax(-1, keepdim=True)
    p = torch.exp(s - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    den = p.sum(-1, keepdim=True)
    return (p @ _per_query_head(v, h).to(dt)) / torch.where(den > 0, den, torch.ones_like(den))
