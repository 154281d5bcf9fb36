"""Which layers to convert, by measurement on calibration text: one mechanism for every attention method.

A plan entry `layers: {auto: CRITERION, count: N}` (or `fraction: F` of the candidate layers; candidates:
`within`, default every layer no other attention entry names) converts the N candidates where the method
hurts least, measured on the original model before conversion; the others keep the original attention. The
method is attached to every candidate once (so a method with random initial parameters is measured as one
model, seeded) and switched on or off per layer with its `bypass` flag. Criteria (score per candidate layer;
the N lowest scores are converted, ties to the lower index):

- `loss`: the calibration loss increase when only that layer runs the method (causal LMs; for encoders the
  mean relative squared change of the last hidden state);
- `output-error`: the relative squared error of the layer's method output against its exact output, both
  from the exact model's q, k, v at that layer (untrained, or as the checkpoint has it);
- `kl-restore` (the KL-guided selection of arXiv 2512.20569): with every candidate converted, how much the
  KL divergence from the original's next-token distribution drops when that one layer is restored to exact
  attention (a layer whose restoration helps least is converted first);
- `evenly`: the layers kept exact are evenly spaced over the candidates (the naive baseline; nothing measured).

`distill_tokens: N` first trains the method on every candidate by attention transfer on N calibration tokens
(the "briefly trained all-converted model" of arXiv 2512.20569; any criterion can use it); the trained
parameters only inform the choice and are discarded, the conversion starts from the seeded initialisation.

The scores and the choice are stored in the plan's `prepared` record, so loading never measures again.
"""
from __future__ import annotations

import contextlib

import torch
from tqdm.auto import tqdm

from ...errors import AttnswapError

CRITERIA = ("loss", "output-error", "kl-restore", "evenly")


@contextlib.contextmanager
def _attached(model, cls, options, sites, adapter, seed: int):
    """The method on every site in `sites`, all bypassed (the original model) on entry."""
    from ...surgery import base_model
    from .analysis import _through_attnswap

    base = base_model(model)
    geometry = adapter.geometry(base.config)
    ref = next(base.parameters())
    torch.manual_seed(seed)
    methods = {}
    for site in sites:
        m = cls(options, site, geometry, adapter).to(device=ref.device, dtype=ref.dtype)
        m.bypass = True
        site.module.attnswap = m
        methods[site.index] = m
    try:
        with _through_attnswap(model):
            yield methods
    finally:
        for site in sites:
            del site.module.attnswap


def _active(methods: dict, on: set[int]) -> None:
    for index, m in methods.items():
        m.bypass = index not in on


def _logp(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids)
    logits = out.logits if hasattr(out, "logits") else out.last_hidden_state
    return torch.log_softmax(logits.float(), dim=-1) if hasattr(out, "logits") else logits.double()


def _loss(model, ids: torch.Tensor, causal: bool, reference: torch.Tensor) -> float:
    """Mean next-token NLL (causal) or relative squared change of the last hidden state against `reference`."""
    got = _logp(model, ids)
    if causal:
        return float(-got[:, :-1].gather(-1, ids[:, 1:, None]).mean())
    return float(((got - reference).pow(2).sum(-1) / reference.pow(2).sum(-1)).mean())


def _kl(model, ids: torch.Tensor, causal: bool, reference: torch.Tensor) -> float:
    got = _logp(model, ids)
    if not causal:
        return float(((got - reference).pow(2).sum(-1) / reference.pow(2).sum(-1)).mean())
    return float((reference.exp() * (reference - got)).sum(-1).mean())  # KL(original || converted)


