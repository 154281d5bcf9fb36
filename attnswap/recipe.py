"""Recipes: convert -> distill -> finetune -> eval -> export from one YAML file, validated in full before any step runs."""
from __future__ import annotations

import json
import os
from pathlib import Path

import yaml
from pydantic import ValidationError

from .checkpoint import check_out, read_metrics, save
from .config import Recipe
from .data import check_data
from .errors import AttnswapError


def load_recipe(path: str | os.PathLike) -> tuple[Recipe, str]:
    p = Path(path)
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
        return Recipe(**raw), text
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise AttnswapError(f"recipe {path}: field '{where}': {err['msg']}") from None


def validate(recipe: Recipe, out: str | None, force: bool) -> Path:
    """Every check that can fail without training: source, architecture, variant and options, data, output."""
    from .arch import adapter_for
    from .models import load_config
    from .variants.registry import get_variant

    out = out or recipe.out
    if not out:
        raise AttnswapError("no output directory: pass --out or set 'out' in the recipe")
    check_out(out, force)
    adapter = adapter_for(load_config(recipe.model))
    cls = get_variant(recipe.convert.variant)
    cls.check_supported(adapter, cls.parse_options(recipe.convert.options))
    if recipe.convert.calibration:
        check_data(recipe.convert.calibration)
    if recipe.distill:
        check_data(recipe.distill.data)
    if recipe.finetune:
        check_data(recipe.finetune.data)
    if recipe.eval:
        check_data(recipe.eval.data)
        if not adapter.causal:
            raise AttnswapError(f"recipe eval measures perplexity, which needs a causal LM; {recipe.model} is {adapter.name}")
    return Path(out)


def run(recipe: Recipe, recipe_text: str, out: str | None = None, *, force: bool = False,
        progress: bool = True, log=print) -> dict:
    """Run every step of the recipe into the run directory `out`; returns the results (also results.json)."""
    from .distill import distill
    from .evaluate import perplexity
    from .export import export
    from .models import load_model, load_tokenizer
    from .surgery import convert
    from .train import finetune

    out = validate(recipe, out, force)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / "recipe.yaml").write_text(recipe_text)
    results: dict = {"recipe": recipe.model_dump(mode="json")}
    files = {"recipe.yaml": recipe_text}

    log(f"[1] convert {recipe.model} -> {recipe.convert.variant}")
    tokenizer = load_tokenizer(recipe.model)
    model = load_model(recipe.model)
    convert(model, recipe.convert.variant, layers=recipe.convert.layers,
            calibration=recipe.convert.calibration_for(tokenizer), **recipe.convert.options)
    stage = save(model, out / "converted", tokenizer=tokenizer, files=files)

    if recipe.distill:
        log(f"[2] distill {recipe.distill.tokens} tokens on {recipe.distill.data}")
        results["distill"] = distill(model, tokenizer, recipe.distill, out / "distilled", progress=progress)
        (out / "distilled" / "recipe.yaml").write_text(recipe_text)
        stage = out / "distilled"

    if recipe.finetune:
        log(f"[3] finetune {recipe.finetune.steps} steps on {recipe.finetune.data}")
        results["finetune"] = finetune(model, tokenizer, recipe.finetune, out / "finetuned", progress=progress,
                                       metrics=read_metrics(stage))
        (out / "finetuned" / "recipe.yaml").write_text(recipe_text)
        stage = out / "finetuned"

    if recipe.eval:
        ev = recipe.eval
        log(f"[4] eval perplexity on {ev.data} ({ev.max_tokens} tokens, seq_len {ev.seq_len})")
        kw = dict(max_tokens=ev.max_tokens, seq_len=ev.seq_len, progress=progress)
        evaluated = load_model(stage, merge_lora=True)
        results["eval"] = {"data": ev.data, "converted": perplexity(evaluated, tokenizer, ev.data, label="converted", **kw)}
        if ev.compare:
            original = perplexity(load_model(recipe.model), tokenizer, ev.data, label="original", **kw)
            results["eval"]["original"] = original
            results["eval"]["ratio"] = results["eval"]["converted"]["perplexity"] / original["perplexity"]
        (stage / "metrics.json").write_text(json.dumps({**read_metrics(stage), "eval": results["eval"]}, indent=2))

    if recipe.export:
        log(f"[5] export ({recipe.export.dtype}, merge_lora={recipe.export.merge_lora}) -> {out / 'final'}")
        export(stage, out / "final", merge_lora=recipe.export.merge_lora, dtype=recipe.export.dtype)
        results["final"] = str(out / "final")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results
