"""Export: merged safetensors + config.json (attnswap section) + tokenizer + recipe + README model card."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from . import outputs
from .arch import is_causal_lm
from .classification import is_classifier
from .checkpoint import read_metrics, write_model
from .errors import AttnswapError, NumericalError
from .models import load_model, load_tokenizer, resolve
from .plan import describe as describe_plan

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHARD_SIZE = "2GB"


def card_metadata(section: dict | None, source: dict, causal: bool, classifier: bool = False) -> str:
    """The YAML block the hub reads: base_model, library_name, tags, pipeline_tag, license (when the original
    states one). A converted model needs attnswap to load (library `attnswap`); a plain one loads with
    transformers."""
    from huggingface_hub import ModelCardData

    plan = (section or {}).get("plan") or {}
    parts = [*(plan.get("attention") or []), plan.get("cache"), plan.get("tuner"), plan.get("scores")]
    methods = sorted({part.get("method") or part.get("policy") for part in parts if part})
    data = ModelCardData(base_model=source.get("base_model"), license=source.get("license"),
                         language=source.get("language"), library_name="attnswap" if section else "transformers",
                         pipeline_tag=("text-classification" if classifier else "text-generation" if causal
                                       else "feature-extraction"),
                         tags=["attnswap", *(f"attnswap-{m}" for m in methods)])
    return "---\n" + data.to_yaml() + "\n---\n"


def model_card(name: str, section: dict | None, metrics: dict, recipe: str | None, origin: str | None = None,
               source: dict | None = None, causal: bool = True, classifier: bool = False) -> str:
    source = source or {}
    lines = [card_metadata(section, source, causal, classifier), f"# {name}", "",
             "Exported by attnswap (attention surgery for pretrained transformers).", ""]
    if source.get("base_model"):
        lines += [f"Base model: [{source['base_model']}](https://huggingface.co/{source['base_model']})"
                  + (f", license {source['license']}" if source.get("license") else "") + ".", ""]
    if origin:
        lines += [origin, ""]
    if section:
        lines += [
            "Plan (layers not named keep the original attention):",
            "",
            *[f"- {line}" for line in describe_plan(section)],
            f"- versions: {', '.join(f'{k} {v}' for k, v in section.get('versions', {}).items())}",
            "",
        ]
    else:
        lines += ["- attention: unchanged (no attnswap conversion)", ""]
    lines += ["## Measured", ""]
    ev = metrics.get("eval")
    if ev:
        lines += ["| model | perplexity | predictions | data | seq_len |", "|---|---:|---:|---|---:|"]
        rows = {"converted": ev.get("converted", ev), "original": ev.get("original")}  # 0.1.0 kept "converted"
        for who, r in rows.items():
            if r:
                lines.append(f"| {who} | {r['perplexity']:.3f} | {r['tokens']} | {ev['data']} | {r['seq_len']} |")
        if "ratio" in ev:
            lines += ["", f"Perplexity ratio converted / original: {ev['ratio']:.4f}"]
        lines.append("")
    rv = metrics.get("eval_retrieval")
    if rv:
        overlap = f"{rv['top10_overlap']:.4f}" if "top10_overlap" in rv else "-"
        lines += [f"Passage retrieval (`attnswap eval retrieval`) on {rv['passages']} passages of {rv['length']} tokens "
                  f"of {rv['data']}:", "", "| model | accuracy@1 | MRR | top-10 overlap with the original |",
                  "|---|---:|---:|---:|", f"| converted | {rv['accuracy_at_1']:.4f} | {rv['mrr']:.4f} | {overlap} |"]
        if rv.get("original"):
            o = rv["original"]
            lines.append(f"| original | {o['accuracy_at_1']:.4f} | {o['mrr']:.4f} | 1 |")
        lines.append("")
    ds = metrics.get("distill")
    if ds:
        lines += [f"Distilled (attention transfer) on {ds['tokens']} tokens of {ds['config']['data']}, "
                  f"lr {ds['config']['lr']}: relative MSE of each layer's attention output against the original "
                  "on a held-out window, before and after:", "", "| layer | before | after |", "|---|---:|---:|"]
        lines += [f"| {p} | {ds['layer_loss_start'][p]:.5f} | {v:.5f} |" for p, v in ds["layer_loss_final"].items()]
        lines.append("")
    ft = metrics.get("finetune")
    if ft:
        trained = f"LoRA r={ft['lora_r']}" if ft["lora_r"] else "the plan's own parameters only"
        lines += [f"Fine-tuned {ft['steps']} steps ({trained}, lr={ft['lr']}, seq_len={ft['seq_len']}) "
                  f"on {ft['data']}: mean loss of the first / last 10 steps {ft['loss_start_mean']} -> "
                  f"{ft['loss_end_mean']}, {ft['tokens']} tokens, "
                  f"world size {ft['world_size']}.", ""]
    if not (ev or ft or ds or rv):
        lines += ["No measurements were recorded for this checkpoint.", ""]
    if recipe:
        lines += ["## Recipe", "", "```yaml", recipe.rstrip(), "```", ""]
    lines += ["## Load", "", "From this directory, or from its hub repository once uploaded (`snapshot_download` "
              "fetches the whole folder):", "", "```python"]
    if section:  # the converted attention is attnswap's: load through it
        lines += ["import attnswap  # pip install attnswap", "from huggingface_hub import snapshot_download", "",
                  f'path = snapshot_download("YOUR-NAME/{name}")  # or the local path of this folder',
                  "model = attnswap.load_model(path)", "tokenizer = attnswap.load_tokenizer(path)"]
    else:
        cls = ("AutoModelForSequenceClassification" if classifier else "AutoModelForCausalLM" if causal
               else "AutoModel")
        lines += [f"from transformers import AutoTokenizer, {cls}", "",
                  f'model = {cls}.from_pretrained("YOUR-NAME/{name}")  # or the local path of this folder',
                  f'tokenizer = AutoTokenizer.from_pretrained("YOUR-NAME/{name}")']
    lines += ["```", ""]
    return "\n".join(lines)


def check_report_dir(report: str | os.PathLike) -> Path:
    """A folder written by `attnswap report` (it holds report.md), or a one-line error."""
    path = outputs.user_path(report)
    if not (path / "report.md").is_file():
        raise AttnswapError(f"--report {report} holds no report.md; give the --out folder of 'attnswap report'")
    return path


def card_report(report: Path) -> list[str]:
    """The report's page as a section of the model card: its headings one level down, its images under report/."""
    lines = ["## Report", ""]
    for line in (report / "report.md").read_text().splitlines():
        if line.startswith("#"):
            line = "#" + line
        line = re.sub(r"\]\((?![a-z]+:|/)([^)]+)\)", r"](report/\1)", line)
        lines.append(line)
    return lines + [""]


