"""KV-cache pruning on SmolLM2-135M: long-context perplexity and passkey accuracy per scorer and kept fraction.

    python benchmarks/memory_table.py --context 2048 --score-from 1024 --interval 256 \
        --namm-params runs/evolve/namm.safetensors --out docs/bench/memory-cpu

Every row is measured in this one run with the same text and keys. At budget 1.0 nothing is evicted and
every scorer is the unpruned model (tests/test_memory.py checks it), so that row is measured once. Columns:
perplexity of tokens score_from..context of the first `context` tokens of --data (of each of --documents
consecutive context-long stretches, pooled; fed in chunks of
`interval`, evicting after each), passkey accuracy (a 5-digit key at each depth of --passkey-context
tokens of filler, greedy answer), the kept fraction of the cache and its peak bytes during the perplexity
run. Writes <out>.json and <out>.png.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import attnswap
from attnswap.methods import kinds
from attnswap.methods.cache.tasks import long_context_perplexity, passkey

SCORERS = list(kinds()["cache"].all())  # every registered cache policy


def _fmt(x):
    return "-" if x is None else f"{x:.2f}"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default="../shared/data/wikitext2-test.txt")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--score-from", type=int, default=1024)
    p.add_argument("--interval", type=int, default=256)
    p.add_argument("--documents", type=int, default=1, help="perplexity pooled over this many consecutive "
                   "context-long stretches of --data")
    p.add_argument("--budgets", default="0.5,0.25")
    p.add_argument("--scorers", default=",".join(SCORERS))
    p.add_argument("--namm-params", default=None, help="evolved parameters: adds 'namm (evolved)' rows")
    p.add_argument("--tasks", default="ppl,passkey", help="ppl, passkey or both")
    p.add_argument("--passkey-context", type=int, default=1024)
    p.add_argument("--depths", default="0.1,0.5,0.9")
    p.add_argument("--trials", type=int, default=1)
    p.add_argument("--out", default=None)
    a = p.parse_args()

    tok = attnswap.load_tokenizer(a.model)
    model = attnswap.load_model(a.model)
    depths = [float(d) for d in a.depths.split(",")]
    setups = [("none (full cache)", "h2o", 1.0, None)]
    for b in (float(x) for x in a.budgets.split(",")):
        setups += [(s, s, b, None) for s in a.scorers.split(",")]
        if a.namm_params:
            setups.append(("namm (evolved)", "namm", b, a.namm_params))
    rows = []
    for label, scorer, budget, params in setups:
        attnswap.revert(model)
        attnswap.convert(model, scorer, budget=budget, interval=a.interval, **({"params": params} if params else {}))
        t0 = time.perf_counter()
        ppl = long_context_perplexity(model, tok, a.data, context=a.context, score_from=a.score_from,
                                      documents=a.documents)
        key = {"accuracy": None, "by_depth": {}}
        if "passkey" in a.tasks:
            key = passkey(model, tok, a.data, context=a.passkey_context, depths=depths, trials=a.trials)
        rows.append({"scorer": label, "budget": budget, "perplexity": ppl["perplexity"],
                     "passkey": key["accuracy"], "passkey_by_depth": key["by_depth"],
                     "kept_fraction": ppl["kept_fraction"], "peak_cache_bytes": ppl["peak_cache_bytes"],
                     "seconds": round(time.perf_counter() - t0, 1)})
        r = rows[-1]
        print(f"{label:18s} budget {budget:4.2f}: ppl {r['perplexity']:8.3f}  passkey {_fmt(r['passkey'])} "
              f"{r['passkey_by_depth']}  kept {r['kept_fraction']:.3f}  peak {r['peak_cache_bytes']:,} B  "
              f"({r['seconds']} s)", flush=True)
    print(f"\n| scorer | kept fraction | perplexity (tokens {a.score_from}..{a.context}, {a.documents} doc.) | passkey ({a.passkey_context} "
          f"tokens, depths {a.depths}) | peak cache bytes |\n|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['scorer']} | {r['budget']} | {r['perplexity']:.3f} | {_fmt(r['passkey'])} | "
              f"{r['peak_cache_bytes']:,} |")
    if "passkey" not in a.tasks:
        print("(passkey not measured: --tasks ppl)")
    if a.out:
        info = {"device": f"CPU, {torch.get_num_threads()} threads", "torch": torch.__version__, "args": vars(a)}
        Path(a.out).with_suffix(".json").write_text(json.dumps({"info": info, "rows": rows}, indent=2))
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        full = rows[0]["perplexity"]
        for label in dict.fromkeys(r["scorer"] for r in rows[1:]):
            pts = [(1.0, full)] + [(r["budget"], r["perplexity"]) for r in rows if r["scorer"] == label]
            ax.plot(*zip(*sorted(pts)), marker="o", label=label)
        ax.set_xlabel("kept fraction of the KV cache")
        ax.set_ylabel(f"perplexity, tokens {a.score_from}..{a.context}")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
        ax.set_title(f"{a.model}, KV pruning every {a.interval} tokens")
        fig.tight_layout()
        fig.savefig(Path(a.out).with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
