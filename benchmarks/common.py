"""Helpers shared by the benchmark scripts: timing with CUDA peak memory, and line plots."""
from __future__ import annotations

import statistics
import time

import torch


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def device_name(device: str) -> str:
    """The GPU's name, or the CPU's model and the thread count: ratios differ between CPUs, so tables name theirs."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} threads"


def timed(fn, device, reps):
    """Median milliseconds of fn() after one warm-up call, and peak MiB allocated above the start (CUDA; else None)."""
    fn()  # warm-up (compilation, autotuning)
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device == "cuda" else None
    return statistics.median(times) * 1e3, peak


def line_panels(panels: dict[str, dict[str, list[tuple]]], path, xlabel: str, ylabel: str, log2: bool = False):
    """One subplot per panel title, one line per series label of (x, y) points; saved to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels.items()):
        for label, pts in series.items():
            if not pts:
                continue
            if log2:
                ax.loglog(*zip(*pts), marker="o", label=label, base=2)
            else:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def speed_table(results, ms_digits: int = 1) -> str:
    """Markdown table of {T, mode, method, ms, peak_mib} rows with each row's speed relative to SDPA's."""
    lines = ["| T | mode | method | ms | SDPA / this | peak MiB |", "|---:|---|---|---:|---:|---:|"]
    sdpa = {(r["T"], r["mode"]): r["ms"] for r in results if r["method"] == "sdpa"}
    for r in results:
        ratio = sdpa.get((r["T"], r["mode"]), float("nan")) / r["ms"]
        peak = "" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}"
        lines.append(f"| {r['T']} | {r['mode']} | {r['method']} | {r['ms']:.{ms_digits}f} | {ratio:.2f} | {peak} |")
    return "\n".join(lines)


def write_json(results: dict, out: str | None) -> None:
    """Write `results` to <out>.json (creating its folder); nothing when `out` is None."""
    if out:
        import json
        from pathlib import Path

        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out + ".json").write_text(json.dumps(results, indent=2))


def plot_speed(results, path):
    """One panel per mode ("fwd", "fwd+bwd") of {T, method, mode, ms} rows: ms against T per method, log-log."""
    modes = dict.fromkeys(r["mode"] for r in results)
    names = dict.fromkeys(r["method"] for r in results)
    panels = {m: {n: [(r["T"], r["ms"]) for r in results if r["method"] == n and r["mode"] == m] for n in names}
              for m in modes}
    line_panels(panels, path, "sequence length T", "ms (median)", log2=True)


def speed_rows(names, a, step_fn, dtype, peak_fn=None):
    """Time step_fn(name, mode, T, device, dtype)() for every T of a.lengths, mode "fwd" and "fwd+bwd" (T <= a.bwd_max)
    and name: median of a.reps (half above 4,096 tokens, at least 2); peak from timed() or peak_fn(name, mode, T).
    A cell that fails (out of memory) is reported and skipped. Rows {T, method, mode, ms, peak_mib}."""
    import sys

    rows = []
    for t in a.lengths:
        for mode in ("fwd", "fwd+bwd"):
            if mode == "fwd+bwd" and t > a.bwd_max:
                continue
            for name in names:
                try:
                    ms, peak = timed(step_fn(name, mode, t, a.device, dtype), a.device,
                                     a.reps if t <= 4096 else max(2, a.reps // 2))
                except (RuntimeError, torch.OutOfMemoryError) as e:
                    print(f"{name} T={t} {mode}: {str(e).splitlines()[0]}", file=sys.stderr)
                    continue
                if peak_fn is not None:
                    peak = peak_fn(name, mode, t)
                rows.append({"T": t, "method": name, "mode": mode, "ms": ms, "peak_mib": peak})
                print(f"T={t:6d} {name:>10} {mode:>8}: {ms:10.2f} ms" + ("" if peak is None else f"  peak {peak:9.1f} MiB"),
                      flush=True)
    return rows


def make_step(fn, x, mode):
    """A timed step: fn(*x) under no_grad for "fwd"; forward and backward of its float sum for "fwd+bwd"."""

    def step():
        if mode == "fwd":
            with torch.no_grad():
                return fn(*x)
        out = fn(*x)
        out.float().sum().backward()
        return out

    return step


CALIBRATION = ("accuracy", "nll", "ece", "ece_floor", "brier", "entropy", "disagreement")


def calibration_table(rows: list[dict], domain: str) -> str:
    """Markdown table of calibration rows ({"arm", "train_seconds", "calibration": {domain: result}})."""
    lines = [f"held-out: {domain}", "| model | members | train s | " + " | ".join(CALIBRATION) + " | ece / floor |",
             "|---|---:|---:|" + "---:|" * (len(CALIBRATION) + 1)]
    for r in rows:
        c = r["calibration"][domain]
        lines.append(f"| {r['arm']} | {c['members']} | {r.get('train_seconds', '-')} | "
                     + " | ".join(f"{c[m]:.4f}" for m in CALIBRATION) + f" | {c['ece'] / c['ece_floor']:.1f} |")
    return "\n".join(lines)


def record_arm(doc: dict, out, row: dict) -> None:
    """Replace the arm's row in doc, write it to `out` (JSON) at once, print its tables."""
    import json

    doc["rows"] = [r for r in doc["rows"] if r["arm"] != row["arm"]] + [row]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
    for d in row["calibration"]:
        print(calibration_table([row], d), flush=True)


def finish_arms(doc: dict, domains: list[str], out: str) -> None:
    """Print every arm's tables and draw one reliability diagram per domain: <out>-same.png, <out>-other.png."""
    from attnswap.methods.tuners.calibration import reliability_plot

    for i, d in enumerate(domains):
        print(calibration_table(doc["rows"], d))
        reliability_plot({r["arm"]: r["calibration"][d] for r in doc["rows"]}, f"{out}-{['same', 'other'][i]}.png")
    print(f"wrote {out}.json and {out}-same.png / -other.png")