def export(source: str | os.PathLike, out: str | os.PathLike, *, merge_lora: bool = True, dtype: str = "fp32",
           force: bool = False, member: int | None = None, keep_fp32: bool = False, protect=(),
           report: str | os.PathLike | None = None) -> Path:
    """Write `source` as a self-contained checkpoint directory at `out`, whole or not at all.

    `member` k: of a model whose tuner has members (an ensemble), only member k, folded into the backbone weights:
    a plain model of the original architecture. A tensor whose values do not fit `dtype` (fp16 beyond
    65504) is refused, naming it, or kept in fp32 with `keep_fp32` (the model card says which).
    """
    report = check_report_dir(report) if report is not None else None
    guards = [*outputs.inputs(source, report=report), *protect]
    outputs.check_out(out, force, guards)
    with outputs.claim(out, force=force, protect=guards):
        return _export(source, out, merge_lora=merge_lora, dtype=dtype, force=force, member=member,
                       keep_fp32=keep_fp32, guards=guards, report=report)


def cast_checked(model, dtype: str, keep_fp32: bool = False) -> list[str]:
    """Cast the floating tensors of `model` to `dtype`; refuse non-finite values, and values beyond the
    dtype's range unless `keep_fp32` (then those tensors stay fp32: returned by name)."""
    target = DTYPES[dtype]
    kept = []
    limit = torch.finfo(target).max
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if not t.is_floating_point():
            continue
        if not bool(torch.isfinite(t).all()):
            raise NumericalError(f"cannot export: '{name}' holds non-finite values (NaN/inf); nothing was written")
        peak = float(t.detach().abs().max()) if t.numel() else 0.0
        if peak > limit:
            if not keep_fp32:
                raise NumericalError(f"cannot export as {dtype}: '{name}' holds values up to {peak:.4g}, beyond "
                                     f"{dtype}'s {limit:.4g}; export as fp32/bf16, or pass --keep-fp32 to keep such "
                                     "tensors in fp32")
            kept.append(name)
    for module_name, module in model.named_modules():
        for attr, t in list(module._parameters.items()) + list(module._buffers.items()):
            full = f"{module_name}.{attr}" if module_name else attr
            if t is not None and t.is_floating_point() and full not in kept:
                t.data = t.data.to(target)
    return kept


