"""Evolve the parameters of a cache policy that has them (`CachePolicy.evolvable`, e.g. namm's network) with
CMA-ES on a memory task, with a checkpoint per generation.

OUT/evolve.json holds the run's settings, the CMA-ES state and the history; OUT/<policy>.safetensors the best
parameters so far (key: the policy's name; load them with the policy's option `params`). `resume=True`
continues from OUT/evolve.json: the generations computed after a resume are the ones an uninterrupted run
computes, so the result is the same for a fixed seed.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ... import faults, outputs, parallel
from ...errors import AttnswapError, NumericalError
from ...surgery import method_modules
from .cmaes import CMAES
from .tasks import long_context_perplexity, passkey

STATE = "evolve.json"
TASKS = ("ppl", "passkey")


def params_file(policy) -> str:
    """The file of a run's best parameters: `<policy name>.safetensors`."""
    return f"{policy.name}.safetensors"


def evolvable_policy(model):
    """The cache-policy instances of `model` and the name of the buffer a search sets, or a one-line error."""
    policies = list(method_modules(model, "cache").values())
    if not policies or type(policies[0]).evolvable is None:
        raise AttnswapError("evolve needs a model with a cache policy that has parameters to evolve (a policy "
                            "whose 'attnswap list' entry says so)")
    return policies, type(policies[0]).evolvable


def fitness(model, tokenizer, task: str, data: str, theta: np.ndarray, **task_kw) -> tuple[float, dict]:
    """(value to minimise, the task's result) for one parameter vector: nll for ppl, -accuracy (then nll of
    nothing: ties stay ties) for passkey."""
    t = torch.tensor(theta, dtype=torch.float32)
    policies, buffer = evolvable_policy(model)
    for p in policies:
        getattr(p, buffer).copy_(t)
    if task == "ppl":
        r = long_context_perplexity(model, tokenizer, data, **task_kw)
        return r["nll"], r
    r = passkey(model, tokenizer, data, **task_kw)
    return -r["accuracy"], r


def evolve(model, tokenizer, *, task: str, data: str, out: str | os.PathLike, generations: int, population: int,
           sigma: float = 0.1, seed: int = 0, resume: bool = False, force: bool = False, progress: bool = True,
           task_kw: dict | None = None, log=None, init: str | os.PathLike | None = None, protect=(),
           threads: int | None = None) -> dict:
    """Run CMA-ES over the parameters of the model's cache policy, starting from the policy's
    `initial_params()` or from the parameters file `init` (incremental evolution: a vector evolved on one
    setting, refined on another, as the NAMM paper does between its stages).

    The run works in a resumable run directory beside `out` (`outputs.writing` with progress): each
    generation's state and parameters are written atomically there; the finished run is swapped in as `out`.
    `resume` continues an interrupted run (or a finished one, for more generations).

    Under torchrun, each generation's candidates are split over the ranks (each pinned to `threads` intra-op
    threads, by default the cores shared by the processes): every rank takes the same CMA-ES step from the
    gathered scores, so the history and parameters are those of one process with the same threads; rank 0
    alone writes."""
    if task not in TASKS:
        raise AttnswapError(f"unknown task '{task}': use one of {', '.join(TASKS)}")
    policies, _ = evolvable_policy(model)
    cls = type(policies[0])
    settings = {"task": task, "data": data, "population": population, "sigma": sigma, "seed": seed,
                "options": policies[0].options.model_dump(mode="json"), "task_kw": task_kw or {},
                "init": None if init is None else str(init)}
    x0 = None if resume else (cls.initial_params() if init is None else cls.load_params(init)).double().numpy()
    params = params_file(cls)
    size, rank = parallel.world()
    parallel.pin_threads(threads)
    writing = (outputs.writing(out, force=force, resume=resume, protect=protect, label="evolve", progress=STATE,
                               carry=(STATE, params)) if rank == 0 else contextlib.nullcontext(None))
    with writing as run:
        if resume:
            saved = parallel.broadcast(_read_state(run / STATE) if rank == 0 else None)
            if saved["settings"] != settings:
                changed = [k for k in settings if saved["settings"].get(k) != settings[k]]
                raise AttnswapError(f"--resume with different {', '.join(changed)} than the run of {out}; use the "
                                    "same options")
            if "fitness" not in saved.get("cmaes", {}):
                raise AttnswapError(f"the run of {out} was written by attnswap 0.1.0's own CMA-ES, which resume no "
                                    "longer continues; start it again with --force (or --init its parameters file)")
            es, history = CMAES.from_state(saved["cmaes"]), saved["history"]
        else:
            es = CMAES(x0, sigma, popsize=population, seed=seed)
            es.best_f, es.best_x = fitness(model, tokenizer, task, data, x0, **(task_kw or {}))[0], x0.copy()
            history = [{"generation": 0, "best": es.best_f, "start": es.best_f}]
        bar = tqdm(total=generations, initial=es.generation, desc="evolve", unit="gen",
                   disable=not progress or rank != 0)
        while es.generation < generations:
            t0 = time.perf_counter()
            xs = es.ask()
            mine = {}
            for i in range(rank, len(xs), size):  # this rank's share of the candidates
                mine[i] = fitness(model, tokenizer, task, data, xs[i], **(task_kw or {}))[0]
                faults.point("evolve.candidate")
            fs = parallel.gather_in_order(mine, len(xs))
            if not all(np.isfinite(fs)):
                raise NumericalError(f"a candidate of generation {es.generation + 1} scored {fs}; nothing of this "
                                     "generation was saved (resume with --resume)")
            es.tell(xs, fs)
            history.append({"generation": es.generation, "best": es.best_f, "min": float(min(fs)),
                            "mean": float(np.mean(fs)), "sigma": es.sigma,
                            "seconds": round(time.perf_counter() - t0, 1)})
            if rank == 0:
                _save_progress(run, es, settings, history, cls.name)
            bar.update(1)
            bar.set_postfix(best=f"{es.best_f:.4f}", mean=f"{np.mean(fs):.4f}", sigma=f"{es.sigma:.3f}")
            if log and rank == 0:
                log(f"generation {es.generation}: best {es.best_f:.5f}, min {min(fs):.5f}, mean {np.mean(fs):.5f}")
        bar.close()
        if rank == 0 and not (run / params).is_file():  # zero generations asked: the start is the best
            _save_progress(run, es, settings, history, cls.name)
    out = outputs.user_path(out)
    return {"out": str(out), "params": str(out / params), "best": es.best_f, "generations": es.generation,
            "evaluations": es.evaluations, "history": history, "world_size": size, "rank": rank}


def _save_progress(run: Path, es: CMAES, settings: dict, history: list, name: str) -> None:
    """The best vector first, then the state that names its generation: a kill between the two leaves the
    previous state, which resumes to the same result (it recomputes this generation)."""
    best = {name: torch.tensor(es.best_x, dtype=torch.float32)}
    outputs.write_file(run / f"{name}.safetensors", lambda tmp: save_file(best, str(tmp)), label="evolve.params_file")
    faults.point("evolve.params")
    outputs.write_atomic(run / STATE, json.dumps({"settings": settings, "cmaes": es.state(), "history": history}),
                         label="evolve.state")


def _read_state(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise AttnswapError(f"cannot resume: {path} is unreadable ({str(e).splitlines()[0][:120]}); pass --force "
                            "to start the run again") from None
