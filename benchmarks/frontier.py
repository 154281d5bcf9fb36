"""The quality/efficiency frontier on SmolLM2-135M: perplexity against the number of converted layers.

Each point is a model: the original, trained checkpoints given with `--checkpoint` (e.g. the linear recipes'
exports), and a method converted untrained (`--method`, default MRA at block budget 0.25) on each of `--counts`
layers, the layers kept exact chosen by a measured criterion (`--criterion`, default `loss`) and by `evenly`.
The criterion's scores are measured once, by `layers: {auto: CRITERION}` at the largest count below the
number of layers; the smaller counts take the same scores through the same `choose` function `layers: auto`
uses (so they are the layers `auto` would pick), and are converted with those layers listed.

Beside each point: perplexity under the standard protocol (WikiText-2 test, 16,384 tokens, windows of 1,024),
the decoding cache bytes after a prompt of `--context` - 1 tokens and one generated token, and the prefill time
of that prompt (median of `--reps`, after a warm-up at 1,024 tokens). Prints a table, writes JSON and a PNG.

    python benchmarks/frontier.py --checkpoint linear-30=runs/smollm2-linear/final \
        --checkpoint linear-22-kl-restore=runs/smollm2-linear-hybrid/final --out docs/bench/frontier-cpu
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import yaml

import attnswap
from attnswap.data import calibration
from attnswap.evaluate import perplexity
from attnswap.generation import generate
from attnswap.methods.attention.selection import choose
from attnswap.surgery import plan_of

from common import line_panels

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TEST, TRAIN = str(DATA / "wikitext2-test.txt"), str(DATA / "train-wikipedia-enwiki2021.txt")


def converted(model, layers: int) -> dict:
    """The converted model's method, converted layers, layers kept exact and how they were chosen, from its plan."""
    plan, prepared = plan_of(model)
    (part,) = plan["attention"]  # one attention entry per point
    conv = list(range(layers)) if part["layers"] == "all" else part["layers"]
    sel = prepared.get("attention.0", {}).get("selection", {})
    return {"method": part["method"], "criterion": sel.get("criterion", "all" if len(conv) == layers else "listed"),
            "converted_layers": len(conv), "kept_exact": [i for i in range(layers) if i not in conv]}


