"""One library function per command: what `attnswap COMMAND` and a recipe step run, from a typed config
(attnswap.config). Each validates everything it can before loading weights, then works and returns a dict of
results; the CLI only parses options and prints that dict, a recipe only calls these in order.
"""
from __future__ import annotations

import contextlib
import json

from . import outputs
from .config import (CalibrationConfig, ConvertConfig, DistillConfig, EvalConfig, EvolveConfig, ExportConfig,
                     FinetuneConfig, GenerateConfig, LmEvalConfig, MemoryEvalConfig)
from .errors import AttnswapError


def check_convert(source: str, cfg: ConvertConfig):
    """The plan resolved against SOURCE's architecture (one-line errors before any weight is read)."""
    from . import plan as plans
    from .arch import adapter_for
    from .data import check_data
    from .models import check_positions, layer_count, load_config

    if cfg.calibration:
        check_data(cfg.calibration)
    config = load_config(source)
    if getattr(config, "attnswap", None):
        raise AttnswapError(f"{source} is already converted; convert the original model instead")
    resolved = plans.resolve(cfg.spec(), adapter_for(config), layer_count(config))
    if cfg.calibration:
        check_positions(config, min(cfg.calibration_seq_len, cfg.calibration_tokens), "--calibration-seq-len")
    return resolved


def convert(source: str, cfg: ConvertConfig, out: str, *, force: bool = False) -> dict:
    """SOURCE converted by the plan, written to OUT as a loadable checkpoint."""
    from . import plan as plans
    from .checkpoint import save
    from .models import load_model, load_tokenizer
    from .surgery import convert as do_convert

    guards = outputs.inputs(source, calibration=cfg.calibration,
                            plan=cfg.plan if isinstance(cfg.plan, str) else None)
    outputs.check_out(out, force, guards)
    check_convert(source, cfg)
    with outputs.claim(out, force=force, protect=guards):
        tokenizer = load_tokenizer(source)
        model = load_model(source)
        do_convert(model, cfg.spec(), calibration=cfg.calibration_for(tokenizer), seed=cfg.seed)
        save(model, out, tokenizer=tokenizer, force=force, protect=guards, label="convert")
    section = model.config.attnswap
    new = sum(p.numel() for n, p in model.named_parameters() if ".attnswap" in n)
    return {"out": str(outputs.user_path(out)), "plan": section["plan"], "new_parameters": new,
            **({"prepared": section["prepared"]} if "prepared" in section else {}),
            "describe": plans.describe(section)}


def _check_text_eval(source: str, cfg, *, batch_size: int = 1):
    from .data import check_data
    from .evaluate import require_causal_lm
    from .models import check_fits, check_positions, load_config

    check_data(cfg.data)
    config = load_config(source)
    require_causal_lm(config, source)
    check_positions(config, cfg.seq_len, allow_long=cfg.allow_long)
    check_fits(config, batch_size, cfg.seq_len)
    return config


def eval_perplexity(source: str, cfg: EvalConfig, *, progress: bool = True) -> dict:
    """Perplexity under the fixed protocol; with `compare`, the original beside it and the ratio."""
    from .evaluate import perplexity
    from .models import load_model, load_tokenizer

    for s in [source] + ([cfg.compare] if cfg.compare else []):
        _check_text_eval(s, cfg, batch_size=cfg.batch_size)
    kw = dict(max_tokens=cfg.max_tokens, seq_len=cfg.seq_len, batch_size=cfg.batch_size, progress=progress)
    result = perplexity(load_model(source, merge_lora=True), load_tokenizer(source), cfg.data, label=source, **kw)
    if cfg.compare:
        base = perplexity(load_model(cfg.compare, merge_lora=True), load_tokenizer(cfg.compare), cfg.data,
                          label=str(cfg.compare), **kw)
        result = {**result, "original": base, "ratio": result["perplexity"] / base["perplexity"]}
    return result


