"""Plans on SmolLM2-135M, and the README's untrained / exact numbers re-measured on the restructured code.

Prints one table and writes JSON (every row measured in this one run):
- perplexity under the protocol (WikiText-2 test, 16,384 tokens, windows of 1,024) of the original, of the
  exact mixed plan (layers 0-14 sliding-window with a window covering the sequence, 15-29 mra at block_budget
  1.0, cache policy h2o at 1.0), and of the README's exact / untrained settings;
- `eval memory` (long-context perplexity, the memory table's protocol) of the full cache, of the exact plan,
  of the hybrid plan (0-9 linear, 10-29 original, h2o at 0.25: only the 20 original layers are pruned), and
  of the committed evolved namm vectors beside the baselines the README compares them with;
- the hybrid plan: generate runs, save -> export -> load gives the same logits.

    python benchmarks/plan_checks.py --out docs/bench/plans-cpu
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import attnswap
from attnswap import commands
from attnswap.config import EvalConfig, ExportConfig, GenerateConfig
from attnswap.evaluate import perplexity
from attnswap.methods.cache.tasks import long_context_perplexity

DATA = "../shared/data/wikitext2-test.txt"
BENCH = Path(__file__).resolve().parent.parent / "docs" / "bench"
EXACT = {"attention": [{"layers": "0-14", "method": "sliding-window", "options": {"window": 8192, "sinks": 0}},
                       {"layers": "15-29", "method": "mra", "options": {"block_budget": 1.0}}],
         "cache": {"policy": "h2o", "budget": 1.0, "interval": 256}}
HYBRID = {"attention": [{"layers": "0-9", "method": "linear"}],
          "cache": {"policy": "h2o", "budget": 0.25, "interval": 256}}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--runs", default="runs/plan-checks")
    p.add_argument("--skip", default="", help="comma-separated groups to skip: ppl, memory, memory8k, hybrid")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    skip = set(a.skip.split(","))
    runs = Path(a.runs)
    tok = attnswap.load_tokenizer(a.model)
    model = attnswap.load_model(a.model)
    rows = []

    def record(group, label, value, readme=None, seconds=None, **extra):
        rows.append({"group": group, "setting": label, "value": value, "readme": readme, "seconds": seconds, **extra})
        diff = "" if readme is None else f"  (README {readme}; {100 * (value / readme - 1):+.3f} %)"
        print(f"[{group}] {label}: {value:.4f}{diff}" + (f"  [{seconds:.0f} s]" if seconds else ""), flush=True)
        if a.out:
            Path(a.out + ".json").write_text(json.dumps(rows, indent=2))

    def ppl(label, what=None, readme=None, **options):
        attnswap.revert(model)
        if what is not None:
            attnswap.convert(model, what, **options)
        t0 = time.perf_counter()
        r = perplexity(model, tok, DATA, max_tokens=16384, seq_len=1024, progress=False)
        record("perplexity 16k", label, r["perplexity"], readme, time.perf_counter() - t0)

    def memory(group, label, what, readme=None, context=2048, score_from=1024, documents=4, interval=256, **options):
        attnswap.revert(model)
        if isinstance(what, str):
            attnswap.convert(model, what, interval=interval, **options)
        elif what is not None:
            attnswap.convert(model, what, **options)
        t0 = time.perf_counter()
        r = long_context_perplexity(model, tok, DATA, context=context, score_from=score_from, documents=documents,
                                    chunk=interval)
        record(group, label, r["perplexity"], readme, time.perf_counter() - t0, kept_fraction=r["kept_fraction"],
               pruned_layers=r["pruned_layers"], peak_cache_bytes=r["peak_cache_bytes"])

    if "ppl" not in skip:
        ppl("original", None, 22.749)
        ppl("plan: 0-14 sliding-window (window 8192), 15-29 mra block_budget 1.0, h2o 1.0", EXACT, 22.749)
        ppl("none (the original attention through attnswap)", "none", 22.749)
        ppl("sliding-window 256 + 4 sinks", "sliding-window", 26.615, window=256, sinks=4)
        ppl("sliding-window 64 + 4 sinks", "sliding-window", 39.12, window=64, sinks=4)
        ppl("mra block_budget 1.0", "mra", 22.749, block_budget=1.0)
        ppl("mra block_budget 0.5", "mra", 24.525, block_budget=0.5)
        ppl("mra block_budget 0.25", "mra", 33.547, block_budget=0.25)
        ppl("diff (untrained)", "diff", 13102.0)
        ppl("dex heads all (starts as the original)", "dex", 22.749)
    if "memory" not in skip:  # docs/variants/memory.md's 2,048 table: tokens 1,024..2,048 of 4 documents
        memory("memory 2k", "full cache", None, 20.895)
        memory("memory 2k", "plan: exact mixed + h2o 1.0", EXACT, 20.895)
        memory("memory 2k", "h2o 0.25", "h2o", 25.04, budget=0.25, interval=256)
        memory("memory 2k", "namm 0.25, evolved (docs/bench/memory-namm-evolved.safetensors)", "namm", 24.90,
               budget=0.25, interval=256, params=str(BENCH / "memory-namm-evolved.safetensors"))
        memory("memory 2k", "plan: 0-9 linear (untrained), h2o 0.25 on 10-29", HYBRID)
        memory("memory 2k", "0-9 linear (untrained), full cache", {"attention": HYBRID["attention"]})
    if "memory8k" not in skip:  # the 8,192 table: tokens 4,096..8,192 of the first document, interval 512
        kw = dict(context=8192, score_from=4096, documents=1, interval=512)
        memory("memory 8k", "full cache", None, 27.663, **kw)
        memory("memory 8k", "streaming 0.25", "streaming", 28.425, budget=0.25, **kw)
        memory("memory 8k", "namm 0.25, evolved at 2k then 8k (docs/bench/memory-namm-evolved-8k.safetensors)",
               "namm", 28.29, budget=0.25, params=str(BENCH / "memory-namm-evolved-8k.safetensors"), **kw)
    if "hybrid" not in skip:
        attnswap.revert(model)
        src = runs / "hybrid"
        import yaml

        runs.mkdir(parents=True, exist_ok=True)
        (runs / "hybrid.yaml").write_text(yaml.safe_dump(HYBRID))
        from attnswap.config import ConvertConfig

        commands.convert(a.model, ConvertConfig(plan=str(runs / "hybrid.yaml")), str(src), force=True)
        g = commands.generate(str(src), GenerateConfig(prompt="The history of the city", max_new_tokens=32))
        record("hybrid", "generate: tokens/s (32 new tokens)", g["tokens_per_second"], None, None,
               text=g["text"], peak_cache_bytes=g["peak_cache_bytes"])
        commands.export(str(src), ExportConfig(), str(runs / "hybrid-export"), force=True)
        ids = torch.tensor([tok("The history of the city of Paris begins", add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            x = attnswap.load(src)(input_ids=ids).logits
            y = attnswap.load(runs / "hybrid-export")(input_ids=ids).logits
        record("hybrid", "save -> export -> load: max abs logit difference", float((x - y).abs().max()))
        r = commands.eval_perplexity(str(src), EvalConfig(data=DATA))
        record("hybrid", "perplexity 16k of the untrained hybrid (plain forward: the policy acts only in decoding)",
               r["perplexity"])


if __name__ == "__main__":
    main()
