"""attnswap.attention_stats on hand-computable cases (issue 20): uniform attention has entropy log T and spectral
gap 1; one-hot attention has entropy 0; CKA of a matrix with itself is 1; the collapse residual of identical
tokens is 0."""
import math

import torch

from attnswap.attention_stats import (collapse_residual, linear_cka, rbf_cka, row_stats, spectral_gap,
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
