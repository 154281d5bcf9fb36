"""Plans: what a converted model carries. Per-layer attention methods with their options, an optional cache
policy, an optional tuner; written as YAML (`attnswap convert SRC --plan plan.yaml`, or inside a recipe):

    attention:                  # layers not listed keep the original attention
      - {layers: 0-14, method: linear, options: {window: 64}}
      - {layers: 15-29, method: mra, options: {block_budget: 0.5}}
    cache: {policy: h2o, budget: 0.25, interval: 512}
    tuner: {method: lora-ensemble, options: {members: 4}}
    scores: {method: gmm-mask, layers: all}   # a score modifier on the layers' softmax attention

`--to METHOD --set k=v --layers L` is the one-method shorthand (`shorthand`). A plan is validated as a whole
(`resolve`) before anything runs. It is stored in config.json's `attnswap` section with a schema version
(`section`); sections written by attnswap 0.1.0 (one "variant") read back as the equivalent plan (`stored`).

Composition rule (docs/architecture.md): a cache policy prunes the KV cache of every layer whose attention
reads one, i.e. layers that keep the original attention and layers whose method is `prunable` (it runs over
the kept entries, in position order); layers whose method decodes from a state of its own (linear) keep it.
A policy that would prune no layer, or runs without a budget on a converted layer, is an error. A score
modifier applies to the layers it names, each of which must run softmax attention that forms scores (the
original attention, or a method with `takes_scores`), and not beside a cache policy (pruning would break the
positions it reads).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import AttnswapError, first_validation_error

SCHEMA = 2


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AutoLayers(_Spec):
    """`layers: {auto: loss, count: 22}`: the layers chosen by measurement (methods/attention/selection.py)."""

    auto: Literal["loss", "output-error", "kl-restore", "evenly"] = Field(description="the selection criterion")
    count: int | None = Field(None, ge=1, description="layers to convert")
    fraction: float | None = Field(None, gt=0, le=1, description="fraction of the candidate layers to convert")
    within: str | list[int] | None = Field(None, description="candidate layers (default: every layer no other "
                                                             "attention entry names)")
    distill_tokens: int = Field(0, ge=0, description="before measuring, train the method on every candidate layer by "
                                                     "attention transfer (as `distill`) on this many calibration "
                                                     "tokens, cycling the windows: the briefly trained model of the "
                                                     "kl-restore criterion (0: measure the untrained method)")

    @model_validator(mode="after")
    def _one_target(self):
        if (self.count is None) == (self.fraction is None):
            raise ValueError("give exactly one of count and fraction")
        return self


class AttentionEntry(_Spec):
    layers: str | int | list[int] | AutoLayers = Field("all", description="layers, e.g. '0-14', '3,5', 'all', or "
                                                                           "{auto: CRITERION, count: N}")

    @field_validator("layers", mode="before")
    @classmethod
    def _auto(cls, v):
        if isinstance(v, dict):  # one error about the selection, not one per union member
            try:
                return AutoLayers(**v)
            except ValidationError as e:
                loc, msg, _ = first_validation_error(e)
                raise ValueError(f"{'.'.join(str(p) for p in loc) + ': ' if loc else ''}{msg}") from None
        return v
    method: str = Field(description="attention method (attnswap list)")
    options: dict[str, Any] = Field(default_factory=dict)


class CacheEntry(_Spec):
    model_config = ConfigDict(extra="allow")  # `cache: {policy: h2o, budget: 0.25}`: the rest are options
    policy: str = Field(description="cache policy (attnswap list)")
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _fold_extra(self):
        extra = dict(self.__pydantic_extra__ or {})
        if extra:
            self.__pydantic_extra__.clear()
            self.options = {**self.options, **extra}
        return self


class TunerEntry(_Spec):
    method: str = Field(description="tuner (attnswap list)")
    layers: str | int | list[int] = Field("all", description="layers whose projections it adapts")
    options: dict[str, Any] = Field(default_factory=dict)


class ScoresEntry(_Spec):
    method: str = Field(description="score modifier (attnswap list)")
    layers: str | int | list[int] = Field("all", description="layers whose attention scores it modifies")
    options: dict[str, Any] = Field(default_factory=dict)


class PlanSpec(_Spec):
    attention: list[AttentionEntry] = Field(default_factory=list)
    cache: CacheEntry | None = None
    tuner: TunerEntry | None = None
    scores: ScoresEntry | None = None


@dataclass
class Part:
    """One resolved entry: the method class, its validated options and the layers it covers."""

    cls: type
    options: Any
    layers: list[int]
    prepared: dict = field(default_factory=dict)
    auto: dict | None = None  # `layers: {auto: ...}`: `layers` are the candidates until the selection runs
    target: int = 0  # how many of them to convert

    def entry(self) -> dict:
        key = "policy" if self.cls.kind == "cache" else "method"
        return {key: self.cls.name, "layers": self.layers, "options": self.options.model_dump(mode="json")}


@dataclass
class Plan:
    attention: list[Part]
    cache: Part | None
    tuner: Part | None
    scores: Part | None = None

    def parts(self) -> list[tuple[str, Part]]:
        """(key in the section, part) for every part, attention entries first."""
        out = [(f"attention.{i}", p) for i, p in enumerate(self.attention)]
        return out + [(k, p) for k, p in (("cache", self.cache), ("tuner", self.tuner), ("scores", self.scores))
                      if p is not None]

    def method_at(self, layer: int) -> Part | None:
        return next((p for p in self.attention if layer in p.layers), None)

    def to_dict(self) -> dict:
        return {"attention": [p.entry() for p in self.attention],
                "cache": self.cache.entry() if self.cache else None,
                "tuner": self.tuner.entry() if self.tuner else None,
                **({"scores": self.scores.entry()} if self.scores else {})}


def parse_layers(spec: str | int | list[int] | None, n_layers: int, what: str = "--layers") -> list[int]:
    """'0-5,10' -> [0, 1, 2, 3, 4, 5, 10]; None or 'all' -> every layer."""
    if spec is None or spec == "all":
        return list(range(n_layers))
    parts = [str(p) for p in spec] if isinstance(spec, (list, tuple)) else str(spec).split(",")
    layers: set[int] = set()
    try:
        for part in (p.strip() for p in parts if p.strip()):
            lo, sep, hi = part.partition("-")
            layers.update(range(int(lo), (int(hi) if sep else int(lo)) + 1))
    except ValueError:
        raise AttnswapError(f"bad {what} '{spec}': use numbers and ranges like '0-5,10'") from None
    bad = sorted(i for i in layers if not 0 <= i < n_layers)
    if bad or not layers:
        raise AttnswapError(f"bad {what} '{spec}': the model has layers 0-{n_layers - 1}")
    return sorted(layers)


def shorthand(method: str, options: dict | None = None, layers=None, seed: int | None = None) -> dict:
    """`--to METHOD --set k=v --layers L` as a plan of one entry, in the kind METHOD belongs to. `seed` (convert's)
    is also the method's own `seed` option where it has one, unless `options` give it (0 is every such option's
    default, so it is left out)."""
    from .methods import find

    cls = find(method)
    options = dict(options or {})
    if seed and "seed" in cls.Options.model_fields:
        options.setdefault("seed", seed)
    if cls.kind == "attention":
        return {"attention": [{"layers": "all" if layers is None else layers, "method": method, "options": options}]}
    if cls.kind == "cache":
        if layers is not None:
            raise AttnswapError(f"--layers does not apply to cache policy '{method}' (it prunes every layer that "
                                "reads a KV cache); write a plan to combine it with attention methods per layer")
        return {"cache": {"policy": method, "options": options}}
    if cls.kind == "scores":
        return {"scores": {"method": method, "layers": "all" if layers is None else layers, "options": options}}
    return {"tuner": {"method": method, "layers": "all" if layers is None else layers, "options": options}}


def read(path: str | os.PathLike) -> dict:
    """A plan YAML file as a dict (one-line errors for a missing or malformed file)."""
    import yaml

    p = Path(path).expanduser()
    if not p.is_file():
        raise AttnswapError(f"plan file not found: {path}")
    try:
        data = yaml.safe_load(p.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise AttnswapError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise AttnswapError(f"{path}: a plan is a mapping with 'attention', 'cache' and/or 'tuner'")
    return data


def spec(data: dict | PlanSpec) -> PlanSpec:
    if isinstance(data, PlanSpec):
        return data
    try:
        return PlanSpec(**data)
    except ValidationError as e:
        loc, msg, given = first_validation_error(e)
        where = ".".join(str(p) for p in loc)
        raise AttnswapError(f"bad plan at '{where}': {msg}") from None


def resolve(data: dict | PlanSpec, adapter, n_layers: int) -> Plan:
    """Validate a whole plan against an architecture: known methods of the right kind, layers in range and not
    overlapping, options valid, every method and policy allowed here, the composition rule. No side effects."""
    from .methods import kinds

    s = spec(data)
    registries = kinds()
    if not s.attention and s.cache is None and s.tuner is None and s.scores is None:
        raise AttnswapError("the plan is empty: give attention entries, a cache policy, a tuner or a score modifier")
    attention, owner = [None] * len(s.attention), {}
    autos = [i for i, e in enumerate(s.attention) if isinstance(e.layers, AutoLayers)]
    if len(autos) > 1:
        raise AttnswapError("one attention entry per plan may choose its layers by measurement (layers: auto)")
    for i in sorted(range(len(s.attention)), key=lambda i: i in autos):  # explicit entries first
        e = s.attention[i]
        cls = registries["attention"].get(e.method)
        where = f"layers of attention entry {i} ({e.method})"
        auto, target = None, 0
        if isinstance(e.layers, AutoLayers):
            auto = e.layers.model_dump()
            pool = parse_layers(e.layers.within, n_layers, where + " within")
            layers = [x for x in pool if x not in owner]
            target = e.layers.count if e.layers.count is not None else round(e.layers.fraction * len(layers))
            if not 1 <= target <= len(layers):
                raise AttnswapError(f"{where}: cannot convert {target} of the {len(layers)} candidate layers")
        else:
            layers = parse_layers(e.layers, n_layers, where)
        for layer in layers:
            if layer in owner:
                raise AttnswapError(f"layer {layer} is in two attention entries ({owner[layer]} and {e.method}); "
                                    "each layer runs one attention method")
            owner[layer] = e.method
        opts = cls.parse_options(e.options)
        cls.check_supported(adapter, opts)
        attention[i] = Part(cls, opts, layers, auto=auto, target=target)
    cache = None
    if s.cache is not None:
        cls = registries["cache"].get(s.cache.policy)
        opts = cls.parse_options(s.cache.options)
        cls.check_supported(adapter, opts)
        cls.check_options(opts)
        pruned = [i for i in range(n_layers) if i not in owner or _part(attention, i).cls.prunable]
        if not pruned:
            raise AttnswapError(f"cache policy '{cls.name}' would prune no layer: every layer runs an attention "
                                f"method with a decoding state of its own ({', '.join(sorted(set(owner.values())))})")
        converted = [i for i in pruned if i in owner and not _part(attention, i).cls.exact]
        if opts.budget is None and converted:
            raise AttnswapError(f"cache policy '{cls.name}' without a budget keeps different counts per head; that "
                                f"applies to layers with the original attention only, not to layers {converted[0]}.. "
                                "converted by the plan: give a budget")
        cache = Part(cls, opts, pruned)
    tuner = None
    if s.tuner is not None:
        cls = registries["tuner"].get(s.tuner.method)
        opts = cls.parse_options(s.tuner.options)
        cls.check_supported(adapter, opts)
        tuner = Part(cls, opts, parse_layers(s.tuner.layers, n_layers, f"layers of tuner {s.tuner.method}"))
    scores = None
    if s.scores is not None:
        cls = registries["scores"].get(s.scores.method)
        opts = cls.parse_options(s.scores.options)
        cls.check_supported(adapter, opts)
        layers = parse_layers(s.scores.layers, n_layers, f"layers of score modifier {s.scores.method}")
        for layer in layers:
            if layer in owner and not _part(attention, layer).cls.takes_scores:
                able = ", ".join(n for n, c in registries["attention"].all().items() if c.takes_scores)
                raise AttnswapError(f"score modifier '{cls.name}' needs softmax scores, but layer {layer} runs "
                                    f"'{owner[layer]}', which forms none; put it on layers with the original "
                                    f"attention or {able}")
        if cache is not None:
            raise AttnswapError(f"score modifier '{cls.name}' reads relative positions, which a pruned KV cache "
                                f"(cache policy '{cache.cls.name}') no longer keeps; use one or the other")
        scores = Part(cls, opts, layers)
    return Plan(attention, cache, tuner, scores)


def _part(attention: list[Part], layer: int) -> Part:
    return next(p for p in attention if layer in p.layers)


def section(plan: Plan, extra: dict) -> dict:
    """The `attnswap` section of config.json: schema, the resolved plan, what was measured at conversion."""
    prepared = {key: p.prepared for key, p in plan.parts() if p.prepared}
    return {"schema": SCHEMA, "plan": plan.to_dict(), **({"prepared": prepared} if prepared else {}), **extra}


def stored(sec: dict) -> tuple[dict, dict]:
    """(plan dict, prepared records by part key) of a stored section, written by this version or by 0.1.0
    (one "variant": an attention method, `memory` a cache policy, `lora-ensemble` a tuner)."""
    if "schema" not in sec:
        return _legacy(sec)
    if sec["schema"] > SCHEMA:
        raise AttnswapError(f"this checkpoint's plan has schema {sec['schema']}, newer than this attnswap reads "
                            f"({SCHEMA}); upgrade attnswap")
    plan = dict(sec["plan"])
    if plan.get("cache"):
        plan["cache"] = {k: v for k, v in plan["cache"].items() if k != "layers"}
    return plan, dict(sec.get("prepared", {}))


# 0.1.0's kinds-in-one variants: the legacy name, the kind it is now, and how its options map
_LEGACY_CACHE_FIELDS = {"budget", "interval", "sinks", "window", "seed"}


def _legacy(sec: dict) -> tuple[dict, dict]:
    from .methods import kinds

    name, options, prepared = sec["variant"], dict(sec["options"]), sec.get("prepared", {})
    registries = kinds()
    if name in registries["attention"].all():
        return {"attention": [{"layers": sec["layers"], "method": name, "options": options}]}, (
            {"attention.0": prepared} if prepared else {})
    if name in registries["tuner"].all():
        return {"tuner": {"method": name, "layers": sec["layers"], "options": options}}, (
            {"tuner": prepared} if prepared else {})
    policy = options.pop("scorer", None)
    if policy in registries["cache"].all():  # 0.1.0's "memory" variant: a scorer with its options
        fields = registries["cache"].get(policy).Options.model_fields
        opts = {k: v for k, v in options.items() if k in fields and (k in _LEGACY_CACHE_FIELDS or v is not None)}
        record = {"params_file": prepared["namm_params_file"]} if "namm_params_file" in prepared else {}
        return {"cache": {"policy": policy, "options": opts}}, ({"cache": record} if record else {})
    raise AttnswapError(f"this checkpoint was converted to '{name}', which this attnswap does not know")


def legacy_tensor_prefix(sec: dict) -> str | None:
    """0.1.0 kept every kind's tensors under `.attnswap.`; the submodule they load into now, or None."""
    if "schema" in sec:
        return None
    from .methods import ATTRS

    plan, _ = _legacy(sec)
    return ATTRS["cache"] if "cache" in plan else ATTRS["tuner"] if "tuner" in plan else None


