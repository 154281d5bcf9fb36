"""Short fine-tuning: LoRA (PEFT) on q/k/v/o plus the variant's own parameters, through accelerate.

One code path for one process, `torchrun --nproc_per_node N -m attnswap finetune ...` on CPUs (gloo) and
`accelerate launch` on GPUs. Checkpoints every `save_every` steps (trainable tensors, optimizer, scheduler,
step) under OUT/checkpoints/; `resume` continues from the newest. A NaN/inf loss stops the run before the
optimizer step, so the weights and the last checkpoint stay good.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
from accelerate.utils import gather_object
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .arch import adapter_for
from .checkpoint import check_out, write_model
from .config import FinetuneConfig
from .data import training_ids, windows
from .errors import AttnswapError, TrainingDiverged
from .surgery import variant_modules

CHECKPOINTS = "checkpoints"
KEEP_CHECKPOINTS = 2


def _accelerator():
    from accelerate import Accelerator

    # On CPU, accelerate only sets up a gloo process group when told it runs on CPUs.
    return Accelerator(cpu=not torch.cuda.is_available())


def attach_lora(model, cfg: FinetuneConfig):
    """Wrap with PEFT LoRA on the adapter's q/k/v/o targets; also unfreeze the variant's own parameters."""
    variant_params = [p for v in variant_modules(model).values() for p in v.trainable_parameters()]
    if cfg.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        adapter = adapter_for(model.config)
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                          target_modules=list(adapter.lora_targets), fan_in_fan_out=adapter.name == "gpt2")
        model = get_peft_model(model, lora)
    else:
        for p in model.parameters():
            p.requires_grad_(False)
    for p in variant_params:
        p.requires_grad_(True)
    if not any(p.requires_grad for p in model.parameters()):
        raise AttnswapError("nothing to train: --lora-r is 0 and the variant has no trainable parameters")
    return model


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def digest(model) -> str:
    """sha256 of the trainable tensors: equal on every rank of a data-parallel run."""
    h = hashlib.sha256()
    for name, t in sorted(trainable_state(model).items()):
        h.update(name.encode())
        h.update(t.float().numpy().tobytes())
    return h.hexdigest()[:16]


def _schedule(cfg: FinetuneConfig):
    def factor(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / (cfg.warmup + 1)
        return max(0.0, (cfg.steps - step) / max(1, cfg.steps - cfg.warmup))

    return factor


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted((out / CHECKPOINTS).glob("step-*/state.json"))
    return found[-1].parent if found else None


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(out: Path, step: int, model, optimizer, scheduler, cfg: FinetuneConfig, losses,
                     rng: list) -> Path:
    root = out / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    # RNG per rank too: dropout masks after a resume must be the ones the uninterrupted run would draw
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng}, tmp / "optim.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "config": cfg.model_dump(), "losses": losses}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(root.glob("step-*"))[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _load_checkpoint(ckpt: Path, model, optimizer, scheduler, rank: int) -> tuple[int, list]:
    state = json.loads((ckpt / "state.json").read_text())
    tensors = load_file(str(ckpt / "trainable.safetensors"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t)
    optim = torch.load(ckpt / "optim.pt", weights_only=False)
    optimizer.load_state_dict(optim["optimizer"])
    scheduler.load_state_dict(optim["scheduler"])
    if rank < len(optim["rng"]):
        _set_rng_state(optim["rng"][rank])
    return state["step"], state["losses"]


def _check_resume(out: Path, cfg: FinetuneConfig) -> Path:
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        raise AttnswapError(f"nothing to resume: no checkpoint under {out / CHECKPOINTS}")
    saved = FinetuneConfig(**json.loads((ckpt / "state.json").read_text())["config"])
    fixed = ("data", "lora_r", "lora_alpha", "seq_len", "batch_size", "seed")
    diff = [k for k in fixed if getattr(saved, k) != getattr(cfg, k)]
    if diff:
        raise AttnswapError(f"--resume with different {', '.join(diff)} than the checkpoint in {ckpt}; use the same options")
    return ckpt


def _variant_schedules(variants, step: int, total: int) -> dict[str, float]:
    """Advance every variant's own schedule to `step`; the mean over layers of what they report."""
    seen: dict[str, list[float]] = {}
    for v in variants:
        for k, x in v.on_train_step(step, total).items():
            seen.setdefault(k, []).append(float(x))
    return {k: sum(xs) / len(xs) for k, xs in seen.items()}


