"""attnswap.attention_stats on hand-computable cases (issue 20): uniform attention has entropy log T and spectral
gap 1; one-hot attention has entropy 0; CKA of a matrix with itself is 1; the collapse residual of identical
tokens is 0; a pure-attention stack with identity values collapses within the cubic bound; the KPCA measures are 1
on the values the KPCA reading predicts and follow the reproduction study's formula."""
import math

import torch

from attnswap.attention_stats import (collapse_bound, collapse_residual, kpca_alignment, kpca_values, linear_cka,
                                      optimal_cosine, rbf_cka, row_stats, spectral_gap, token_spread,
                                      top_singular_values)


def test_uniform_attention_has_entropy_log_t_and_gap_1():
    t = 12
    p = torch.full((3, t, t), 1.0 / t)
    s = row_stats(p, causal=False, sinks=4, band=3)
    assert torch.allclose(s["entropy"], torch.full((3,), math.log(t), dtype=torch.float64), atol=1e-12)
    assert torch.allclose(s["entropy_relative"], torch.ones(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(s["sink_mass"], torch.full((3,), 4 / t, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(s["sink_uniform_share"], torch.full((3,), 4 / t, dtype=torch.float64))
    # keys within 3 of the query: 3 + min(i, 2) + min(T - 1 - i, 2) of them, each 1/T
    want = sum(1 + min(i, 2) + min(t - 1 - i, 2) for i in range(t)) / t / t
    assert torch.allclose(s["band_mass"], torch.full((3,), want, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(s["keys_for_mass"], torch.full((3,), math.ceil(0.9 * t), dtype=torch.float64))
    assert torch.allclose(spectral_gap(p), torch.ones(3, dtype=torch.float64), atol=1e-10)


def test_causal_uniform_rows_and_one_hot_attention():
    t = 9
    causal = torch.tril(torch.ones(t, t, dtype=torch.float64)) / torch.arange(1, t + 1, dtype=torch.float64)[:, None]
    s = row_stats(causal, causal=True, sinks=2)
    want = sum(math.log(i + 1) for i in range(t)) / t
    assert abs(float(s["entropy"]) - want) <= 1e-12 and abs(float(s["entropy_relative"]) - 1) <= 1e-12
    # rows that see more than the 2 sinks (i >= 2): mass 2 / (i + 1), the uniform share itself
    share = sum(2 / (i + 1) for i in range(2, t)) / (t - 2)
    assert abs(float(s["sink_mass"]) - share) <= 1e-12 and abs(float(s["sink_uniform_share"]) - share) <= 1e-12
    one_hot = torch.eye(t)[torch.randperm(t, generator=torch.Generator().manual_seed(0))]
    s = row_stats(one_hot, causal=False)
    assert float(s["entropy"]) == 0 and float(s["keys_for_mass"]) == 1
    assert abs(float(spectral_gap(one_hot))) <= 1e-10  # a permutation: every singular value 1


def test_top_singular_values_match_a_full_decomposition():
    g = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(2, 30, 30, generator=g, dtype=torch.float64) * 3, -1)
    want = torch.linalg.svdvals(p)[..., :2]
    assert (top_singular_values(p, 2, iterations=200) - want).abs().max() <= 1e-8


def test_cka_and_the_collapse_residual():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(20, 5, generator=g, dtype=torch.float64)
    for cka in (linear_cka, rbf_cka):
        assert abs(cka(x, x) - 1) <= 1e-12
        assert abs(cka(x, 3 * x + 1) - 1) <= 1e-12  # invariant to scale and shift
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
    assert abs(linear_cka(x, x @ q) - 1) <= 1e-12  # invariant to rotations
    assert linear_cka(x, torch.randn(20, 5, generator=g, dtype=torch.float64)) < 0.6
    same = torch.randn(1, 8, generator=g, dtype=torch.float64).expand(10, 8)
    r = collapse_residual(same)
    assert r["frobenius"] <= 1e-12 and r["l1_inf"] <= 1e-12
    y = torch.zeros(4, 2, dtype=torch.float64)
    y[:, 0] = torch.tensor([1.0, -1.0, 1.0, -1.0])  # mean 0: the residual is all of it
    assert abs(collapse_residual(y)["frobenius"] - 1) <= 1e-12


def test_spectral_gap_matches_a_full_decomposition_on_close_singular_values():
    # sigma_2 and sigma_3 within 1 %: a block of 2 converges slowly there, the block of 6 does not
    g = torch.Generator().manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))
    w, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))
    sigma = torch.cat([torch.tensor([1.0, 0.5, 0.495], dtype=torch.float64), torch.linspace(0.2, 0.01, 37,
                                                                                           dtype=torch.float64)])
    p = u @ torch.diag(sigma) @ w.T
    assert abs(float(spectral_gap(p)) - 0.5) <= 1e-6


def test_pure_attention_collapses_within_the_cubic_bound(tiny_dirs):
    """Dong et al.'s setting on a tiny random model: single heads of tiny GPT-2 (W_Q, W_K of head h of layer l),
    identity values, no residual branch, no MLP; token embeddings scaled to a spread where one layer contracts."""
    import attnswap

    model = attnswap.load_model(tiny_dirs["gpt2"])
    c = 32
    d = 8
    heads = [(layer.attn.c_attn.weight.detach().double(), h) for h in range(4) for layer in model.transformer.h]
    x = model.transformer.wte.weight.detach()[torch.arange(5, 29)].double() * 0.2  # 24 tokens
    spreads, bounds, iterated = [token_spread(x)], [], [token_spread(x)]
    for w, h in heads[:6]:
        wq, wk = w[:, h * d:(h + 1) * d], w[:, c + h * d:c + (h + 1) * d]
        w_norm = float(torch.linalg.matrix_norm(wq @ wk.T, ord=2))
        p = torch.softmax((x @ wq) @ (x @ wk).T / math.sqrt(d), -1)
        bounds.append(collapse_bound(spreads[-1], w_norm, d))
        iterated.append(collapse_bound(iterated[-1], w_norm, d))
        x = p @ x
        spreads.append(token_spread(x))
    floor = 1e-14 * float(x.norm(dim=-1).max())  # float64 rounding of the tokens themselves
    for layer, (s_next, b) in enumerate(zip(spreads[1:], bounds)):
        assert s_next <= b + floor, (layer, s_next, b)
    assert all(s <= b + floor for s, b in zip(spreads, iterated))
    assert bounds[0] < 0.6 * spreads[0]  # the first layer is in the contracting regime: the bound is not vacuous
    # measured 0.255 -> 1.3e-4 -> 1.2e-14, then float64 rounding: spread_{l+1} / spread_l^3 stays put (0.008, 0.005),
    # the cubic law of the bound (4 ||W|| / sqrt(d) is its constant), not a geometric rate
    cubic = [spreads[i + 1] / spreads[i] ** 3 for i in range(2)]
    assert max(cubic) / min(cubic) < 10, cubic
    # doubly exponential: each step's contraction factor shrinks like the spread squared
    assert spreads[3] / spreads[0] < 1e-4 and spreads[4] <= max(1e-9 * spreads[0], floor)
    assert collapse_residual(x)["frobenius"] <= 1e-9


def test_kpca_alignment_against_the_studys_formula():
    g = torch.Generator().manual_seed(4)
    t, d = 40, 6
    k = torch.randn(t, d, generator=g, dtype=torch.float64) * 1.5
    # the study's formula, directly: S = exp(k k^T / sqrt d), K = S / (g g^T) centred, top-d eigenvectors A,
    # v_hat = G A - G (1/T) A with G = diag(1/g)
    s = torch.exp(k @ k.T / math.sqrt(d))
    gs = s.sum(1, keepdim=True)
    one = torch.full((t, t), 1.0 / t, dtype=torch.float64)
    kphi = s / (gs @ gs.T)
    kc = kphi - one @ kphi - kphi @ one + one @ kphi @ one
    a = torch.linalg.eigh(kc).eigenvectors[:, -d:].flip(-1)
    a = a * torch.sign(a.gather(0, a.abs().argmax(0, keepdim=True)))
    want = torch.diag(1 / gs[:, 0]) @ a - torch.diag(1 / gs[:, 0]) @ one @ a
    got = kpca_values(k)
    ratio = got / want
    assert float(ratio.min()) > 0 and float((ratio.max() - ratio.min()) / ratio.mean()) <= 1e-8  # one positive factor
    for m, v in kpca_alignment(k, want * 7).items():  # the study's values (rounded differently): 1 within 1e-6
        assert abs(v - 1) <= 1e-6, m
    for m, v in kpca_alignment(k, got * 7).items():
        assert abs(v - 1) <= 1e-12, m
    # the optimal cosine pairs rows one to one: a permutation of the rows is still 1, the plain row cosine is not
    perm = torch.randperm(t, generator=g)
    assert abs(optimal_cosine(want, want[perm]) - 1) <= 1e-12
    assert float(torch.nn.functional.cosine_similarity(want, want[perm]).mean()) < 0.9
    r = kpca_alignment(k, torch.randn(t, d, generator=g, dtype=torch.float64))
    assert r["linear_cka"] < 0.5 and r["optimal_cosine"] < 0.9
