"""Measurements of attention heads, for choosing heads to adapt and for before/after analyses (DEX, Diff).

`recording(model)` collects every attention layer's per-head output (what the o-projection receives, split by
head) during the forward passes inside the block, for converted and plain models alike. `head_redundancy`
turns one layer's outputs into each head's mean cosine similarity to the other heads of the layer (per token,
averaged over tokens): the head-redundancy measure of the Diff/DEX analyses. `heads_scaled` masks heads, and
`head_scores` measures every head of every layer on calibration ids (redundancy, or importance = the loss
increase when the head alone is masked).
"""
from __future__ import annotations

import contextlib
from typing import Literal

import torch
from torch import nn

from ... import attention
from ...arch import adapter_for
from ...surgery import base_model as _base


@contextlib.contextmanager
def _through_attnswap(model: nn.Module):
    """Route attention through the attnswap implementation (plain SDPA for unconverted layers) in the block."""
    base = _base(model)
    previous = base.config._attn_implementation
    base.set_attn_implementation(attention.ensure_registered())
    try:
        yield {s.index: s.module for s in adapter_for(base.config).sites(base)}
    finally:
        if previous != attention.IMPLEMENTATION:
            base.set_attn_implementation(previous)


@contextlib.contextmanager
def _probed(modules: list[nn.Module], probe):
    """Attach `probe` to the attention modules in the block (the attention function calls it after each
    layer's attention); head scaling runs before recording whatever the nesting, as a masked model outputs."""
    for m in modules:
        probes = [*getattr(m, attention.PROBES, ()), probe]
        setattr(m, attention.PROBES, sorted(probes, key=lambda p: p.order))
    try:
        yield
    finally:
        for m in modules:
            rest = [p for p in getattr(m, attention.PROBES, ()) if p is not probe]
            if rest:
                setattr(m, attention.PROBES, rest)
            elif hasattr(m, attention.PROBES):
                delattr(m, attention.PROBES)


class _Recorder:
    order = 1

    def __init__(self, layer_of: dict, found: dict, inputs: bool):
        self.layer_of, self.found, self.inputs = layer_of, found, inputs

    def __call__(self, module, out, query, key, value):
        entry = (out[0].detach(), query.detach(), key.detach(), value.detach()) if self.inputs else out[0].detach()
        self.found.setdefault(self.layer_of[module], []).append(entry)
        return out


class _HeadScale:
    order = 0

    def __init__(self, scales: dict):
        self.scales = scales  # attention module -> [H]

    def __call__(self, module, out, query, key, value):
        scale = self.scales[module]
        return (out[0] * scale.to(out[0].dtype).view(1, 1, -1, 1), *out[1:])


@contextlib.contextmanager
def recording(model: nn.Module, inputs: bool = False):
    """Yields a dict filled during the block: layer index -> list of per-head outputs [B, T, H, D] (one per call).

    With `inputs`, each entry is (output, query [B, H, T, D], key, value [B, Hkv, T, D]) instead.
    """
    found: dict[int, list] = {}
    with _through_attnswap(model) as modules:
        layer_of = {m: i for i, m in modules.items()}
        with _probed(list(modules.values()), _Recorder(layer_of, found, inputs)):
            yield found


@contextlib.contextmanager
def heads_scaled(model: nn.Module, scales: dict[int, torch.Tensor]):
    """Within the block, layer i's head outputs are multiplied by scales[i] ([H]; 0 masks a head)."""
    with _through_attnswap(model) as modules:
        chosen = {modules[i]: s for i, s in scales.items()}
        with _probed(list(chosen), _HeadScale(chosen)):
            yield model