def measure(model, tok, prompt: torch.Tensor, reps: int) -> dict:
    ppl = perplexity(model, tok, TEST, max_tokens=16384, seq_len=1024, progress=False)["perplexity"]
    generate(model, prompt[:, :1024], max_new_tokens=1)  # warm-up
    runs = [generate(model, prompt, max_new_tokens=1) for _ in range(reps)]
    return {"perplexity": ppl, "prefill_s": statistics.median(r["prefill_seconds"] for r in runs),
            "cache_bytes": runs[0]["peak_cache_bytes"]}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--checkpoint", action="append", default=[], help="LABEL=DIR of a converted (trained) model")
    p.add_argument("--method", default="mra")
    p.add_argument("--set", dest="sets", action="append", default=None, help="method option key=value")
    p.add_argument("--counts", default="30,22,15", help="converted layers per point")
    p.add_argument("--criterion", default="loss")
    p.add_argument("--calibration-tokens", type=int, default=4096)
    p.add_argument("--calibration-seq-len", type=int, default=512)
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    sets = a.sets if a.sets is not None else ["block_budget=0.25"]
    options = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in sets)}
    torch.manual_seed(0)
    tok = attnswap.load_tokenizer(a.model)
    ids = tok(Path(TEST).read_text(encoding="utf-8"), return_tensors="pt").input_ids
    prompt = ids[:, 16384:16384 + a.context - 1]  # past the perplexity protocol's tokens
    rows = []

    def record(label, model, **extra):
        t0 = time.perf_counter()
        info = converted(model, layers) if plan_of(model)[0] else {"method": "original", "criterion": "-",
                                                                  "converted_layers": 0, "kept_exact": []}
        r = {"label": label, **info, **extra, **measure(model, tok, prompt, a.reps),
             "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(r)
        print(f"{label:>28} | {r['converted_layers']:>2} converted | ppl {r['perplexity']:8.3f} | "
              f"cache {r['cache_bytes']:>12,} B | prefill {r['prefill_s']:6.2f} s", flush=True)
        if a.out:
            Path(a.out + ".json").write_text(json.dumps({"args": vars(a), "options": options, "rows": rows}, indent=2))

    model = attnswap.load_model(a.model)
    layers = model.config.num_hidden_layers
    record("original", model)
    for spec in a.checkpoint:
        label, src = spec.split("=", 1)
        ckpt = attnswap.load_model(src, merge_lora=True)
        record(label, ckpt, checkpoint=src, trained=True)
        del ckpt
    counts = sorted((int(c) for c in a.counts.split(",")), reverse=True)
    scores, first = None, next((c for c in counts if c < layers), None)
    for count in counts:
        for criterion in ([a.criterion, "evenly"] if count < layers else ["all"]):
            attnswap.revert(model)
            t0 = time.perf_counter()
            if criterion == "all":
                plan_layers = "all"
            elif criterion == "evenly" or scores is not None:
                plan_layers = choose(list(range(layers)), count, criterion, scores)
            else:
                cal = calibration(tok, TRAIN, a.calibration_tokens, a.calibration_seq_len, seed=0)
                plan_layers = {"auto": criterion, "count": first}
            attnswap.convert(model, {"attention": [{"layers": plan_layers, "method": a.method, "options": options}]},
                             calibration=cal if isinstance(plan_layers, dict) else None)
            sel = plan_of(model)[1].get("attention.0", {}).get("selection")
            if sel:
                scores = {int(k): v for k, v in sel["scores"].items()}
            seconds = round(time.perf_counter() - t0, 1)
            record(f"{a.method} untrained", model, trained=False, conversion_seconds=seconds)
            rows[-1]["criterion"] = criterion  # layers listed by `choose` are recorded as "listed" in the plan
    if a.out:
        Path(a.out + ".json").write_text(json.dumps({"args": vars(a), "options": options, "scores": scores,
                                                     "rows": rows}, indent=2))
        original = rows[0]
        panels = {"perplexity / original": {}, f"decoding cache MiB at {a.context}": {},
                  f"prefill s at {a.context}": {}}
        for r in rows[1:]:
            kind = f"{r['method']} ({'trained' if r['trained'] else 'untrained'})"
            # an all-converted point ends every line of its method
            keys = ([k for k in {f"{kind}, {x['criterion']}" for x in rows[1:] if x["criterion"] != "all"
                                 and x["method"] == r["method"] and x["trained"] == r["trained"]}]
                    if r["criterion"] == "all" else [f"{kind}, {r['criterion']}"]) or [f"{kind}, all"]
            vals = (r["perplexity"] / original["perplexity"], r["cache_bytes"] / 2**20, r["prefill_s"])
            for title, val in zip(panels, vals):
                for key in keys:
                    panels[title].setdefault(key, []).append((r["converted_layers"], val))
        for title, val in zip(panels, (1.0, original["cache_bytes"] / 2**20, original["prefill_s"])):
            for key in panels[title]:
                panels[title][key] = sorted(panels[title][key] + [(0, val)])
        line_panels(panels, a.out + ".png", xlabel=f"converted layers (of {layers})", ylabel="")
    print("\n| model | chosen by | converted layers | kept exact | perplexity | x original | decoding cache MiB | "
          "prefill s |\n|---|---|---:|---|---:|---:|---:|---:|")
    for r in rows:
        kept = ",".join(map(str, r["kept_exact"])) or "-"
        print(f"| {r['label']} | {r['criterion']} | {r['converted_layers']} | {kept} | {r['perplexity']:.3f} | "
              f"{r['perplexity'] / rows[0]['perplexity']:.3f} | {r['cache_bytes'] / 2**20:.1f} | {r['prefill_s']:.2f} |")


if __name__ == "__main__":
    main()