def eval_calibration(source: str, cfg: CalibrationConfig, *, force: bool = False) -> dict:
    """Calibration of next-token predictions (and the reliability diagram, with `plot`)."""
    from .evaluate import require_finite
    from .methods.tuners.calibration import calibration, reliability_plot
    from .models import load_model, load_tokenizer

    if cfg.plot is not None:
        plot = outputs.user_path(cfg.plot)
        if plot.is_dir():
            raise AttnswapError(f"--plot '{cfg.plot}' is a directory; give a .png file name")
        if plot.exists() and not force:
            raise AttnswapError(f"--plot '{cfg.plot}' already exists; pass --force to overwrite it")
    from . import classification
    from .models import check_comparable, load_config, max_positions

    config = load_config(source)
    others = cfg.ensemble or []
    for other in others:
        other_config = check_comparable(config, other, source)
        if classification.is_classifier(other_config) != classification.is_classifier(config) or (
                classification.head_labels(other_config) != classification.head_labels(config)):
            raise AttnswapError(f"--ensemble {other} does not predict what {source} predicts (another task or other "
                                "classes); an explicit ensemble needs models of one task")
    if classification.is_classifier(config):  # labelled examples, one prediction each; --seq-len truncates them
        examples = classification.read_examples(cfg.data)  # fails early on a text file
        classification.check_labels(examples, classification.head_labels(config), cfg.data)
        seq_len = min(cfg.seq_len, max_positions(config) or cfg.seq_len)
        result = classification.calibration(load_model(source, merge_lora=True), load_tokenizer(source), cfg.data,
                                            seq_len=seq_len, label=source,
                                            others=[load_model(o, merge_lora=True) for o in others])
    else:
        for s in [source, *others]:
            _check_text_eval(s, cfg)
        result = calibration(load_model(source, merge_lora=True), load_tokenizer(source), cfg.data,
                             max_tokens=cfg.max_tokens, seq_len=cfg.seq_len, label=source,
                             others=[load_model(o, merge_lora=True) for o in others])
    if others:
        result["ensemble"] = [source, *others]
    require_finite(f"eval calibration of {source}", nll=result["nll"], ece=result["ece"])
    if cfg.plot is not None:
        outputs.write_file(outputs.user_path(cfg.plot), lambda tmp: reliability_plot({source: result}, tmp))
        result["plot"] = cfg.plot
    return result


def inspect(source: str, cfg, out: str, *, force: bool = False) -> dict:
    """Per layer and head, what SOURCE's attention does on one window of text (attnswap.inspection): JSON and
    PNGs written to OUT, whole or not at all."""
    from . import inspection
    from .data import check_data, training_ids
    from .models import check_comparable, check_positions, layer_count, load_config, load_model, load_tokenizer
    from .plan import parse_layers

    check_data(cfg.data)
    config = load_config(source)
    check_positions(config, cfg.tokens, "--tokens")
    layers = parse_layers(cfg.layers, layer_count(config))
    if cfg.compare is not None:
        check_comparable(config, cfg.compare, source)
    guards = outputs.inputs(source, data=cfg.data, compare=cfg.compare)
    outputs.check_out(out, force, guards)
    tokenizer = load_tokenizer(source)
    ids = training_ids(tokenizer, cfg.data, cfg.tokens)[: cfg.tokens][None]
    model = load_model(source, merge_lora=True)
    reference = load_model(cfg.compare, merge_lora=True) if cfg.compare else None
    result = inspection.inspect(model, ids, layers=layers, sinks=cfg.sinks, band=cfg.band, reference=reference,
                                kpca_tokens=cfg.kpca_tokens)
    result = {"source": source, "data": cfg.data, **({"compare": cfg.compare} if cfg.compare else {}), **result}
    with outputs.writing(out, force=force, protect=guards, label="inspect") as stage:
        result["plots"] = inspection.plots(result, stage, source)
        (stage / "inspect.json").write_text(json.dumps(result, indent=2))
    return {"out": str(outputs.user_path(out)), **result}