def head_redundancy(out: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """out [B, T, H, D] -> [H]: each head's mean cosine similarity to the layer's other heads, over tokens.

    keep [B, T] (False = padding) leaves tokens out of the mean.
    """
    x = torch.nn.functional.normalize(out.double(), dim=-1)
    cos = torch.einsum("bthd,btgd->bthg", x, x)  # [B, T, H, H]
    w = torch.ones(out.shape[:2], dtype=torch.float64, device=out.device) if keep is None else keep.double()
    mean = (cos * w[..., None, None]).sum((0, 1)) / w.sum()
    h = out.shape[2]
    return (mean.sum(-1) - mean.diagonal()) / (h - 1)


def _objective(model: nn.Module, ids: torch.Tensor, batch_size: int, reference: list | None = None):
    """Causal LMs: mean next-token loss over `ids`. Other models: the mean relative squared change of the last
    hidden state against `reference` (a list of the unmasked states, returned when reference is None)."""
    causal = adapter_for(_base(model).config).causal
    total, states = 0.0, []
    for i, chunk in enumerate(ids.split(batch_size)):
        if causal:
            total += float(model(input_ids=chunk, labels=chunk).loss) * len(chunk)
            continue
        h = model(input_ids=chunk).last_hidden_state.double()
        if reference is None:
            states.append(h)
        else:
            ref = reference[i]
            total += float(((h - ref).pow(2).sum(-1) / ref.pow(2).sum(-1)).mean()) * len(chunk)
    return states if (not causal and reference is None) else total / len(ids)


@torch.no_grad()
def head_scores(model: nn.Module, ids: torch.Tensor, measure: Literal["redundancy", "importance"],
                layers: list[int] | None = None, batch_size: int = 4) -> dict[int, torch.Tensor]:
    """layer -> [H] float64 scores of every head, measured on calibration ids [N, T] (deterministic).

    redundancy: `head_redundancy` averaged over the windows. importance: the objective's increase when that
    head alone is masked (next-token loss for causal LMs, relative change of the last hidden state otherwise).
    """
    base = _base(model)
    sites = adapter_for(base.config).sites(base)
    layers = [s.index for s in sites] if layers is None else list(layers)
    was_training = model.training
    model.eval()
    try:
        if measure == "redundancy":
            sums: dict[int, torch.Tensor] = {}
            for chunk in ids.split(batch_size):
                with recording(model) as rec:
                    model(input_ids=chunk)
                for layer in layers:
                    sums[layer] = sums.get(layer, 0) + head_redundancy(rec[layer][0]) * len(chunk)
            return {layer: sums[layer] / len(ids) for layer in layers}
        if measure != "importance":
            raise ValueError(f"unknown head measure {measure!r}")
        h = adapter_for(base.config).geometry(base.config).num_heads
        reference = _objective(model, ids, batch_size)
        causal = not isinstance(reference, list)
        scores = {}
        for layer in layers:
            row = []
            for head in range(h):
                scale = torch.ones(h)
                scale[head] = 0.0
                with heads_scaled(model, {layer: scale}):
                    value = _objective(model, ids, batch_size, None if causal else reference)
                row.append(value - reference if causal else value)
            scores[layer] = torch.tensor(row, dtype=torch.float64)
        return scores
    finally:
        model.train(was_training)


def recorded_qk(model, ids: torch.Tensor, layers):
    """(window index, layer, q [H, T, D], k [Hk, T, D], scale, causal) of every wanted layer, one window of `ids`
    [N, T] per forward pass, as the attention receives them (after RoPE)."""
    base = _base(model)
    adapter = adapter_for(base.config)
    scales = {s.index: getattr(s.module, "scaling", None) for s in adapter.sites(base)}
    wanted = set(layers)
    device = next(model.parameters()).device
    for n, row in enumerate(ids):
        with torch.no_grad(), recording(model, inputs=True) as found:
            model(input_ids=row[None].to(device), use_cache=False)
        for layer, entries in sorted(found.items()):
            if layer in wanted:
                _, q, k, _ = entries[0]
                q, k = q[0].float(), k[0].float()
                yield n, layer, q, k, scales.get(layer) or q.shape[-1] ** -0.5, adapter.causal
