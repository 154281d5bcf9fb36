"""Helpers shared by the benchmark scripts: timing with CUDA peak memory, and line plots."""
from __future__ import annotations

import statistics
import time

import torch


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


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