def eval_lm_eval(source: str, cfg: LmEvalConfig) -> dict:
    """lm-evaluation-harness tasks on SOURCE (and on `compare` beside it): lm-eval's results and table."""
    from . import lmeval
    from .models import load_config, load_model, load_tokenizer

    tasks = cfg.task_list()
    if not tasks:
        raise AttnswapError("--tasks: name at least one lm-eval task")
    tm = lmeval.check_tasks(tasks, cfg.include_path)
    for who in filter(None, (source, cfg.compare)):
        load_config(who)  # a bad source fails here, before the other is evaluated
    out = {}
    for who in filter(None, (source, cfg.compare)):
        out[who] = lmeval.evaluate(load_model(who, merge_lora=True), load_tokenizer(who), tasks,
                                   num_fewshot=cfg.num_fewshot, limit=cfg.limit, batch_size=cfg.batch_size, tm=tm)
    result = {"source": source, **out[source]}
    if cfg.compare:
        result["original"] = out[cfg.compare]
    return result


def eval_retrieval(source: str, cfg) -> dict:
    """Passage retrieval by mean-pooled embeddings (attnswap.retrieval); with `compare`, the original beside it and
    the overlap of the two models' 10 nearest candidates."""
    from .data import check_data, read_text
    from .models import check_positions, load_config, load_model, load_tokenizer
    from .retrieval import retrieval, top_k_overlap

    check_data(cfg.data)
    for who in filter(None, (source, cfg.compare)):
        check_positions(load_config(who), cfg.length + 2, flag="--length")  # + the special tokens
    text = read_text(cfg.data)
    runs = {}
    for who in filter(None, (source, cfg.compare)):
        runs[who] = retrieval(load_model(who, merge_lora=True), load_tokenizer(who), text, passages=cfg.passages,
                              length=cfg.length, batch_size=cfg.batch_size)
    mine = runs[source]
    result = {"source": source, **{k: v for k, v in mine.items() if k != "sim"}}
    if cfg.compare:
        theirs = runs[cfg.compare]
        if theirs["passages"] != mine["passages"]:
            raise AttnswapError(f"{source} and {cfg.compare} cut the text into {mine['passages']} and "
                                f"{theirs['passages']} passages (different tokenizers); compare models that share one")
        result["original"] = {k: v for k, v in theirs.items() if k != "sim"}
        result["top10_overlap"] = top_k_overlap(mine["sim"], theirs["sim"])
    return result


def _check_cache(source: str, cfg, longest: int, flag: str):
    """The cache policy a memory command runs, checked against SOURCE before loading weights."""
    from .data import check_data
    from .evaluate import require_causal_lm
    from .methods import kinds
    from .models import check_positions, load_config

    check_data(cfg.data)
    config = load_config(source)
    require_causal_lm(config, source)
    check_positions(config, longest, flag)
    if cfg.policy is not None:
        cls = kinds()["cache"].get(cfg.policy)
        cls.check_options(cls.parse_options(cfg.policy_options()))
    return config


def eval_memory(source: str, cfg: MemoryEvalConfig) -> dict:
    """Long-context perplexity and passkey retrieval under the model's cache policy (or `policy`; none: the
    full cache), with the kept fraction and peak cache bytes."""
    from .evaluate import require_finite
    from .methods.cache.tasks import long_context_perplexity, passkey
    from .models import load_model, load_tokenizer
    from .surgery import plan_of, with_cache_policy

    longest = max(cfg.context if "ppl" in cfg.tasks else 0, cfg.passkey_context if "passkey" in cfg.tasks else 0)
    flag = "--context" if "ppl" in cfg.tasks and cfg.context >= cfg.passkey_context else "--passkey-context"
    _check_cache(source, cfg, longest, flag)
    model = load_model(source, merge_lora=True)
    chunk = None
    if cfg.policy is None and not plan_of(model)[0].get("cache"):
        if cfg.budget is not None or cfg.options:
            raise AttnswapError(f"{source} has no cache policy: give --policy (see 'attnswap list') with --budget "
                                "or --set, or leave them out to measure the full cache")
        chunk = cfg.interval  # the full cache, fed in chunks of this length
    else:
        with_cache_policy(model, cfg.policy, cfg.policy_options())
    tok = load_tokenizer(source)
    plan = plan_of(model)[0]
    result = {"source": source, "cache": plan.get("cache")}
    if "ppl" in cfg.tasks:
        r = long_context_perplexity(model, tok, cfg.data, context=cfg.context, score_from=cfg.score_from,
                                    documents=cfg.documents, chunk=chunk)
        require_finite(f"eval memory of {source}", perplexity=r["perplexity"])
        result["ppl"] = r
    if "passkey" in cfg.tasks:
        result["passkey"] = passkey(model, tok, cfg.data, context=cfg.passkey_context, depths=cfg.depths,
                                    trials=cfg.trials, chunk=chunk)
    return result


