"""`attnswap report`: one Markdown page (+ PNGs and JSON) on a converted model beside its original (issue 20).

Every number on the page comes from the library function of the command it names, called with the config the
page prints, so `attnswap eval perplexity ...` (etc.) with the same options prints the same numbers:
- the plan (`plan.describe`) and the tokens spent: read from what the checkpoint recorded, the plan's
  `prepared` records (calibration text measured at conversion) and `metrics.json` (distill, finetune steps);
- perplexity under the standard protocol and at a long window (`commands.eval_perplexity`, both models);
- calibration of the next-token predictions (`commands.eval_calibration`, both models);
- `eval memory` (long-context perplexity under the cache policy) where the plan has a cache policy;
- lm-eval tasks when asked for (`commands.eval_lm_eval`);
- prefill and decode speed, peak memory and cache bytes at a few context lengths (`speed`, below: greedy decoding
  by `attnswap.generation.generate`, as `attnswap generate` runs it);
- the inspect heatmaps of both models side by side (`attnswap.inspection` on one window of the data).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from .errors import AttnswapError

INSPECT_SIDE_BY_SIDE = ("entropy_relative", "sink_ratio", "band_mass", "spectral_gap", "kpca_linear_cka")


def tokens_spent(section: dict | None, metrics: dict) -> dict:
    """What adapting the model cost, from its records: calibration windows read at conversion (forward passes
    only) per plan part, and the tokens of each training step. {"rows": [...], "trained": N, "read": N}."""
    from . import plan as plans

    rows = []
    if section:
        _, prepared = plans.stored(section)
        for key, record in sorted(prepared.items()):
            cal = record.get("calibration") if isinstance(record, dict) else None
            if cal:
                rows.append({"step": f"convert ({key}: calibration)", "tokens": int(cal["tokens"]), "trained": False,
                             "data": _norm(cal.get("data"))})
    for step in ("distill", "finetune"):
        rec = metrics.get(step)
        if rec and rec.get("tokens") is not None:
            cfg = rec.get("config", rec)
            rows.append({"step": step, "tokens": int(rec["tokens"]), "trained": True, "data": _norm(cfg.get("data"))})
    return {"rows": rows, "trained": sum(r["tokens"] for r in rows if r["trained"]),
            "read": sum(r["tokens"] for r in rows if not r["trained"])}


def _norm(path):
    return os.path.normpath(path) if isinstance(path, str) and os.sep in path else path


class PeakMemory:
    """Peak memory of a block: on CUDA the allocator's peak; on Linux CPUs the process's peak resident set
    (VmHWM, reset through /proc/self/clear_refs) above the resident set at the start, after glibc has returned its
    free pages (malloc_trim), so memory freed earlier but still resident does not hide the growth. None where
    neither can be read."""

    def __init__(self, device: torch.device):
        self.device = device
        self.mib: float | None = None

    @staticmethod
    def _status(key: str) -> int | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            return self
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        try:
            Path("/proc/self/clear_refs").write_text("5")  # the peak resident set restarts from the current one
            self.start = self._status("VmRSS")
        except OSError:
            self.start = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = (torch.cuda.max_memory_allocated(self.device) - self.start) / 2**20
        elif self.start is not None:
            peak = self._status("VmHWM")
            self.mib = None if peak is None else max(0, peak - self.start) / 2**20
        return False


def speed(model, ids: torch.Tensor, lengths: list[int], decode_tokens: int) -> list[dict]:
    """Per context length L: a prefill of L - decode_tokens tokens of `ids`, then decode_tokens greedy steps (so
    the cache ends at L). Prefill and decode tokens/s, peak memory of the whole call and the cache bytes after
    prefill and at the end. One warm-up call first (64 tokens)."""
    from .generation import generate

    device = next(model.parameters()).device
    generate(model, ids[None, :64].to(device), 2)
    rows = []
    for length in lengths:
        prompt = ids[None, : length - decode_tokens].to(device)
        with PeakMemory(device) as peak:
            r = generate(model, prompt, decode_tokens)
        rows.append({"length": length, "prompt_tokens": prompt.shape[1], "decode_tokens": r["new_tokens"],
                     "prefill_seconds": r["prefill_seconds"],
                     "prefill_tokens_per_second": round(prompt.shape[1] / max(r["prefill_seconds"], 1e-9), 1),
                     "decode_tokens_per_second": r["tokens_per_second"],
                     "peak_mib": None if peak.mib is None else round(peak.mib, 1),
                     "cache_bytes_after_prefill": r["cache_bytes_after_prefill"],
                     "peak_cache_bytes": r["peak_cache_bytes"]})
    return rows


def check(source: str, cfg) -> dict:
    """Everything the report will need, checked before any weight is read: the data, both configs, the lengths."""
    from . import plan as plans
    from .data import check_data
    from .evaluate import require_causal_lm
    from .models import check_comparable, check_positions, load_config, max_positions

    check_data(cfg.data)
    config = load_config(source)
    require_causal_lm(config, source)
    if cfg.compare is not None:
        require_causal_lm(check_comparable(config, cfg.compare, source), cfg.compare)
    if min(cfg.lengths) <= cfg.decode_tokens:
        raise AttnswapError(f"--lengths {min(cfg.lengths)} leaves no prompt before {cfg.decode_tokens} decode tokens; "
                            "give lengths above --decode-tokens")
    check_positions(config, max(cfg.lengths), "--lengths", allow_long=cfg.allow_long)
    check_positions(config, cfg.seq_len, "--seq-len", allow_long=cfg.allow_long)
    check_positions(config, cfg.inspect_tokens, "--inspect-tokens", allow_long=cfg.allow_long)
    section = getattr(config, "attnswap", None)
    if section and plans.stored(section)[0].get("cache"):
        check_positions(config, cfg.memory_context, "--memory-context")
    long = cfg.long_seq_len if cfg.long_seq_len is not None else min(max_positions(config) or 0, 8192)
    if long:
        check_positions(config, long, "--long-seq-len", allow_long=cfg.allow_long)
    return {"long_seq_len": long if long > cfg.seq_len else 0}


def report(source: str, cfg, out: str, *, force: bool = False, progress: bool = True, log=print) -> dict:
    """Measure SOURCE (and cfg.compare beside it) and write report.md, report.json and the PNGs to OUT."""
    from . import commands, inspection, outputs
    from . import plan as plans
    from .checkpoint import read_metrics
    from .config import CalibrationConfig, EvalConfig, LmEvalConfig, MemoryEvalConfig
    from .data import training_ids
    from .models import load_config, load_model, load_tokenizer, resolve

    checked = check(source, cfg)
    guards = outputs.inputs(source, data=cfg.data, compare=cfg.compare)
    outputs.check_out(out, force, guards)
    t0 = time.perf_counter()
    section = getattr(load_config(source), "attnswap", None)
    src_dir = Path(resolve(source).location) if outputs.user_path(source).is_dir() else None
    metrics = read_metrics(src_dir) if src_dir else {}
    result: dict = {"source": source, "compare": cfg.compare, "data": cfg.data, "config": cfg.model_dump(mode="json"),
                    "plan": plans.describe(section) if section else ["attention unchanged (no attnswap conversion)"],
                    "tokens_spent": tokens_spent(section, metrics), "commands": {}}
    both = [source] + ([cfg.compare] if cfg.compare else [])
    cmd = result["commands"]

    log("[report] perplexity, standard protocol")
    ev = EvalConfig(data=cfg.data, max_tokens=cfg.max_tokens, seq_len=cfg.seq_len, compare=cfg.compare,
                    allow_long=cfg.allow_long)
    result["perplexity"] = commands.eval_perplexity(source, ev, progress=progress)
    cmd["perplexity"] = _cli("eval perplexity", source, ev)
    long = checked["long_seq_len"]
    if long:
        log(f"[report] perplexity, windows of {long}")
        lev = EvalConfig(data=cfg.data, max_tokens=max(cfg.max_tokens, 2 * long), seq_len=long, compare=cfg.compare,
                         allow_long=cfg.allow_long)
        result["long_context"] = commands.eval_perplexity(source, lev, progress=progress)
        cmd["long_context"] = _cli("eval perplexity", source, lev)

    log("[report] calibration")
    cal = CalibrationConfig(data=cfg.data, max_tokens=cfg.max_tokens, seq_len=cfg.seq_len, allow_long=cfg.allow_long)
    result["calibration"] = {s: commands.eval_calibration(s, cal) for s in both}
    cmd["calibration"] = [_cli("eval calibration", s, cal) for s in both]

    if section and plans.stored(section)[0].get("cache"):
        log("[report] eval memory")
        mem = MemoryEvalConfig(data=cfg.data, tasks=["ppl"], context=cfg.memory_context,
                               score_from=cfg.memory_context // 2)
        result["memory"] = commands.eval_memory(source, mem)
        cmd["memory"] = _cli("eval memory", source, mem)

    if cfg.tasks:
        log(f"[report] lm-eval {cfg.tasks}")
        lm = LmEvalConfig(tasks=cfg.tasks, limit=cfg.limit, compare=cfg.compare)
        result["lm_eval"] = commands.eval_lm_eval(source, lm)
        cmd["lm_eval"] = _cli("eval lm-eval", source, lm)

    tokenizer = load_tokenizer(source)
    ids = training_ids(tokenizer, cfg.data, max(max(cfg.lengths), cfg.inspect_tokens))
    models = {s: load_model(s, merge_lora=True) for s in both}
    result["speed"] = {}
    for s, m in models.items():
        log(f"[report] speed of {s} at {', '.join(map(str, cfg.lengths))} tokens")
        result["speed"][s] = speed(m, ids, cfg.lengths, cfg.decode_tokens)

    log(f"[report] inspect ({cfg.inspect_tokens} tokens)")
    window = ids[: cfg.inspect_tokens][None]
    result["inspect"] = {source: inspection.inspect(models[source], window, reference=models.get(cfg.compare),
                                                    progress=progress)}
    if cfg.compare:
        result["inspect"][cfg.compare] = inspection.inspect(models[cfg.compare], window, progress=progress)
    result["device"] = str(next(models[source].parameters()).device)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    with outputs.writing(out, force=force, protect=guards, label="report") as stage:
        result["plots"] = plots(result, stage)
        (stage / "report.json").write_text(json.dumps(result, indent=2, default=str))
        (stage / "report.md").write_text(page(result))
    return {"out": str(outputs.user_path(out)), **result}


def _cli(name: str, source: str, cfg) -> str:
    """The command line that reproduces a section (its config's non-default fields as flags)."""
    parts = [f"attnswap {name} {source}"]
    for field, value in cfg.model_dump(exclude_defaults=True).items():
        flag = "--" + field.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, list):
            parts.append(f"{flag} {','.join(map(str, value))}")
        elif value is not None:
            parts.append(f"{flag} {value}")
    return " ".join(parts)


