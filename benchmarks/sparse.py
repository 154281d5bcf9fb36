"""Sparse causal attention (hash buckets / query-key dropping + window and sinks) vs SDPA: speed, and the
fraction of scores it computes and its error on real SmolLM2 activations.

    python benchmarks/sparse.py speed    --device cpu  --lengths 1024,2048,4096,8192,16384 --out docs/bench/sparse-cpu
    python benchmarks/sparse.py speed    --device cuda --lengths 1024,4096,8192,16384,32768 --check --out $OUT/sparse-gpu
    python benchmarks/sparse.py fraction --out docs/bench/sparse-fraction

speed: SmolLM2-135M's attention shape (9 query heads, 3 KV heads, head dim 64, batch 1), causal, random inputs;
SDPA (is_causal, GQA) against `sparse_attention` (the compiled kernels on CPU, Triton on CUDA; "@blocked" after
an entry: the PyTorch CPU path) at each --configs entry "buckets/drop[/window]" (window 64 unless given, sinks 4;
buckets hashed by the angular LSH of the method, drop by per-head norm thresholds measured once on the inputs, as
`convert --calibration` stores them), the routing (hashing, norms) timed with it. Forward and forward+backward
(up to --bwd-max), medians in one process.
fraction: q/k/v of all 30 layers of the real SmolLM2-135M on 1,024 WikiText-2 tokens: per configuration the
fraction of the causal score matrix the method computes (allowed pairs / causal pairs, averaged over layers and
heads) and the relative RMS error of its output against exact attention, beside MRA's at its budgets (MRA
computes a fraction = its budget of the causal block grid, plus block means). Prints tables; writes <out>.json
(and <out>.png for speed).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

from attnswap_kernels import rel_rms_error
from attnswap_kernels.sparse_attn import allowed, lsh_buckets, sparse_attention

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, make_step, plot_speed, speed_rows, speed_table  # noqa: E402

H, HK, D = 9, 3, 64
WINDOW, SINKS = 64, 4
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2-test.txt"


def thresholds(q, k, drop):
    """Per-head norm quantiles (what `convert --calibration` stores for the method), measured on the inputs."""
    return (q.float().norm(dim=-1).quantile(drop, dim=-1, keepdim=True),
            k.float().norm(dim=-1).quantile(drop, dim=-1, keepdim=True))


def routing(q, k, buckets, drop, seed=0, thr=None, lsh="auto"):
    """The method's routing on given q, k: LSH buckets per query head, keep masks by per-head norm thresholds
    (`thresholds`, measured on q, k unless given)."""
    h, g = q.shape[1], q.shape[1] // k.shape[1]
    qb = kb = qk = kk = None
    if buckets > 1:
        qb, kb = lsh_buckets(q, buckets, seed, impl=lsh), lsh_buckets(k, buckets, seed, heads=h, impl=lsh)
    if drop > 0:
        tq, tk = thresholds(q, k, drop) if thr is None else thr
        qk = q.float().norm(dim=-1) >= tq
        kk = (k.float().norm(dim=-1) >= tk).repeat_interleave(g, 1)
    return dict(q_bucket=qb, k_bucket=kb, q_keep=qk, k_keep=kk)


def config(name):
    """"buckets/drop[/window][@impl]" -> (buckets, drop), window (default WINDOW). "@blocked": the PyTorch CPU
    path with the PyTorch hash (what runs without a C++ compiler); "auto" otherwise."""
    name, _, impl = name.partition("@")
    b, d, *w = name.split("/")
    return (int(b), float(d)), int(w[0]) if w else WINDOW


def impl_of(name):
    return name.partition("@")[2] or "auto"


def step_fn(name, mode, t, device, dtype):
    g = torch.Generator().manual_seed(t)
    x = [torch.randn(1, n, t, D, generator=g).to(device=device, dtype=dtype).requires_grad_(mode != "fwd")
         for n in (H, HK, HK)]
    if name == "sdpa":
        def fn(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    else:
        (buckets, drop), window = config(name)
        thr = thresholds(x[0].detach(), x[1].detach(), drop) if drop > 0 else None  # the method's calibration

        impl = impl_of(name)
        lsh = "torch" if impl == "blocked" else "auto"

        def fn(q, k, v):  # the routing (LSH, norms against the thresholds) is part of the method's cost
            route = routing(q.detach(), k.detach(), buckets, drop, thr=thr, lsh=lsh)
            return sparse_attention(q, k, v, window=window, sinks=SINKS, impl=impl, **route)

    return make_step(fn, x, mode)


def speed(a):
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    return speed_rows(["sdpa"] + a.configs, a, step_fn, dtype)


def check(device):
    """The Triton kernels against the reference at odd lengths, fp32 and bf16, forward and gradients."""
    from attnswap_kernels.sparse_attn import sparse_attention_reference

    rows = []
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        for t in (1000, 2049):
            for name in ("1/0.0", "8/0.0", "1/0.3", "8/0.25"):
                g = torch.Generator().manual_seed(t)
                x = [torch.randn(1, n, t, D, generator=g).to(device=device, dtype=dtype).requires_grad_()
                     for n in (H, HK, HK)]
                ref_in = [y.detach().double().requires_grad_() for y in x]
                route = routing(x[0].detach(), x[1].detach(), *config(name)[0])
                do = torch.randn(1, H, t, D, generator=g).to(device=device, dtype=dtype)
                ref = sparse_attention_reference(*ref_in, window=WINDOW, sinks=SINKS, **route)
                ref.backward(do.double())
                out = sparse_attention(*x, window=WINDOW, sinks=SINKS, impl="triton", **route)
                out.backward(do)
                errs = {"o": rel_rms_error(ref, out)}
                errs.update({n: rel_rms_error(r.grad, y.grad) for n, r, y in zip(("dq", "dk", "dv"), ref_in, x)})
                ok = all(e <= tol for e in errs.values())
                rows.append({"dtype": str(dtype).split(".")[1], "T": t, "config": name, "ok": ok, **errs})
                print(f"check {rows[-1]['dtype']:>8} T={t:5d} {name:>7} " + "  ".join(f"{k} {v:.2e}" for k, v in errs.items())
                      + ("  ok" if ok else "  FAIL"), flush=True)
    return rows


def fraction(a):
    import attnswap
    from attnswap.methods.attention.analysis import recording
    from attnswap.models import load_tokenizer
    from attnswap_kernels.mra import exact_attention, mra_attention

    tok = load_tokenizer("smollm2-135m")
    model = attnswap.load_model("smollm2-135m")
    ids = torch.tensor(tok(DATA.read_text(encoding="utf-8")[:400_000])["input_ids"][:a.tokens])[None]
    scale = model.model.layers[0].self_attn.scaling
    with torch.no_grad(), recording(model, inputs=True) as found:
        model(input_ids=ids, use_cache=False)
    acts = [tuple(x.float() for x in found[layer][0][1:]) for layer in sorted(found)]  # (q, k, v) per layer
    rows = []
    t = ids.shape[1]
    causal_pairs = t * (t + 1) / 2
    for name in a.configs:
        fracs, errs = [], []
        (buckets, drop), window = config(name)
        for q, k, v in acts:
            route = routing(q, k, buckets, drop)
            mask = allowed(t, t, window=window, sinks=SINKS, **route)
            fracs.append(float(mask.float().sum(dim=(-1, -2)).mean()) / causal_pairs)
            ex = exact_attention(q, k, v, causal=True, scale=scale)
            got = sparse_attention(q, k, v, scale=scale, window=window, sinks=SINKS, **route)
            errs.append(rel_rms_error(ex, got))
        r = {"method": "sparse", "config": name, "fraction": statistics.mean(fracs),
             "mean_rel_err": statistics.mean(errs), "max_rel_err": max(errs)}
        rows.append(r)
        print(f"sparse {name:>8}: computed fraction {r['fraction']:.3f}  rel err {r['mean_rel_err']:.4f} "
              f"(max {r['max_rel_err']:.4f})", flush=True)
    for budget in (0.5, 0.25, 0.125):
        errs = [rel_rms_error(exact_attention(q, k, v, causal=True, scale=scale),
                              mra_attention(q, k, v, causal=True, block_size=32, budget=budget, scale=scale))
                for q, k, v in acts]
        r = {"method": "mra", "config": f"budget {budget}", "fraction": budget, "mean_rel_err": statistics.mean(errs),
             "max_rel_err": max(errs)}
        rows.append(r)
        print(f"mra budget {budget}: rel err {r['mean_rel_err']:.4f} (max {r['max_rel_err']:.4f})", flush=True)
    return rows


def fraction_table(rows):
    lines = ["| method | setting | computed fraction | mean rel. error | max (layer) |", "|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['config']} | {r['fraction']:.3f} | {r['mean_rel_err']:.4f} | "
                     f"{r['max_rel_err']:.4f} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["speed", "fraction"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lengths", default="1024,4096,16384", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--configs", default="8/0.0,16/0.0,32/0.0,1/0.5", type=lambda s: s.split(","),
                   help="buckets/drop[/window][@blocked] entries (window 64 by default; @blocked: the PyTorch "
                        "CPU path)")
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--bwd-max", type=int, default=4096)
    p.add_argument("--check", action="store_true", help="check Triton against the reference first (CUDA)")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    info = {"device": device_name(a.device),
            "torch": torch.__version__, "window": WINDOW, "sinks": SINKS}
    print(info)
    checks = check(a.device) if a.check else []
    rows = {"speed": speed, "fraction": fraction}[a.what](a)
    print(speed_table(rows, ms_digits=2) if a.what == "speed" else fraction_table(rows))
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"info": info, "checks": checks, a.what: rows}, indent=2))
        if a.what == "speed":
            plot_speed(rows, out.with_suffix(".png"))
    if checks and not all(c["ok"] for c in checks):
        sys.exit(1)


if __name__ == "__main__":
    main()
