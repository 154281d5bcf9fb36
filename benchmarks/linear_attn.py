"""Causal linear attention vs SDPA: forward and forward+backward time and peak memory at long T.

    python benchmarks/linear_attn.py --device cpu  --lengths 1024,4096,16384 --out docs/bench/linear-cpu
    python benchmarks/linear_attn.py --device cuda --lengths 1024,4096,16384,32768 --check --out $OUT

Shapes are SmolLM2-135M's: 9 query heads, 3 KV heads, head dim 64. The linear op gets Hedgehog
features (2 x 64 = 128 per head) and values with the normaliser column (65). SDPA is causal with GQA.
Prints a table; writes <out>.json and <out>.png. Medians of repeated runs, one process, one device.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

from attnswap_kernels import rel_rms_error
from attnswap_kernels.linear_attn import causal_linear_attn, causal_linear_attn_chunked

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, line_panels, speed_table, timed  # noqa: E402

H, HK, D, FEAT = 9, 3, 64, 128


def make_inputs(t, device, dtype, grad):
    g = torch.Generator(device="cpu").manual_seed(t)

    def rnd(*shape, pos=False):
        x = torch.rand(*shape, generator=g) if pos else torch.randn(*shape, generator=g)
        return x.to(device=device, dtype=dtype).requires_grad_(grad)

    return {
        "q": rnd(1, H, t, D), "k": rnd(1, HK, t, D), "v": rnd(1, HK, t, D),
        "fq": rnd(1, H, t, FEAT, pos=True), "fk": rnd(1, HK, t, FEAT, pos=True), "ve": rnd(1, HK, t, D + 1),
    }


def methods(device):
    m = {
        "sdpa": lambda x: F.scaled_dot_product_attention(x["q"], x["k"], x["v"], is_causal=True, enable_gqa=True),
        "linear": lambda x: causal_linear_attn(x["fq"], x["fk"], x["ve"]),
    }
    if device == "cuda":
        m["linear-torch"] = lambda x: causal_linear_attn_chunked(x["fq"], x["fk"], x["ve"])
        try:
            from fla.ops.linear_attn import chunk_linear_attn

            def fla(x):
                # fla has no GQA: keys/values repeated to 9 heads; [B, T, H, K] layout; it normalises itself
                q = x["fq"].transpose(1, 2)
                k = x["fk"].repeat_interleave(H // HK, 1).transpose(1, 2)
                v = x["ve"][..., :D].repeat_interleave(H // HK, 1).transpose(1, 2)
                return chunk_linear_attn(q, k, v, scale=1.0, normalize=True)[0]

            m["fla-chunk"] = fla
        except Exception as e:  # noqa: BLE001
            print(f"flash-linear-attention not available: {e}", file=sys.stderr)
    return m


def check(device):
    """Triton vs the chunked reference, fp32 and bf16, forward and gradients, odd lengths."""
    from attnswap_kernels.linear_attn.triton import causal_linear_attn_triton

    rows = []
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        for t in (1000, 4097):
            x = make_inputs(t, device, dtype, grad=True)
            ref_in = [x[n].detach().double().requires_grad_() for n in ("fq", "fk", "ve")]
            do = torch.randn(1, H, t, D + 1, device=device, dtype=dtype)
            ref = causal_linear_attn_chunked(*ref_in)
            ref.backward(do.double())
            out = causal_linear_attn_triton(x["fq"], x["fk"], x["ve"])
            out.backward(do)
            errs = {"o": rel_rms_error(ref, out)}
            for name, a, b in zip(("dq", "dk", "dv"), ref_in, (x["fq"], x["fk"], x["ve"])):
                errs[name] = rel_rms_error(a.grad, b.grad)
            ok = all(e <= tol for e in errs.values())
            rows.append({"dtype": str(dtype).split(".")[1], "T": t, "tolerance": tol, "ok": ok, **errs})
            print(f"check {rows[-1]['dtype']:>8} T={t:5d}  " + "  ".join(f"{k} {v:.2e}" for k, v in errs.items())
                  + ("  ok" if ok else "  FAIL"))
    return rows


def run(device, lengths, reps):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    results = []
    for t in lengths:
        for name, fn in methods(device).items():
            for mode in ("fwd", "fwd+bwd"):
                x = make_inputs(t, device, dtype, grad=mode != "fwd")

                def step():
                    if mode == "fwd":
                        with torch.no_grad():
                            return fn(x)
                    out = fn(x)
                    out.float().sum().backward()
                    return out

                try:
                    ms, peak = timed(step, device, reps if t <= 4096 else max(2, reps // 2))
                except (RuntimeError, torch.OutOfMemoryError) as e:
                    print(f"{name} T={t} {mode}: {str(e).splitlines()[0]}", file=sys.stderr)
                    continue
                results.append({"T": t, "method": name, "mode": mode, "ms": ms, "peak_mib": peak})
                print(f"T={t:6d} {name:>13} {mode:>8}: {ms:10.2f} ms"
                      + ("" if peak is None else f"  peak {peak:9.1f} MiB"), flush=True)
    return results


def plot(results, path):
    names = dict.fromkeys(r["method"] for r in results)
    panels = {m: {n: [(r["T"], r["ms"]) for r in results if r["method"] == n and r["mode"] == m] for n in names}
              for m in ("fwd", "fwd+bwd")}
    line_panels(panels, path, "sequence length T", "ms (median)", log2=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lengths", default="1024,4096,16384")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--check", action="store_true", help="check Triton against the reference first (CUDA)")
    p.add_argument("--out", default=None, help="write <out>.json and <out>.png")
    a = p.parse_args()
    info = {"device": device_name(a.device),
            "torch": torch.__version__}
    print(info)
    checks = check(a.device) if a.check else []
    results = run(a.device, [int(x) for x in a.lengths.split(",")], a.reps)
    print(speed_table(results, ms_digits=2))
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"info": info, "checks": checks, "results": results}, indent=2))
        plot(results, out.with_suffix(".png"))
    if checks and not all(c["ok"] for c in checks):
        sys.exit(1)


if __name__ == "__main__":
    main()