def describe(sec: dict) -> list[str]:
    """Lines for `attnswap list SOURCE` and the model card."""
    from .methods import kinds

    plan, prepared = stored(sec)
    registries = kinds()
    lines = []
    for i, e in enumerate(plan.get("attention") or []):
        cls = registries["attention"].get(e["method"])
        layers = e["layers"]
        lines.append(f"attention {e['method']} on layers {compact(layers)}: {e['options']}")
        record = prepared.get(f"attention.{i}", {})
        if "selection" in record:
            sel = record["selection"]
            how = f"layers chosen by {sel['criterion']}: converted {compact(sel['converted'])}, kept exact " \
                  f"{compact(sel['kept_exact']) or '(no layer)'}"
            if "scores" in sel:
                c = sel["calibration"]
                how += f" (scores on {c['tokens']} tokens of {c['data']}, seed {c['seed']}: " + ", ".join(
                    f"{k}: {v:.4g}" for k, v in sel["scores"].items()) + ")"
            lines.append(f"  {how}")
        lines += [f"  {x}" for x in cls.describe({**e, "layers": layers}, record)]
    if plan.get("cache"):
        c = plan["cache"]
        cls = registries["cache"].get(c["policy"])
        o = c["options"]
        budget = "free (score <= 0 evicts)" if o.get("budget") is None else f"keeps {o['budget']} of the tokens seen"
        where = sec.get("plan", {}).get("cache", {}).get("layers")
        lines.append(f"cache policy {c['policy']}: {budget}, every {o.get('interval')} tokens"
                     + (f", on layers {compact(where)}" if where is not None else "") + f"; {o}")
        lines += [f"  {x}" for x in cls.describe(c, prepared.get("cache", {}))]
    if plan.get("scores"):
        m = plan["scores"]
        cls = registries["scores"].get(m["method"])
        lines.append(f"score modifier {m['method']} on layers {compact(m.get('layers', 'all'))}: {m['options']}")
        lines += [f"  {x}" for x in cls.describe(m, prepared.get("scores", {}))]
    if plan.get("tuner"):
        t = plan["tuner"]
        cls = registries["tuner"].get(t["method"])
        lines.append(f"tuner {t['method']} on layers {compact(t.get('layers', 'all'))}: {t['options']}")
        lines += [f"  {x}" for x in cls.describe(t, prepared.get("tuner", {}))]
    return lines


def compact(layers) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    if not isinstance(layers, list):
        return str(layers)
    out, start = [], None
    for i, x in enumerate(layers):
        if start is None:
            start = x
        if i + 1 == len(layers) or layers[i + 1] != x + 1:
            out.append(f"{start}-{x}" if x != start else str(x))
            start = None
    return ",".join(out)
