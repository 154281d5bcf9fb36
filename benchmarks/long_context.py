"""Long context, where linear attention is for: perplexity of tokens 4,096..8,192 of 8,192-token documents.

For the original SmolLM2, converted checkpoints (e.g. the all-linear and hybrid linear recipes' exports), and an
exact sliding window (+ the same sinks) whose KV cache holds as many bytes as the first converted model's
decoding cache (linear state + window + sinks), sized from that model's measured peak cache bytes and
checked by measurement. Each document is fed in chunks through the model's own decoding cache (the `eval
memory` long-context protocol), on WikiText-2 test and on text of another domain: Python source code (the
standard library files listed in CODE, concatenated; their sha256 is recorded).

    python benchmarks/long_context.py --models linear=runs/smollm2-linear/final hybrid=runs/smollm2-linear-hybrid/final \
        --out docs/bench/linear-long-context-cpu
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sysconfig
import tempfile
import time
from pathlib import Path

import attnswap
from attnswap.methods.cache.tasks import long_context_perplexity
from attnswap.surgery import plan_of

WIKI = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2-test.txt")
CODE = ["argparse.py", "inspect.py", "typing.py", "dataclasses.py", "pathlib.py", "tarfile.py", "zipfile.py",
        "subprocess.py", "enum.py", "functools.py", "ast.py", "difflib.py"]


def code_text(path: Path) -> tuple[str, str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    text = "\n\n".join((root / name).read_text(encoding="utf-8") for name in CODE)
    path.write_text(text, encoding="utf-8")
    return str(path), hashlib.sha256(text.encode()).hexdigest()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--original", default="smollm2-135m")
    p.add_argument("--models", nargs="+", default=[], help="label=checkpoint; the first sizes the sliding window")
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--score-from", type=int, default=4096)
    p.add_argument("--documents", type=int, default=2)
    p.add_argument("--chunk", type=int, default=1024, help="tokens fed per forward through the cache")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    out = Path(a.out) if a.out else None
    code, code_sha = code_text(Path(tempfile.gettempdir()) / "attnswap-long-context-code.txt")  # sha256 in the JSON
    texts = {"wikitext2-test": WIKI, "python-stdlib-code": code}
    tok = attnswap.load_tokenizer(a.original)
    rows = []

    def run(label, model):
        for name, path in texts.items():
            t0 = time.perf_counter()
            r = long_context_perplexity(model, tok, path, context=a.context, score_from=a.score_from,
                                        documents=a.documents, chunk=a.chunk)
            rows.append({"model": label, "text": name, "perplexity": r["perplexity"], "predictions": r["predictions"],
                         "peak_cache_bytes": r["peak_cache_bytes"], "seconds": round(time.perf_counter() - t0, 1)})
            print(f"{label:>40} | {name:>20} | ppl {r['perplexity']:8.3f} | cache {r['peak_cache_bytes']:>12,} B",
                  flush=True)
            if out:
                Path(a.out + ".json").write_text(json.dumps({"rows": rows, "code_files": CODE, "code_sha256": code_sha,
                                                             "protocol": vars(a)}, indent=2))
        return r["peak_cache_bytes"]

    run("original", attnswap.load_model(a.original))
    budget = None
    for spec in a.models:
        label, src = spec.split("=", 1)
        model = attnswap.load_model(src, merge_lora=True)
        peak = run(f"{label} ({src})", model)
        budget = budget or peak
    if budget:
        base = attnswap.load_model(a.original)
        cfg = base.config
        heads = cfg.num_key_value_heads
        per_token = 2 * heads * (cfg.hidden_size // cfg.num_attention_heads) * next(base.parameters()).element_size()
        window = budget // (cfg.num_hidden_layers * per_token) - a.sinks
        attnswap.convert(base, "sliding-window", window=int(window), sinks=a.sinks)
        run(f"sliding-window {window} + {a.sinks} sinks (equal bytes)", base)
        print("plan of the sliding window:", plan_of(base)[0]["attention"])


if __name__ == "__main__":
    main()
