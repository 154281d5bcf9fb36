"""DEX + LoRA against LoRA alone over several training seeds, with lambda and negative attention over training.

    python benchmarks/dex_seeds.py --seeds 0,1,2 --steps 150 --seq-len 512 --out docs/bench/dex-seeds-cpu

Arms (each trained once per seed). A seed sets the LoRA initialisation; `finetune` reads its data in order from
the start of the text, so with --vary-data seed s also reads the training text from character s x 500,000 on
(a copy under --work; about 110k tokens apart, more than a run reads), the same text for every arm of that seed:
- `lora`: the original attention, LoRA r 8 on q/k/v/o;
- `dex-redundancy`, `dex-importance` (or those named in --arms): dex on half the heads of every layer, chosen on
  the same calibration text (seed 0 for every training seed: the converted architecture is the same, only
  training varies) by redundancy or by importance, plus the same LoRA.
Every arm trains on the same windows for a given seed, at the same lr and schedule, and is evaluated on the
foundation's protocol (wikitext2-test, 16,384 tokens, windows of 1,024). During training, every --every steps,
the dex arms record each adapted head's lambda (the effective one: ramp x clamp(lambda_hat)), how far W moved
from the identity (||W - I||_F / ||I||_F) and the negative-attention fraction on one held-out window
(`dex_adapt.analyse`: the attention mass on keys whose value the head reverses). Prints the per-seed table and
the mean and standard deviation per arm, writes <out>.json and <out>.png (trajectories).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import attnswap
from attnswap.config import FinetuneConfig
from attnswap.data import calibration, encode, read_text, windows
from attnswap.evaluate import perplexity
from attnswap.surgery import method_modules
from attnswap.train import finetune

sys.path.insert(0, str(Path(__file__).parent))
from dex_adapt import analyse  # noqa: E402


def dex_state(modules) -> dict:
    """Mean effective lambda and mean relative movement of W over the adapted heads of every dex layer."""
    lams, moves = [], []
    for m in modules:
        if not len(m.heads):
            continue
        lams.append(m.effective_lambda().detach().float())
        eye = torch.eye(m.weight.shape[-1])
        moves.append(((m.weight.detach().float() - eye).norm(dim=(-2, -1)) / eye.norm()))
    lam, move = torch.cat(lams), torch.cat(moves)
    return {"lambda_mean": float(lam.mean()), "lambda_min": float(lam.min()), "lambda_max": float(lam.max()),
            "w_move_mean": float(move.mean()), "w_move_max": float(move.max())}


def chosen_heads(a, cal, select) -> dict[int, list[int]]:
    """The heads dex adapts under `select` on the calibration text (measured once: the same for every seed)."""
    model = attnswap.load_model(a.model)
    attnswap.convert(model, "dex", calibration=cal, heads=a.heads, select=select)
    return {int(k): v for k, v in model.config.attnswap["plan"]["attention"][0]["options"]["heads"].items()}


def run_arm(a, tok, arm, seed, cal, probe, subset_of):
    model = attnswap.load_model(a.model)
    trace = []
    modules = []
    if arm != "lora":
        if arm not in subset_of:
            t0 = time.perf_counter()
            subset_of[arm] = chosen_heads(a, cal, arm.split("-", 1)[1])
            print(f"{arm}: heads chosen in {time.perf_counter() - t0:.0f} s", flush=True)
        attnswap.convert(model, "dex", heads=subset_of[arm], lambda_max=a.lambda_max, anneal_steps=a.anneal_steps)
        modules = list(method_modules(model).values())

        def on_step(step, loss):
            if step % a.every and step != a.steps:
                return
            was = model.training
            model.eval()
            trace.append({"step": step, "loss": loss, **dex_state(modules),
                          **{k: v for k, v in analyse(model, probe, subset_of[arm]).items() if "negative" in k}})
            model.train(was)
    else:
        on_step = None
    data = a.data
    if a.vary_data and seed:
        data = Path(a.work) / f"data-seed{seed}.txt"
        if not data.is_file():
            data.parent.mkdir(parents=True, exist_ok=True)
            data.write_text(Path(a.data).read_text(encoding="utf-8")[seed * 500_000:], encoding="utf-8")
        data = str(data)
    cfg = FinetuneConfig(data=data, steps=a.steps, seq_len=a.seq_len, lr=a.lr, seed=seed, warmup=10,
                         lora_r=a.lora_r, save_every=a.steps, variant_lr=a.variant_lr if arm != "lora" else None)
    work = Path(a.work) / f"{arm}-seed{seed}"
    t0 = time.perf_counter()
    ft = finetune(model, tok, cfg, work, force=True, progress=False, on_step=on_step)
    train_s = time.perf_counter() - t0
    tuned = attnswap.load(work, merge_lora=True)
    ppl = perplexity(tuned, tok, a.eval_data, max_tokens=a.eval_tokens, seq_len=1024, progress=False)
    return {"arm": arm, "seed": seed, "data": data, "train_tokens": ft["tokens"], "train_s": round(train_s, 1),
            "loss_start": ft["loss_start_mean"], "loss_end": ft["loss_end_mean"], "perplexity": ppl["perplexity"],
            "predictions": ppl["tokens"], "trace": trace}


def summary(rows, arms):
    out = {}
    for arm in arms:
        ppl = [r["perplexity"] for r in rows if r["arm"] == arm]
        if ppl:
            out[arm] = {"n": len(ppl), "mean": statistics.mean(ppl),
                        "std": statistics.stdev(ppl) if len(ppl) > 1 else None, "values": ppl}
    return out


def table(saved):
    rows, summ = saved["rows"], saved["summary"]
    print("| arm | seed | train tokens | train s | loss first / last 10 | ppl | lambda at the end (mean) | "
          "negative attention at the end (adapted heads) |\n|---|---:|---:|---:|---|---:|---:|---:|")
    for r in rows:
        last = r["trace"][-1] if r["trace"] else {}
        print(f"| {r['arm']} | {r['seed']} | {r['train_tokens']:,} | {r['train_s']} | {r['loss_start']} / "
              f"{r['loss_end']} | {r['perplexity']:.3f} | {last.get('lambda_mean', float('nan')):.3f} | "
              f"{last.get('negative_attention_adapted', float('nan')):.4f} |")
    print("\n| arm | seeds | mean ppl | std | per seed |\n|---|---:|---:|---:|---|")
    for arm, s in summ.items():
        std = "-" if s["std"] is None else f"{s['std']:.3f}"
        print(f"| {arm} | {s['n']} | {s['mean']:.3f} | {std} | {', '.join(f'{v:.3f}' for v in s['values'])} |")


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for r in rows:
        if not r["trace"]:
            continue
        steps = [t["step"] for t in r["trace"]]
        label = f"{r['arm']} seed {r['seed']}"
        axes[0].plot(steps, [t["lambda_mean"] for t in r["trace"]], marker=".", label=label)
        axes[1].plot(steps, [t["w_move_mean"] for t in r["trace"]], marker=".", label=label)
        axes[2].plot(steps, [t["negative_attention_adapted"] for t in r["trace"]], marker=".", label=label)
    for ax, title in zip(axes, ("effective lambda (mean over adapted heads)", "||W - I||_F / ||I||_F (mean)",
                                "negative attention fraction (adapted heads)")):
        ax.set_xlabel("step")
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default="../shared/data/train-wikipedia-enwiki2021.txt")
    p.add_argument("--eval-data", default="../shared/data/wikitext2-test.txt")
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--variant-lr", type=float, default=None)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--heads", type=float, default=0.5)
    p.add_argument("--lambda-max", type=float, default=0.5)
    p.add_argument("--anneal-steps", type=int, default=50)
    p.add_argument("--arms", default="lora,dex-redundancy,dex-importance")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--vary-data", action="store_true", help="seed s also trains on the text from character s x 500,000")
    p.add_argument("--every", type=int, default=25, help="record the dex trajectories every N steps")
    p.add_argument("--work", default="runs/dex-seeds")
    p.add_argument("--out", default=None)
    p.add_argument("--table", default=None, help="only print the tables of a JSON this script wrote")
    a = p.parse_args()
    if a.table:
        return table(json.loads(Path(a.table).read_text()))
    torch.set_num_threads(torch.get_num_threads())
    tok = attnswap.load_tokenizer(a.model)
    probe = windows(encode(tok, read_text(a.eval_data)), 512)[:1]
    cal = calibration(tok, a.data, 4096, 512, 0)
    arms = a.arms.split(",")
    rows, subsets = [], {}
    info = {"device": f"CPU, {torch.get_num_threads()} threads", "torch": torch.__version__, "args": vars(a)}
    for seed in (int(s) for s in a.seeds.split(",")):
        for arm in arms:
            rows.append(run_arm(a, tok, arm, seed, cal, probe, subsets))
            r = rows[-1]
            print(f"{arm} seed {seed}: ppl {r['perplexity']:.4f}, {r['train_s']} s", flush=True)
            if a.out:
                saved = {"info": {**info, "heads": {k: {str(l): h for l, h in v.items()} for k, v in subsets.items()}},
                         "rows": rows, "summary": summary(rows, arms)}
                Path(a.out).with_suffix(".json").write_text(json.dumps(saved, indent=2))
    saved = {"rows": rows, "summary": summary(rows, arms)}
    table(saved)
    if a.out:
        plot(rows, Path(a.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
