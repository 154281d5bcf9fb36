"""Decoding cache size vs generated length: the original model's KV cache against a converted model's.

    python benchmarks/decode_memory.py --model smollm2-135m --tokens 4096 --out docs/bench/decode-memory-cpu

Converts the model to pure linear attention (window 0, sinks 0) and to the hybrid (window 64, sinks 4),
generates greedily from a short prompt and records the cache bytes every 256 tokens. Prints a table,
writes <out>.json and <out>.png.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import attnswap
from attnswap.generation import generate

SETUPS = {
    "original": None,
    "linear (pure)": dict(feature_map="hedgehog", window=0, sinks=0),
    "linear (window 64 + 4 sinks)": dict(feature_map="hedgehog", window=64, sinks=4),
}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--every", type=int, default=256)
    p.add_argument("--setups", default=",".join(SETUPS), help="comma-separated names from: " + ", ".join(SETUPS))
    p.add_argument("--out", default=None)
    a = p.parse_args()
    chosen = [n.strip() for n in a.setups.split(",")]
    tok = attnswap.load_tokenizer(a.model)
    prompt = tok("The history of the city begins", return_tensors="pt", add_special_tokens=False)["input_ids"]
    runs = {}
    for name in chosen:
        opts = SETUPS[name]
        model = attnswap.load_model(a.model)
        if opts is not None:
            attnswap.convert(model, "linear", **opts)
        r = generate(model, prompt, a.tokens, record_every=a.every)
        runs[name] = {"tokens_per_second": r["tokens_per_second"], "peak_cache_bytes": r["peak_cache_bytes"],
                      "trace": r["cache_trace"]}
        print(f"{name:>30}: {r['tokens_per_second']} tok/s, peak cache {r['peak_cache_bytes'] / 2**20:.2f} MiB", flush=True)
    lengths = [pt["generated"] for pt in next(iter(runs.values()))["trace"]]
    print("| generated | " + " | ".join(f"{n} cache bytes" for n in runs) + " |")
    print("|---:|" + "---:|" * len(runs))
    for i, n in enumerate(lengths):
        print(f"| {n} | " + " | ".join(str(r["trace"][i]["cache_bytes"]) for r in runs.values()) + " |")
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        info = {"model": a.model, "device": "cpu", "threads": torch.get_num_threads()}
        out.with_suffix(".json").write_text(json.dumps({"info": info, "runs": runs}, indent=2))
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for name, r in runs.items():
            ax.plot([pt["generated"] for pt in r["trace"]], [pt["cache_bytes"] / 2**20 for pt in r["trace"]],
                    marker=".", label=name)
        ax.set_xlabel("generated tokens")
        ax.set_ylabel("cache MiB")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
