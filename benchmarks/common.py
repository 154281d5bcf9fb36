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
