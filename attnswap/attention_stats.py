"""Measures of attention rows and hidden states, for `attnswap inspect` (issue 20). Pure functions on tensors.

- Row statistics of a row-stochastic attention matrix P [..., T, T] (a causal one is lower-triangular): the mean
  row entropy, in nats and relative to the log of the row's length (the keys a row may see); the mass on the first
  `sinks` keys and the uniform share of those keys; the mass on the local band (keys within `band` of the query);
  the mean number of keys that hold 90 % of a row's mass. Rows of a single key are left out of the relative
  entropy (log 1 = 0), rows whose keys are all sinks out of the sink statistics.
- The spectral gap 1 - sigma_2 / sigma_1 of P from its two largest singular values, by block power iteration on
  P^T P with a block of 6 vectors (a causal P is triangular, its eigenvalues are its diagonal: the singular values
  are the informative ones).
  Uniform attention is rank 1: gap 1; a permutation (each query on one key) has all singular values 1: gap 0.
- The rank-collapse residual of hidden states X [T, d] (Dong et al., "Attention is Not All You Need: Pure
  Attention Loses Rank Doubly Exponentially with Depth", ICML 2021, arXiv 2103.03404): res(X) = X - 1 x^T with
  x = argmin ||X - 1 x^T||; in the Frobenius norm x is the mean token, and the relative residual is
  ||res(X)||_F / ||X||_F (0: every token the same). The paper's l1,inf bounds use
  ||X||_{1,inf} = sqrt(||X||_1 ||X||_inf) (max column sum, max row sum), given here too.
  `collapse_bound`: a bound, derived here, on one pure-attention layer's effect on the token spread (below); it
  has the paper's cubic form.
- Linear and kernel (Gaussian) CKA between two representations of the same tokens (Kornblith et al., 2019).
- The KPCA alignment tests of Saritas and Yildiz ("A Reproduction Study: The Kernel PCA Interpretation of
  Self-Attention Fails Under Scrutiny", arXiv 2505.07908; their definitions, in KarahanS/Reproduction-Study-KPCA,
  scripts/nlp_value_vectors.py): the value vectors a head *would* have if self-attention were kernel PCA of its
  keys (Teo and Nguyen, 2024), compared with its real value vectors (`kpca_alignment`).
"""
from __future__ import annotations

import math

import torch


def _row_lengths(t: int, causal: bool, device) -> torch.Tensor:
    """[T]: keys row i may see."""
    if causal:
        return torch.arange(1, t + 1, device=device, dtype=torch.float64)
    return torch.full((t,), float(t), device=device, dtype=torch.float64)


def row_stats(p: torch.Tensor, causal: bool, sinks: int = 4, band: int = 64, mass: float = 0.9) -> dict:
    """p [..., T, T] -> {name: [...]} means over rows (float64)."""
    p = p.double()
    t = p.shape[-1]
    n = _row_lengths(t, causal, p.device)
    ent = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)  # [..., T]
    longer = n > 1
    rel = (ent[..., longer] / torch.log(n[longer])).mean(-1) if longer.any() else torch.zeros(p.shape[:-2])
    i = torch.arange(t, device=p.device)
    dist = (i[:, None] - i[None, :]).abs()
    inband = (dist < band).to(p.dtype)
    with_sinks = n > sinks  # rows that see more keys than the sinks
    sink_mass = p[..., :sinks].sum(-1)[..., with_sinks].mean(-1)
    uniform = (sinks / n[with_sinks]).mean()
    top = p.sort(dim=-1, descending=True).values.cumsum(-1)
    keys = (top < mass - 1e-12).sum(-1) + 1  # the fewest keys whose mass reaches `mass`
    return {"entropy": ent.mean(-1), "entropy_relative": rel, "sink_mass": sink_mass,
            "sink_uniform_share": uniform.expand(sink_mass.shape), "band_mass": (p * inband).sum(-1).mean(-1),
            "keys_for_mass": keys.double().mean(-1)}