def _export(source, out, *, merge_lora, dtype, force, member, keep_fp32, guards, report=None) -> Path:
    src_dir = Path(resolve(source).location) if outputs.user_path(source).is_dir() else None
    model = load_model(source, merge_lora=merge_lora)
    origin = None
    if member is not None:
        from .methods.tuners.members import extract_member, member_count
        from .surgery import plan_of

        tuner = plan_of(model)[0].get("tuner") or {}  # extract_member removes the plan
        n = member_count(model)
        model = extract_member(model, member)
        origin = (f"Member {member} of {n} of the `{tuner.get('method')}` model `{source}` "
                  f"(options `{json.dumps(tuner.get('options'), sort_keys=True)}`), merged into the weights.")
    kept = cast_checked(model, dtype, keep_fp32)
    if kept:
        outputs.warn(f"{len(kept)} tensors exceed {dtype}'s range and stay fp32, e.g. '{kept[0]}'")
        origin = ((origin + "\n\n") if origin else "") + (f"Kept in fp32 (values beyond {dtype}'s range): "
                                                           + ", ".join(f"`{k}`" for k in kept) + ".")
    tokenizer = load_tokenizer(source)
    metrics = read_metrics(src_dir) if src_dir else {}
    if member is not None:
        metrics.pop("eval", None)  # measured on the whole ensemble, not on this member
    recipe_path = src_dir / "recipe.yaml" if src_dir else None
    recipe = recipe_path.read_text() if recipe_path and recipe_path.is_file() else None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    section = getattr(base.config, "attnswap", None)
    if section is not None:
        base.config.attnswap = {**section, "export": {"dtype": dtype, "merged_lora": merge_lora,
                                                      **({"kept_fp32": kept} if kept else {})}}
    with outputs.writing(out, force=force, protect=guards, label="export") as tmp:
        write_model(model, tmp, tokenizer, max_shard_size=SHARD_SIZE)
        if recipe:
            (tmp / "recipe.yaml").write_text(recipe)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
        card = model_card(Path(out).name, base.config.attnswap if section else None, metrics, recipe, origin,
                          source=getattr(base.config, "attnswap_origin", None), causal=is_causal_lm(base.config),
                          classifier=is_classifier(base.config))
        if report is not None:
            shutil.copytree(report, tmp / "report", ignore=shutil.ignore_patterns(outputs.MANIFEST))
            head, sep, load = card.partition("## Load")
            card = head + "\n".join(card_report(report)) + "\n" + sep + load
        (tmp / "README.md").write_text(card)
    return outputs.user_path(out)
