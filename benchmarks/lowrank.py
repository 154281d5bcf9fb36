"""lowrank on SmolLM2-135M: perplexity against the projection parameters kept, at several energies, before and
after the same short LoRA; and the factorised projections' speed on CPU.

For each energy, all 30 layers' q, k, v, o projections are replaced by their rank-r PCA projections measured on
4,096 calibration tokens of the training file (`attnswap convert --to lowrank --set energy=E --calibration ...`),
evaluated under the standard protocol (WikiText-2 test, 16,384 tokens, windows of 1,024), fine-tuned with LoRA
r 8 on q/k/v/o (60 steps x 512 tokens, lr 3e-4: the budget of benchmarks/gmm_mask.py) and evaluated again; the
`lora` arm is the original model with the same LoRA. Parameters: the projections' in x out against r (in + out)
of the factorised form. Speed (op level, since the executed model keeps the products at full size): the 120
projections of one 1,024-token sequence as dense matmuls vs two matmuls of the chosen ranks, median of 7 runs.

    python benchmarks/lowrank.py --out docs/bench/lowrank-cpu
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import attnswap
from attnswap.config import FinetuneConfig
from attnswap.data import calibration
from attnswap.evaluate import perplexity
from attnswap.train import finetune
from common import write_json

TRAIN = "../shared/data/train-wikipedia-enwiki2021.txt"
TEST = "../shared/data/wikitext2-test.txt"


@torch.no_grad()
def projection_speed(model, ranks: dict, tokens: int = 1024, reps: int = 7) -> tuple[float, float]:
    """(dense ms, factorised ms): every converted projection applied to [tokens, in] inputs."""
    from attnswap.arch import adapter_for

    adapter = adapter_for(model.config)
    shapes = []
    for site in adapter.sites(model):
        for t, p in adapter.projections(model, site).items():
            r = ranks.get(str(site.index), {}).get(t)
            if r is not None:
                out_f, in_f = p.weight.shape
                shapes.append((torch.randn(out_f, in_f), torch.randn(r, in_f), torch.randn(out_f, r),
                               torch.randn(tokens, in_f)))

    def run(factorised: bool) -> float:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for w, a, b, x in shapes:
                _ = (x @ a.T) @ b.T if factorised else x @ w.T
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    run(False), run(True)  # warm-up
    return run(False), run(True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--energies", default="0.999,0.99,0.95")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    tok = attnswap.load_tokenizer(a.model)
    cal = calibration(tok, TRAIN, tokens=4096, seq_len=512)
    ev = dict(max_tokens=a.eval_tokens, seq_len=1024, progress=False)
    cfg = FinetuneConfig(data=TRAIN, steps=a.steps, seq_len=a.seq_len, lr=a.lr, warmup=min(10, a.steps // 5),
                         save_every=10 ** 6)
    t_all = time.perf_counter()
    results = {"config": vars(a), "arms": {}}
    for arm in ["lora", *a.energies.split(",")]:
        model = attnswap.load_model(a.model)
        row = {}
        if arm != "lora":
            t0 = time.perf_counter()
            attnswap.convert(model, "lowrank", calibration=cal, energy=float(arm))
            row["convert_seconds"] = round(time.perf_counter() - t0, 1)
            prepared = model.config.attnswap["prepared"]["tuner"]
            ranks = model.config.attnswap["plan"]["tuner"]["options"]["ranks"]
            row.update(dense_parameters=prepared["dense_parameters"],
                       factorised_parameters=prepared["factorised_parameters"],
                       kept=prepared["factorised_parameters"] / prepared["dense_parameters"],
                       mean_rank={t: statistics.mean(r[t] for r in ranks.values()) for t in "qkvo"},
                       ranks=ranks)
            row["dense_ms"], row["factorised_ms"] = projection_speed(model, ranks)
        row["before"] = perplexity(model, tok, TEST, **ev)["perplexity"]
        with tempfile.TemporaryDirectory() as work:
            r = finetune(model, tok, cfg, Path(work) / "ft", progress=False)
        row["after"] = perplexity(model, tok, TEST, **ev)["perplexity"]
        row["train_seconds"] = r["seconds"]
        results["arms"][arm] = row
        print(f"{arm}: {json.dumps({k: v for k, v in row.items() if k != 'ranks'})}", flush=True)
    results["wall_seconds"] = round(time.perf_counter() - t_all, 1)
    base = results["arms"]["lora"]
    print(f"\noriginal {base['before']:.3f}; LoRA r 8, {a.steps} steps x {a.seq_len} tokens, lr {a.lr}")
    print("| energy | mean rank q/k/v/o | projection params kept | before LoRA | after LoRA | after / LoRA alone | "
          "projections ms dense -> factorised |\n|---|---|---:|---:|---:|---:|---:|")
    for arm, r in results["arms"].items():
        if arm == "lora":
            print(f"| (original) | full: 576/192/192/576 | 1.000 | {r['before']:.3f} | {r['after']:.3f} | 1.000 | |")
            continue
        mr = "/".join(f"{r['mean_rank'][t]:.0f}" for t in "qkvo")
        print(f"| {arm} | {mr} | {r['kept']:.3f} | {r['before']:.3f} | {r['after']:.3f} | "
              f"{r['after'] / base['after']:.3f} | {r['dense_ms']:.1f} -> {r['factorised_ms']:.1f} |")
    print(f"wall {results['wall_seconds']} s")
    write_json(results, a.out)


if __name__ == "__main__":
    main()
