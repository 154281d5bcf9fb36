"""LoRA-Ensemble where one model is overconfident: SmolLM2-135M fine-tuned for many epochs on a few thousand
tokens of one domain, scored on held-out text of that domain and of another.

    python benchmarks/ensemble_overconfident.py --arms original,single,explicit4,ens4,ens8 \
        --out docs/bench/ensemble-overconfident-cpu

The domains: WikiText's tokenised Wikipedia (" , ", "@-@", " = Title = ") and natural Wikipedia prose.
- train: the first --train-tokens tokens of train-wikitext2-excerpt.txt (WikiText-2 train), repeated:
  --steps x --batch-size x --seq-len tokens is --steps x --batch-size x --seq-len / --train-tokens epochs;
- held-out, same domain: the first --eval-tokens tokens of wikitext2-valid.txt (other articles);
- held-out, other domain: --eval-tokens tokens of train-wikipedia-enwiki2021.txt from character 8,000,000.

Arms (each converts the original to `lora-ensemble` and trains it with `attnswap.finetune`, r, alpha, lr,
schedule, data order all equal; `repeat` mode, so every member sees every token):
- `single`: 1 member (one LoRA), seed 0;
- `ensN`: N members in one model, trained together (N times the single model's compute);
- `explicitN`: N independently trained 1-member models (member seeds 0..N-1: their A matrices differ; seed 0 is
  `single`), their LoRAs then
  stacked as the N members of one lora-ensemble model, so it is scored in the same batched forward: an explicit
  ensemble of independent LoRAs at the same training compute as `ensN`.
Each model is scored by `attnswap eval calibration`'s function on both held-out texts (windows of
--eval-seq-len). Prints a table; writes <out>.json (rows added as arms finish) and <out>-<domain>.png.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import attnswap
from attnswap.config import FinetuneConfig
from attnswap.data import encode, read_text
from attnswap.methods.tuners.calibration import calibration
from attnswap.surgery import method_modules
from attnswap.train import finetune

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import finish_arms, record_arm  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def slice_file(tok, source: Path, start_char: int, tokens: int, path: Path) -> Path:
    """Write the text of `tokens` tokens of `source` from character `start_char` (cut at a token boundary)."""
    text = read_text(str(source), max_chars=start_char + 8 * tokens)[start_char:]
    ids = encode(tok, text)[:tokens]
    path.write_text(tok.decode(ids))
    return path


def train_one(args, tok, members: int, seed: int, work: Path, data: Path):
    model = attnswap.load_model(args.model)
    attnswap.convert(model, "lora-ensemble", members=members, r=args.r, alpha=args.alpha, batch_mode="repeat",
                     seed=seed)
    cfg = FinetuneConfig(data=str(data), steps=args.steps, lr=args.lr, warmup=args.warmup, seq_len=args.seq_len,
                         batch_size=args.batch_size, seed=seed, save_every=args.steps)
    t0 = time.perf_counter()
    train = finetune(model, tok, cfg, work, force=True, progress=False)
    train["wall_seconds"] = round(time.perf_counter() - t0, 1)
    return model, train


def stack_members(models: list) -> torch.nn.Module:
    """One lora-ensemble model whose member m is the (single) member of models[m]."""
    first = models[0]
    stacked = attnswap.load_model(args_global.model)
    attnswap.convert(stacked, "lora-ensemble", members=len(models), r=args_global.r, alpha=args_global.alpha,
                     batch_mode="repeat")
    tuners = [method_modules(m, "tuner") for m in models]
    with torch.no_grad():
        for path, tuner in method_modules(stacked, "tuner").items():
            for t in tuner.lora_A:
                tuner.lora_A[t].copy_(torch.cat([tu[path].lora_A[t] for tu in tuners]))
                tuner.lora_B[t].copy_(torch.cat([tu[path].lora_B[t] for tu in tuners]))
    del first
    stacked.eval()
    return stacked




def main():
    global args_global
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--arms", default="original,single,explicit4,ens4,ens8")
    ap.add_argument("--train-tokens", type=int, default=2048)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--eval-seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=96)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--work", default="runs/ensemble-overconfident")
    ap.add_argument("--out", default="docs/bench/ensemble-overconfident-cpu")
    args = ap.parse_args()
    args_global = args
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tok = attnswap.load_tokenizer(args.model)
    train_file = slice_file(tok, DATA / "train-wikitext2-excerpt.txt", 0, args.train_tokens, work / "train.txt")
    domains = {
        "wikitext (same domain)": slice_file(tok, DATA / "wikitext2-valid.txt", 0, args.eval_tokens + 64,
                                             work / "heldout-wikitext.txt"),
        "wikipedia prose (other domain)": slice_file(tok, DATA / "train-wikipedia-enwiki2021.txt", 8_000_000,
                                                     args.eval_tokens + 64, work / "heldout-wikipedia.txt"),
    }
    out = Path(args.out + ".json")
    doc = json.loads(out.read_text()) if out.is_file() else {"rows": []}
    doc["command"] = "python benchmarks/ensemble_overconfident.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None)
    doc["machine"] = "2-core CPU (torch 2.13.0, fp32)"
    doc["epochs"] = args.steps * args.batch_size * args.seq_len / args.train_tokens
    singles: dict[int, tuple] = {}
    for arm in args.arms.split(","):
        train_s = None
        if arm == "original":
            model = attnswap.load_model(args.model)
        elif arm == "single" or arm.startswith("explicit"):
            n = 1 if arm == "single" else int(arm[len("explicit"):])
            for s in range(n):
                if s not in singles:
                    singles[s] = train_one(args, tok, 1, s, work / f"single-seed{s}", train_file)
            models = [singles[s][0] for s in range(n)]
            train_s = round(sum(singles[s][1]["seconds"] for s in range(n)), 1)
            model = models[0] if n == 1 else stack_members(models)
        elif arm.startswith("ens"):
            model, train = train_one(args, tok, int(arm[3:]), 0, work / arm, train_file)
            train_s = train["seconds"]
        else:
            raise SystemExit(f"unknown arm '{arm}': original, single, ensN or explicitN")
        cal = {name: calibration(model, tok, str(path), max_tokens=args.eval_tokens, seq_len=args.eval_seq_len,
                                 label=arm, progress=False) for name, path in domains.items()}
        record_arm(doc, out, {"arm": arm, "train_seconds": train_s, "calibration": cal})
    finish_arms(doc, list(domains), args.out)


args_global = None

if __name__ == "__main__":
    main()
