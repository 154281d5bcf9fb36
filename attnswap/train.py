"""Short fine-tuning: LoRA (PEFT) on q/k/v/o plus the variant's own parameters, through accelerate.

One code path for one process, `torchrun --nproc_per_node N -m attnswap finetune ...` on CPUs (gloo) and
`accelerate launch` on GPUs. Checkpoints every `save_every` steps (trainable tensors, optimizer, scheduler,
step) under OUT/checkpoints/; `resume` continues from the newest. A NaN/inf loss stops the run before the
optimizer step, so the weights and the last checkpoint stay good.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import pickle
import shutil
import time
from pathlib import Path

import torch
from accelerate.utils import gather_object
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import faults, outputs, parallel
from .arch import adapter_for
from .checkpoint import check_finite, first_non_finite, write_model
from .config import FinetuneConfig
from .data import training_ids, windows
from .errors import AttnswapError, TrainingDiverged
from .surgery import all_method_modules, base_model, bypassed, method_modules

CHECKPOINTS = "checkpoints"
KEEP_CHECKPOINTS = 2


def _accelerator():
    from accelerate import Accelerator

    # On CPU, accelerate only sets up a gloo process group when told it runs on CPUs.
    return Accelerator(cpu=not torch.cuda.is_available())


def attach_lora(model, cfg: FinetuneConfig):
    """Wrap with PEFT LoRA on the adapter's q/k/v/o targets; also unfreeze the plan's methods' own parameters
    (attention methods and tuner)."""
    variant_params = [p for m in all_method_modules(model) for p in m.trainable_parameters()]
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
    if cfg.task == "classification":  # the head is new (or was trained with the model): trained in full
        from .classification import head_parameters

        for p in head_parameters(base_model(model)):
            p.requires_grad_(True)
    if not any(p.requires_grad for p in model.parameters()):
        raise AttnswapError("nothing to train: --lora-r is 0 and the plan's methods have no trainable parameters")
    return model


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The trained tensors, whole (gathered from the ranks where the model is sharded: every rank calls it)."""
    return {n: parallel.full(p.detach()).cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def digest(model) -> str:
    """sha256 of the trainable tensors: equal on every rank of a data-parallel run."""
    h = hashlib.sha256()
    for name, t in sorted(trainable_state(model).items()):
        h.update(name.encode())
        h.update(t.float().numpy().tobytes())
    return h.hexdigest()[:16]


def _scheduler(optimizer, cfg: FinetuneConfig):
    """transformers' linear schedule: warm-up from 0 over `warmup` steps, then linear decay to 0 at `steps`."""
    from transformers import get_linear_schedule_with_warmup

    return get_linear_schedule_with_warmup(optimizer, cfg.warmup, cfg.steps)


PROGRESS = f"{CHECKPOINTS}/step-*/state.json"  # what makes a run directory resumable


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -------------------------------------------------------------------------- resumable state without pickles
# The optimizer and scheduler state, and each rank's RNG, are stored as tensors in training.safetensors and
# everything else as JSON in state.json: loading a checkpoint never un-pickles anything.

def _flatten_state(optimizer, scheduler, rng: list) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors whole (a sharded optimizer state is gathered: every rank calls it) and the rest as JSON."""
    tensors, meta = {}, {"optimizer": {"state": {}, "param_groups": optimizer.state_dict()["param_groups"]},
                         "scheduler": {}, "rng": []}
    for idx, slots in optimizer.state_dict()["state"].items():
        meta["optimizer"]["state"][str(idx)] = {}
        for k, v in slots.items():
            if torch.is_tensor(v):
                tensors[f"optimizer.{idx}.{k}"] = parallel.full(v.detach()).cpu().contiguous()
                meta["optimizer"]["state"][str(idx)][k] = "tensor"
            else:
                meta["optimizer"]["state"][str(idx)][k] = v
    meta["scheduler"] = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    for r, state in enumerate(rng):
        meta["rng"].append(sorted(state))
        for k, v in state.items():
            vs = v if isinstance(v, list) else [v]
            for i, t in enumerate(vs):
                tensors[f"rng.{r}.{k}.{i}"] = t.cpu().contiguous()
    return tensors, meta


def _unflatten_state(tensors: dict, meta: dict) -> tuple[dict, dict, list]:
    optim = {"state": {}, "param_groups": meta["optimizer"]["param_groups"]}
    for idx, slots in meta["optimizer"]["state"].items():
        optim["state"][int(idx)] = {k: tensors[f"optimizer.{idx}.{k}"] if v == "tensor" else v
                                    for k, v in slots.items()}
    rng = []
    for r, keys in enumerate(meta["rng"]):
        state = {}
        for k in keys:
            parts = sorted((int(n.rsplit(".", 1)[1]), t) for n, t in tensors.items() if n.startswith(f"rng.{r}.{k}."))
            vals = [t for _, t in parts]
            state[k] = vals if k == "cuda" else vals[0]
        rng.append(state)
    return optim, meta["scheduler"], rng


def _save_checkpoint(run: Path, step: int, weights: dict[str, torch.Tensor], training: tuple[dict, dict],
                     cfg: FinetuneConfig, losses, history: list) -> Path:
    """One checkpoint of the (finite: the caller checked) trainable `weights`, atomically: staged as a scratch
    folder inside checkpoints/, given a manifest with checksums, renamed to step-NNNNNN."""
    root = run / CHECKPOINTS
    with outputs.atomic_folder(root / f"step-{step:06d}", label="finetune.checkpoint") as tmp:
        save_file(weights, str(tmp / "trainable.safetensors"))
        faults.point("finetune.checkpoint")
        tensors, meta = training  # _flatten_state's
        save_file(tensors, str(tmp / "training.safetensors"))
        state = {"step": step, "config": cfg.model_dump(), "losses": losses, "resumes": history, **meta}
        (tmp / "state.json").write_text(json.dumps(state))
    for old in sorted(root.glob("step-*"))[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return root / f"step-{step:06d}"


def _checkpoint_problem(ckpt: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (None: it is intact). attnswap 0.1.0's have no manifest."""
    if (ckpt / outputs.MANIFEST).is_file():
        return outputs.verify(ckpt)
    try:
        json.loads((ckpt / "state.json").read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return "state.json is unreadable"
    return None if (ckpt / "trainable.safetensors").is_file() else "trainable.safetensors is missing"


def latest_checkpoint(run: Path) -> Path | None:
    """The newest intact checkpoint; newer corrupt or truncated ones are skipped with a warning."""
    for ckpt in sorted((run / CHECKPOINTS).glob("step-*/state.json"), reverse=True):
        problem = _checkpoint_problem(ckpt.parent)
        if problem is None:
            return ckpt.parent
        outputs.warn(f"skipping checkpoint {ckpt.parent.name}: {problem}")
    return None


def _load_checkpoint(ckpt: Path, model, optimizer, scheduler, rank: int) -> tuple[int, list, list]:
    try:
        state = json.loads((ckpt / "state.json").read_text())
        tensors = load_file(str(ckpt / "trainable.safetensors"))
        if (ckpt / "training.safetensors").is_file():
            optim, sched, rng = _unflatten_state(load_file(str(ckpt / "training.safetensors")), state)
        else:  # attnswap 0.1.0 wrote optim.pt: tensors only, never code
            legacy = torch.load(ckpt / "optim.pt", weights_only=True)
            optim, sched, rng = legacy["optimizer"], legacy["scheduler"], legacy["rng"]
    except (pickle.UnpicklingError, SafetensorError, OSError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise AttnswapError(f"cannot resume from {ckpt}: {first} (a checkpoint holds tensors and JSON only; "
                            "anything else is refused, never run)") from None
    params = dict(model.named_parameters())
    missing = sorted(set(tensors) - set(params))
    if missing:
        raise AttnswapError(f"cannot resume from {ckpt}: it holds '{missing[0]}', which this model does not have")
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(parallel.like(params[name], t))
    by_index = [p for group in optimizer.param_groups for p in group["params"]]
    for idx, slots in optim["state"].items():  # whole tensors -> this rank's shards where the model is sharded
        optim["state"][idx] = {k: parallel.like(by_index[int(idx)], v) if torch.is_tensor(v) else v
                               for k, v in slots.items()}
    optimizer.load_state_dict(optim)
    scheduler.load_state_dict({**sched, "lr_lambdas": [None] * len(optimizer.param_groups)})
    if rank < len(rng):
        _set_rng_state(rng[rank])
    return state["step"], state["losses"], state.get("resumes", [])


FIXED_ON_RESUME = ("data", "lora_r", "lora_alpha", "seq_len", "batch_size", "seed", "task")


def _check_resume(ckpt: Path, cfg: FinetuneConfig) -> tuple[FinetuneConfig, dict]:
    """Options that resume cannot honour (the data order, the LoRA shapes) must match; returns the saved
    config and the options that changed and are applied from here on (lr, variant_lr, weight_decay, steps,
    warmup, max_grad_norm, save_every)."""
    saved_raw = json.loads((ckpt / "state.json").read_text())["config"]
    saved = FinetuneConfig(**{k: v for k, v in saved_raw.items() if k in FinetuneConfig.model_fields})
    diff = [k for k in FIXED_ON_RESUME if getattr(saved, k) != getattr(cfg, k)]
    if diff:
        raise AttnswapError(f"--resume with different {', '.join(diff)} than the checkpoint in {ckpt}; "
                            "resume cannot change them: use the same options")
    changed = {k: [getattr(saved, k), getattr(cfg, k)] for k in FinetuneConfig.model_fields
               if k not in FIXED_ON_RESUME and getattr(saved, k) != getattr(cfg, k)}
    return saved, changed


def _apply_hyperparameters(optimizer, scheduler, cfg: FinetuneConfig, lrs: list[float]) -> None:
    """After loading a checkpoint: the current options' peak learning rates and weight decay, with the
    schedule's factor at the step reached (the schedule itself is rebuilt from the current options)."""
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
    scheduler.base_lrs = list(lrs)
    for group, lr in zip(optimizer.param_groups, lrs):
        group["initial_lr"] = lr
        group["lr"] = lr * factor
        group["weight_decay"] = cfg.weight_decay
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def _method_schedules(methods, step: int, total: int) -> dict[str, float]:
    """Advance every attention method's own schedule to `step`; the mean over layers of what they report."""
    seen: dict[str, list[float]] = {}
    for v in methods:
        for k, x in v.on_train_step(step, total).items():
            seen.setdefault(k, []).append(float(x))
    return {k: sum(xs) / len(xs) for k, xs in seen.items()}


def finetune(model, tokenizer, cfg: FinetuneConfig, out: str | os.PathLike, *, resume: bool = False,
             force: bool = False, progress: bool = True, metrics: dict | None = None, on_step=None,
             protect=()) -> dict:
    """Fine-tune `model` (converted or not) and write it to `out` (loadable with attnswap.load).

    The run works in a resumable run directory beside `out` (`outputs.run_dir`): checkpoints every
    `save_every` steps, each written atomically with checksums. A failure or a kill keeps it for
    `resume`; the finished run (model, checkpoints, losses) is swapped in as `out` at the end.
    `on_step(step, loss)` is called after each optimizer step (1-based step), e.g. for logging.
    """
    if any(t.adapts for t in method_modules(model, "tuner").values()):
        cfg = cfg.model_copy(update={"lora_r": 0})  # the plan's tuner is the adapter: no PEFT LoRA on top of it
    accelerator = _accelerator()
    writer = accelerator.is_main_process  # only it writes; the others compute and read its run directory
    if writer:
        outputs.check_out(out, force or resume, protect)
    staging = (outputs.writing(out, force=force, resume=resume, protect=protect, label="finetune",
                               progress=PROGRESS, carry=(CHECKPOINTS, "losses.json"))
               if writer else contextlib.nullcontext(outputs.run_dir(out)))
    with staging as run:
        accelerator.wait_for_everyone()  # the run directory is ready (and a finished run's progress copied in)
        return _finetune(model, tokenizer, cfg, run, accelerator, resume=resume, progress=progress,
                         metrics=metrics, on_step=on_step)


def _kl_to_original(model, unwrapped, batch) -> torch.Tensor:
    """Mean per-token KL(original || converted) of the next-token distributions. The teacher pass is the same
    model with every attention method bypassed (the original attention) and the LoRA adapters disabled."""
    with torch.no_grad(), contextlib.ExitStack() as stack:
        stack.enter_context(bypassed(unwrapped))
        if hasattr(unwrapped, "disable_adapter"):
            stack.enter_context(unwrapped.disable_adapter())
        teacher = unwrapped(input_ids=batch).logits.float().log_softmax(-1)
    student = model(input_ids=batch).logits.float().log_softmax(-1)
    vocab = student.shape[-1]
    return torch.nn.functional.kl_div(student.reshape(-1, vocab), teacher.reshape(-1, vocab), log_target=True,
                                      reduction="batchmean")


def _finetune(model, tokenizer, cfg: FinetuneConfig, run: Path, accelerator, *, resume: bool, progress: bool,
              metrics: dict | None, on_step) -> dict:
    ckpt = latest_checkpoint(run) if resume else None
    if resume and ckpt is None:
        raise AttnswapError(f"nothing to resume: no intact checkpoint in {run / CHECKPOINTS}; pass --force to "
                            "start again")
    saved, changed = _check_resume(ckpt, cfg) if ckpt is not None else (None, {})
    if cfg.loss == "kl" and method_modules(model, "tuner"):
        raise AttnswapError("--loss kl compares against the original model, which a plan with a tuner has no "
                            "switch back to; use --loss ce")
    torch.manual_seed(cfg.seed)
    model = attach_lora(model, cfg)
    model.train()
    world, rank = accelerator.num_processes, accelerator.process_index
    sharded = cfg.parallel == "fsdp" and world > 1
    if sharded:  # before the optimizer is built: it holds the shards
        parallel.shard_model(model)
    shards = parallel.shard_fraction(model) if sharded else None
    own = {id(p) for m in all_method_modules(model) for p in m.parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) not in own], "lr": cfg.lr},
              {"params": [p for p in params if id(p) in own], "lr": cfg.variant_lr or cfg.lr}]
    groups = [g for g in groups if g["params"]]
    peaks = [g["lr"] for g in groups]  # the optimizer and scheduler rescale g["lr"] from here on
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = _scheduler(optimizer, cfg)
    start, losses, history = (0, [], [])
    if ckpt is not None:
        start, losses, history = _load_checkpoint(ckpt, model, optimizer, scheduler, rank)
        # options resume can honour are applied, never silently kept from the checkpoint
        _apply_hyperparameters(optimizer, scheduler, cfg, peaks)
        if changed:
            history = [*history, {"step": start, "changed": changed}]
            outputs.warn(f"resuming at step {start} with changed options (applied from here on): " +
                         ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))

    methods = list(method_modules(model).values())  # before prepare() wraps the model
    per_step = cfg.batch_size * world
    if cfg.task == "classification":
        from . import classification

        examples = classification.encode(tokenizer, classification.read_examples(cfg.data),
                                         classification.head_labels(base_model(model).config), cfg.seq_len)
        count = len(examples["labels"])
    else:
        rows = windows(training_ids(tokenizer, cfg.data, cfg.steps * per_step * cfg.seq_len), cfg.seq_len)
        count = len(rows)
    seen = 0  # tokens read (classification: the real tokens of the examples, padding not counted)
    if not sharded:  # accelerate's DDP; a sharded model's gradients are already averaged by FSDP
        model, optimizer = accelerator.prepare(model, optimizer)

    bar = tqdm(total=cfg.steps, initial=start, desc="finetune", unit="step",
               disable=not (progress and accelerator.is_main_process))
    t0, last_ckpt = time.perf_counter(), ckpt
    for step in range(start, cfg.steps):
        # step s, rank r reads rows [(s * world + r) * batch, ...): the data order survives --resume
        first = (step * world + rank) * cfg.batch_size
        idx = torch.arange(first, first + cfg.batch_size) % count
        shown = _method_schedules(methods, step, cfg.steps)
        if cfg.task == "classification":
            batch = classification.rows(examples, idx, accelerator.device)
            seen += int(batch["attention_mask"].sum()) * world
            loss = model(**batch).loss
        elif cfg.loss == "kl":
            batch = rows[idx].to(accelerator.device)
            loss = _kl_to_original(model, accelerator.unwrap_model(model), batch)
        else:
            batch = rows[idx].to(accelerator.device)
            loss = model(input_ids=batch, labels=batch).loss
        mean_loss = float(accelerator.reduce(loss.detach(), reduction="mean"))
        where = f"the last good checkpoint is {last_ckpt.name}" if last_ckpt else "no checkpoint was written yet"
        if not math.isfinite(mean_loss):
            raise TrainingDiverged(f"loss became {mean_loss} at step {step + 1}; stopped before the update, "
                                   f"{where} (resume with --resume and a lower --lr)")
        accelerator.backward(loss)
        norm = float(parallel.full(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)) if sharded
                     else accelerator.clip_grad_norm_(params, cfg.max_grad_norm))
        if not math.isfinite(norm):
            raise TrainingDiverged(f"gradient norm became {norm} at step {step + 1}; stopped before the update, "
                                   f"{where} (resume with --resume and a lower --lr)")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(mean_loss, 5))
        bar.update(1)
        bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}",
                        **{k: f"{v:.3g}" for k, v in shown.items()})
        done = step + 1
        faults.point("finetune.step")
        if done % cfg.save_every == 0 or done == cfg.steps:
            rng = gather_object([_rng_state()]) if world > 1 else [_rng_state()]
            # only finite weights are saved, so the newest checkpoint is always a good one
            weights = trainable_state(accelerator.unwrap_model(model))
            bad = first_non_finite(weights.items())
            if bad is not None:
                raise TrainingDiverged(f"'{bad}' became non-finite by step {done}; not saved, {where} (resume "
                                       "with --resume and a lower --lr)")
            training = _flatten_state(optimizer, scheduler, rng)
            if accelerator.is_main_process:
                last_ckpt = _save_checkpoint(run, done, weights, training, cfg, losses, history)
            accelerator.wait_for_everyone()
        if on_step is not None:
            on_step(done, mean_loss)
    bar.close()

    model = parallel.unshard(accelerator.unwrap_model(model))
    model.eval()
    result = {
        "steps": cfg.steps,
        "resumed_from": start if resume else None,
        "resumes": history,
        "tokens": seen if cfg.task == "classification" else (cfg.steps - start) * per_step * cfg.seq_len,
        **({"examples": len(examples["labels"]), "epochs": round(cfg.steps * per_step / count, 3)}
           if cfg.task == "classification" else {}),
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        # single-step losses are noisy; the card quotes means over the first and last 10 steps
        "loss_start_mean": round(sum(losses[:10]) / len(losses[:10]), 4) if losses else None,
        "loss_end_mean": round(sum(losses[-10:]) / len(losses[-10:]), 4) if losses else None,
        "world_size": world,
        "rank": rank,
        "parallel": cfg.parallel if world > 1 else None,
        # this rank's share of the parameters' elements while training (fsdp), else null
        "shard_fraction": shards,
        "digest": digest(model),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if accelerator.is_main_process:
        _write_final(model, tokenizer, run, {**(metrics or {}), "finetune": {**cfg.model_dump(), **result}})
        (run / "losses.json").write_text(json.dumps(losses))
    accelerator.wait_for_everyone()
    return result


def _write_final(model, tokenizer, run: Path, metrics: dict) -> None:
    """The trained model's files go into the run directory beside its checkpoints (the whole directory is
    then swapped in as the output); files of an earlier final model in it are replaced."""
    check_finite(model, "the trained model")
    for stale in [*run.glob("*.safetensors"), *run.glob("*.json"), run / "adapter"]:
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
    write_model(model, run, tokenizer)
    (run / "metrics.json").write_text(json.dumps(metrics, indent=2))