def _fmt(x, digits=3):
    return "-" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def page(r: dict) -> str:
    """The Markdown page of a report result."""
    from .plan import compact

    src, orig = r["source"], r["compare"]
    who = [src] + ([orig] if orig else [])
    lines = [f"# attnswap report: `{src}`" + (f" beside `{orig}`" if orig else ""), "",
             f"Measured on `{r['data']}` in {r['seconds']} s (`attnswap report`, attnswap "
             f"{_version()}). Each table names the command that prints the same numbers.", "", "## Plan", ""]
    lines += [f"- {line}" for line in r["plan"]]
    ts = r["tokens_spent"]
    lines += ["", "## Tokens spent", ""]
    if ts["rows"]:
        lines += ["| step | tokens | trains | data |", "|---|---:|---|---|"]
        lines += [f"| {x['step']} | {x['tokens']:,} | {'yes' if x['trained'] else 'no (forward only)'} | "
                  f"{x.get('data') or '-'} |" for x in ts["rows"]]
        lines += ["", f"Trained on {ts['trained']:,} tokens; {ts['read']:,} more read at conversion."]
    else:
        lines.append("Nothing recorded: converted without calibration and not trained.")
    lines += ["", "## Perplexity", ""]
    rows = [("standard", r["perplexity"], r["commands"]["perplexity"])]
    if "long_context" in r:
        rows.append(("long context", r["long_context"], r["commands"]["long_context"]))
    lines += ["| protocol | window | tokens | " + " | ".join(f"`{w}`" for w in who) + (" | ratio |" if orig else " |"),
              "|---|---:|---:|" + "---:|" * (len(who) + (1 if orig else 0))]
    for name, p, _ in rows:
        vals = [p["perplexity"]] + ([p["original"]["perplexity"]] if orig else [])
        lines.append(f"| {name} | {p['seq_len']} | {p['tokens']} | " + " | ".join(f"{v:.3f}" for v in vals)
                     + (f" | {p['ratio']:.4f} |" if orig else " |"))
    lines += [""] + [f"    {c}" for _, _, c in rows]
    lines += ["", "## Calibration (next-token predictions)", "", "| model | ECE | NLL | accuracy | tokens |",
              "|---|---:|---:|---:|---:|"]
    for s in who:
        c = r["calibration"][s]
        lines.append(f"| `{s}` | {c['ece']:.4f} | {c['nll']:.4f} | {_fmt(c.get('accuracy'), 4)} | "
                     f"{c.get('tokens', '-')} |")
    lines += [""] + [f"    {c}" for c in r["commands"]["calibration"]]
    if "memory" in r:
        m = r["memory"]["ppl"]
        lines += ["", "## Cache policy (`eval memory`)", "",
                  f"Long-context perplexity under `{r['memory']['cache']}`: {m['perplexity']:.3f}"
                  + (f", kept fraction {m['kept_fraction']:.3f}" if m.get("kept_fraction") is not None else ""),
                  "", f"    {r['commands']['memory']}"]
    lines += ["", "## lm-eval", ""]
    if "lm_eval" in r:
        for s, res in [(src, r["lm_eval"]), *([(orig, r["lm_eval"]["original"])] if orig else [])]:
            lines += [f"`{s}`:", "", res["table"], ""]
        lines.append(f"    {r['commands']['lm_eval']}")
    else:
        lines.append("Not run: pass `--tasks` (e.g. `attnswap_wikitext_nextsent`, which runs offline).")
    lines += ["", "## Speed and memory", "",
              "Greedy decoding as `attnswap generate` runs it: a prefill of L - decode tokens of the data, then the "
              "decode steps. Peak memory: " + ("the allocator's peak" if r["device"].startswith("cuda") else
                                              "the growth of the process's peak resident set during the call") + ".",
              "", "| model | L | prefill tok/s | decode tok/s | peak MiB | cache MiB at the end |",
              "|---|---:|---:|---:|---:|---:|"]
    for s in who:
        for x in r["speed"][s]:
            lines.append(f"| `{s}` | {x['length']} | {x['prefill_tokens_per_second']:.1f} | "
                         f"{_fmt(x['decode_tokens_per_second'], 2)} | {_fmt(x['peak_mib'], 1)} | "
                         f"{x['peak_cache_bytes'] / 2**20:.1f} |")
    if orig:
        lines += ["", "| L | prefill speed-up | decode speed-up | cache bytes ratio |", "|---:|---:|---:|---:|"]
        for a, b in zip(r["speed"][src], r["speed"][orig]):
            dec = (a["decode_tokens_per_second"] or 0) / max(b["decode_tokens_per_second"] or 1e-9, 1e-9)
            lines.append(f"| {a['length']} | {a['prefill_tokens_per_second'] / b['prefill_tokens_per_second']:.2f}x | "
                         f"{dec:.2f}x | {a['peak_cache_bytes'] / max(b['peak_cache_bytes'], 1):.3f} |")
    lines += ["", "![cache bytes](cache_bytes.png)", "", "## Attention, layer x head (`attnswap inspect`)", ""]
    ins = r["inspect"][src]
    lines.append(f"One window of {ins['tokens']} tokens; sinks = the first {ins['sinks']} tokens, band = "
                 f"{ins['band']} keys.")
    if ins["not_defined"]:
        lines.append(f"Not defined for this model's methods (no attention matrix) in layers "
                     f"{compact(sorted(int(x) for x in ins['not_defined']))}: entropy, sinks, band and spectral gap there.")
    lines.append("")
    for p in r["plots"]:
        if p.startswith("inspect_"):
            lines += [f"![{p[8:-4]}]({p})", ""]
    if orig and "output_error" in ins["per_head"]:
        errs = [sum(row) / len(row) for row in ins["per_head"]["output_error"]]
        worst = max(range(len(errs)), key=errs.__getitem__)
        lines += [f"Attention output error against `{orig}` (relative, mean over heads): "
                  f"{sum(errs) / len(errs):.4f} over the layers, largest in layer {ins['layers'][worst]} "
                  f"({errs[worst]:.4f}).", ""]
    return "\n".join(lines)


