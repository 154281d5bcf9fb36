"""A single LoRA model vs an N-member LoRA-Ensemble of SmolLM2-135M at the same training tokens: calibration.

    python benchmarks/lora_ensemble.py --steps 100 --arms original,single,ens4 --work runs/lora-ensemble \
        --out docs/bench/lora-ensemble-cpu

Every trained arm converts the original model to `lora-ensemble` (the single model is the 1-member case: one
LoRA of rank r on q/k/v/o, PEFT's initialisation) and fine-tunes it with `attnswap.finetune` on the same
windows of --data (same order, seed, lr, schedule, steps x batch x seq-len tokens). With --batch-mode split the
N members share each batch (member m trains on row m of every step's N rows), so every arm sees the same tokens
and spends the same backbone compute; with repeat every member sees the whole batch (N times the compute).
Each model is then scored by `attnswap.methods.tuners.calibration.calibration` (ece_floor: the ECE a perfectly calibrated model
would show with the same bin counts, i.e. the noise floor of ece) on the foundation's protocol (wikitext2-test,
16,384 tokens, windows of 1,024). Prints a table; writes <out>.json (rows added as arms finish, so arms can run
in separate calls) and <out>.png (reliability diagrams).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import attnswap
from attnswap.config import FinetuneConfig
from attnswap.train import finetune
from attnswap.methods.tuners.calibration import calibration, ece_floor, reliability_plot

METRICS = ("accuracy", "nll", "ece", "ece_floor", "brier", "entropy", "disagreement")


def members_of(arm: str) -> int | None:
    if arm == "original":
        return None
    if arm == "single":
        return 1
    if arm.startswith("ens") and arm[3:].isdigit():
        return int(arm[3:])
    raise SystemExit(f"unknown arm '{arm}': original, single or ensN")


def table(rows: list[dict]) -> str:
    lines = ["| model | members | train s | train tokens | loss first/last 10 | " + " | ".join(METRICS) + " |",
             "|---|---:|---:|---:|---|" + "---:|" * len(METRICS)]
    for r in rows:
        c, t = r["calibration"], r.get("train") or {}
        c.setdefault("ece_floor", ece_floor(c["reliability"]))
        loss = f"{t['loss_start_mean']:.4f} / {t['loss_end_mean']:.4f}" if t else "-"
        lines.append(f"| {r['arm']} | {c['members']} | {t.get('seconds', '-')} | {t.get('tokens', '-')} | {loss} | "
                     + " | ".join(f"{c[m]:.4f}" for m in METRICS) + " |")
    for r in rows:
        for i, m in enumerate(r["calibration"].get("member_scores", [])):
            lines.append(f"| {r['arm']} member {i} | 1 | | | | {m['accuracy']:.4f} | {m['nll']:.4f} | {m['ece']:.4f} "
                         "| | | | |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="../shared/data/train-wikipedia-enwiki2021.txt")
    ap.add_argument("--eval-data", default="../shared/data/wikitext2-test.txt")
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--eval-seq-len", type=int, default=1024)
    ap.add_argument("--arms", default="original,single,ens4")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--batch-mode", default="split", choices=["split", "repeat"])
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="runs/lora-ensemble")
    ap.add_argument("--out", default="docs/bench/lora-ensemble-cpu")
    ap.add_argument("--table", help="print the table of an existing JSON file and exit")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(Path(args.table).read_text())["rows"]))
        return
    out = Path(args.out + ".json")
    doc = json.loads(out.read_text()) if out.is_file() else {"rows": []}
    doc["command"] = "python benchmarks/lora_ensemble.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "table")
    doc["machine"] = "2-core CPU (torch 2.13.0, fp32)"
    tok = attnswap.load_tokenizer(args.model)
    for arm in args.arms.split(","):
        n = members_of(arm)
        model = attnswap.load_model(args.model)
        train = None
        if n is not None:
            attnswap.convert(model, "lora-ensemble", members=n, r=args.r, alpha=args.alpha,
                             batch_mode=args.batch_mode, seed=args.seed)
            cfg = FinetuneConfig(data=args.data, steps=args.steps, lr=args.lr, warmup=args.warmup,
                                 seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed,
                                 save_every=args.steps)
            t0 = time.perf_counter()
            train = finetune(model, tok, cfg, Path(args.work) / arm, force=True)
            train["wall_seconds"] = round(time.perf_counter() - t0, 1)
        cal = calibration(model, tok, args.eval_data, max_tokens=args.max_tokens, seq_len=args.eval_seq_len, label=arm)
        row = {"arm": arm, "members": n or 1, "batch_mode": args.batch_mode if n else None,
               "train": train, "calibration": cal}
        doc["rows"] = [r for r in doc["rows"] if r["arm"] != arm] + [row]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=2))
        print(table([row]), flush=True)
    print(table(doc["rows"]))
    reliability_plot({r["arm"]: r["calibration"] for r in doc["rows"]}, args.out + ".png")
    print(f"wrote {out} and {args.out}.png")


if __name__ == "__main__":
    main()
