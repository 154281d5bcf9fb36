"""MRA attention vs SDPA: time and peak memory at long T, and accuracy against exact attention on real activations.

    python benchmarks/mra.py speed   --device cpu  --lengths 1024,2048,4096,8192,16384 --out docs/bench/mra-cpu
    python benchmarks/mra.py speed   --device cuda --lengths 1024,4096,8192,16384,32768 --check --out $OUT/mra-gpu
    python benchmarks/mra.py quality --out docs/bench/mra-quality
    python benchmarks/mra.py embeddings --out docs/bench/mra-minilm

speed: SmolLM2-135M's attention shape (9 query heads, 3 KV heads, head dim 64, batch 1), causal, SDPA (with
GQA) against `mra_attention` at several budgets (block 32, default priors: diagonal + first block; the compiled
core on CPU, the Triton kernels on CUDA; --blocked B,..: also the PyTorch CPU path at those budgets). Medians of repeated runs in one process; peak memory is
torch.cuda.max_memory_allocated on CUDA and, on CPU (--memory), the peak resident-set growth during one call
(after a warm-up; inputs excluded) in a fresh process whose malloc returns every block >= 64 KiB to the OS on
free, sampled every 0.1 ms. quality: q/k/v captured from every layer of the real SmolLM2-135M (1,024 WikiText-2 tokens) and
MiniLM-L6 (512-token WikiText-2 passages), relative RMS error of the MRA output against exact attention per
budget and mode. embeddings: MiniLM-L6 sentence embeddings (mean pooling) of 1,000 WikiText-2 sentences and of
256-token passages, cosine similarity to the original's per block size and budget. Prints tables; writes
<out>.json and <out>.png.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from attnswap_kernels import rel_rms_error
from attnswap_kernels.mra import exact_attention, mra_attention

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, line_panels, make_step, plot_speed, speed_rows, speed_table  # noqa: E402

H, HK, D = 9, 3, 64
BUDGETS = (0.5, 0.25, 0.125)
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2-test.txt"


def make_inputs(t, device, dtype, grad):
    g = torch.Generator().manual_seed(t)
    return [torch.randn(1, n, t, D, generator=g).to(device=device, dtype=dtype).requires_grad_(grad) for n in (H, HK, HK)]


def method(name):
    if name == "sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    _, budget, *impl = name.split("@")  # "mra@0.25" (the default path) or "mra@0.25@blocked" (the PyTorch path)
    return lambda q, k, v: mra_attention(q, k, v, causal=True, block_size=32, budget=float(budget),
                                         impl=impl[0] if impl else "auto")


def step_fn(name, mode, t, device, dtype):
    fn = method(name)
    x = make_inputs(t, device, dtype, grad=mode != "fwd")
    return make_step(fn, x, mode)


def rss_peak_during(fn, interval=1e-4):
    """Peak resident-set growth (MiB) while fn() runs, sampled from /proc/self/statm by a thread."""
    import os
    import threading

    page = os.sysconf("SC_PAGE_SIZE")

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    base, peak, done = rss(), [0], threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(interval)

    th = threading.Thread(target=poll)
    th.start()
    try:
        fn()
    finally:
        done.set()
        th.join()
    return (max(peak[0], rss()) - base) / 2**20


def cpu_peak_mib(name, mode, t):
    """Peak resident-set growth during one call, in a fresh process whose malloc maps every block >= 64 KiB
    on its own (MALLOC_MMAP_THRESHOLD_), so freed tensors leave the resident set at once."""
    import os
    import subprocess

    code = (f"import torch, benchmarks.mra as b; torch.set_num_threads({torch.get_num_threads()});"
            f"s = b.step_fn({name!r}, {mode!r}, {t}, 'cpu', torch.float32); s();"
            "print(b.rss_peak_during(s))")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parents[1])
    return float(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None


def speed(a):
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    peak_fn = cpu_peak_mib if a.device == "cpu" and a.memory else None
    names = ["sdpa"] + [f"mra@{b}" for b in BUDGETS] + [f"mra@{b}@blocked" for b in a.blocked]
    return speed_rows(names, a, step_fn, dtype, peak_fn)


def check(device):
    """Triton against the PyTorch reference at odd lengths, fp32 and bf16, forward and gradients."""
    rows = []
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        for t in (1000, 4097):
            for causal in (True, False):
                x = make_inputs(t, device, dtype, grad=True)
                ref_in = [y.detach().float().requires_grad_() for y in x]
                do = torch.randn(1, H, t, D, device=device, dtype=dtype)
                kw = dict(causal=causal, block_size=32, budget=0.25)
                ref = mra_attention(*ref_in, impl="blocked", **kw)
                ref.backward(do.float())
                out = mra_attention(*x, impl="triton", **kw)
                out.backward(do)
                errs = {"o": rel_rms_error(ref, out)}
                errs.update({n: rel_rms_error(r.grad, y.grad) for n, r, y in zip(("dq", "dk", "dv"), ref_in, x)})
                ok = all(e <= tol for e in errs.values())
                rows.append({"dtype": str(dtype).split(".")[1], "T": t, "causal": causal, "ok": ok, **errs})
                print(f"check {rows[-1]['dtype']:>8} T={t:5d} causal={causal!s:5} "
                      + "  ".join(f"{k} {v:.2e}" for k, v in errs.items()) + ("  ok" if ok else "  FAIL"))
    return rows


def capture(model, ids, attention_mask=None):
    """q, k, v, scaling of every attention call of one forward (the model converted to a full-budget MRA)."""
    import attnswap
    from attnswap.methods.attention.mra import MRA

    attnswap.convert(model, "mra", block_budget=1.0)
    seen = []
    orig = MRA.forward

    def grab(self, module, query, key, value, attention_mask, scaling=None, **kw):
        seen.append((query.detach(), key.detach(), value.detach(), scaling))
        return orig(self, module, query, key, value, attention_mask, scaling=scaling, **kw)

    MRA.forward = grab
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=attention_mask)
    finally:
        MRA.forward = orig
        attnswap.revert(model)
    return seen


def quality(a):
    import attnswap
    from attnswap.models import load_tokenizer

    text = DATA.read_text(encoding="utf-8")
    rows = []
    for alias, causal, length, batch in (("smollm2-135m", True, 1024, 1), ("minilm-l6", False, 512, 4)):
        tok = load_tokenizer(alias)
        model = attnswap.load_model(alias)
        ids = torch.tensor(tok(text[:400_000])["input_ids"][: length * batch]).view(batch, length)
        layers = capture(model, ids)
        for mode in ("full", "sparse"):
            for selection in ("row", "global"):
                for budget in (1.0, 0.5, 0.25, 0.125):
                    errs = []
                    for q, k, v, scale in layers:
                        ex = exact_attention(q, k, v, causal=causal, scale=scale)
                        got = mra_attention(q, k, v, causal=causal, block_size=32, budget=budget, approx=mode,
                                            selection=selection, scale=scale)
                        errs.append(rel_rms_error(ex, got))
                    r = {"model": alias, "approx": mode, "selection": selection, "budget": budget,
                         "mean_rel_err": statistics.mean(errs), "max_rel_err": max(errs), "per_layer": errs}
                    rows.append(r)
                    print(f"{alias:>13} {mode:>6} {selection:>6} budget {budget:5}: mean rel err "
                          f"{r['mean_rel_err']:.4f}  max {r['max_rel_err']:.4f}  ({len(errs)} layers)", flush=True)
    return rows


def wiki_sentences(n: int, min_words: int = 6) -> list[str]:
    """The first n sentences of WikiText-2 test prose (headings skipped, split after . ! ?)."""
    import re

    out = []
    for line in DATA.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("="):
            continue
        for sent in re.split(r"(?<=[.!?])\s+(?=[A-Z])", line):
            if len(sent.split()) >= min_words:
                out.append(sent)
                if len(out) == n:
                    return out
    return out


def mean_pooled(model, tok, texts, batch=64, max_length=256):
    """Sentence embeddings as all-MiniLM-L6-v2 is used: mean of the token states over the attention mask."""
    embs, lengths = [], []
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            enc = tok(texts[i:i + batch], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            h = model(**enc).last_hidden_state
            m = enc["attention_mask"][..., None].to(h.dtype)
            embs.append((h * m).sum(1) / m.sum(1))
            lengths += enc["attention_mask"].sum(1).tolist()
    return torch.cat(embs), lengths


def embeddings(a):
    """MiniLM-L6 converted to MRA: cosine similarity of mean-pooled sentence embeddings to the original's."""
    import attnswap
    from attnswap.models import load_tokenizer

    tok = load_tokenizer("minilm-l6")
    model = attnswap.load_model("minilm-l6")
    rows = []
    for kind, texts in (("sentences", wiki_sentences(a.sentences)), ("passages", wiki_passages(a.passages, tok))):
        ref, lengths = mean_pooled(model, tok, texts)
        print(f"{kind}: {len(texts)} texts, tokens per text median {statistics.median(lengths):.0f}, "
              f"max {max(lengths)}", flush=True)
        for bs in (32, 16, 8):
            for budget in (1.0, 0.5, 0.25, 0.125):
                attnswap.convert(model, "mra", block_size=bs, block_budget=budget)
                got, _ = mean_pooled(model, tok, texts)
                attnswap.revert(model)
                cos = F.cosine_similarity(got, ref, dim=-1)
                r = {"texts": kind, "n": len(texts), "median_tokens": statistics.median(lengths), "block_size": bs,
                     "budget": budget, "mean_cos": float(cos.mean()), "min_cos": float(cos.min())}
                rows.append(r)
                print(f"{kind:>9} block {bs:2d} budget {budget:5}: mean cosine {r['mean_cos']:.5f}  min {r['min_cos']:.5f}",
                      flush=True)
    return rows


