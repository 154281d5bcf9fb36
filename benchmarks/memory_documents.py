"""KV-cache pruning on SmolLM2-135M, per document: the spread that tells a 1 % difference from noise.

    python benchmarks/memory_documents.py --documents 8 --budget 0.25 \
        --namm-params docs/bench/memory-namm-evolved.safetensors --out docs/bench/memory-documents-cpu

For each of --documents consecutive --context-token documents of --data (WikiText-2 test by default), the
perplexity of tokens --score-from..--context with the cache pruned to --budget every --interval tokens, per
setup: the full cache, streaming, h2o / tova / snapkv in both conventions (attnswap's, and `convention: kvpress`,
snapkv then with kvpress's window of 64), and namm with the evolved vector. Prints per setup the mean over
documents, its standard deviation and standard error, and the paired difference to the best press per document;
writes <out>.json.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

import attnswap
from attnswap.data import encode, read_text
from attnswap.methods.cache.tasks import run_chunked


def setups(a):
    out = [("full cache", "h2o", {"budget": 1.0}), ("streaming", "streaming", {})]
    for name in ("h2o", "tova", "snapkv"):
        out.append((name, name, {}))
        out.append((f"{name} (kvpress)", name, {"convention": "kvpress",
                                                 **({"window": a.kvpress_window} if name == "snapkv" else {})}))
    if a.namm_params:
        out.append(("namm (evolved)", "namm", {"params": a.namm_params}))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default="../shared/data/wikitext2-test.txt")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--score-from", type=int, default=1024)
    p.add_argument("--interval", type=int, default=256)
    p.add_argument("--documents", type=int, default=8)
    p.add_argument("--budget", type=float, default=0.25)
    p.add_argument("--namm-params", default=None)
    p.add_argument("--kvpress-window", type=int, default=64, help="snapkv's window under convention kvpress "
                                                                   "(kvpress's default 64)")
    p.add_argument("--setups", default=None, help="comma list of setup labels to run (default: all)")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    tok = attnswap.load_tokenizer(a.model)
    model = attnswap.load_model(a.model)
    ids = encode(tok, read_text(a.data, max_chars=6 * a.context * a.documents + 10_000))
    docs = [ids[d * a.context:(d + 1) * a.context][None] for d in range(a.documents)]
    assert all(d.shape[1] == a.context for d in docs), "the data is too short for that many documents"
    rows = []
    chosen = setups(a) if not a.setups else [x for x in setups(a) if x[0] in a.setups.split(",")]
    for label, policy, opts in chosen:
        attnswap.revert(model)
        attnswap.convert(model, policy, **{"budget": a.budget, "interval": a.interval, **opts})
        t0 = time.perf_counter()
        ppl = []
        for doc in docs:
            nll, count, _, _ = run_chunked(model, doc, a.interval, score_from=a.score_from)
            ppl.append(math.exp(nll / count))
        rows.append({"setup": label, "policy": policy, "options": opts, "perplexity": ppl,
                     "seconds": round(time.perf_counter() - t0, 1)})
        print(f"{label:18s} mean {statistics.mean(ppl):8.3f}  per document {[round(x, 3) for x in ppl]}  "
              f"({rows[-1]['seconds']} s)", flush=True)
    presses = [r for r in rows if r["setup"] not in ("full cache", "namm (evolved)")] or rows
    best = min(presses, key=lambda r: statistics.mean(r["perplexity"]))
    n = a.documents
    print(f"\n| setup | mean ppl | std over {n} documents | std error | paired vs {best['setup']} (mean, std error) |"
          "\n|---|---:|---:|---:|---:|")
    for r in rows:
        v = r["perplexity"]
        d = [x / y - 1 for x, y in zip(v, best["perplexity"])]
        r["paired_vs_best"] = {"best": best["setup"], "mean": statistics.mean(d), "se": statistics.stdev(d) / math.sqrt(n)}
        print(f"| {r['setup']} | {statistics.mean(v):.3f} | {statistics.stdev(v):.3f} | "
              f"{statistics.stdev(v) / math.sqrt(n):.3f} | {100 * statistics.mean(d):+.2f} % "
              f"(± {100 * r['paired_vs_best']['se']:.2f} %) |")
    if a.out:
        info = {"device": f"CPU, {torch.get_num_threads()} threads", "torch": torch.__version__, "args": vars(a)}
        Path(a.out).with_suffix(".json").write_text(json.dumps({"info": info, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
