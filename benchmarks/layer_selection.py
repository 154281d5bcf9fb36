"""Layer selection on SmolLM2-135M: which layers to keep exact, by each criterion, and the perplexity it gives.

For one attention method and options (untrained), converts `--count` of the 30 layers chosen by each criterion
of `layers: auto` (measured on calibration text from the training file, never the test text) and evaluates
perplexity under the standard protocol (WikiText-2 test, 16,384 tokens, windows of 1,024). Prints a table,
writes JSON: the measurement's time, the scores, the chosen layers, the perplexity and ratio.

    python benchmarks/layer_selection.py --method mra --set block_budget=0.5 --count 26 --out docs/bench/layer-selection-mra-cpu
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml

import attnswap
from attnswap.data import calibration
from attnswap.evaluate import perplexity

TEST = "../shared/data/wikitext2-test.txt"
TRAIN = "../shared/data/train-wikipedia-enwiki2021.txt"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--method", default="mra")
    p.add_argument("--set", dest="sets", action="append", default=[], help="method option key=value")
    p.add_argument("--count", type=int, default=26, help="layers to convert")
    p.add_argument("--criteria", default="loss,kl-restore,output-error,evenly")
    p.add_argument("--calibration-tokens", type=int, default=4096)
    p.add_argument("--calibration-seq-len", type=int, default=512)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    options = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in a.sets)}
    tok = attnswap.load_tokenizer(a.model)
    model = attnswap.load_model(a.model)
    cal = calibration(tok, TRAIN, a.calibration_tokens, a.calibration_seq_len, seed=0)
    original = perplexity(model, tok, TEST, max_tokens=16384, seq_len=1024, progress=False)["perplexity"]
    rows = [{"criterion": "none (original)", "perplexity": original, "ratio": 1.0}]
    print(f"original: {original:.4f}", flush=True)
    for criterion in a.criteria.split(","):
        attnswap.revert(model)
        t0 = time.perf_counter()
        attnswap.convert(model, {"attention": [{"layers": {"auto": criterion, "count": a.count}, "method": a.method,
                                                "options": options}]}, calibration=cal)
        seconds = time.perf_counter() - t0
        sel = model.config.attnswap["prepared"]["attention.0"]["selection"]
        ppl = perplexity(model, tok, TEST, max_tokens=16384, seq_len=1024, progress=False)["perplexity"]
        rows.append({"criterion": criterion, "perplexity": ppl, "ratio": ppl / original, "kept_exact": sel["kept_exact"],
                     "selection_seconds": round(seconds, 1), "scores": sel.get("scores")})
        print(f"{criterion}: kept exact {sel['kept_exact']}, perplexity {ppl:.4f} ({ppl / original:.4f}x), "
              f"selection {seconds:.0f} s", flush=True)
        if a.out:
            info = {"args": vars(a), "calibration": cal.describe()}
            Path(a.out + ".json").write_text(json.dumps({"info": info, "rows": rows}, indent=2))
    print(f"\n| criterion | layers kept exact | perplexity | ratio | selection time |\n|---|---|---:|---:|---:|")
    for r in rows:
        kept = ",".join(map(str, r.get("kept_exact", []))) or "-"
        print(f"| {r['criterion']} | {kept} | {r['perplexity']:.3f} | {r['ratio']:.4f} | "
              f"{r.get('selection_seconds', '-')} |")


if __name__ == "__main__":
    main()
