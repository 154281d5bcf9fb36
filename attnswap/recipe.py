"""Recipes: convert, then any of evolve, distill, finetune, eval (perplexity, memory, calibration), generate,
export, from one YAML file; each step is a command's typed config (attnswap.config), validated in full before any
step runs."""
from __future__ import annotations

import json
import os
from pathlib import Path

import yaml
from pydantic import ValidationError

from . import faults, outputs
from .checkpoint import read_metrics, save
from .config import STEPS, Recipe, is_path
from .data import check_data
from .errors import AttnswapError, first_validation_error


def load_recipe(path: str | os.PathLike) -> tuple[Recipe, str]:
    """Parse and type-check a recipe. Its paths (model directory, data files, out) are relative to the
    recipe file's folder, so a recipe means the same from any working directory; `~` expands."""
    p = outputs.user_path(path)
    if not p.is_file():
        raise AttnswapError(f"recipe not found: {path}")
    text = p.read_text()
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise AttnswapError(f"recipe {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise AttnswapError(f"recipe {path} must be a YAML mapping with at least 'model' and 'convert'")
    try:
        recipe = Recipe(**raw)
    except ValidationError as e:
        loc, msg, _ = first_validation_error(e)
        where = ".".join(str(x) for x in loc) or "(recipe)"
        raise AttnswapError(f"recipe {path}: field '{where}': {msg}") from None
    return _resolve_paths(recipe, Path(os.path.realpath(p)).parent), text


def _resolve_paths(recipe: Recipe, base: Path) -> Recipe:
    """Every path field of every step (marked `path=True` in attnswap.config) relative to the recipe's folder."""
    from .data import HUB_TEXTS
    from .models import ALIASES

    def model(value):
        if not isinstance(value, str) or value in ALIASES:
            return value
        local = base / outputs.user_path(value)
        looks_local = value.startswith((".", "/", "~")) or value.endswith(".gguf")
        return str(local) if looks_local or os.path.lexists(local) else value

    def path(value):
        if not isinstance(value, str) or value in HUB_TEXTS:
            return value
        return str(base / outputs.user_path(value))

    update = {"model": model(recipe.model)}
    for step in ("convert", *STEPS):
        cfg = getattr(recipe, step)
        if cfg is None:
            continue
        changes = {}
        for name in type(cfg).model_fields:
            if is_path(type(cfg), name) and getattr(cfg, name) is not None:
                value = getattr(cfg, name)
                changes[name] = model(value) if name == "compare" else path(value)
        update[step] = cfg.model_copy(update=changes)
    if recipe.out is not None:
        update["out"] = path(recipe.out)
    return recipe.model_copy(update=update)


def _guards(recipe: Recipe, recipe_path: str | None) -> list:
    files = {"recipe": recipe_path, "calibration": recipe.convert.calibration,
             "plan": recipe.convert.plan if isinstance(recipe.convert.plan, str) else None}
    for step in STEPS:
        cfg = getattr(recipe, step)
        if cfg is not None and hasattr(cfg, "data"):
            files[f"{step} data"] = cfg.data
    if recipe.evolve is not None:
        files["evolve init"] = recipe.evolve.init
    return outputs.inputs(recipe.model, **files)


def validate(recipe: Recipe, out: str | None, force: bool, recipe_path: str | None = None) -> Path:
    """Every check that can fail without training, before any step writes: source, architecture, the plan
    (methods, options, layers, composition), data, lengths against the model's positions and this machine's
    memory, the output."""
    from . import commands
    from .arch import is_causal_lm
    from .methods import kinds
    from .models import check_fits, check_positions, load_config

    out = out or recipe.out
    if not out:
        raise AttnswapError("no output directory: pass --out or set 'out' in the recipe")
    outputs.check_out(out, force, _guards(recipe, recipe_path))
    plan = commands.check_convert(recipe.model, recipe.convert)
    config = load_config(recipe.model)
    for step in ("distill", "finetune", "eval", "eval_calibration"):
        cfg = getattr(recipe, step)
        if cfg is None:
            continue
        check_data(cfg.data)
        check_positions(config, cfg.seq_len, f"{step}.seq_len", allow_long=cfg.allow_long)
        batch = getattr(cfg, "batch_size", 1)
        check_fits(config, batch, cfg.seq_len, training=step in ("distill", "finetune"),
                   flags=f"{step}.batch_size or {step}.seq_len")
    if recipe.finetune is not None and recipe.finetune.task == "classification":
        raise AttnswapError("a recipe fine-tunes language models; train a classifier with 'attnswap finetune "
                            "CONVERTED --task classification' on the recipe's converted checkpoint")
    if (recipe.eval or recipe.eval_calibration or recipe.eval_memory or recipe.generate or recipe.finetune) and \
            not is_causal_lm(config):
        raise AttnswapError(f"recipe fine-tuning, evaluations and generation need a causal LM; {recipe.model} is a "
                            f"{config.model_type} encoder")
    if recipe.eval_retrieval is not None:
        check_data(recipe.eval_retrieval.data)
        for who in (recipe.model, recipe.eval_retrieval.compare):
            check_positions(load_config(who), recipe.eval_retrieval.length + 2, "eval_retrieval.length")
    for step in ("eval_memory", "evolve"):
        cfg = getattr(recipe, step)
        if cfg is None:
            continue
        check_data(cfg.data)
        check_positions(config, cfg.context, f"{step}.context")
        if cfg.policy is not None:
            cls = kinds()["cache"].get(cfg.policy)
            cls.check_options(cls.parse_options(cfg.policy_options()))
        elif plan.cache is None and (step == "evolve" or cfg.policy_options()):
            raise AttnswapError(f"recipe {step}: the plan has no cache policy; give {step}.policy")
    if recipe.report is not None:
        from .report import check as check_report

        check_report(recipe.model, recipe.report)
    if recipe.export is not None and recipe.export.report is not None:
        from .export import check_report_dir

        check_report_dir(recipe.export.report)
    if recipe.evolve is not None:
        policy = recipe.evolve.policy or (plan.cache.cls.name if plan.cache else None)
        if policy is None or not kinds()["cache"].get(policy).evolvable:
            raise AttnswapError(f"recipe evolve: cache policy '{policy}' has no parameters to evolve")
    return outputs.user_path(out)


def run(recipe: Recipe, recipe_text: str, out: str | None = None, *, force: bool = False,
        progress: bool = True, log=print, recipe_path: str | None = None) -> dict:
    """Run every step of the recipe into the run directory `out`, whole or not at all: the steps write into
    a staging directory beside it, swapped in when the last step is done. Returns the results (also in
    results.json)."""
    out = validate(recipe, out, force, recipe_path)
    with outputs.writing(out, force=force, protect=_guards(recipe, recipe_path), label="run") as stage:
        results = _run_steps(recipe, recipe_text, out, stage, progress=progress, log=log)
    return results


def _run_steps(recipe: Recipe, recipe_text: str, out: Path, stage: Path, *, progress: bool, log) -> dict:
    from . import commands
    from .distill import distill
    from .methods.cache.evolve import evolvable_policy, evolve
    from .models import load_model, load_tokenizer
    from .surgery import convert, plan_of, with_cache_policy
    from .train import finetune

    (stage / "recipe.yaml").write_text(recipe_text)
    results: dict = {"recipe": recipe.model_dump(mode="json")}
    files = {"recipe.yaml": recipe_text}

    log(f"[convert] {recipe.model} -> {recipe.convert.to or recipe.convert.plan}")
    tokenizer = load_tokenizer(recipe.model)
    model = load_model(recipe.model)
    convert(model, recipe.convert.spec(), calibration=recipe.convert.calibration_for(tokenizer))
    done = save(model, stage / "converted", tokenizer=tokenizer, files=files)
    faults.point("run.converted")

    if recipe.evolve:
        ev = recipe.evolve
        log(f"[evolve] {ev.generations} generations of {ev.population} on {ev.data}")
        before = plan_of(model)[0].get("cache")
        with_cache_policy(model, ev.policy, ev.policy_options())  # the evolve step's budget, while it runs
        results["evolve"] = evolve(model, tokenizer, task=ev.task, data=ev.data, out=stage / "evolve",
                                   generations=ev.generations, population=ev.population, sigma=ev.sigma,
                                   seed=ev.seed, task_kw=ev.task_kw(), init=ev.init, progress=progress)
        policies, buffer = evolvable_policy(model)
        best = type(policies[0]).load_params(results["evolve"]["params"])
        for p in policies:
            getattr(p, buffer).copy_(best)  # the best vector, not the last candidate tried
        if before and before["policy"] == type(policies[0]).name:  # later steps run the plan's own options
            with_cache_policy(model, None, before["options"])
        done = save(model, stage / "evolved", tokenizer=tokenizer, files=files)

    if recipe.distill:
        log(f"[distill] {recipe.distill.tokens} tokens on {recipe.distill.data}")
        results["distill"] = distill(model, tokenizer, recipe.distill, stage / "distilled", progress=progress)
        outputs.add_files(stage / "distilled", {"recipe.yaml": recipe_text})
        done = stage / "distilled"

    if recipe.finetune:
        log(f"[finetune] {recipe.finetune.steps} steps on {recipe.finetune.data}")
        results["finetune"] = finetune(model, tokenizer, recipe.finetune, stage / "finetuned", progress=progress,
                                       metrics=read_metrics(done))
        outputs.add_files(stage / "finetuned", {"recipe.yaml": recipe_text})
        done = stage / "finetuned"
        faults.point("run.finetuned")

    if recipe.eval:
        ev = recipe.eval
        log(f"[eval] perplexity on {ev.data} ({ev.max_tokens} tokens, seq_len {ev.seq_len})")
        results["eval"] = {"data": ev.data, **commands.eval_perplexity(str(done), ev, progress=progress)}
        outputs.add_files(done, {"metrics.json": json.dumps({**read_metrics(done), "eval": results["eval"]}, indent=2)})
    if recipe.eval_memory:
        log(f"[eval_memory] {', '.join(recipe.eval_memory.tasks)} on {recipe.eval_memory.data}")
        results["eval_memory"] = commands.eval_memory(str(done), recipe.eval_memory)
    if recipe.eval_calibration:
        log(f"[eval_calibration] on {recipe.eval_calibration.data}")
        cal = recipe.eval_calibration
        if cal.plot is not None:  # the plot is an output of the run: it goes into the run directory
            cal = cal.model_copy(update={"plot": str(stage / Path(cal.plot).name)})
        results["eval_calibration"] = commands.eval_calibration(str(done), cal)
    if recipe.eval_retrieval:
        rv = recipe.eval_retrieval
        log(f"[eval_retrieval] {rv.passages} passages of {rv.length} tokens of {rv.data}")
        results["eval_retrieval"] = {"data": rv.data, **commands.eval_retrieval(str(done), rv)}
        outputs.add_files(done, {"metrics.json": json.dumps({**read_metrics(done),
                                                             "eval_retrieval": results["eval_retrieval"]}, indent=2)})
    if recipe.report:
        from .report import report

        log(f"[report] beside {recipe.report.compare} on {recipe.report.data}")
        r = report(str(done), recipe.report, str(stage / "report"), progress=progress, log=log)
        results["report"] = {"out": str(out / "report"), "seconds": r["seconds"]}
    if recipe.generate:
        log(f"[generate] {recipe.generate.max_new_tokens} tokens")
        results["generate"] = commands.generate(str(done), recipe.generate)

    if recipe.export:
        log(f"[export] ({recipe.export.dtype}, merge_lora={recipe.export.merge_lora}) -> {out / 'final'}")
        from .export import export

        report_dir = stage / "report" if recipe.report else recipe.export.report
        export(done, stage / "final", merge_lora=recipe.export.merge_lora, dtype=recipe.export.dtype,
               member=recipe.export.member, keep_fp32=recipe.export.keep_fp32, report=report_dir)
        results["final"] = str(out / "final")
    (stage / "results.json").write_text(json.dumps(results, indent=2, default=str))
    return results
