"""`attnswap inspect`: what each layer and head of a model's attention does, from one recording pass (issue 20).

On one window of the first `tokens` tokens of a text, the model (original or converted, causal or
bidirectional) runs once with every attention layer recorded (its q, k, v as the attention receives them and its
per-head output) and its hidden states kept. Per layer and head (`attnswap.attention_stats`):
- from the layer's attention matrix, where it has one: mean row entropy (nats, and relative to the log of the
  row's length), mass on the first `sinks` keys (and its ratio to the uniform share sinks / T), mass on the local
  band, keys holding 90 % of a row's mass, spectral gap 1 - sigma_2 / sigma_1. The matrix is the softmax of the
  recorded q and k for a layer that keeps the original attention (or a method that computes it exactly), and a
  method's own matrix where the method defines one (`attention_probs`); for the others (linear, lln, xca, ...)
  these metrics are reported as not defined, by name;
- head redundancy (mean cosine of a head's output to the layer's other heads);
- with a model to compare (`compare`): the relative error of each head's output against that model's on the
  same tokens.
Per layer: the rank-collapse residual (relative, `attention_stats.collapse_residual`) of the hidden state after
the layer (with the residual branch) and of the attention's own output before the output projection (the branch
alone).
Per layer and KV head, on the first `kpca_tokens` tokens (the reproduction study used sentences of up to 128):
the KPCA alignment of the recorded values with the values the kernel-PCA reading predicts from the recorded keys
(`attention_stats.kpca_alignment`: optimal cosine, linear and kernel CKA). The keys are those the attention
receives (after a rotary embedding), and the Gram matrix is over all of the window's keys, as the study defines
it for encoders, also for a causal model.
"""
from __future__ import annotations

import torch

from .attention import attention_weights
from .attention_stats import collapse_residual, kpca_alignment, row_stats, spectral_gap

KPCA_METRICS = ("optimal_cosine", "linear_cka", "kernel_cka")
HEAD_METRICS = ("entropy", "entropy_relative", "sink_mass", "sink_ratio", "band_mass", "keys_for_mass",
                "spectral_gap")


def _explicit_probs(method, q, k, scale: float, causal: bool):
    """[H, T, T] float64 attention matrix of one layer, or None where the layer's method defines none."""
    if method is not None and not type(method).exact:
        probs = getattr(method, "attention_probs", None)
        return None if probs is None else probs(q, k, scale).double()[0]
    t = q.shape[2]
    mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril() if causal else None
    return attention_weights(q, k, scale, mask)[0]


def record(model, ids: torch.Tensor):
    """({layer: (out [1, T, H, D], q, k, v)}, hidden states tuple) of one forward pass on ids [1, T]."""
    from .methods.attention.analysis import recording

    with torch.no_grad(), recording(model, inputs=True) as found:
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    return {layer: entries[0] for layer, entries in found.items()}, out.hidden_states