def evolve(source: str, cfg: EvolveConfig, out: str, *, resume: bool = False, force: bool = False) -> dict:
    """CMA-ES over the parameters of the model's (or `policy`'s) cache policy; a checkpoint per generation."""
    from .methods import kinds
    from .methods.cache.evolve import evolve as do_evolve
    from .models import load_model, load_tokenizer
    from .surgery import with_cache_policy

    if cfg.init is not None and not outputs.user_path(cfg.init).is_file():
        raise AttnswapError(f"--init file not found: {cfg.init}")
    from . import parallel

    guards = outputs.inputs(source, data=cfg.data, init=cfg.init)
    _, rank = parallel.world()
    if rank == 0:  # under torchrun, rank 0 alone owns the output
        outputs.check_out(out, force or resume, guards)
    _check_cache(source, cfg, cfg.context, "--context")
    policy = cfg.policy
    if policy is None:
        evolvable = [n for n, c in kinds()["cache"].all().items() if c.evolvable]
        policy = evolvable[0] if len(evolvable) == 1 else None
        if policy is None:
            raise AttnswapError(f"give --policy: the cache policies with parameters to evolve are {evolvable}")
    claim = outputs.claim(out, force=force or resume, protect=guards) if rank == 0 else contextlib.nullcontext()
    with claim:
        model = load_model(source, merge_lora=True)
        with_cache_policy(model, policy, cfg.policy_options())
        return do_evolve(model, load_tokenizer(source), task=cfg.task, data=cfg.data, out=out,
                         generations=cfg.generations, population=cfg.population, sigma=cfg.sigma, seed=cfg.seed,
                         resume=resume, force=force, task_kw=cfg.task_kw(), init=cfg.init, protect=guards,
                         threads=cfg.threads)


def _check_training(source: str, cfg):
    from .data import check_data
    from .models import check_fits, check_positions, load_config

    check_data(cfg.data)
    config = load_config(source)
    check_positions(config, cfg.seq_len, allow_long=cfg.allow_long)
    check_fits(config, cfg.batch_size, cfg.seq_len, training=True)
    return config


def distill(source: str, cfg: DistillConfig, out: str, *, force: bool = False) -> dict:
    """Attention transfer: the attention methods' new parameters trained to each layer's original output."""
    from .distill import distill as do_distill
    from .models import load_model, load_tokenizer

    guards = outputs.inputs(source, data=cfg.data)
    writer = outputs.writer_process()  # rank 0 of a multi-process run writes; the others only compute
    if writer:
        outputs.check_out(out, force, guards)
    _check_training(source, cfg)
    with outputs.claim(out, force=force, protect=guards) if writer else contextlib.nullcontext():
        return do_distill(load_model(source), load_tokenizer(source), cfg, out, force=force, protect=guards)


def finetune(source: str, cfg: FinetuneConfig, out: str, *, resume: bool = False, force: bool = False) -> dict:
    """LoRA (or the plan's tuner) plus the attention methods' own parameters; resumable."""
    from .models import load_model, load_tokenizer
    from .train import finetune as do_finetune

    guards = outputs.inputs(source, data=cfg.data)
    if outputs.writer_process():  # rank 0 of a multi-process run writes; the others only compute
        outputs.check_out(out, force or resume, guards)
    import torch

    from . import classification
    from .arch import is_causal_lm

    config = _check_training(source, cfg)
    tokenizer = load_tokenizer(source)
    if cfg.task == "classification":
        examples = classification.read_examples(cfg.data)
        if classification.is_classifier(config):  # trained further: its head keeps its classes
            names = classification.head_labels(config)
            classification.check_labels(examples, names, cfg.data)
        else:
            names = classification.label_names(examples)
        torch.manual_seed(cfg.seed)  # the new head's initialisation
        model = load_model(source, merge_lora=True, labels=names)
        classification.prepare_head(model, tokenizer, names)
    else:
        if not is_causal_lm(config):
            what = "a classifier" if classification.is_classifier(config) else f"a {config.model_type} encoder"
            raise AttnswapError(f"{source} is {what}, which has no next-token loss; fine-tune it with --task "
                                "classification on labelled examples")
        model = load_model(source, merge_lora=True)
    return do_finetune(model, tokenizer, cfg, out, resume=resume, force=force, protect=guards)


