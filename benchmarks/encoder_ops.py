"""Encoder token mixers, the op alone, against SDPA (bidirectional): time at 512 .. 16,384 tokens on the CPU.

    python benchmarks/encoder_ops.py --lengths 512,4096,16384 --out docs/bench/encoder-ops-cpu

MiniLM-L6's attention shape (12 heads, head dim 32, batch 1), random inputs, fp32, forward only, no padding. Each
op as its method computes it, with the parameters it has at conversion: `xca` (tau 1), `separable` (zero latent
query, unit gain), `additive` (seeded w_g and Proj), `mra` (block 32, budget 0.25), `sliding-window` (a band of
64 around each token + 4 sinks, through SDPA with a boolean mask, as the method runs it). Medians in one process;
prints a table of ms and SDPA / op; writes <out>.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import timed  # noqa: E402

H, D = 12, 32


def ops():
    from attnswap.methods.attention.additive import additive
    from attnswap.methods.attention.separable import separable
    from attnswap.methods.attention.sliding_window import band_mask
    from attnswap.methods.attention.xca import xca
    from attnswap_kernels.mra import mra_attention

    g = torch.Generator().manual_seed(0)
    tau, latent, gain = torch.ones(H), torch.zeros(H, D), torch.ones(H, D)
    w_g = torch.randn(H, D, generator=g)
    proj_w, proj_b = (torch.rand(H, D, D, generator=g) * 2 - 1) * D ** -0.5, torch.zeros(H, D)
    return {
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
        "xca": lambda q, k, v: xca(q, k, v, tau),
        "separable": lambda q, k, v: separable(k, v, latent, gain),
        "additive": lambda q, k, v: additive(q, k, w_g, proj_w, proj_b),
        "mra@0.25": lambda q, k, v: mra_attention(q, k, v, causal=False, block_size=32, budget=0.25),
        "sliding-window 64": lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, attn_mask=band_mask(q.shape[2], k.shape[2], 64, 4, False, q.device)),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="512,4096,16384", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    rows = []
    for t in a.lengths:
        x = [torch.randn(1, H, t, D, generator=torch.Generator().manual_seed(t)) for _ in range(3)]
        for name, fn in ops().items():
            with torch.no_grad():
                ms, _ = timed(lambda: fn(*x), "cpu", a.reps if t <= 4096 else max(2, a.reps // 2))
            rows.append({"T": t, "op": name, "ms": ms})
            print(f"T={t:6d} {name:>18}: {ms:10.2f} ms", flush=True)
    sdpa = {r["T"]: r["ms"] for r in rows if r["op"] == "sdpa"}
    print("| T | op | ms | SDPA / op |\n|---:|---|---:|---:|")
    for r in rows:
        print(f"| {r['T']:,} | {r['op']} | {r['ms']:.2f} | {sdpa[r['T']] / r['ms']:.1f} |")
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        info = {"device": f"CPU, {torch.get_num_threads()} threads", "torch": torch.__version__, "heads": H, "head_dim": D}
        out.with_suffix(".json").write_text(json.dumps({"info": info, "ops": rows}, indent=2))


if __name__ == "__main__":
    main()
