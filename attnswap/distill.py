"""Stage 1 attention transfer: train only the variants' new parameters to reproduce each layer's original
attention output (Hedgehog / LoLCATs). All original weights stay frozen.

Each step runs the model once with exact attention (the teacher), capturing every converted attention
module's inputs and outputs with hooks. Then each layer's student output is recomputed from that layer's
captured inputs and its MSE to the teacher output is back-propagated through that one attention module
only: layers train independently, the whole model is never back-propagated through, and the residual
stream every layer sees is the original model's.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import faults, outputs, parallel
from .checkpoint import save
from .config import DistillConfig
from .data import training_ids, windows
from .errors import AttnswapError, TrainingDiverged
from .surgery import bypassed, method_modules


class _Capture:
    """Forward hooks that record an attention module's call (args, kwargs) and output."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.calls: dict[str, tuple] = {}
        self.handles = []
        for path, m in modules.items():
            self.handles.append(m.register_forward_hook(self._hook(path), with_kwargs=True))

    def _hook(self, path):
        def hook(module, args, kwargs, output):
            out = output[0] if isinstance(output, tuple) else output
            self.calls[path] = (args, kwargs, out.detach())

        return hook

    def close(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def _held_out_losses(model, attn_modules, batch) -> dict[str, float]:
    capture = _Capture(attn_modules)
    try:
        with bypassed(model):
            model(input_ids=batch, use_cache=False)
    finally:
        capture.close()
    losses = {}
    for path, (args, kwargs, target) in capture.calls.items():
        student = attn_modules[path](*args, **kwargs)
        student = student[0] if isinstance(student, tuple) else student
        losses[path] = _relative_mse(student, target).item()
    return losses


def _relative_mse(student, target):
    """Mean over the sequences of each one's MSE / its mean square: a mean over the ranks' batches equals the
    value on their union, so W processes of batch B step as one of batch W x B."""
    t = target.float().flatten(1)
    per_row = (student.float().flatten(1) - t).pow(2).mean(1) / t.pow(2).mean(1).clamp_min(1e-12)
    return per_row.mean()


def _average_gradients(params) -> None:
    """Data parallel without sharding: every rank's gradients replaced by their mean over the ranks."""
    import torch.distributed as dist

    size, _ = parallel.world()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad.div_(size)


def _own_parameters(variants: dict) -> list[torch.nn.Parameter]:
    params = [p for v in variants.values() for p in v.trainable_parameters()]
    if not params:
        names = sorted({type(v).name for v in variants.values()}) or ["no attention methods"]
        raise AttnswapError(f"the plan's attention methods ({', '.join(names)}) have no parameters to distill; go "
                            "straight to finetune")
    return params


def transfer(model, rows: torch.Tensor, steps: int, lr: float, *, batch_size: int = 1, progress: bool = True,
             desc: str = "distill") -> dict[str, list[float]]:
    """Attention transfer in place: `steps` Adam steps on the attention methods' own parameters, batches drawn
    in order from `rows` (cycled); returns each layer's loss history. The methods' parameters are left frozen
    (requires_grad False) afterwards, as the original weights are throughout.

    Under torchrun, step s of rank r reads rows [(s W + r) B, ...) and the gradients are averaged over the W
    ranks: by FSDP's reduce-scatter where the model is sharded (`parallel.shard_model`), else by all-reduce."""
    variants = method_modules(model)
    attn_modules = {path: model.get_submodule(path) for path in variants}
    trainable = _own_parameters(variants)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(trainable, lr=lr)
    device = next(model.parameters()).device
    size, rank = parallel.world()
    sharded = parallel.is_sharded(model)
    history: dict[str, list[float]] = {path: [] for path in variants}
    capture = _Capture(attn_modules)
    was_training = model.training
    model.eval()  # no dropout: the student must match the teacher's deterministic output
    bar = tqdm(range(steps), desc=desc, unit="step", disable=not progress)
    try:
        for step in bar:
            first = (step * size + rank) * batch_size
            idx = torch.arange(first, first + batch_size) % len(rows)
            batch = rows[idx].to(device)
            with torch.no_grad(), bypassed(model):
                model(input_ids=batch, use_cache=False)
            optimizer.zero_grad(set_to_none=True)
            for path, (args, kwargs, target) in capture.calls.items():
                student = attn_modules[path](*args, **kwargs)
                student = student[0] if isinstance(student, tuple) else student
                # relative MSE: comparable across layers whose outputs differ in scale (Adam does not mind)
                loss = _relative_mse(student, target)
                if not torch.isfinite(loss) and size == 1:  # several ranks stop together, below
                    raise TrainingDiverged(f"distill loss of {path} became {loss.item()} at step {step + 1}; "
                                           "try a lower --lr")
                loss.backward()
                history[path].append(loss.item())
            if size > 1 and not sharded:
                _average_gradients(trainable)
            # this rank's shard of each gradient where sharded; every rank stops if any rank saw a bad value
            local = [g.to_local() if hasattr(g, "to_local") else g for g in (p.grad for p in trainable) if g is not None]
            finite = all(math.isfinite(history[path][-1]) for path in capture.calls) and \
                all(bool(torch.isfinite(g).all()) for g in local)
            if not parallel.all_ok(finite):
                raise TrainingDiverged(f"a distill loss or gradient became non-finite at step {step + 1}; stopped "
                                       "before the update, nothing was written; try a lower --lr")
            optimizer.step()
            faults.point("distill.step")
            capture.calls.clear()
            recent = [h[-1] for h in history.values()]
            bar.set_postfix(mean=f"{sum(recent) / len(recent):.4f}", worst=f"{max(recent):.4f}")
    finally:
        for p in trainable:
            p.requires_grad_(False)
        capture.close()
        bar.close()
        model.train(was_training)
    return history


def distill(model, tokenizer, cfg: DistillConfig, out: str | Path | None = None, *, force: bool = False,
            progress: bool = True, metrics: dict | None = None, protect=()) -> dict:
    """Train the variants' parameters to match the original attention outputs; optionally save to `out`
    (whole or not at all; `protect`: inputs `out` may not be or contain).

    Under torchrun every process trains on its own batches (rank 0 alone writes); with `parallel: fsdp` the
    model is sharded over them while it trains (`parallel.shard_model`) and whole again afterwards."""
    size, rank = parallel.world()
    if out is not None and rank == 0:
        outputs.check_out(out, force, protect)
    variants = method_modules(model)
    _own_parameters(variants)  # nothing to train: say so before reading any text
    attn_modules = {path: model.get_submodule(path) for path in variants}
    torch.manual_seed(cfg.seed)
    steps = cfg.steps_over(size)
    n_train = steps * cfg.batch_size * size
    # one more window than training reads: the held-out window each layer's loss is reported on
    rows = windows(training_ids(tokenizer, cfg.data, (n_train + 1) * cfg.seq_len), cfg.seq_len)
    held_out, rows = rows[-1:], rows[:-1]
    model.eval()
    shards = None
    if cfg.parallel == "fsdp" and size > 1:
        parallel.shard_model(model)
        shards = parallel.shard_fraction(model)
    device = next(model.parameters()).device  # the shards' device (FSDP moves them to its mesh's)
    start = _held_out_losses(model, attn_modules, held_out.to(device))
    t0 = time.perf_counter()
    transfer(model, rows, steps, cfg.lr, batch_size=cfg.batch_size, progress=progress and rank == 0)
    final = _held_out_losses(model, attn_modules, held_out.to(device))
    parallel.unshard(model)
    result = {
        "steps": steps,
        "tokens": steps * cfg.batch_size * size * cfg.seq_len,
        "seconds": round(time.perf_counter() - t0, 1),
        # relative MSE (MSE / mean square of the original output) on one held-out window
        "layer_loss_start": {p: round(v, 5) for p, v in start.items()},
        "layer_loss_final": {p: round(v, 5) for p, v in final.items()},
        "mean_loss_final": round(sum(final.values()) / len(final), 5),
        "world_size": size,
        "rank": rank,
        # this rank's share of the parameters' elements while training (fsdp), else null
        "shard_fraction": shards,
        "config": cfg.model_dump(),
    }
    if out is not None and rank == 0:
        import json

        save(model, out, tokenizer=tokenizer, force=force, protect=protect, label="distill",
             files={"metrics.json": json.dumps({**(metrics or {}), "distill": result}, indent=2)})
    parallel.barrier()
    return result
