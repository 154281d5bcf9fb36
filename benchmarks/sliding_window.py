"""The sliding-window method's attention on the CPU: SDPA with the band mask (what the method computed before, and
still computes where the band kernel does not apply) against the compiled band kernel, beside full causal SDPA.

    python benchmarks/sliding_window.py --lengths 1024,4096,16384 --windows 64,256 --out docs/bench/sliding-window-cpu

SmolLM2-135M's attention shape (9 query heads, 3 KV heads, head dim 64, batch 1), random inputs, fp32, causal,
4 sinks. Each method runs as `SlidingWindow.forward` does: "masked w" builds `band_mask` and calls SDPA, "kernel
w" calls `window_attention`. Forward and forward+backward (up to --bwd-max), medians in one process. Prints a
table; writes <out>.json and <out>.png.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

from attnswap.methods.attention.sliding_window import band_mask
from attnswap_kernels.sparse_attn import window_attention

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, make_step, plot_speed, speed_rows, speed_table, write_json  # noqa: E402

H, HK, D, SINKS = 9, 3, 64, 4


def step_fn(name, mode, t, device, dtype):
    g = torch.Generator().manual_seed(t)
    x = [torch.randn(1, n, t, D, generator=g, dtype=dtype).requires_grad_(mode != "fwd") for n in (H, HK, HK)]
    kind, _, w = name.partition(" ")
    if kind == "sdpa":
        def fn(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    elif kind == "masked":
        def fn(q, k, v):
            mask = band_mask(t, t, int(w), SINKS, True, q.device)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    else:
        def fn(q, k, v):
            return window_attention(q, k, v, window=int(w), sinks=SINKS)
    return make_step(fn, x, mode)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="1024,4096,16384", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--windows", default="64,256", type=lambda s: s.split(","))
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--bwd-max", type=int, default=4096)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    a.device = "cpu"
    names = ["sdpa"] + [f"{kind} {w}" for w in a.windows for kind in ("masked", "kernel")]
    rows = speed_rows(names, a, step_fn, torch.float32)
    print(speed_table(rows, ms_digits=2))
    if a.out:
        write_json({"info": {"device": device_name("cpu"), "torch": torch.__version__,
                             "sinks": SINKS}, "speed": rows}, a.out)
        plot_speed(rows, Path(a.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
