"""DEX adaptation vs a plain LoRA fine-tune of SmolLM2-135M at the same training tokens, side by side.

    python benchmarks/dex_adapt.py --steps 200 --out docs/bench/dex-adapt-cpu --work runs/dex-adapt

Every arm starts from the same model, trains on the same windows of --data (same seed, order, LoRA rank, lr and
schedule) and is evaluated on the foundation's protocol (wikitext2-test, 16,384 tokens, windows of 1,024):
- `lora`: the original attention, LoRA on q/k/v/o;
- `dex`: `dex` on a fraction of the heads chosen on calibration text (--dex options), plus the same LoRA;
- `dex-only` (optional): the same dex conversion with LoRA rank 0 (only the dex maps and lambdas train).
Per model it also measures, on --analysis-windows windows of the evaluation text, the two quantities the
DEX paper analyses:
- negative attention: the attention mass a head puts on keys whose value it reverses. A dex head outputs
  sum_j a_ij v_j M (rescaled by a positive norm ratio) with M = I - lambda W; key j counts as negatively attended when v_j . (v_j M) < 0. For a
  softmax head (M = I) the fraction is 0 by construction. Reported over all heads and over the adapted heads.
- head redundancy: each head's mean per-token cosine to the other heads of its layer, averaged over heads
  and layers (`attnswap.methods.attention.analysis.head_redundancy`); also over the adapted heads alone.
Prints a table and writes <out>.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import attnswap
from attnswap.methods.attention.analysis import head_redundancy, recording
from attnswap.config import FinetuneConfig
from attnswap.data import calibration, encode, read_text, windows
from attnswap.evaluate import perplexity
from attnswap.surgery import method_modules
from attnswap.train import finetune


def parse_options(text: str) -> dict:
    import yaml

    return {k: yaml.safe_load(v) for k, _, v in (kv.partition("=") for kv in text.split(",") if kv)}


@torch.no_grad()
def analyse(model, ids: torch.Tensor, subset: dict[int, list[int]]) -> dict:
    """Negative-attention fraction and head redundancy of a (converted or plain) causal model on ids [N, T];
    the `_adapted` values average over `subset` (layer -> heads: the heads dex adapts) only."""
    maps = {}  # layer -> (head indices, M [S, D, D]) of dex heads
    for path, v in method_modules(model).items():
        if len(getattr(v, "heads", [])):
            maps[v.layer_index] = (v.heads.tolist(), v.value_maps().double())
    neg_all, neg_adapted, red_all, red_adapted = [], [], [], []
    for row in ids:
        with recording(model, inputs=True) as rec:
            model(input_ids=row[None])
        for layer, calls in sorted(rec.items()):
            out, q, k, val = calls[0]
            h, hk, t = q.shape[1], k.shape[1], q.shape[2]
            red = head_redundancy(out)
            heads, m = maps.get(layer, ([], None))
            chosen = subset.get(layer, [])
            red_all.append(red.mean())
            if chosen:
                red_adapted.append(red[chosen].mean())
            k = k.repeat_interleave(h // hk, 1).double()
            val = val.repeat_interleave(h // hk, 1).double()
            logits = q.double() @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
            causal = torch.ones(t, t, dtype=torch.bool).tril()
            a = torch.softmax(logits.masked_fill(~causal, -torch.inf), -1)[0]  # [H, T, T]
            frac = torch.zeros(h, dtype=torch.float64)
            for i, head in enumerate(heads):
                v = val[0, head]  # [T, D]
                reversed_ = ((v @ m[i]) * v).sum(-1) < 0  # [T] keys whose value this head reverses
                frac[head] = (a[head] * reversed_).sum(-1).mean()
            neg_all.append(frac.mean())
            if chosen:
                neg_adapted.append(frac[chosen].mean())

    def mean(xs):
        return float(torch.stack(xs).mean()) if xs else None

    return {"negative_attention": mean(neg_all), "negative_attention_adapted": mean(neg_adapted),
            "head_redundancy": mean(red_all), "head_redundancy_adapted": mean(red_adapted)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default="../shared/data/train-wikipedia-enwiki2021.txt")
    p.add_argument("--eval-data", default="../shared/data/wikitext2-test.txt")
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--variant-lr", type=float, default=None, help="lr of the dex maps and lambdas (default: --lr)")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--dex", default="heads=0.5,select=redundancy,lambda_max=0.5,anneal_steps=100",
                   help="dex options, k=v,k=v (heads a fraction or count: the analysis reports those heads)")
    p.add_argument("--calibration-tokens", type=int, default=4096)
    p.add_argument("--arms", default="lora,dex", help="comma list of lora, dex, dex-only")
    p.add_argument("--analysis-windows", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="runs/dex-adapt")
    p.add_argument("--out", default=None)
    p.add_argument("--table", default=None, help="only print the table of a JSON this script wrote")
    a = p.parse_args()
    if a.table:
        saved = json.loads(Path(a.table).read_text())
        return table(saved["rows"], a, saved["info"]["selection"])

    tok = attnswap.load_tokenizer(a.model)
    eval_ids = windows(encode(tok, read_text(a.eval_data)), a.seq_len)[: a.analysis_windows]
    dex_options = parse_options(a.dex)
    cal = calibration(tok, a.data, a.calibration_tokens, 512, a.seed)
    rows = []
    original = attnswap.load_model(a.model)
    attnswap.convert(original, "dex", calibration=cal, **dex_options)
    subset = {int(k): v for k, v in original.config.attnswap["plan"]["attention"][0]["options"]["heads"].items()}
    prepared = original.config.attnswap["prepared"]["attention.0"]
    attnswap.revert(original)
    base_ppl = perplexity(original, tok, a.eval_data, max_tokens=a.eval_tokens, seq_len=a.seq_len, progress=False)
    rows.append({"arm": "original", "train_tokens": 0, "perplexity": base_ppl["perplexity"],
                 **analyse(original, eval_ids, subset)})
    print(f"original: ppl {base_ppl['perplexity']:.4f}  {rows[-1]}", flush=True)
    for arm in a.arms.split(","):
        model = attnswap.load_model(a.model)
        if arm in ("dex", "dex-only"):
            attnswap.convert(model, "dex", calibration=cal, **dex_options)
        cfg = FinetuneConfig(data=a.data, steps=a.steps, seq_len=a.seq_len, lr=a.lr, seed=a.seed, warmup=10,
                             lora_r=0 if arm == "dex-only" else a.lora_r, save_every=max(a.steps, 1),
                             variant_lr=a.variant_lr if arm != "lora" else None)
        t0 = time.perf_counter()
        ft = finetune(model, tok, cfg, Path(a.work) / arm, force=True, progress=False)
        train_s = time.perf_counter() - t0
        tuned = attnswap.load(Path(a.work) / arm, merge_lora=True)
        ppl = perplexity(tuned, tok, a.eval_data, max_tokens=a.eval_tokens, seq_len=a.seq_len, progress=False)
        rows.append({"arm": arm, "train_tokens": ft["tokens"], "train_s": round(train_s, 1),
                     "loss_start": ft["loss_start_mean"], "loss_end": ft["loss_end_mean"],
                     "perplexity": ppl["perplexity"], "predictions": ppl["tokens"], **analyse(tuned, eval_ids, subset)})
        print(f"{arm}: {rows[-1]}", flush=True)
        save(rows, a, prepared)  # after every arm: an interrupted run keeps what it measured

    table(rows, a, prepared)


def table(rows, a, prepared):
    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    print(f"heads adapted: {prepared['heads_per_layer']} per layer by {prepared['select']}")
    print("| model | train tokens | train s | loss first/last 10 | ppl | negative attention (all / adapted) "
          "| head redundancy (all / adapted) |\n|---|---:|---:|---|---:|---|---|")
    for r in rows:
        print(f"| {r['arm']} | {r['train_tokens']:,} | {r.get('train_s', '-')} | {r.get('loss_start', '-')} / "
              f"{r.get('loss_end', '-')} | {r['perplexity']:.3f} | {f(r['negative_attention'], '.4f')} / "
              f"{f(r['negative_attention_adapted'], '.4f')} | {f(r['head_redundancy'], '.4f')} / "
              f"{f(r['head_redundancy_adapted'], '.4f')} |")


def save(rows, a, prepared):
    if a.out:
        info = {"device": f"CPU, {torch.get_num_threads()} threads", "torch": torch.__version__, "args": vars(a),
                "selection": prepared}
        Path(a.out).with_suffix(".json").write_text(json.dumps({"info": info, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
