"""The NAMM network: Neural Attention Memory Models (Cetin et al., "An Evolved Universal Transformer Memory", 2024;
SakanaAI/evo-memory), the scorer evolved with CMA-ES.

Features of every cached entry (per layer and KV head), from the attention it receives:
- the entry's attention column over the queries since the last eviction (averaged over the KV group),
  turned into a magnitude spectrogram: STFT with n_fft 32, hop 16, a Hann window (17 frequency bins per
  frame); the frames are folded into an exponential moving average (coefficient 0.99) that the entry
  carries from eviction to eviction;
- a recency embedding of the entry's age (tokens since it was written): sin/cos at 4 frequencies.
log(EMA) and the recency embedding (25 values) are standardised over the head's entries and scored by a
tiny network shared by every layer and head: a linear embedding (25 -> 8), one backward-masked attention
(each entry attends to the entries written at or after it, so it can tell whether it has been superseded),
an MLP (8 -> 8 -> 1) and a linear read-out of the input added to it. Score <= 0 means evict (free mode);
with a budget the best-scored entries are kept. Entries younger than n_fft (32 tokens) have received
attention in at most one, Hann-windowed, frame, so their spectrogram says nothing yet: they are kept (the
role of h2o's and snapkv's recent window). The 506 parameters form one flat vector, the search space
of CMA-ES. The default vector scores by the spectrogram's DC term (the EMA of received attention) alone;
the rest starts as small seeded random weights with a zero output, for the evolution to use.
"""
from __future__ import annotations

import torch


N_FFT, HOP, EMA, FREQS, RECENCY, HIDDEN = 32, 16, 0.99, 17, 8, 8
IN = FREQS + RECENCY
SHAPES = {"w_in": (IN, HIDDEN), "b_in": (HIDDEN,), "wq": (HIDDEN, HIDDEN), "wk": (HIDDEN, HIDDEN),
          "wv": (HIDDEN, HIDDEN), "w1": (HIDDEN, HIDDEN), "b1": (HIDDEN,), "w_out": (HIDDEN,), "w_lin": (IN,),
          "b_out": (1,)}
N_PARAMS = sum(torch.Size(s).numel() for s in SHAPES.values())


def unpack(theta: torch.Tensor) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for name, shape in SHAPES.items():
        n = torch.Size(shape).numel()
        out[name] = theta[i:i + n].view(shape)
        i += n
    return out


def default_params() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    p = {name: torch.randn(shape, generator=g) * 0.3 for name, shape in SHAPES.items()}
    p["w_out"].zero_()
    p["b_out"].zero_()
    p["w_lin"].zero_()
    p["w_lin"][0] = 1.0  # DC term of the spectrogram: the EMA of the attention the entry receives
    return torch.cat([t.flatten() for t in p.values()])


def spectrogram(rows: torch.Tensor) -> torch.Tensor:
    """rows [B, Hkv, R, N] (attention over time per entry) -> magnitudes [B, Hkv, F, N, 17]."""
    if rows.shape[2] < N_FFT:
        rows = torch.nn.functional.pad(rows, (0, 0, N_FFT - rows.shape[2], 0))
    frames = rows.unfold(2, N_FFT, HOP)  # [B, Hkv, F, N, n_fft]
    window = torch.hann_window(N_FFT, periodic=True, dtype=rows.dtype, device=rows.device)
    return torch.fft.rfft(frames * window, dim=-1).abs()


def recency(age: torch.Tensor) -> torch.Tensor:
    freqs = 4096.0 ** (-torch.arange(RECENCY // 2, device=age.device, dtype=torch.float32) / (RECENCY // 2 - 1))
    angle = age.float()[..., None] * freqs
    return torch.cat([angle.sin(), angle.cos()], dim=-1)


def network(theta: torch.Tensor, x: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """x [B, Hkv, N, 25] standardised features, pos/valid [B, Hkv, N] -> scores [B, Hkv, N]."""
    p = unpack(theta.to(x.dtype))
    h = x @ p["w_in"] + p["b_in"]
    q, k, v = h @ p["wq"], h @ p["wk"], h @ p["wv"]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if bool(valid.all()) and bool((pos[..., 1:] > pos[..., :-1]).all()):
        # entries in position order: "attend to the newer ones" is causal attention on the reversed sequence
        flip = lambda t: t.flip(-2)  # noqa: E731
        h = h + flip(sdpa(flip(q), flip(k), flip(v), is_causal=True))
    else:
        later = (pos[..., None, :] >= pos[..., :, None]) & valid[..., None, :]  # [B, Hkv, N, N]
        later = later | ~later.any(-1, keepdim=True)  # a row with nothing to see (padding) attends uniformly
        h = h + sdpa(q, k, v, attn_mask=later)
    hidden = torch.relu(h @ p["w1"] + p["b1"])
    return hidden @ p["w_out"] + x @ p["w_lin"] + p["b_out"]


def standardise(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    w = valid[..., None].float()
    n = w.sum(2, keepdim=True).clamp_min(1.0)
    mean = (x * w).sum(2, keepdim=True) / n
    var = ((x - mean).pow(2) * w).sum(2, keepdim=True) / n
    return (x - mean) / (var + 1e-6).sqrt()
