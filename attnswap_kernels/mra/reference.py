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

from .. import per_query_head
from ..flash_cpu import NEG, flash, flash_bwd


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
    selection: str = "global",
    diagonal_blocks: int = 1,
    first_blocks: int = 1,
    scale: float | None = None,
    shared: bool = False,
) -> torch.Tensor:
    """The block pairs computed exactly: [B, Hs, nbq, nbk] bool (not differentiable), Hs = H, or Hk when `shared`.

    Allowed pairs are ranked by their low-resolution attention probability, softmax over J of
    qbar_I . kbar_J * scale + log n_J (qbar_I: mean of the block's real queries; kvalid [B, nbk*bs] from `prepare`
    marks padding, which is in no mean). `budget` <= 1 is the fraction of allowed pairs (rounded up) and > 1 a
    count of blocks per query-block row; "row" selection spends it in every query-block row, "global" over each
    head's whole grid (rows whose mass is concentrated take fewer blocks). The priors are added first and count
    towards the budget. Query blocks of padding only select nothing (their rows see block means only; callers
    ignore them). `shared`: one selection per group of query heads that share a KV head (grouped-query
    attention), ranked by the group's summed probabilities; the group's queries then read each key block once.
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
        # a query block of padding only selects nothing: it must not take budget from real rows
        allowed = (allowed_blocks(logn, lay, causal) & (rows.sum(-2) > 0)).expand(b, h, -1, -1)
        forced = forced_blocks(lay, causal, diagonal_blocks, first_blocks, q.device) & allowed
        # rank by low-resolution attention probability (each row normalised), so that "global" compares rows
        # fairly: the budget goes where the estimated attention mass is
        score = torch.log_softmax((score + logn[:, None, None, :]).masked_fill(~allowed, float("-inf")), -1)
        if shared and hk < h:
            h = hk
            score = score.view(b, hk, -1, lay.nbq, lay.nbk).logsumexp(2)
            allowed, forced = allowed[:, :hk], forced[:, :hk]
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


def mra_naive(qp, kp, vp, kbar, vbar, logn, sel, kvalid, lay: Layout, *, causal: bool, scale: float, approx: str = "full"):
    """The definition on dense tensors (small shapes only): one softmax over exact and virtual keys.

    Padded inputs qp [B, H, nbq*bs, D], kp/vp [B, Hk, nbk*bs, *]; returns [B, H, nbq*bs, Dv] (rows without any
    allowed key are 0).
    """
    b, h, nq, d = qp.shape
    bs = lay.bs
    dt = _compute_dtype(qp)
    sel = per_query_head(sel, h)
    k, v = per_query_head(kp, h).to(dt), per_query_head(vp, h).to(dt)
    kb, vb = per_query_head(kbar, h).to(dt), per_query_head(vbar, h).to(dt)
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


class _SplitKeyAttention(torch.autograd.Function):
    """softmax attention of q over the union of key sets (k_i, v_i, additive bias mask_i), one flash call per set.

    The parts are merged by their log-sum-exps; the backward runs the flash backward of every part with the
    merged output and log-sum-exp, which is the exact gradient of the merged softmax (as in split-KV and ring
    attention). Returns (o, lse); lse is not differentiable.
    """

    @staticmethod
    def forward(ctx, scale, q, *parts):
        outs, lses = [], []
        for k, v, mask in zip(parts[0::3], parts[1::3], parts[2::3]):
            o_i, lse_i = flash(q, k, v, mask, scale)
            outs.append(o_i)
            lses.append(lse_i)
        lse = lses[0]
        for x in lses[1:]:
            lse = torch.logaddexp(lse, x)
        o = sum(o_i * torch.exp(x - lse)[..., None] for o_i, x in zip(outs, lses))
        ctx.scale = scale
        ctx.save_for_backward(q, o, lse, *parts)
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, o, lse, *parts = ctx.saved_tensors
        do = do.contiguous()
        dq, grads = None, []
        for k, v, mask in zip(parts[0::3], parts[1::3], parts[2::3]):
            dq_i, dk, dv = flash_bwd(do, q, k, v, o, lse, mask, ctx.scale)
            dq = dq_i if dq is None else dq + dq_i
            grads += [dk, dv, None]
        return None, dq, *grads


def mra_blocked(qp, kp, vp, kbar, vbar, logn, sel, kvalid, lay: Layout, *, causal: bool, scale: float,
                approx: str = "full", step_elems: int = 1 << 21):
    """The same result computed block-sparsely, O(T * (selected blocks * bs + nbk)), with PyTorch's flash kernels.

    One work item per (batch, head, query block). Its bs queries attend (1) for causal models, the diagonal
    block under a causal + padding bias [bs, bs], and (2) one packed key list: the other selected key blocks
    (gathered; unused slots point at an all-masked dummy block) followed by the block means of the first allowed
    blocks, under a bias shared by all bs queries: 0 for a real key, log n_J for a virtual key, NEG for padding,
    unused slots, virtual twins of selected blocks and blocks a causal row may not see. The two parts are
    merged by log-sum-exp (`_SplitKeyAttention`). Items are sorted by their number of selected blocks and packed
    `step_elems` scores per call, so little is padded; scores are never materialised.
    """
    dv_out = vp.shape[-1]
    if qp.shape[-1] != dv_out:  # the flash kernels want one head size: zero columns change no score or value
        e = max(qp.shape[-1], dv_out)
        qp, kp, kbar = (F.pad(x, (0, e - x.shape[-1])) for x in (qp, kp, kbar))
        vp, vbar = (F.pad(x, (0, e - dv_out)) for x in (vp, vbar))
    b, h, nq, d = qp.shape
    hk, hs, dv, bs = kp.shape[1], sel.shape[1], vp.shape[-1], lay.bs
    gq, nbq, nbk = h // hs, lay.nbq, lay.nbk  # gq query heads share each selection (1, or G when shared)
    dev = qp.device
    dt = _compute_dtype(qp)
    n_items = b * hs * nbq
    item = torch.arange(n_items, device=dev)
    item_b, item_s, item_i = item // (hs * nbq), (item // nbq) % hs, item % nbq
    kv_row = item_b * hk + item_s // (hs // hk)  # (batch, kv head) row of the flattened key blocks
    # selected blocks in ascending order; in a causal row the diagonal is the last one and is handled apart
    off = sel.clone()
    if causal:
        diag_j = lay.i0 + torch.arange(nbq, device=dev)
        diag_sel = sel[:, :, torch.arange(nbq, device=dev), diag_j].reshape(-1)  # False only for padding rows
        off[:, :, torch.arange(nbq, device=dev), diag_j] = False
    cnt = off.sum(-1).reshape(-1)
    idx = off.to(torch.int8).argsort(dim=-1, descending=True, stable=True).reshape(n_items, nbk)
    # flat tables: key blocks, then the block means in blocks of bs virtual keys, then one all-masked dummy block
    full = approx == "full"
    nvb = -(-nbk // bs) if full else 0
    n_real = b * hk * nbk
    tabs_k, tabs_v = [kp.to(dt).reshape(n_real, bs, d)], [vp.to(dt).reshape(n_real, bs, dv)]
    if full:
        pad = nvb * bs - nbk
        tabs_k.append(F.pad(kbar.to(dt), (0, 0, 0, pad)).reshape(b * hk * nvb, bs, d))
        tabs_v.append(F.pad(vbar.to(dt), (0, 0, 0, pad)).reshape(b * hk * nvb, bs, dv))
    dummy = n_real + b * hk * nvb
    ktab = torch.cat(tabs_k + [kp.new_zeros(1, bs, d, dtype=dt)])
    vtab = torch.cat(tabs_v + [vp.new_zeros(1, bs, dv, dtype=dt)])
    kbias = torch.where(kvalid, 0.0, NEG).to(dt).view(b, 1, nbk, bs).expand(b, hk, nbk, bs).reshape(n_real, bs)
    kbias = torch.cat([kbias, kbias.new_full((dummy + 1 - n_real, bs), NEG)])  # rows of the table above
    if full:
        vbias = torch.where((allowed_blocks(logn, lay, causal) & ~sel).expand(b, hs, nbq, nbk),
                            logn.to(dt)[:, None, None, :], NEG).reshape(n_items, nbk)
    rows = gq * bs  # queries per item: the block's rows of every head sharing the selection
    qitems = qp.to(dt).view(b, hs, gq, nbq, bs, d).transpose(2, 3).reshape(n_items, 1, rows, d)
    if causal:
        tri = torch.ones(bs, bs, dtype=torch.bool, device=dev).tril().repeat(gq, 1)
        diag_rows = kv_row * nbk + lay.i0 + item_i  # the diagonal key block of each item
    order = torch.argsort(cnt * (nbk + 1) + item_i)  # similar items together: little padding per call
    cnt_sorted = cnt[order]
    out = qp.new_empty(n_items, 1, rows, dv, dtype=dt)
    lse_all = qp.new_empty(n_items, 1, rows, dtype=dt)
    s0 = 0
    while s0 < n_items:
        # the largest n whose padded cost, n items x the last (largest) item's key count, fits in step_elems
        cost = torch.arange(1, n_items - s0 + 1, device=dev) * rows * ((cnt_sorted[s0:] + 1) * bs + nbk)
        n = max(1, int((cost <= step_elems).sum()))
        it = order[s0:s0 + n]
        s0 += n
        kmax = int(cnt[it].max())
        gidx = torch.where(torch.arange(kmax, device=dev) < cnt[it, None], kv_row[it, None] * nbk + idx[it, :kmax], dummy)
        bias = kbias[gidx].reshape(n, kmax * bs)
        if full:
            jend = min(lay.i0 + int(item_i[it].max()) + 1, nbk) if causal else nbk  # causal: later blocks unseen
            nv = -(-jend // bs)
            vidx = n_real + kv_row[it, None] * nvb + torch.arange(nv, device=dev)
            gidx = torch.cat([gidx, vidx], 1)
            bias = torch.cat([bias, F.pad(vbias[it, :jend], (0, nv * bs - jend), value=NEG)], 1)
        parts = []
        if causal:
            dk_rows = diag_rows[it]
            dbias = torch.where(tri & diag_sel[it, None, None], kbias[dk_rows][:, None, :], NEG)  # causal, padding
            parts += [ktab[dk_rows][:, None], vtab[dk_rows][:, None], dbias[:, None]]
        if gidx.shape[1]:
            keys = ktab.index_select(0, gidx.reshape(-1)).view(n, 1, -1, d)
            vals = vtab.index_select(0, gidx.reshape(-1)).view(n, 1, -1, dv)
            parts += [keys, vals, bias.view(n, 1, 1, -1)]
        o, lse = _SplitKeyAttention.apply(scale, qitems[it], *parts)
        out[it], lse_all[it] = o, lse
    # a row with no key at all (padding before any real key) is 0, as in the definition
    out = torch.where(lse_all[..., None] > NEG / 2, out, 0.0)
    return out.view(b, hs, nbq, gq, bs, dv).transpose(2, 3).reshape(b, h, nq, dv)[..., :dv_out]


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
    s = torch.einsum("bhid,bhjd->bhij", q.to(dt), per_query_head(k, h).to(dt)) * scale
    ok = torch.ones(b, 1, tq, tk, dtype=torch.bool, device=q.device)
    if key_valid is not None:
        ok = ok & key_valid.bool()[:, None, None, :]
    if causal:
        ok = ok & (torch.arange(tk, device=q.device)[None, :] <= torch.arange(tk - tq, tk, device=q.device)[:, None])
    s = s.masked_fill(~ok, float("-inf"))
    m = s.amax(-1, keepdim=True)
    p = torch.exp(s - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    den = p.sum(-1, keepdim=True)
    return (p @ per_query_head(v, h).to(dt)) / torch.where(den > 0, den, torch.ones_like(den))