def wiki_passages(n: int, tok, length: int = 256) -> list[str]:
    """n consecutive WikiText-2 test passages of `length` MiniLM tokens (long inputs: many blocks)."""
    ids = tok(DATA.read_text(encoding="utf-8")[:2_000_000], add_special_tokens=False)["input_ids"]
    step = length - 2  # [CLS] and [SEP] are added back
    return [tok.decode(ids[i * step:(i + 1) * step]) for i in range(n)]


def embeddings_table(rows):
    lines = ["| texts | median tokens | block | budget | mean cosine | min cosine |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['texts']} ({r['n']}) | {r['median_tokens']:.0f} | {r['block_size']} | {r['budget']} | "
                     f"{r['mean_cos']:.5f} | {r['min_cos']:.5f} |")
    return "\n".join(lines)


def quality_table(rows):
    lines = ["| model | approx | selection | budget | mean rel. error | max (layer) |", "|---|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['approx']} | {r['selection']} | {r['budget']} | {r['mean_rel_err']:.4f} | "
                     f"{r['max_rel_err']:.4f} |")
    return "\n".join(lines)


def plot_quality(rows, path):
    panels = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        panels[f"{model}: MRA vs exact attention"] = {
            f"{mode}, {sel}": [(r["budget"], r["mean_rel_err"]) for r in rows
                               if r["model"] == model and r["approx"] == mode and r["selection"] == sel]
            for mode in ("full", "sparse") for sel in ("row", "global")}
    line_panels(panels, path, "block budget", "relative RMS error (mean over layers)")


