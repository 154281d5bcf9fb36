"""gmm-mask on SmolLM2-135M: does a learned Gaussian-mixture locality mask help a short LoRA fine-tune, with the
original attention and with a short sliding window (does a locality prior recover what the window loses)?

Every arm starts from the same model and trains on the same windows of --data (same seed, order, LoRA rank 8 on
q/k/v/o, lr, schedule; the mask's own parameters at --variant-lr), then is evaluated under the standard protocol
(WikiText-2 test, 16,384 tokens, windows of 1,024):
- `lora`: the original attention + LoRA;
- `gmm-multiply`, `gmm-add`: the same + gmm-mask on every layer (the paper's multiplicative form; additive bias);
- `window`: sliding-window (--window + 4 sinks) on every layer + LoRA;
- `window+gmm-multiply`, `window+gmm-add`: the window + the mask + LoRA.
Also the perplexity of each converted model before training (the mask starts exact) and the trained widths and
amplitudes (mean |a| per Gaussian). Prints a table, writes <out>.json.

    python benchmarks/gmm_mask.py --out docs/bench/gmm-mask-cpu
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import attnswap
from attnswap.config import FinetuneConfig
from attnswap.evaluate import perplexity
from attnswap.surgery import method_modules
from attnswap.train import finetune
from common import write_json


def plan(arm: str, window: int) -> dict | None:
    out = {}
    if arm.startswith("window"):
        out["attention"] = [{"layers": "all", "method": "sliding-window", "options": {"window": window, "sinks": 4}}]
    if "gmm" in arm:
        out["scores"] = {"method": "gmm-mask", "options": {"mode": arm.rsplit("-", 1)[1]}}
    return out or None


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default="../shared/data/train-wikipedia-enwiki2021.txt")
    p.add_argument("--eval-data", default="../shared/data/wikitext2-test.txt")
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--variant-lr", type=float, default=1e-2)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--arms", default="lora,gmm-multiply,gmm-add,window,window+gmm-multiply,window+gmm-add")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    tok = attnswap.load_tokenizer(a.model)
    ev = dict(max_tokens=a.eval_tokens, seq_len=1024, progress=False)
    t_all = time.perf_counter()
    results = {"config": vars(a), "original": perplexity(attnswap.load_model(a.model), tok, a.eval_data, **ev)["perplexity"],
               "arms": {}}
    print(f"original: {results['original']:.3f}", flush=True)
    for arm in a.arms.split(","):
        model = attnswap.load_model(a.model)
        spec = plan(arm, a.window)
        if spec:
            attnswap.convert(model, spec)
        before = perplexity(model, tok, a.eval_data, **ev)["perplexity"]
        cfg = FinetuneConfig(data=a.data, steps=a.steps, seq_len=a.seq_len, lr=a.lr, variant_lr=a.variant_lr,
                             warmup=min(10, a.steps // 5), save_every=10 ** 6)
        with tempfile.TemporaryDirectory() as work:
            r = finetune(model, tok, cfg, Path(work) / "ft", progress=False)
        after = perplexity(model, tok, a.eval_data, **ev)["perplexity"]
        row = {"plan": spec, "before": before, "after": after, "train_seconds": r.get("seconds"),
               "train_tokens": a.steps * a.seq_len}
        mods = list(method_modules(model, "scores").values())
        if mods:
            amp = torch.stack([m.amplitude.detach().float() for m in mods])  # [L, n, H]
            sig = torch.stack([m.log_sigma.detach().float().exp() for m in mods])
            row["mean_abs_amplitude"] = amp.abs().mean((0, 2)).tolist()
            row["median_sigma"] = sig.median(-1).values.median(0).values.tolist()
        results["arms"][arm] = row
        print(f"{arm}: before {before:.3f}, after {after:.3f} ({row['train_seconds']} s)"
              + (f", |a| {[round(x, 3) for x in row['mean_abs_amplitude']]}, sigma {[round(x, 1) for x in row['median_sigma']]}"
                 if mods else ""), flush=True)
    results["wall_seconds"] = round(time.perf_counter() - t_all, 1)
    base = results["original"]
    print(f"\noriginal {base:.3f}; {a.steps} steps x {a.seq_len} tokens, LoRA r 8 lr {a.lr}, mask lr {a.variant_lr}")
    print("| arm | before | after | after / original | train s |\n|---|---:|---:|---:|---:|")
    for arm, r in results["arms"].items():
        print(f"| {arm} | {r['before']:.3f} | {r['after']:.3f} | {r['after'] / base:.3f} | {r['train_seconds']} |")
    print(f"wall {results['wall_seconds']} s")
    write_json(results, a.out)


if __name__ == "__main__":
    main()
