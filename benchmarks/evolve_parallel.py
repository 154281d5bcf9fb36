"""`evolve` in one process and split over torchrun ranks: the wall time of a generation, and equal results.

Runs `attnswap evolve` (namm at budget 0.25 on SmolLM2-135M, long-context perplexity as the fitness) as
(a) one process with all the machine's threads, (b) one process with `--threads T`, (c) `torchrun
--nproc_per_node P` with `--threads T` each, and reports the median generation time (evolve.json's
`seconds`), the wall time of the command, and whether (b) and (c) have the same history and parameters.

    python benchmarks/evolve_parallel.py --out docs/bench/evolve-parallel-cpu
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2-test.txt"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="threads per process in (b) and (c)")
    p.add_argument("--population", type=int, default=4)
    p.add_argument("--generations", type=int, default=2)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--score-from", type=int, default=512)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    args = ["evolve", a.model, "--policy", "namm", "--data", str(DATA), "--task", "ppl", "--context", str(a.context),
            "--score-from", str(a.score_from), "--budget", "0.25", "--population", str(a.population),
            "--generations", str(a.generations), "--seed", "0", "--json"]
    py = [sys.executable, "-m", "attnswap"]
    runs = {f"1 process, all {os.cpu_count()} cores": (py, []),
            f"1 process x {a.threads} threads": (py, ["--threads", str(a.threads)]),
            f"{a.processes} processes x {a.threads} threads": (
                [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(a.processes), "-m", "attnswap"],
                ["--threads", str(a.threads)])}
    rows, states = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, (cmd, extra) in runs.items():
            out = Path(tmp) / f"run{len(rows)}"
            t0 = time.perf_counter()
            proc = subprocess.run([*cmd, *args, *extra, "--out", str(out)], capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                sys.exit(f"{label} failed:\n{proc.stderr[-2000:]}")
            state = json.loads((out / "evolve.json").read_text())
            gens = [h["seconds"] for h in state["history"][1:]]
            states[label] = ([{k: v for k, v in h.items() if k != "seconds"} for h in state["history"]],
                             (out / "namm.safetensors").read_bytes())
            rows.append({"run": label, "generation_s_median": statistics.median(gens), "generation_s": gens,
                         "command_wall_s": round(wall, 1), "best": state["history"][-1]["best"]})
            print(f"{label:>28} | generation {statistics.median(gens):7.1f} s | command {wall:7.1f} s", flush=True)
    labels = list(runs)
    same = states[labels[1]] == states[labels[2]]
    ratio = rows[2]["generation_s_median"] / rows[1]["generation_s_median"]
    ratio_all = rows[2]["generation_s_median"] / rows[0]["generation_s_median"]
    print(f"\nsame history and parameters ({labels[1]} vs {labels[2]}): {same}")
    print(f"generation time {labels[2]} / {labels[1]}: {ratio:.3f}; / {labels[0]}: {ratio_all:.3f}")
    if not same:
        for (h1, h2) in zip(states[labels[1]][0], states[labels[2]][0]):
            if h1 != h2:
                print("first difference:", h1, h2)
                break
    if a.out:
        Path(a.out + ".json").write_text(json.dumps({"args": vars(a), "rows": rows, "same_results": same,
                                                     "histories": {k: v[0] for k, v in states.items()},
                                                     "ratio_vs_same_threads": ratio, "ratio_vs_all_cores": ratio_all},
                                                    indent=2))


if __name__ == "__main__":
    main()