def top_singular_values(p: torch.Tensor, k: int = 2, iterations: int = 30, seed: int = 0) -> torch.Tensor:
    """p [..., T, T] -> [..., k]: the k largest singular values by block power iteration on p^T p (k vectors,
    QR each step) and the Rayleigh-Ritz values of the final block: exact for a rank <= k matrix, otherwise
    converging at the rate sigma_{k+1}^2 / sigma_k^2 per step."""
    p = p.double()
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(*p.shape[:-2], p.shape[-1], k, generator=g, dtype=torch.float64).to(p.device)
    q = torch.linalg.qr(q).Q
    for _ in range(iterations):
        q = torch.linalg.qr(p.transpose(-1, -2) @ (p @ q)).Q
    small = (p @ q).transpose(-1, -2) @ (p @ q)  # [..., k, k] = q^T p^T p q
    return torch.linalg.eigvalsh(small).flip(-1).clamp_min(0).sqrt()


def spectral_gap(p: torch.Tensor, iterations: int = 30, block: int = 6) -> torch.Tensor:
    """p [..., T, T] -> [...]: 1 - sigma_2 / sigma_1, from a block of `block` vectors (converging at the rate
    (sigma_7 / sigma_2)^2 rather than (sigma_3 / sigma_2)^2: on SmolLM2's attention at 2,048 tokens, 30 iterations
    gave the gap of a full decomposition within 2.4e-7, against 5.3e-5 with a block of 2)."""
    s = top_singular_values(p, min(block, p.shape[-1]), iterations)
    return 1 - s[..., 1] / s[..., 0].clamp_min(1e-300)


def collapse_residual(x: torch.Tensor) -> dict:
    """x [T, d] -> relative rank-collapse residuals: Frobenius (the mean token removed) and the paper's composite
    l1,inf norm (the same x; sqrt(max column sum x max row sum))."""
    x = x.double()
    res = x - x.mean(0, keepdim=True)

    def l1inf(m):
        return math.sqrt(float(m.abs().sum(0).max()) * float(m.abs().sum(1).max()))

    return {"frobenius": float(res.norm() / x.norm().clamp_min(1e-300)),
            "l1_inf": l1inf(res) / max(l1inf(x), 1e-300)}


def _centred_gram(k: torch.Tensor) -> torch.Tensor:
    n = k.shape[0]
    h = torch.eye(n, dtype=k.dtype, device=k.device) - 1.0 / n
    return h @ k @ h


