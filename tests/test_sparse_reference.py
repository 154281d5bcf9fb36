"""The reference of sparse causal attention (hash buckets, query/key dropping): exact at one bucket and no drop,
its mask by a hand loop, every row defined, the dropped queries' cheap path."""
import pytest
import torch
import torch.nn.functional as F

from attnswap_kernels.sparse_attn import allowed, lsh_buckets, sparse_attention_reference


def qkv(b=2, h=6, hk=2, tq=37, tk=37, d=16, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, tq, d, generator=g, dtype=dtype, requires_grad=True),
            torch.randn(b, hk, tk, d, generator=g, dtype=dtype, requires_grad=True),
            torch.randn(b, hk, tk, d, generator=g, dtype=dtype, requires_grad=True))


@pytest.mark.parametrize("tq,tk", [(37, 37), (1, 23), (5, 37)])
def test_one_bucket_and_no_drop_is_causal_softmax_forward_and_backward(tq, tk):
    q, k, v = qkv(tq=tq, tk=tk)
    buckets = torch.zeros(2, 6, tk, dtype=torch.long)
    keep = torch.ones(2, 6, tk, dtype=torch.bool)
    out = sparse_attention_reference(q, k, v, q_bucket=buckets[..., -tq:], k_bucket=buckets, q_keep=keep[..., -tq:],
                                     k_keep=keep)
    mask = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), attn_mask=mask)
    assert (out - want).abs().max() <= 1e-12
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    ref = torch.autograd.grad(want, (q, k, v), grad)
    for a, b in zip(got, ref):
        assert (a - b).abs().max() <= 1e-12


def test_the_mask_by_a_hand_loop():
    g = torch.Generator().manual_seed(1)
    tq, tk, window, sinks = 7, 19, 3, 2
    qb, kb = torch.randint(0, 3, (1, 2, tq), generator=g), torch.randint(0, 3, (1, 2, tk), generator=g)
    qk, kk = torch.rand(1, 2, tq, generator=g) > 0.3, torch.rand(1, 2, tk, generator=g) > 0.3
    got = allowed(tq, tk, q_bucket=qb, k_bucket=kb, q_keep=qk, k_keep=kk, window=window, sinks=sinks)
    for h in range(2):
        for a in range(tq):
            i = tk - tq + a
            for j in range(tk):
                routed = bool(qb[0, h, a] == kb[0, h, j]) and bool(qk[0, h, a]) and bool(kk[0, h, j])
                always = j < sinks or j == i or 0 <= i - j < window
                assert bool(got[0, h, a, j]) == ((routed or always) and j <= i), (h, a, j)


def test_every_row_is_defined_and_a_dropped_query_takes_the_cheap_path():
    q, k, v = qkv(h=2, hk=2, tq=29, tk=29, seed=2)
    qb, kb = lsh_buckets(q.detach(), 8), lsh_buckets(k.detach(), 8)
    q_keep = torch.ones(2, 2, 29, dtype=torch.bool)
    q_keep[:, :, 10] = False
    out = sparse_attention_reference(q, k, v, q_bucket=qb, k_bucket=kb, q_keep=q_keep, window=4, sinks=1)
    assert torch.isfinite(out).all()
    mask = allowed(29, 29, q_bucket=qb, k_bucket=kb, q_keep=q_keep, window=4, sinks=1)
    assert mask.any(-1).all()
    none_kept = torch.zeros(1, 1, 29, dtype=torch.bool)
    cheap = allowed(29, 29, q_keep=none_kept, window=4, sinks=1)[0, 0, 10]  # sinks, band and diagonal only
    assert cheap.nonzero().flatten().tolist() == [0, 7, 8, 9, 10]
    s = (q[:, :, 10:11] @ k.transpose(-1, -2)) * 16 ** -0.5  # [B, H, 1, T]
    w = torch.softmax(s.masked_fill(~cheap, float("-inf")), -1)
    assert (out[:, :, 10] - (w @ v)[:, :, 0]).abs().max() <= 1e-12


def test_lsh_buckets_depend_on_direction_only():
    x = torch.randn(1, 3, 50, 8, generator=torch.Generator().manual_seed(3))
    b = lsh_buckets(x, 6)
    assert b.shape == (1, 3, 50) and b.min() >= 0 and b.max() < 6 and len(b.unique()) > 1
    assert torch.equal(b, lsh_buckets(3 * x, 6)) and torch.equal(lsh_buckets(x, 1), torch.zeros_like(b))
    assert torch.equal(lsh_buckets(-x, 6), (b + 3) % 6)  # the opposite direction: the opposite half
    with pytest.raises(ValueError, match="even"):
        lsh_buckets(x, 5)