def _version() -> str:
    from . import __version__

    return __version__


def plots(r: dict, folder: Path) -> list[str]:
    """cache_bytes.png (cache bytes against context length, both models) and inspect_<metric>.png (layer x head,
    the models side by side on one colour scale; the output error of the converted model alone)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for s, rows in r["speed"].items():
        ax.plot([x["length"] for x in rows], [x["peak_cache_bytes"] / 2**20 for x in rows], marker="o", label=s)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("cache MiB")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "cache_bytes.png", dpi=110)
    plt.close(fig)
    written.append("cache_bytes.png")

    ins = r["inspect"]
    names = list(ins)
    for metric in (*INSPECT_SIDE_BY_SIDE, "output_error"):
        tables = {s: {**ins[s]["per_head"], **ins[s].get("per_kv_head", {})} for s in names}
        grids = {s: np.array([[np.nan if v is None else v for v in row] for row in t[metric]], dtype=float)
                 for s, t in tables.items() if metric in t}
        grids = {s: g for s, g in grids.items() if not np.isnan(g).all()}
        if not grids:
            continue
        vals = np.concatenate([g[~np.isnan(g)] for g in grids.values()])
        lo, hi = float(vals.min()), float(vals.max())
        fig, axes = plt.subplots(1, len(grids), figsize=(3.2 * len(grids) + 1, 1 + 0.2 * len(ins[names[0]]["layers"])),
                                 squeeze=False)
        for ax, (s, g) in zip(axes[0], grids.items()):
            im = ax.imshow(g, aspect="auto", cmap="viridis", vmin=lo, vmax=hi)
            ax.set_title(f"{s}\n{metric}", fontsize=8)
            ax.set_xlabel("KV head" if metric.startswith("kpca_") else "head")
        axes[0][0].set_ylabel("layer")
        fig.colorbar(im, ax=list(axes[0]))
        path = f"inspect_{metric}.png"
        fig.savefig(folder / path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