def inspect(model, ids: torch.Tensor, *, layers: str | list[int] | None = None, sinks: int = 4, band: int = 64,
            reference=None, kpca_tokens: int = 128, progress: bool = True) -> dict:
    """The measurements of the module docstring on ids [1, T]; `reference`: a model to compare with."""
    from tqdm.auto import tqdm

    from .arch import adapter_for
    from .methods.attention.analysis import head_redundancy
    from .plan import parse_layers
    from .surgery import base_model, method_modules

    base = base_model(model)
    adapter = adapter_for(base.config)
    sites = {s.index: s for s in adapter.sites(base)}
    methods = {m.layer_index: m for m in method_modules(model).values()}
    wanted = parse_layers(layers, len(sites))
    device = next(model.parameters()).device
    ids = ids.to(device)
    found, hidden = record(model, ids)
    theirs = record(reference, ids)[0] if reference is not None else None
    t = ids.shape[1]
    per_head = {m: [] for m in (*HEAD_METRICS, "redundancy", *(("output_error",) if theirs else ()))}
    per_layer = {"collapse_with_residual": [], "collapse_attention_only": []}
    per_kv_head = {f"kpca_{m}": [] for m in KPCA_METRICS} if kpca_tokens else {}
    undefined = {}
    for layer in tqdm(wanted, desc="inspect", unit="layer", disable=not progress):
        out, q, k, v = found[layer]
        scale = getattr(sites[layer].module, "scaling", None) or q.shape[-1] ** -0.5
        h, groups = q.shape[1], q.shape[1] // k.shape[1]
        rows = {m: [] for m in HEAD_METRICS}
        for head in range(h):  # one [T, T] matrix at a time (float64: 512 MiB at 8,192 tokens)
            kv = head // groups
            probs = _explicit_probs(methods.get(layer), q[:, head:head + 1], k[:, kv:kv + 1], scale, adapter.causal)
            if probs is None:
                undefined[layer] = list(HEAD_METRICS)
                break
            stats = row_stats(probs, adapter.causal, sinks=sinks, band=band)
            stats["sink_ratio"] = stats["sink_mass"] / (sinks / t)
            stats["spectral_gap"] = spectral_gap(probs)
            for m in HEAD_METRICS:
                rows[m].append(round(float(stats[m][0]), 6))
            del probs
        for m in HEAD_METRICS:
            per_head[m].append([None] * h if layer in undefined else rows[m])
        per_head["redundancy"].append([round(float(x), 6) for x in head_redundancy(out)])
        if theirs is not None:
            ref = theirs[layer][0].double()
            err = (out.double() - ref).pow(2).sum((0, 1, 3)).sqrt() / ref.pow(2).sum((0, 1, 3)).sqrt().clamp_min(1e-300)
            per_head["output_error"].append([round(float(x), 6) for x in err])
        if kpca_tokens:
            n = min(kpca_tokens, t)
            rows = [kpca_alignment(k[0, j, :n], v[0, j, :n]) for j in range(k.shape[1])]
            for m in KPCA_METRICS:
                per_kv_head[f"kpca_{m}"].append([round(r[m], 6) for r in rows])
        per_layer["collapse_with_residual"].append(collapse_residual(hidden[layer + 1][0]))
        per_layer["collapse_attention_only"].append(collapse_residual(out[0].reshape(t, -1)))
    return {"tokens": t, "layers": wanted, "causal": adapter.causal, "sinks": sinks, "band": band,
            "per_head": per_head, "per_layer": per_layer, "per_kv_head": per_kv_head,
            "kpca_tokens": min(kpca_tokens, t),
            "not_defined": {str(k): v for k, v in undefined.items()},
            "methods": {str(i): type(methods[i]).name for i in wanted if i in methods}}


def plots(result: dict, folder, label: str) -> list[str]:
    """Heatmaps (layer x head) of every per-head metric and curves of the per-layer ones into `folder`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written = []
    for name, rows in [*result["per_head"].items(), *result.get("per_kv_head", {}).items()]:
        grid = np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=float)
        if np.isnan(grid).all():
            continue
        fig, ax = plt.subplots(figsize=(1 + 0.4 * grid.shape[1], 1 + 0.25 * grid.shape[0]))
        im = ax.imshow(grid, aspect="auto", cmap="viridis")
        ax.set_xlabel("KV head" if name.startswith("kpca_") else "head")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(result["layers"])), [str(x) for x in result["layers"]], fontsize=6)
        ax.set_title(f"{label}: {name}", fontsize=9)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        path = f"{name}.png"
        fig.savefig(f"{folder}/{path}", dpi=110)
        plt.close(fig)
        written.append(path)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rows in result["per_layer"].items():
        ax.plot(result["layers"], [r["frobenius"] for r in rows], marker="o", label=name)
    ax.set_xlabel("layer")
    ax.set_ylabel("relative rank-collapse residual")
    ax.set_title(label, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(f"{folder}/collapse.png", dpi=110)
    plt.close(fig)
    return [*written, "collapse.png"]