@torch.no_grad()
def scores(model, cls, options, candidates: list[int], calibration, criterion: str, *, seed: int = 0,
           distill_tokens: int = 0, progress: bool = True) -> dict[int, float]:
    """candidate layer -> score under `criterion` (lower = convert first), on `calibration.ids`; with
    `distill_tokens`, after a brief attention transfer of the method on every candidate (discarded after)."""
    from ...arch import adapter_for
    from ...surgery import base_model

    base = base_model(model)
    adapter = adapter_for(base.config)
    sites = [s for s in adapter.sites(base) if s.index in candidates]
    windows = list(calibration.ids.split(1))
    was_training = model.training
    model.eval()
    try:
        with _attached(model, cls, options, sites, adapter, seed) as methods:
            if distill_tokens:
                _briefly_distilled(model, calibration.ids, distill_tokens, progress)
            if criterion == "output-error":
                return _output_errors(model, methods, sites, windows, progress)
            measure = _loss if criterion == "loss" else _kl
            configs = {i: ({i} if criterion == "loss" else set(candidates) - {i}) for i in candidates}
            if criterion == "kl-restore":
                configs[-1] = set(candidates)  # all converted: the KL the restorations are measured against
            totals = {k: 0.0 for k in configs}
            bar = tqdm(total=len(windows) * (len(configs) + 1), desc=f"select layers ({criterion})",
                       unit="pass", disable=not progress)
            for ids in windows:
                _active(methods, set())
                reference = _logp(model, ids)
                base_value = _loss(model, ids, adapter.causal, reference) if criterion == "loss" else 0.0
                bar.update(1)
                for key, on in configs.items():
                    _active(methods, on)
                    totals[key] += measure(model, ids, adapter.causal, reference) - base_value
                    bar.update(1)
            bar.close()
    finally:
        model.train(was_training)
    n = len(windows)
    if criterion == "loss":
        return {i: totals[i] / n for i in candidates}
    everything = totals.pop(-1) / n
    return {i: everything - totals[i] / n for i in candidates}  # the KL drop when layer i is restored


def _briefly_distilled(model, rows: torch.Tensor, tokens: int, progress: bool) -> None:
    """Attention transfer of the attached methods on the calibration windows; the model's own parameters keep
    their requires_grad flags."""
    from ...config import DistillConfig
    from ...distill import transfer

    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        with torch.enable_grad():
            transfer(model, rows, max(1, tokens // rows.shape[1]), DistillConfig.model_fields["lr"].default,
                     progress=progress, desc="select layers (brief distill)")
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _output_errors(model, methods, sites, windows, progress) -> dict[int, float]:
    from .analysis import recording

    module_of = {s.index: s.module for s in sites}
    err = {i: 0.0 for i in methods}
    for ids in tqdm(windows, desc="select layers (output-error)", unit="window", disable=not progress):
        _active(methods, set())
        with recording(model, inputs=True) as found:
            model(input_ids=ids)
        for i, m in methods.items():
            exact, q, k, v = found[i][0]
            m.bypass = False
            out, _ = m(module_of[i], q, k, v, None)
            m.bypass = True
            e = exact.double()
            err[i] += float((out.double() - e).pow(2).sum() / e.pow(2).sum().clamp_min(1e-30))
    return {i: e / len(windows) for i, e in err.items()}


def choose(candidates: list[int], n: int, criterion: str, measured: dict[int, float] | None) -> list[int]:
    """The n candidates to convert: the lowest scores (ties to the lower index), or for `evenly` all but
    evenly spaced exact ones."""
    if criterion == "evenly":
        keep = len(candidates) - n
        exact = {candidates[int((j + 0.5) * len(candidates) / keep)] for j in range(keep)} if keep else set()
        return [c for c in candidates if c not in exact]
    return sorted(sorted(candidates, key=lambda i: (measured[i], i))[:n])


def select(model, part, calibration, *, seed: int = 0, progress: bool = True) -> tuple[list[int], dict]:
    """Resolve a plan part with `layers: {auto: ...}`: (layers to convert, the record stored in the plan)."""
    auto = part.auto
    criterion, candidates, n = auto["auto"], part.layers, part.target
    measured = None
    if criterion != "evenly":
        if calibration is None:
            raise AttnswapError(f"layers: auto ({criterion}) measures the model on calibration text: pass "
                                "--calibration FILE (API: calibration=attnswap.data.calibration(tokenizer, FILE))")
        measured = scores(model, part.cls, part.options, candidates, calibration, criterion, seed=seed,
                          distill_tokens=auto.get("distill_tokens", 0), progress=progress)
    chosen = choose(candidates, n, criterion, measured)
    record = {"criterion": criterion, "converted": chosen, "kept_exact": [c for c in candidates if c not in chosen],
              "candidates": candidates}
    if measured is not None:
        record["scores"] = {str(i): round(v, 8) for i, v in measured.items()}
        record["calibration"] = calibration.describe()
    return chosen, record
