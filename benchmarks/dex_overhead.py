"""Inference overhead of `dex` vs the original SmolLM2-135M: forward time of the whole model at T tokens.

    python benchmarks/dex_overhead.py --lengths 1024,4096 --out docs/bench/dex-overhead-cpu

The dex model adapts every head of every layer with lambda switched on (ramp 1, random W), the worst case
for its extra D x D product; "sdpa" is the unconverted model. Medians of --reps forward passes (batch 1,
no grad, fp32), alternating the two models so that drift on a shared machine hits both. Prints a table and
writes <out>.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import attnswap
from attnswap.surgery import method_modules


def forward_ms(model, ids) -> float:
    with torch.no_grad():
        t0 = time.perf_counter()
        model(input_ids=ids)
        return (time.perf_counter() - t0) * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--lengths", default="1024,4096", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    base = attnswap.load_model(a.model)
    dex = attnswap.load_model(a.model)
    attnswap.convert(dex, "dex")
    with torch.no_grad():
        for v in method_modules(dex).values():
            v.ramp.fill_(1.0)
            v.weight.add_(0.02 * torch.randn_like(v.weight))
    rows = []
    for t in a.lengths:
        ids = torch.randint(1, base.config.vocab_size, (1, t), generator=torch.Generator().manual_seed(t))
        times = {"original": [], "dex": []}
        forward_ms(base, ids), forward_ms(dex, ids)  # warm-up
        for _ in range(a.reps):
            times["original"].append(forward_ms(base, ids))
            times["dex"].append(forward_ms(dex, ids))
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"T": t, "original_ms": med["original"], "dex_ms": med["dex"],
                     "overhead": med["dex"] / med["original"] - 1})
        print(f"T={t:5d}: original {med['original']:8.1f} ms  dex {med['dex']:8.1f} ms  "
              f"overhead {100 * rows[-1]['overhead']:+.1f} %", flush=True)
    info = {"device": f"CPU, {torch.get_num_threads()} threads", "torch": torch.__version__, "model": a.model,
            "reps": a.reps}
    print("| T | original ms | dex ms | overhead |\n|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['T']} | {r['original_ms']:.1f} | {r['dex_ms']:.1f} | {100 * r['overhead']:+.1f} % |")
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"info": info, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