def generate(source: str, cfg: GenerateConfig) -> dict:
    """Decoding with the plan's caches; tokens/s and peak cache bytes."""
    from .evaluate import require_causal_lm
    from .generation import generate as do_generate
    from .models import check_positions, load_config, load_model, load_tokenizer

    config = load_config(source)
    require_causal_lm(config, source)
    tok = load_tokenizer(source)
    ids = tok(cfg.prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    if ids.shape[1] == 0:
        raise AttnswapError("--prompt is empty after tokenisation")
    check_positions(config, ids.shape[1] + cfg.max_new_tokens, "--prompt tokens + --max-new-tokens",
                    allow_long=cfg.allow_long)
    model = load_model(source, merge_lora=True)
    r = do_generate(model, ids, cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed,
                    eos_token_id=None, record_every=cfg.record_every)
    text = tok.decode(r.pop("ids")[0, ids.shape[1]:], skip_special_tokens=True)
    return {"text": text, "prompt": cfg.prompt, "prompt_tokens": ids.shape[1], **r}


def export(source: str, cfg: ExportConfig, out: str, *, force: bool = False, protect=()) -> dict:
    """A self-contained checkpoint directory: safetensors, config with the plan, tokenizer, recipe, model card."""
    from .export import export as do_export

    path = do_export(source, out, merge_lora=cfg.merge_lora, dtype=cfg.dtype, force=force, member=cfg.member,
                     keep_fp32=cfg.keep_fp32, protect=protect, report=cfg.report)
    return {"out": str(path), "dtype": cfg.dtype, "merged_lora": cfg.merge_lora, "member": cfg.member,
            **({"report": cfg.report} if cfg.report else {})}


def report(source: str, cfg, out: str, *, force: bool = False) -> dict:
    """One Markdown page + PNGs + JSON on SOURCE beside cfg.compare (attnswap.report)."""
    from .report import report as do_report

    return do_report(source, cfg, out, force=force)


def list_methods() -> dict:
    """Every registered method by kind, with the architectures and directions it supports and its options."""
    from .arch import ARCHITECTURES, Geometry
    from .methods import kinds

    geometry = Geometry(9, 3, 64, 576)  # SmolLM2-135M's attention shapes
    out = {}
    for kind, registry in kinds().items():
        rows = []
        for name, cls in registry.all().items():
            archs = [a for a, acls in ARCHITECTURES.items()
                     if ("causal" if acls.causal else "bidirectional") in cls.directions]
            adapter = ARCHITECTURES[archs[0]]() if archs else None
            params = cls.reference_parameters(geometry, adapter) if adapter is not None else 0
            rows.append({"name": name, "summary": cls.summary, "architectures": archs,
                         "directions": sorted(cls.directions), "trains": cls.adds,
                         "trainable_params_per_layer_smollm2": params,
                         **({"prunable": cls.prunable} if kind == "attention" else {}),
                         **({"evolvable": bool(cls.evolvable)} if kind == "cache" else {}),
                         "options": {k: {"default": f.default, "help": f.description}
                                     for k, f in cls.Options.model_fields.items()}})
        out[kind] = rows
    return out


def describe_model(source: str) -> dict:
    """A model's plan (or that it is not converted)."""
    from . import plan as plans
    from .models import load_config

    section = getattr(load_config(source), "attnswap", None)
    if not section:
        return {"source": source, "plan": None, "describe": []}
    spec, prepared = plans.stored(section)
    return {"source": source, "schema": section.get("schema", 1), "plan": section.get("plan", spec),
            "prepared": prepared, "describe": plans.describe(section)}
