"""Issue 19's protocol on MiniLM-L6: every encoder method untrained and after the same distillation budget.

    python benchmarks/encoders.py --out docs/bench/encoders-minilm            # all entries (resumes: done ones kept)
    python benchmarks/encoders.py --only xca,soft --out docs/bench/encoders-minilm
    python benchmarks/encoders.py --table --ops docs/bench/encoder-ops-cpu.json --out docs/bench/encoders-minilm
    python benchmarks/encoders.py --only lowrank --out docs/bench/lowrank-minilm   # docs/methods/lowrank.md

For each entry: MiniLM-L6 with all 6 layers converted; then, untrained and after `distill` (attention transfer,
only the new parameters, every layer to its original output; the budget below, the same for every method):
- embedding fidelity: mean / min cosine of mean-pooled embeddings to the original's on the first 1,000 WikiText-2
  test sentences and on 200 consecutive test passages of 256 tokens (benchmarks/mra.py's protocol);
- retrieval: `attnswap.retrieval` on WikiText-2 test, 500 passages of 256 tokens (the `eval retrieval` protocol):
  accuracy@1, MRR, top-10 overlap with the original;
- the distillation's held-out relative MSE per layer, before and after, and its seconds.
Methods without new parameters (mra, sliding-window) have nothing to distill: one row. Writes <out>.json after
every entry and prints the table.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name  # noqa: E402
from mra import mean_pooled, wiki_passages, wiki_sentences  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
TEST = DATA / "wikitext2-test.txt"
TRAIN = DATA / "train-wikipedia-enwiki2021.txt"

# label -> (method, options, calibration windows of 512 tokens needed)
# distillation learning rate where not --lr: linformer trains every entry of E and F (131,072 per layer); 3e-4 had
# the lowest held-out loss of 1e-3 / 3e-4 / 1e-4 on 131,072 tokens (0.221 / 0.207 / 0.215, from 0.291)
LR = {"linformer": 3e-4}
ENTRIES = {  # in the order they run: issue 19's methods first
    "xca": ("xca", {}, False),
    "separable": ("separable", {}, False),
    "additive": ("additive", {}, False),
    "linformer r128 (pca)": ("linformer", {"rank": 128, "init": "pca"}, True),
    "linformer r128 (pooling)": ("linformer", {"rank": 128, "init": "pooling"}, False),
    "soft m64": ("soft", {"landmarks": 64}, False),
    "soft m64 (shared q = k)": ("soft", {"landmarks": 64, "shared": True}, False),
    "linear (hedgehog, pure)": ("linear", {"window": 0, "sinks": 0}, False),
    "lln (pure)": ("lln", {"window": 0, "sinks": 0}, True),
    "mra 0.5": ("mra", {"block_budget": 0.5}, False),
    "mra 0.25": ("mra", {"block_budget": 0.25}, False),
    "sliding-window 16": ("sliding-window", {"window": 16}, False),
    "sliding-window 32": ("sliding-window", {"window": 32}, False),
    "sliding-window 64": ("sliding-window", {"window": 64}, False),
    "sliding-window 128": ("sliding-window", {"window": 128}, False),
    "linformer r128 (pooling, pad)": ("linformer", {"rank": 128, "init": "pooling", "lengths": "pad"}, False),
    "soft m64 (a sink landmark)": ("soft", {"landmarks": 64, "sinks": 1}, False),
    # lowrank on q and k only: the scores in a reduced head size, and the full-size PCA projections beside them
    **{f"lowrank q/k {mode} {e}": ("lowrank", {"attention": mode, "energy": e, "targets": ["q", "k"]}, True)
       for e in (0.999, 0.99, 0.95) for mode in ("reduced", "full")},
}


def fidelity(model, tok, texts, refs) -> dict:
    out = {}
    for kind, t in texts.items():
        got, _ = mean_pooled(model, tok, t)
        cos = F.cosine_similarity(got, refs[kind], dim=-1)
        out[kind] = {"mean_cos": round(float(cos.mean()), 5), "min_cos": round(float(cos.min()), 5)}
    return out


def measured(model, tok, texts, refs, text, original_sim, a) -> dict:
    from attnswap.retrieval import retrieval, top_k_overlap

    model.eval()  # distill leaves it training (BERT's dropout)
    with torch.no_grad():
        r = retrieval(model, tok, text, passages=a.passages, length=256)
        fid = fidelity(model, tok, texts, refs)
    return {"cosine": fid, "accuracy_at_1": r["accuracy_at_1"], "mrr": round(r["mrr"], 5),
            "top10_overlap": round(top_k_overlap(r["sim"], original_sim), 5)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=None, help="comma-separated labels or method names")
    p.add_argument("--tokens", type=int, default=524_288, help="distillation tokens (the common budget)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--passages", type=int, default=500)
    p.add_argument("--ops", default=None, help="benchmarks/encoder_ops.py's JSON: adds its speed ratios")
    p.add_argument("--table", action="store_true", help="only print the table of <out>.json")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    ops = json.loads(Path(a.ops).read_text())["ops"] if a.ops else None
    if a.table:
        print(table(json.loads(Path(a.out).with_suffix(".json").read_text()), ops))
        return

    import attnswap
    from attnswap.config import DistillConfig
    from attnswap.data import calibration
    from attnswap.distill import distill
    from attnswap.models import load_tokenizer
    from attnswap.retrieval import retrieval
    from attnswap.surgery import method_modules

    out = Path(a.out).with_suffix(".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    done = json.loads(out.read_text()) if out.exists() else {"info": {}, "rows": {}}
    tok = load_tokenizer("minilm-l6")
    text = TEST.read_text(encoding="utf-8")
    texts = {"sentences": wiki_sentences(1000), "passages": wiki_passages(200, tok)}
    original = attnswap.load_model("minilm-l6")
    with torch.no_grad():
        refs = {kind: mean_pooled(original, tok, t)[0] for kind, t in texts.items()}
        base = retrieval(original, tok, text, passages=a.passages, length=256)
    done["info"] = {"device": device_name("cpu"), "torch": torch.__version__,
                    "distill": {"data": TRAIN.name, "tokens": a.tokens, "seq_len": a.seq_len,
                                "batch_size": a.batch_size, "lr": a.lr},
                    "original": {"accuracy_at_1": base["accuracy_at_1"], "mrr": round(base["mrr"], 5)}}
    wanted = None if a.only is None else set(a.only.split(","))
    for label, (method, options, needs_cal) in ENTRIES.items():
        if (wanted and label not in wanted and method not in wanted) or (not wanted and label in done["rows"]):
            continue
        cal = calibration(tok, str(TRAIN), tokens=8 * 512, seq_len=512) if needs_cal else None
        model = attnswap.convert(attnswap.load_model("minilm-l6"), method, calibration=cal, **options)
        row = {"method": method, "options": options, "untrained": measured(model, tok, texts, refs, text,
                                                                           base["sim"], a)}
        print(label, "untrained", row["untrained"], flush=True)
        if any(p.requires_grad for m in method_modules(model).values() for p in m.trainable_parameters()):
            t0 = time.perf_counter()
            r = distill(model, tok, DistillConfig(data=str(TRAIN), tokens=a.tokens, seq_len=a.seq_len,
                                                  batch_size=a.batch_size, lr=LR.get(method, a.lr)),
                         progress=False)
            row["distill"] = {"seconds": round(time.perf_counter() - t0, 1), "steps": r["steps"],
                              "lr": LR.get(method, a.lr),
                              "layer_loss_start": r["layer_loss_start"], "layer_loss_final": r["layer_loss_final"]}
            row["distilled"] = measured(model, tok, texts, refs, text, base["sim"], a)
            print(label, "distilled", row["distill"]["seconds"], "s", row["distilled"], flush=True)
        done["rows"][label] = row
        out.write_text(json.dumps(done, indent=2))
    print(table(done, ops))


# the op each entry runs in benchmarks/encoder_ops.py (its speed columns), by label or else by method
OPS = {"xca": "xca", "separable": "separable", "additive": "additive", "linformer": "linformer r128",
       "soft": "soft m64", "linear": "linear (hedgehog, pure)", "lln": "lln (pure)", "mra 0.25": "mra@0.25",
       "sliding-window 64": "sliding-window 64"}


def op_ratios(label: str, method: str, ops: list[dict] | None) -> str:
    name = OPS.get(label) or (OPS.get(method) if method not in ("mra", "sliding-window") else None)
    if not ops or name is None:
        return "- | -"
    sdpa = {r["T"]: r["ms"] for r in ops if r["op"] == "sdpa"}
    got = {r["T"]: sdpa[r["T"]] / r["ms"] for r in ops if r["op"] == name}
    return " | ".join(f"{got[t]:.1f}x" if t in got else "-" for t in (4096, 16384))


def table(done, ops: list[dict] | None = None) -> str:
    o = done["info"]["original"]
    lines = ["| model | distilled | sentences mean / min cos | passages mean / min cos | accuracy@1 | MRR | "
             "top-10 overlap | op x SDPA 4k | op x SDPA 16k |", "|---|---|---:|---:|---:|---:|---:|---:|---:|",
             f"| original | - | 1 / 1 | 1 / 1 | {o['accuracy_at_1']:.4f} | {o['mrr']:.4f} | 1 | 1 | 1 |"]
    for label, row in done["rows"].items():
        for stage in ("untrained", "distilled"):
            r = row.get(stage)
            if r is None:
                continue
            c = r["cosine"]
            lines.append(f"| {label} | {'yes' if stage == 'distilled' else 'no'} | "
                         f"{c['sentences']['mean_cos']:.4f} / {c['sentences']['min_cos']:.4f} | "
                         f"{c['passages']['mean_cos']:.4f} / {c['passages']['min_cos']:.4f} | "
                         f"{r['accuracy_at_1']:.4f} | {r['mrr']:.4f} | {r['top10_overlap']:.4f} | "
                         f"{op_ratios(label, row['method'], ops)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
