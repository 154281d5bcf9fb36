"""Recipes: convert -> distill -> finetune -> eval -> export from one YAML file, validated in full before any step runs."""
from __future__ import annotations

import json
import os
from pathlib import Path

import yaml
from pydantic import ValidationError

from . import faults, outputs
from .checkpoint import read_metrics, save
from .config import Recipe
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
    from .data import HUB_TEXTS
    from .models import ALIASES

    def data(value):
        if value is None or value in HUB_TEXTS:
            return value
        return str(base / outputs.user_path(value))

    model = recipe.model
    if model not in ALIASES:
        local = base / outputs.user_path(model)
        looks_local = model.startswith((".", "/", "~")) or model.endswith(".gguf")
        if looks_local or os.path.lexists(local):
            model = str(local)
    update = {"model": model, "convert": recipe.convert.model_copy(update={"calibration": data(recipe.convert.calibration)})}
    for step in ("distill", "finetune", "eval"):
        cfg = getattr(recipe, step)
        if cfg is not None:
            update[step] = cfg.model_copy(update={"data": data(cfg.data)})
    if recipe.out is not None:
        update["out"] = str(base / outputs.user_path(recipe.out))
    return recipe.model_copy(update=update)


def _guards(recipe: Recipe, recipe_path: str | None) -> list:
    files = {"recipe": recipe_path, "calibration": recipe.convert.calibration}
    for step in ("distill", "finetune", "eval"):
        cfg = getattr(recipe, step)
        files[f"{step} data"] = cfg.data if cfg is not None else None
    return outputs.inputs(recipe.model, **files)


def validate(recipe: Recipe, out: str | None, force: bool, recipe_path: str | None = None) -> Path:
    """Every check that can fail without training, before any step writes: source, architecture, variant and
    options, data, lengths against the model's positions and this machine's memory, the output."""
    from .arch import adapter_for
    from .models import check_fits, check_positions, load_config
    from .variants.registry import get_variant

    out = out or recipe.out
    if not out:
        raise AttnswapError("no output directory: pass --out or set 'out' in the recipe")
    outputs.check_out(out, force, _guards(recipe, recipe_path))
    config = load_config(recipe.model)
    adapter = adapter_for(config)
    cls = get_variant(recipe.convert.variant)
    cls.check_supported(adapter, cls.parse_options(recipe.convert.options))
    if recipe.convert.calibration:
        check_data(recipe.convert.calibration)
        check_positions(config, min(recipe.convert.calibration_seq_len, recipe.convert.calibration_tokens),
                        "convert.calibration_seq_len")
    for step in ("distill", "finetune", "eval"):
        cfg = getattr(recipe, step)
        if cfg is None:
            continue
        check_data(cfg.data)
        check_positions(config, cfg.seq_len, f"{step}.seq_len", allow_long=cfg.allow_long)
        check_fits(config, cfg.batch_size, cfg.seq_len, training=step != "eval",
                   flags=f"{step}.batch_size or {step}.seq_len")
    if recipe.eval and not adapter.causal:
        raise AttnswapError(f"recipe eval measures perplexity, which needs a causal LM; {recipe.model} is {adapter.name}")
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
    from .distill import distill
    from .evaluate import perplexity
    from .export import export
    from .models import load_model, load_tokenizer
    from .surgery import convert
    from .train import finetune

    (stage / "recipe.yaml").write_text(recipe_text)
    results: dict = {"recipe": recipe.model_dump(mode="json")}
    files = {"recipe.yaml": recipe_text}

    log(f"[1] convert {recipe.model} -> {recipe.convert.variant}")
    tokenizer = load_tokenizer(recipe.model)
    model = load_model(recipe.model)
    convert(model, recipe.convert.variant, layers=recipe.convert.layers,
            calibration=recipe.convert.calibration_for(tokenizer), **recipe.convert.options)
    done = save(model, stage / "converted", tokenizer=tokenizer, files=files)
    faults.point("run.converted")

    if recipe.distill:
        log(f"[2] distill {recipe.distill.tokens} tokens on {recipe.distill.data}")
        results["distill"] = distill(model, tokenizer, recipe.distill, stage / "distilled", progress=progress)
        outputs.add_files(stage / "distilled", {"recipe.yaml": recipe_text})
        done = stage / "distilled"

    if recipe.finetune:
        log(f"[3] finetune {recipe.finetune.steps} steps on {recipe.finetune.data}")
        results["finetune"] = finetune(model, tokenizer, recipe.finetune, stage / "finetuned", progress=progress,
                                       metrics=read_metrics(done))
        outputs.add_files(stage / "finetuned", {"recipe.yaml": recipe_text})
        done = stage / "finetuned"
        faults.point("run.finetuned")

    if recipe.eval:
        ev = recipe.eval
        log(f"[4] eval perplexity on {ev.data} ({ev.max_tokens} tokens, seq_len {ev.seq_len})")
        kw = dict(max_tokens=ev.max_tokens, seq_len=ev.seq_len, batch_size=ev.batch_size, progress=progress)
        evaluated = load_model(done, merge_lora=True)
        results["eval"] = {"data": ev.data, "converted": perplexity(evaluated, tokenizer, ev.data, label="converted", **kw)}
        if ev.compare:
            original = perplexity(load_model(recipe.model), tokenizer, ev.data, label="original", **kw)
            results["eval"]["original"] = original
            results["eval"]["ratio"] = results["eval"]["converted"]["perplexity"] / original["perplexity"]
        outputs.add_files(done, {"metrics.json": json.dumps({**read_metrics(done), "eval": results["eval"]}, indent=2)})

    if recipe.export:
        log(f"[5] export ({recipe.export.dtype}, merge_lora={recipe.export.merge_lora}) -> {out / 'final'}")
        export(done, stage / "final", merge_lora=recipe.export.merge_lora, dtype=recipe.export.dtype)
        results["final"] = str(out / "final")
    (stage / "results.json").write_text(json.dumps(results, indent=2))
    return results
