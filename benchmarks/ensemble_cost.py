"""What N LoRA-Ensemble members cost against one model and against N full models (time and memory).

    python benchmarks/ensemble_cost.py --members 1,2,4,8 --seq-len 512 --reps 3 --out docs/bench/ensemble-cost-cpu

Each measurement runs in a fresh process (so its peak resident memory is its own):
- `ensemble infer`: one batched forward of a [1, T] window through an N-member lora-ensemble (every member sees
  the window: N rows through the shared backbone), no grad;
- `full models infer`: N separate copies of the model (what N independently fine-tuned models are), each run
  on the window in turn;
- `ensemble train`: one optimizer step (forward, backward, AdamW) of the N-member ensemble on one window,
  batch_mode repeat (N rows); only the members' A and B train;
- `full model train`: one full fine-tuning step (all weights, AdamW) of one model; N full models need N of
  these, N times the time and the memory (reported as such, not measured N times).
Reported: median ms over --reps after a warm-up; memory as the process's peak RSS (ru_maxrss) minus its RSS
before any weights were loaded (the Python/torch runtime, the same for every setting): what the weights,
activations, gradients and optimizer state took; and the parameter bytes each setting holds. Prints a table; writes <out>.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def _rss_mib() -> float:
    """Peak resident memory of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _median_ms(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def measure(kind: str, n: int, model_name: str, seq_len: int, reps: int) -> dict:
    import attnswap
    from attnswap.surgery import all_method_modules

    tok = attnswap.load_tokenizer(model_name)  # noqa: F841  (imports the same libraries the model needs)
    baseline = _current_rss_mib()  # the runtime (python, torch, transformers) before any weights
    model = attnswap.load_model(model_name)
    ids = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))
    backbone = sum(p.numel() * p.element_size() for p in model.parameters())
    if kind == "full-infer":
        models = [model] + [copy.deepcopy(model) for _ in range(n - 1)]

        @torch.no_grad()
        def step():
            for m in models:
                m(input_ids=ids)

        held = backbone * n
    elif kind == "full-train":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def step():
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        held = backbone
    else:
        attnswap.convert(model, "lora-ensemble", members=n)
        own = [p for v in all_method_modules(model) for p in v.trainable_parameters()]
        held = backbone + sum(p.numel() * p.element_size() for p in own)
        if kind == "ens-infer":
            model.eval()

            @torch.no_grad()
            def step():
                model(input_ids=ids)
        else:
            for p in model.parameters():
                p.requires_grad_(False)
            for p in own:
                p.requires_grad_(True)
            model.train()
            opt = torch.optim.AdamW(own, lr=1e-4)

            def step():
                model(input_ids=ids, labels=ids).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

    ms = _median_ms(step, reps)
    peak = _rss_mib()
    return {"kind": kind, "members": n, "ms": round(ms, 1), "peak_rss_mib": round(peak, 1),
            "runtime_rss_mib": round(baseline, 1), "model_rss_mib": round(peak - baseline, 1),
            "parameter_bytes": held}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--members", default="1,2,4,8")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="docs/bench/ensemble-cost-cpu")
    ap.add_argument("--one", nargs=2, metavar=("KIND", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.model, args.seq_len, args.reps)))
        return
    ns = [int(x) for x in args.members.split(",")]
    runs = [(k, n) for k in ("ens-infer", "full-infer", "ens-train") for n in ns] + [("full-train", 1)]
    rows = []
    for kind, n in runs:
        cmd = [sys.executable, __file__, "--model", args.model, "--seq-len", str(args.seq_len), "--reps",
               str(args.reps), "--one", kind, str(n)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    one = {r["kind"]: r for r in rows if r["members"] == 1}
    lines = [f"SmolLM2-135M, one window of {args.seq_len} tokens, median of {args.reps}",
             "| members N | ensemble infer ms | N full models infer ms | ensemble train step ms | "
             "N full models train ms (N x 1) | ensemble MiB (infer / train) | N full models MiB (infer / "
             "train N x 1) | ensemble params MB | N full models params MB |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    by = {(r["kind"], r["members"]): r for r in rows}
    ft = one["full-train"]
    for n in ns:
        ei, fi, et = by[("ens-infer", n)], by[("full-infer", n)], by[("ens-train", n)]
        lines.append(f"| {n} | {ei['ms']:.0f} | {fi['ms']:.0f} | {et['ms']:.0f} | {n * ft['ms']:.0f} | "
                     f"{ei['model_rss_mib']:.0f} / {et['model_rss_mib']:.0f} | {fi['model_rss_mib']:.0f} / "
                     f"{n * ft['model_rss_mib']:.0f} | {ei['parameter_bytes'] / 1e6:.1f} | "
                     f"{n * one['full-infer']['parameter_bytes'] / 1e6:.1f} |")
    print("\n".join(lines))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps({
        "command": "python benchmarks/ensemble_cost.py " + " ".join(sys.argv[1:]),
        "machine": "2-core CPU (torch 2.13.0, fp32)", "rows": rows, "table": lines}, indent=2))
    print(f"wrote {args.out}.json")


if __name__ == "__main__":
    main()
