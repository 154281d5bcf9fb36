"""lowrank's reduced attention on the CPU: causal attention whose q/k head size r is below v's, as
`attnswap.attention.reduced_attention` runs it, against SDPA at the full head size.

    python benchmarks/lowrank_attention.py --out docs/bench/lowrank-attention-cpu   # the defaults (lowrank.md)

GPT-2's attention shape (12 heads, head size 64, batch 1), random inputs, fp32, causal, scale 1/8. "r E" is the
compiled kernel with q and k of size E and v of size 64 (at E = 64: the same kernel at the full size); "sdpa" is
PyTorch's causal flash kernel at 64; "sdpa-math E" is SDPA on the reduced sizes (its math path, what calling SDPA
directly would cost). Forward and forward+backward (up to --bwd-max), medians in one process. Prints a table;
writes <out>.json and <out>.png.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

from attnswap.attention import reduced_attention
from attnswap_kernels.sparse_attn import window_attention

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, make_step, plot_speed, speed_rows, speed_table, write_json  # noqa: E402

H, D = 12, 64


class _Causal(torch.nn.Module):
    is_causal = True


def step_fn(name, mode, t, device, dtype):
    kind, _, e = name.partition(" ")
    e = int(e or D)
    g = torch.Generator().manual_seed(t)
    x = [torch.randn(1, H, t, n, generator=g, dtype=dtype).requires_grad_(mode != "fwd") for n in (e, e, D)]
    if kind in ("sdpa", "sdpa-math"):  # the same call: PyTorch picks its math path for unequal sizes
        def fn(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=D ** -0.5)
    elif e == D:  # the kernel at the full size (reduced_attention hands equal sizes to SDPA)
        def fn(q, k, v):
            return window_attention(q, k, v, window=t, scale=D ** -0.5)
    else:
        module = _Causal()

        def fn(q, k, v):
            return reduced_attention(module, q, k, v, None, scaling=D ** -0.5)[0]
    return make_step(fn, x, mode)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="1024,4096,16384", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--sizes", default="64,32,16", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--math", default="32", type=lambda s: [int(x) for x in s.split(",") if x],
                   help="reduced sizes to time through SDPA's math path too (empty: none)")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--bwd-max", type=int, default=4096)
    p.add_argument("--math-max", type=int, default=4096)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    a.device = "cpu"
    names = ["sdpa"] + [f"r {e}" for e in a.sizes]
    rows = speed_rows(names, a, step_fn, torch.float32)
    if a.math:
        short = argparse.Namespace(**{**vars(a), "lengths": [t for t in a.lengths if t <= a.math_max]})
        rows += speed_rows([f"sdpa-math {e}" for e in a.math], short, step_fn, torch.float32)
    print(speed_table(rows, ms_digits=2))
    if a.out:
        write_json({"info": {"device": device_name("cpu"), "torch": torch.__version__, "heads": H, "head_dim": D},
                    "speed": rows}, a.out)
        plot_speed(rows, Path(a.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
