"""`soft` on MiniLM-L6: the per-token error of its Nystrom attention against the exact attention, by Newton-Schulz
iterations and sink landmarks.

    python benchmarks/soft_iterations.py

Four consecutive WikiText-2 test windows of 256 tokens; every layer converted (64 landmarks, normalised, pretrained
q and k); for every layer, head and token, the squared error of the attention output against the layer's exact
softmax attention on the same q, k, v, relative to the head's mean square of the exact output. Prints a table of
the median, mean, 99.9th percentile and maximum over all of them.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch.nn import functional as F

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2-test.txt"


def main():
    import attnswap
    from attnswap.methods.attention import soft as module
    from attnswap.models import load_tokenizer

    tok = load_tokenizer("minilm-l6")
    ids = tok(DATA.read_text(encoding="utf-8")[:200_000], return_tensors="pt")["input_ids"][:, 1:]
    windows = [ids[:, i * 256:(i + 1) * 256] for i in range(4)]
    exact_soft, errors = module.soft, []

    def recorded(q, k, v, tau, keep=None, landmarks=64, iterations=8, scale=None, normalize=True, sinks=0):
        out = exact_soft(q, k, v, tau, keep, landmarks, iterations, scale, normalize, sinks)
        ref = F.scaled_dot_product_attention(q, k, v, scale=scale)
        errors.append(((out - ref).pow(2).mean(-1) / ref.pow(2).mean(-1).mean(-1, keepdim=True)).flatten())
        return out

    module.soft = recorded
    print("| iterations | sinks | median | mean | 99.9th percentile | max |\n|---:|---:|---:|---:|---:|---:|")
    for sinks in (1, 0):
        for it in (4, 6, 8, 10, 12, 20):
            model = attnswap.convert(attnswap.load_model("minilm-l6"), "soft", iterations=it, sinks=sinks)
            errors.clear()
            with torch.no_grad():
                for w in windows:
                    model(input_ids=w)
            e = torch.cat(errors)
            print(f"| {it} | {sinks} | {e.median():.4f} | {e.mean():.4f} | {e.quantile(0.999):.2f} | {e.max():.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
