"""Encoder token mixers, the op alone, against SDPA (bidirectional): time at 512 .. 16,384 tokens on the CPU.

    python benchmarks/encoder_ops.py --lengths 512,4096,16384 --memory --throughput --out docs/bench/encoder-ops-cpu

MiniLM-L6's attention shape (12 heads, head dim 32, batch 1), random inputs, fp32, forward only, no padding. Each
op as its method computes it, with the parameters it has at conversion: `xca` (tau 1), `separable` (zero latent
query, unit gain), `additive` (seeded w_g and Proj), `linformer` (r = 128 pooling rows over n = T positions),
`soft` (64 landmarks, 8 Newton-Schulz iterations, normalised), `linear` (hedgehog,
pure) and `lln` (pure) as their MiniLM layer 0 instances, `mra` (block 32, budget 0.25), `sliding-window` (a band of
64 around each token + 4 sinks, through SDPA with a boolean mask, as the method runs it), and a window op that
skips blocks (`band`: what a window would cost with a block-sparse kernel, at 16, 64 and 256). Medians in one process;
prints a table of ms and SDPA / op; writes <out>.json. `--memory`: each op's peak resident-set growth, one fresh
process per cell; `--throughput`: MiniLM-L6 with every layer converted, encode tokens/s on 8 x 512 tokens.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, timed  # noqa: E402

H, D = 12, 32


def ops():
    from attnswap.methods.attention.additive import additive
    from attnswap.methods.attention.linformer import linformer, pooling_rows
    from attnswap.methods.attention.separable import separable
    from attnswap.methods.attention.sliding_window import band_mask
    from attnswap.methods.attention.soft import soft
    from attnswap.methods.attention.xca import xca
    from attnswap_kernels.mra import mra_attention

    g = torch.Generator().manual_seed(0)
    tau, latent, gain = torch.ones(H), torch.zeros(H, D), torch.ones(H, D)
    w_g = torch.randn(H, D, generator=g)
    proj_w, proj_b = (torch.rand(H, D, D, generator=g) * 2 - 1) * D ** -0.5, torch.zeros(H, D)
    rows = {}

    def lin(q, k, v):
        t = q.shape[2]
        if t not in rows:
            rows[t] = pooling_rows(128, t)
        return linformer(q, k, v, rows[t], rows[t])

    return {
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
        "linear (hedgehog, pure)": method_op("linear", window=0, sinks=0),
        "lln (pure)": method_op("lln", window=0, sinks=0),
        "xca": lambda q, k, v: xca(q, k, v, tau),
        "separable": lambda q, k, v: separable(k, v, latent, gain),
        "additive": lambda q, k, v: additive(q, k, w_g, proj_w, proj_b),
        "linformer r128": lin,
        "soft m64": lambda q, k, v: soft(q, k, v, tau, landmarks=64, iterations=8),
        "mra@0.25": lambda q, k, v: mra_attention(q, k, v, causal=False, block_size=32, budget=0.25),
        "sliding-window 64": lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, attn_mask=band_mask(q.shape[2], k.shape[2], 64, 4, False, q.device)),
        **{f"band {w} (block-sparse)": band(w) for w in (16, 64, 256)},
    }


def method_op(name, **options):
    """A method's attention call as the model makes it: layer 0's instance of MiniLM-L6 converted (lln's
    temperatures from 8 calibration windows of the training text)."""
    import attnswap
    from attnswap.data import calibration
    from attnswap.models import load_tokenizer
    from attnswap.surgery import method_modules

    built = []  # on the first call (the untimed warm-up), so that listing the ops loads nothing

    def fn(q, k, v):
        if not built:
            data = Path(__file__).resolve().parents[2] / "shared" / "data" / "train-wikipedia-enwiki2021.txt"
            cal = calibration(load_tokenizer("minilm-l6"), str(data), tokens=8 * 512, seq_len=512)
            model = attnswap.convert(attnswap.load_model("minilm-l6"), name, calibration=cal, **options)
            built.append(next(iter(method_modules(model).values())))
        return built[0](None, q, k, v, None, scaling=D ** -0.5)[0]

    return fn


def band(w):
    """A window op that skips the blocks outside the band: sparse's CPU block-sparse path, band w + 4 sinks, run
    causally forward and on the reversed sequence (a bidirectional band is two causal ones; their log-sum-exp
    merge, a few elementwise ops, is not included). No hashing: query and key buckets that never meet."""
    from attnswap_kernels.sparse_attn import sparse_attention

    def fn(q, k, v):
        b, h, t, _ = q.shape
        qb, kb = torch.zeros(b, h, t, dtype=torch.long), torch.ones(b, h, t, dtype=torch.long)
        kw = dict(q_bucket=qb, k_bucket=kb, window=w, sinks=4, impl="blocked")
        return sparse_attention(q, k, v, **kw), sparse_attention(q.flip(2), k.flip(2), v.flip(2), **kw)

    return fn


def cell(name, t):
    """One op on its random inputs at length t, as a call."""
    x = [torch.randn(1, H, t, D, generator=torch.Generator().manual_seed(t)) for _ in range(3)]
    fn = ops()[name]
    return lambda: fn(*x)


def peak_mib(name, t):
    """Peak resident-set growth (MiB) of one call, in a fresh process (benchmarks/mra.py's measure: malloc maps
    every block >= 64 KiB on its own, so freed tensors leave the resident set at once)."""
    import os
    import subprocess

    code = (f"import sys, torch; sys.path.insert(0, 'benchmarks'); import encoder_ops as b, mra as m; "
            f"torch.set_num_threads({torch.get_num_threads()}); torch.set_grad_enabled(False); "
            f"s = b.cell({name!r}, {t}); s(); print(m.rss_peak_during(s))")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parents[1])
    return float(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None


# the converted models whose encode throughput is timed (`--throughput`): label -> (method, options)
MODELS = {
    "original": (None, {}),
    "sliding-window 64": ("sliding-window", {"window": 64}),
    "mra 0.25": ("mra", {"block_budget": 0.25}),
    "linear (hedgehog, pure)": ("linear", {"window": 0, "sinks": 0}),
    "lln (pure)": ("lln", {"window": 0, "sinks": 0}),
    "xca": ("xca", {}),
    "separable": ("separable", {}),
    "additive": ("additive", {}),
    "linformer r128": ("linformer", {"rank": 128, "init": "pooling"}),
    "soft m64": ("soft", {"landmarks": 64}),
}


def throughput(reps: int, batch: int = 8, length: int = 512):
    """MiniLM-L6, every layer converted: encode tokens per second on batches of `batch` x `length` tokens."""
    import attnswap
    from attnswap.data import calibration
    from attnswap.models import load_tokenizer

    tok = load_tokenizer("minilm-l6")
    data = Path(__file__).resolve().parents[2] / "shared" / "data"
    ids = tok((data / "wikitext2-test.txt").read_text(encoding="utf-8")[:400_000], return_tensors="pt")["input_ids"]
    x = ids[:, : batch * length].reshape(batch, length)
    cal = calibration(tok, str(data / "train-wikipedia-enwiki2021.txt"), tokens=8 * 512, seq_len=512)
    rows = []
    for label, (method, options) in MODELS.items():
        model = attnswap.load_model("minilm-l6")
        if method is not None:
            attnswap.convert(model, method, calibration=cal, **options)
        with torch.no_grad():
            ms, _ = timed(lambda: model(input_ids=x), "cpu", reps)
        rows.append({"model": label, "ms": ms, "tokens_per_s": batch * length / ms * 1e3})
        print(f"{label:>24}: {ms:9.1f} ms per {batch} x {length}, {rows[-1]['tokens_per_s']:9.0f} tokens/s",
              flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="512,4096,16384", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--memory", action="store_true", help="peak resident-set growth per op and length (subprocesses)")
    p.add_argument("--throughput", action="store_true", help="also MiniLM-L6's encode throughput, every method")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    rows = []
    for t in a.lengths:
        x = [torch.randn(1, H, t, D, generator=torch.Generator().manual_seed(t)) for _ in range(3)]
        for name, fn in ops().items():
            with torch.no_grad():
                ms, _ = timed(lambda: fn(*x), "cpu", a.reps if t <= 4096 else max(2, a.reps // 2))
            rows.append({"T": t, "op": name, "ms": ms, "peak_mib": peak_mib(name, t) if a.memory else None})
            print(f"T={t:6d} {name:>24}: {ms:10.2f} ms" + (f", peak {rows[-1]['peak_mib']:.1f} MiB" if a.memory else ""),
                  flush=True)
    sdpa = {r["T"]: r["ms"] for r in rows if r["op"] == "sdpa"}
    print("| T | op | ms | SDPA / op | peak MiB |\n|---:|---|---:|---:|---:|")
    for r in rows:
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}"
        print(f"| {r['T']:,} | {r['op']} | {r['ms']:.2f} | {sdpa[r['T']] / r['ms']:.1f} | {peak} |")
    models = throughput(a.reps) if a.throughput else []
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        info = {"device": device_name("cpu"), "torch": torch.__version__, "heads": H, "head_dim": D}
        out.with_suffix(".json").write_text(json.dumps({"info": info, "ops": rows, "throughput": models}, indent=2))


if __name__ == "__main__":
    main()