def finetune(model, tokenizer, cfg: FinetuneConfig, out: str | os.PathLike, *, resume: bool = False,
             force: bool = False, progress: bool = True, metrics: dict | None = None, on_step=None) -> dict:
    """Fine-tune `model` (converted or not) and write it to `out` (loadable with attnswap.load).

    `on_step(step, loss)` is called after each optimizer step (1-based step), e.g. for logging.
    """
    out = Path(out)
    if any(type(v).is_adapter for v in variant_modules(model).values()):
        cfg = cfg.model_copy(update={"lora_r": 0})  # the variant is the adapter: no PEFT LoRA on top of it
    accelerator = _accelerator()
    ckpt = _check_resume(out, cfg) if resume else None
    if not resume:
        check_out(out, force)
    accelerator.wait_for_everyone()
    if not resume and accelerator.is_main_process and out.exists():
        shutil.rmtree(out)  # --force: the old run goes only now that the options are valid
    torch.manual_seed(cfg.seed)
    model = attach_lora(model, cfg)
    model.train()
    own = {id(p) for v in variant_modules(model).values() for p in v.parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) not in own]},
              {"params": [p for p in params if id(p) in own], "lr": cfg.variant_lr or cfg.lr}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg))
    world, rank = accelerator.num_processes, accelerator.process_index
    start, losses = (0, [])
    if ckpt is not None:
        start, losses = _load_checkpoint(ckpt, model, optimizer, scheduler, rank)

    variants = list(variant_modules(model).values())  # before prepare() wraps the model
    per_step = cfg.batch_size * world
    rows = windows(training_ids(tokenizer, cfg.data, cfg.steps * per_step * cfg.seq_len), cfg.seq_len)
    model, optimizer = accelerator.prepare(model, optimizer)

    bar = tqdm(total=cfg.steps, initial=start, desc="finetune", unit="step",
               disable=not (progress and accelerator.is_main_process))
    t0, last_ckpt = time.perf_counter(), ckpt
    for step in range(start, cfg.steps):
        # step s, rank r reads rows [(s * world + r) * batch, ...): the data order survives --resume
        first = (step * world + rank) * cfg.batch_size
        idx = torch.arange(first, first + cfg.batch_size) % len(rows)
        batch = rows[idx].to(accelerator.device)
        shown = _variant_schedules(variants, step, cfg.steps)
        loss = model(input_ids=batch, labels=batch).loss
        mean_loss = float(accelerator.reduce(loss.detach(), reduction="mean"))
        if not math.isfinite(mean_loss):
            where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
            raise TrainingDiverged(f"loss became {mean_loss} at step {step + 1}; stopped before the update, "
                                   f"{where} (resume with --resume and a lower --lr)")
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(mean_loss, 5))
        bar.update(1)
        bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}",
                        **{k: f"{v:.3g}" for k, v in shown.items()})
        done = step + 1
        if done % cfg.save_every == 0 or done == cfg.steps:
            rng = gather_object([_rng_state()]) if world > 1 else [_rng_state()]
            if accelerator.is_main_process:
                last_ckpt = _save_checkpoint(out, done, accelerator.unwrap_model(model), optimizer, scheduler,
                                             cfg, losses, rng)
            accelerator.wait_for_everyone()
        if on_step is not None:
            on_step(done, mean_loss)
    bar.close()

    model = accelerator.unwrap_model(model)
    model.eval()
    result = {
        "steps": cfg.steps,
        "resumed_from": start if resume else None,
        "tokens": (cfg.steps - start) * per_step * cfg.seq_len,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        # single-step losses are noisy; the card quotes means over the first and last 10 steps
        "loss_start_mean": round(sum(losses[:10]) / len(losses[:10]), 4) if losses else None,
        "loss_end_mean": round(sum(losses[-10:]) / len(losses[-10:]), 4) if losses else None,
        "world_size": world,
        "rank": rank,
        "digest": digest(model),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if accelerator.is_main_process:
        _write_final(model, tokenizer, out, {**(metrics or {}), "finetune": {**cfg.model_dump(), **result}})
        (out / "losses.json").write_text(json.dumps(losses))
    accelerator.wait_for_everyone()
    return result


def _write_final(model, tokenizer, out: Path, metrics: dict) -> None:
    """Model files go to a temp dir inside `out`, then move in; config.json moves last (the commit mark)."""
    tmp = out / ".final-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_model(model, tmp, tokenizer)
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
    names = sorted(p.name for p in tmp.iterdir() if p.name != "config.json") + ["config.json"]
    for name in names:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(tmp / name, target)
    tmp.rmdir()