def _cka(kx: torch.Tensor, ky: torch.Tensor) -> float:
    kx, ky = _centred_gram(kx), _centred_gram(ky)
    return float((kx * ky).sum() / (kx.norm() * ky.norm()).clamp_min(1e-300))


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Centred kernel alignment of x [n, p] and y [n, q] (rows: the same n items) with the kernels x x^T and
    y y^T: 1 for x with itself, invariant to rotations, scale and shifts."""
    x, y = x.double(), y.double()
    return _cka(x @ x.T, y @ y.T)


def rbf_cka(x: torch.Tensor, y: torch.Tensor, sigma: float = 1.0) -> float:
    """Kernel CKA with Gaussian kernels exp(-||a - b||^2 / (2 s^2)), s = sigma x the median pairwise distance."""

    def gram(m):
        m = m.double()
        # exact differences (cdist's matmul form leaves ~1e-8 on the diagonal from 25 rows on, which entered the median)
        d2 = torch.cdist(m, m, compute_mode="donot_use_mm_for_euclid_dist").pow(2)
        med = d2[d2 > 0].median().sqrt() if (d2 > 0).any() else torch.tensor(1.0, dtype=m.dtype)
        return torch.exp(-d2 / (2 * (sigma * med) ** 2))

    return _cka(gram(x), gram(y))


def token_spread(x: torch.Tensor) -> float:
    """x [T, d] -> max_i ||x_i - mean(x)||_2: the largest distance of a token from the mean token."""
    x = x.double()
    return float((x - x.mean(0, keepdim=True)).norm(dim=-1).max())


def collapse_bound(spread: float, w_norm: float, d_qk: int) -> float:
    """An upper bound on token_spread(P X) for one single-head attention layer with identity values and no
    residual branch, P = softmax(X W X^T / sqrt(d_qk)) over every key (W = W_Q W_K^T, w_norm its spectral norm),
    given spread = token_spread(X):

        token_spread(P X) <= 2 (exp(2 w_norm spread^2 / sqrt(d_qk)) - 1) spread  ~  (4 w_norm / sqrt(d_qk)) spread^3

    Derivation (ours; it has the form of Dong et al.'s Lemma, (4 gamma beta / sqrt(d_qk)) ||res||^3, with explicit
    constants). Write X = 1 m^T + R (m the mean token, rows r_i, rho = max ||r_i||). The scores of row i are
    m^T W m + r_i^T W m (constant along the row: cancels in the softmax) + m^T W R^T (the same for every row:
    part of a common c) + r_i^T W R^T, so P_i = softmax(c + e_i) with |e_ij| <= delta = w_norm rho^2 / sqrt(d_qk).
    Each entry is then within a factor exp(+-2 delta) of p = softmax(c): ||P_i - p||_1 <= exp(2 delta) - 1. Since
    P 1 = 1, P X - 1 (m + R^T p)^T = (P - 1 p^T) R, whose rows have norm <= (exp(2 delta) - 1) rho. Measured
    from the mean token instead of m + R^T p, a spread at most doubles."""
    delta = w_norm * spread**2 / math.sqrt(d_qk)
    return 2 * math.expm1(2 * delta) * spread


def kpca_values(k: torch.Tensor) -> torch.Tensor:
    """k [T, d] (one head's keys) -> [T, d]: the value vectors the KPCA reading of self-attention predicts, up to
    one positive factor (which the alignment measures ignore). With the Gram matrix S = exp(k k^T / sqrt(d)), g its
    row sums, K = S / (g g^T) centred (H K H, H = I - 1/T) and A its top-d eigenvectors: v_hat = diag(1/g) H A.
    Computed in float64 from log-sum-exps (no overflow); each eigenvector's sign is fixed so that its entry of
    largest magnitude is positive (the definition leaves it free, and the optimal cosine depends on it)."""
    k = k.double()
    t, d = k.shape
    s = k @ k.T / math.sqrt(d)
    log_g = torch.logsumexp(s, -1)
    kphi = torch.exp(s - log_g[:, None] - log_g[None, :])
    h = torch.eye(t, dtype=k.dtype, device=k.device) - 1.0 / t
    _, vecs = torch.linalg.eigh(h @ kphi @ h)
    a = vecs[:, -d:].flip(-1)  # largest eigenvalue first
    a = a * torch.sign(a.gather(0, a.abs().argmax(0, keepdim=True)))
    return torch.exp(-(log_g - log_g.min()))[:, None] * (h @ a)


def optimal_cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    """The mean cosine of the rows of x and y [T, d] under the one-to-one pairing of rows that maximises it
    (Hungarian assignment, scipy's linear_sum_assignment)."""
    from scipy.optimize import linear_sum_assignment

    xn = x.double() / x.double().norm(dim=-1, keepdim=True).clamp_min(1e-300)
    yn = y.double() / y.double().norm(dim=-1, keepdim=True).clamp_min(1e-300)
    c = (xn @ yn.T).cpu().numpy()
    rows, cols = linear_sum_assignment(c, maximize=True)
    return float(c[rows, cols].mean())


def kpca_alignment(k: torch.Tensor, v: torch.Tensor) -> dict:
    """One head's keys and values [T, d] -> how close its values are to the KPCA prediction `kpca_values(k)`:
    optimal cosine, linear CKA and kernel CKA (1: the same up to what each measure ignores)."""
    pred = kpca_values(k)
    return {"optimal_cosine": optimal_cosine(v, pred), "linear_cka": linear_cka(v, pred),
            "kernel_cka": rbf_cka(v, pred)}