def plot_embeddings(rows, path):
    panels = {f"MiniLM-L6 + MRA, {kind}": {
        f"block {bs}": [(r["budget"], r["mean_cos"]) for r in rows if r["texts"] == kind and r["block_size"] == bs]
        for bs in dict.fromkeys(r["block_size"] for r in rows)} for kind in dict.fromkeys(r["texts"] for r in rows)}
    line_panels(panels, path, "block budget", "mean cosine similarity to the original")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["speed", "quality", "embeddings"])
    p.add_argument("--sentences", type=int, default=1000)
    p.add_argument("--passages", type=int, default=200)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lengths", default="1024,4096,16384", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--bwd-max", type=int, default=4096, help="longest T timed with backward")
    p.add_argument("--memory", action="store_true", help="CPU: peak resident-set growth per cell (subprocess)")
    p.add_argument("--blocked", default="", type=lambda s: [float(x) for x in s.split(",") if x],
                   help="budgets at which to time the PyTorch CPU path too (impl=blocked)")
    p.add_argument("--check", action="store_true", help="check Triton against the reference first (CUDA)")
    p.add_argument("--out", default=None, help="write <out>.json and <out>.png")
    a = p.parse_args()
    info = {"device": device_name(a.device),
            "torch": torch.__version__}
    print(info)
    checks = check(a.device) if a.check else []
    rows = {"speed": speed, "quality": quality, "embeddings": embeddings}[a.what](a)
    print({"speed": speed_table, "quality": quality_table, "embeddings": embeddings_table}[a.what](rows))
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"info": info, "checks": checks, a.what: rows}, indent=2))
        plot = {"speed": plot_speed, "quality": plot_quality, "embeddings": plot_embeddings}[a.what]
        plot(rows, out.with_suffix(".png"))
    if checks and not all(c["ok"] for c in checks):
        sys.exit(1)


if __name__ == "__main__":
    main()
