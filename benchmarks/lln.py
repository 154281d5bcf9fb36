"""LLN vs linear's feature maps on SmolLM2-135M: perplexity untrained and after the same attention transfer,
and the paper's concentration instruments on real activations.

Every arm converts all 30 layers with the same hybrid (exact window 64 + 4 sinks, mix_init 0.9): `linear` with
hedgehog maps, `linear` with elu maps, `lln` (temperatures moment-matched on 4,096 calibration tokens of the
training file). Each is evaluated under the standard protocol (WikiText-2 test, 16,384 tokens, windows of
1,024) untrained, then after `distill` on `--tokens` training tokens (the linear CPU recipe's stage 1: 100,000
tokens at 1,024, lr 1e-2), then evaluated again.

Concentration (Nahshan et al., section 3): on one 512-token window of the test text, per layer and head, the
attention matrix of the softmax (the original) and of each arm's feature maps alone (phi_q(q) . phi_k(k) over
causal pairs, rows normalised: the linear part without the window), after distillation: the mean row entropy
and the spectral gap 1 - s2 / s1 (singular values of the row-stochastic matrix). Prints tables, writes JSON.

    python benchmarks/lln.py --out docs/bench/lln-cpu
"""
from __future__ import annotations

import argparse
import time

import torch

import attnswap
from attnswap.config import DistillConfig
from attnswap.data import calibration, encode, read_text
from attnswap.distill import distill
from attnswap.evaluate import perplexity
from attnswap.methods.attention.analysis import recording
from attnswap.surgery import method_modules
from common import write_json

TEST = "../shared/data/wikitext2-test.txt"
TRAIN = "../shared/data/train-wikipedia-enwiki2021.txt"
HYBRID = {"window": 64, "sinks": 4, "mix_init": 0.9}
ARMS = {"hedgehog": ("linear", {"feature_map": "hedgehog"}), "elu": ("linear", {"feature_map": "elu"}),
        "lln": ("lln", {})}


def row_stats(a: torch.Tensor) -> tuple[float, float]:
    """a [H, T, T] row-stochastic -> (mean row entropy, mean spectral gap 1 - s2/s1) over heads."""
    ent = -(a * a.clamp_min(1e-30).log()).sum(-1).mean()
    s = torch.linalg.svdvals(a.double())  # [H, T]
    gap = (1 - s[:, 1] / s[:, 0]).mean()
    return float(ent), float(gap)


@torch.no_grad()
def concentration(model, ids: torch.Tensor) -> dict[int, dict[str, float]]:
    """Per converted layer: softmax's and the feature maps' entropy and spectral gap on `ids` [1, T]."""
    methods = method_modules(model)
    by_layer = {m.layer_index: m for m in methods.values()}
    from attnswap.surgery import bypassed

    with bypassed(model), recording(model, inputs=True) as found:
        model(input_ids=ids)
    out = {}
    for layer, [(_, q, k, _)] in sorted(found.items()):
        m = by_layer.get(layer)
        if m is None:
            continue
        q, k = q.float(), k.float()
        h, t, d = q.shape[1:]
        g = h // k.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        s = torch.einsum("bhtd,bhsd->bhts", q, k.repeat_interleave(g, 1))[0] * d ** -0.5
        soft = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
        fq, fk = m._phi_q(q).float(), m.phi_k(k).float().repeat_interleave(g, 1)
        kern = torch.einsum("bhtf,bhsf->bhts", fq, fk)[0] * causal
        lin = kern / kern.sum(-1, keepdim=True).clamp_min(1e-30)
        (es, gs), (el, gl) = row_stats(soft), row_stats(lin)
        out[layer] = {"softmax_entropy": es, "softmax_gap": gs, "map_entropy": el, "map_gap": gl}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tokens", type=int, default=100_000, help="distillation tokens per arm")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--arms", default="hedgehog,elu,lln")
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--mix-init", type=float, default=HYBRID["mix_init"], help="initial weight of the exact terms, "
                   "every arm")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    HYBRID["mix_init"] = a.mix_init
    tok = attnswap.load_tokenizer(a.model)
    cal = calibration(tok, TRAIN, tokens=4096, seq_len=512)
    window = encode(tok, read_text(TEST))[:512][None]
    results = {"config": vars(a), "arms": {}}
    t_all = time.perf_counter()
    original = perplexity(attnswap.load_model(a.model), tok, TEST, max_tokens=a.eval_tokens, progress=False)
    results["original"] = original["perplexity"]
    print(f"original: perplexity {original['perplexity']:.3f}", flush=True)
    for arm in a.arms.split(","):
        method, opts = ARMS[arm]
        model = attnswap.load_model(a.model)
        t0 = time.perf_counter()
        attnswap.convert(model, method, calibration=cal if method == "lln" else None, **HYBRID, **opts)
        convert_s = time.perf_counter() - t0
        before = perplexity(model, tok, TEST, max_tokens=a.eval_tokens, progress=False)["perplexity"]
        r = distill(model, tok, DistillConfig(data=TRAIN, tokens=a.tokens, seq_len=a.seq_len, lr=a.lr),
                    progress=False)
        after = perplexity(model, tok, TEST, max_tokens=a.eval_tokens, progress=False)["perplexity"]
        conc = concentration(model, window)
        results["arms"][arm] = {"method": method, "options": {**HYBRID, **opts}, "convert_seconds": round(convert_s, 1),
                                "untrained": before, "distilled": after, "distill_seconds": r["seconds"],
                                "distill_mean_loss": r["mean_loss_final"], "concentration": conc}
        print(f"{arm}: untrained {before:.3f}, distilled {after:.3f} ({r['seconds']} s, relative MSE "
              f"{r['mean_loss_final']})", flush=True)
    results["wall_seconds"] = round(time.perf_counter() - t_all, 1)

    base = results["original"]
    print(f"\n| arm | untrained ppl | x original | distilled ppl | x original | distill s |\n|---|---:|---:|---:|---:|---:|")
    for arm, r in results["arms"].items():
        print(f"| {arm} | {r['untrained']:.3f} | {r['untrained'] / base:.3f} | {r['distilled']:.3f} | "
              f"{r['distilled'] / base:.3f} | {r['distill_seconds']} |")
    print("\nconcentration, mean over layers and heads (512 test tokens; maps alone, after distillation)")
    print("| attention | row entropy | spectral gap |\n|---|---:|---:|")
    first = next(iter(results["arms"].values()))["concentration"]
    mean = lambda rows, key: sum(r[key] for r in rows.values()) / len(rows)  # noqa: E731
    print(f"| softmax (original) | {mean(first, 'softmax_entropy'):.3f} | {mean(first, 'softmax_gap'):.3f} |")
    for arm, r in results["arms"].items():
        print(f"| {arm} | {mean(r['concentration'], 'map_entropy'):.3f} | {mean(r['concentration'], 'map_gap'):.3f} |")
    print(f"wall {results['wall_seconds']} s")
    write_json(results, a.out)


if __name__ == "__main__":
    main()
