"""LoRA-Ensemble on a small classifier trained for many epochs: MiniLM-L6 + a head on next-sentence pairs, through
the CLI only.

    python benchmarks/ensemble_classifier.py --arms single,explicit4,ens4,ens8 --out docs/bench/ensemble-classifier-cpu

The task (benchmarks/nextsent_task.py): does sentence B follow sentence A, or is it from elsewhere in the same
article; --train-examples pairs of Wikipedia prose, --test-examples held-out pairs of other Wikipedia articles
(same domain) and as many of WikiText-2 test (tokenised text: another domain). Every arm runs these commands:

    attnswap convert minilm-l6 --to lora-ensemble --set members=N --set seed=S --out W/conv-N-S
    attnswap finetune W/conv-N-S --task classification --data train.jsonl --steps ... --seed S --out W/arm
    attnswap eval calibration W/arm --data test-....jsonl --json

- `single`: 1 member (one LoRA r 8 on q/k/v/o and the head), seed 0;
- `ensN`: N members trained together in `repeat` mode (every member sees every example: N times the compute);
  the head is shared by the members and trained with them;
- `explicitN`: N single models trained on their own (seeds 0..N-1: their LoRA and head initialisations differ),
  scored as one ensemble by `eval calibration single-0 --ensemble single-1,...`: the same training compute as ensN.
Prints the tables; writes <out>.json and <out>-same.png / <out>-other.png (reliability diagrams).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import finish_arms, record_arm  # noqa: E402



def cli(*args: str) -> dict | None:
    cmd = ["attnswap", *args]
    print("$ " + " ".join(cmd), flush=True)
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if r.returncode:
        sys.exit(f"failed ({r.returncode}): {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ''}")
    return json.loads(r.stdout) if "--json" in args else None




def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--arms", default="single,explicit4,ens4,ens8")
    ap.add_argument("--task", default=None, help="folder of benchmarks/nextsent_task.py's files (made "
                                                           "with --train-examples / --test-examples if absent)")
    ap.add_argument("--train-examples", type=int, default=256)
    ap.add_argument("--test-examples", type=int, default=600)
    ap.add_argument("--negatives", default="same-article", choices=["same-article", "other-article"],
                    help="nextsent_task.py's negatives: same-article (hard) or other-article (easier)")
    ap.add_argument("--steps", type=int, default=160)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--work", default="runs/ensemble-classifier")
    ap.add_argument("--out", default="docs/bench/ensemble-classifier-cpu")
    args = ap.parse_args()
    task = Path(args.task or f"runs/nextsent-{args.negatives}-{args.train_examples}-{args.test_examples}")
    work = Path(args.work)
    if not (task / "train.jsonl").is_file():
        subprocess.run([sys.executable, str(Path(__file__).parent / "nextsent_task.py"), "--out", str(task),
                        "--train", str(args.train_examples), "--test", str(args.test_examples), "--negatives",
                        args.negatives], check=True)
    domains = {"wikipedia (same domain)": task / "test-wikipedia.jsonl",
               "wikitext (other domain)": task / "test-wikitext.jsonl"}
    out = Path(args.out + ".json")
    doc = json.loads(out.read_text()) if out.is_file() else {"rows": []}
    doc["command"] = "python benchmarks/ensemble_classifier.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None)
    doc["machine"] = "2-core CPU (torch 2.13.0, fp32)"
    doc["examples"] = sum(1 for _ in open(task / "train.jsonl"))
    doc["epochs"] = args.steps * args.batch_size / doc["examples"]
    trained: dict[str, float] = {}

    def train(members: int, seed: int, name: str) -> Path:
        run = work / name
        if name not in trained:
            conv = work / f"conv-{members}-{seed}"
            cli("convert", args.model, "--to", "lora-ensemble", "--set", f"members={members}", "--set",
                f"seed={seed}", "--out", str(conv), "--force")
            t0 = time.perf_counter()
            cli("finetune", str(conv), "--task", "classification", "--data", str(task / "train.jsonl"), "--steps",
                str(args.steps), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--lr",
                str(args.lr), "--seed", str(seed), "--save-every", str(args.steps), "--out", str(run), "--force")
            trained[name] = round(time.perf_counter() - t0, 1)
        return run

    for arm in args.arms.split(","):
        if arm == "single" or arm.startswith("explicit"):
            n = 1 if arm == "single" else int(arm[len("explicit"):])
            runs = [train(1, s, f"single-{s}") for s in range(n)]
            extra = ["--ensemble", ",".join(map(str, runs[1:]))] if n > 1 else []
            seconds = round(sum(trained[f"single-{s}"] for s in range(n)), 1)
        elif arm.startswith("ens"):
            runs, extra = [train(int(arm[3:]), 0, arm)], []
            seconds = trained[arm]
        else:
            sys.exit(f"unknown arm '{arm}': single, ensN or explicitN")
        cal = {d: cli("eval", "calibration", str(runs[0]), "--data", str(path), "--json", *extra)
               for d, path in domains.items()}
        record_arm(doc, out, {"arm": arm, "train_seconds": seconds, "calibration": cal})
    finish_arms(doc, list(domains), args.out)


if __name__ == "__main__":
    main()
