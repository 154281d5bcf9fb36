"""Apply a plan to a model: attach each layer's attention method, cache policy and tuner to its attention
module, record the plan in the config; and undo it.

Each kind lives on the attention module as a submodule of its own name (`ATTRS`): `attnswap` (the attention
method), `attnswap_cache` (the cache policy), `attnswap_tuner` (the tuner). The attention function
(`attnswap.attention`) reads them from the module it is called for; a forward pre-hook on each attention module
hands it that layer's cache layer from the cache object (an explicit keyword argument).
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from . import plan as plans
from .arch import adapter_for
from .attention import IMPLEMENTATION, cache_hook, ensure_registered
from .errors import AttnswapError
from .methods import ATTRS
from .plan import parse_layers  # noqa: F401  (public: attnswap.surgery.parse_layers)


OWN = tuple(f".{a}." for a in ATTRS.values())  # state-dict keys of the plan's own tensors contain one of these


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model (a PEFT wrapper keeps it one level down)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def method_modules(model: nn.Module, kind: str = "attention") -> dict[str, nn.Module]:
    """Attention-module path -> attached method of `kind` (attention, cache, tuner), for every layer that has one."""
    attr = "." + ATTRS[kind]
    return {path[: -len(attr)]: m for path, m in base_model(model).named_modules() if path.endswith(attr)}


def all_method_modules(model: nn.Module) -> list[nn.Module]:
    return [m for kind in ATTRS for m in method_modules(model, kind).values()]


def convert(model: nn.Module, what: str | dict | plans.PlanSpec, layers: str | list[int] | None = None, *,
            calibration=None, seed: int | None = None, **options: Any) -> nn.Module:
    """Apply a plan to `model` in place; returns the model.

    `what` is a plan (a dict as in a plan YAML, or a `PlanSpec`) or one method's name, with `layers` and
    `options` the shorthand (`convert(model, name, layers="0-9", **options)`). The original
    projections stay where they were; `revert` undoes it. `calibration` (`attnswap.data.calibration(...)`) is
    text for methods that measure the original model first (dex's head selection); what they measured is
    stored in the plan's options. `seed` (default 0) seeds the layer selection and the new parameters'
    initialisation, so the same plan converts to the same weights; with the one-method shorthand it is also that
    method's own `seed` option where it has one (a tuner's members, say), unless `options` give it.
    """
    base = base_model(model)
    if getattr(base.config, "attnswap", None):
        raise AttnswapError("this model is already converted; convert the original model instead")
    if isinstance(what, str):
        spec = plans.shorthand(what, options, layers, seed=seed)
    else:
        if layers is not None or options:
            raise AttnswapError("give layers and options inside the plan, not beside it")
        spec = what
    adapter = adapter_for(base.config)
    sites = adapter.sites(base)
    if not sites:
        raise AttnswapError(f"found no attention layers in this {adapter.name} model")
    plan = plans.resolve(spec, adapter, len(sites))
    # every measurement runs on the original model, before anything is attached: first the layer selection
    # (layers: auto), then the plan with the chosen layers written out, validated again, then each part's own
    selected = {}
    for i, part in enumerate(plan.attention):
        if part.auto is not None:
            from .methods.attention.selection import select

            chosen, selected[f"attention.{i}"] = select(model, part, calibration, seed=seed or 0)
            explicit = plans.spec(spec).model_dump()
            explicit["attention"][i]["layers"] = chosen
            plan = plans.resolve(explicit, adapter, len(sites))
    buffers = {}
    for key, part in plan.parts():
        prepared = part.cls.prepare(model, part.options, part.layers, calibration)
        part.options, buffers[key] = prepared.options, prepared.buffers
        part.prepared = {**prepared.record, **({"selection": selected[key]} if key in selected else {})}
    torch.manual_seed(seed or 0)
    attach(base, plan, adapter, sites, buffers)
    base.config.attnswap = plans.section(plan, {"swapped": [s.path for s in sites], "versions": _versions()})
    return model


def restore(model: nn.Module, section: dict) -> nn.Module:
    """Apply a stored plan again (a checkpoint's `attnswap` section, this version's or 0.1.0's): no
    measurement, the stored options are already resolved. The config gets the section in this version's
    schema (tensors of a 0.1.0 checkpoint load under their new names: `plan.legacy_tensor_prefix`)."""
    base = base_model(model)
    spec, prepared = plans.stored(section)
    if hasattr(base.config, "attnswap"):
        del base.config.attnswap
    adapter = adapter_for(base.config)
    sites = adapter.sites(base)
    plan = plans.resolve(spec, adapter, len(sites))
    for key, part in plan.parts():
        part.prepared = prepared.get(key, {})
    attach(base, plan, adapter, sites)
    legacy = ("variant", "options", "layers")  # 0.1.0's plan fields, now in the plan
    extra = {k: v for k, v in section.items() if k not in ("schema", "plan", "prepared", *legacy)}
    base.config.attnswap = plans.section(plan, extra)
    return model


def attach(base: nn.Module, plan: plans.Plan, adapter, sites, buffers: dict | None = None) -> None:
    """Attach the plan's method instances to the sites, install the hooks, switch the attention function."""
    import torch

    geometry = adapter.geometry(base.config)
    ref = next(base.parameters())
    for key, part in plan.parts():
        kind = part.cls.kind
        for site in (s for s in sites if s.index in part.layers):
            module = part.cls(part.options, site, geometry, adapter).to(device=ref.device, dtype=ref.dtype)
            own = (buffers or {}).get(key, {})  # {name: value} for every layer, {layer: {name: value}} for one
            values = {**{n: v for n, v in own.items() if not isinstance(n, int)}, **own.get(site.index, {})}
            with torch.no_grad():
                for name, value in values.items():
                    getattr(module, name).copy_(value)
            setattr(site.module, ATTRS[kind], module)
    hooks = [s.module.register_forward_pre_hook(cache_hook(s.index), with_kwargs=True) for s in sites]
    if plan.tuner is not None:
        hooks += plan.tuner.cls.model_hooks(base, adapter, plan.tuner.options)
    base._attnswap_hooks = hooks
    if base.config._attn_implementation != IMPLEMENTATION:  # what revert restores (eager for Gemma 2)
        base._attnswap_original_attn = base.config._attn_implementation
    base.set_attn_implementation(ensure_registered())


def plan_of(model: nn.Module) -> tuple[dict, dict]:
    """(plan dict, prepared records) of a converted model; ({}, {}) for an original one."""
    sec = getattr(base_model(model).config, "attnswap", None)
    return plans.stored(sec) if sec else ({}, {})


def with_cache_policy(model: nn.Module, policy: str | None, options: dict) -> nn.Module:
    """The model's plan with its cache policy replaced (or added): `policy` (None: the plan's own) with
    `options` over the plan's. The methods' trained tensors are kept, and the policy's buffers (evolved
    parameters) too when the policy stays the same and no `params` file is given."""
    import torch

    base = base_model(model)
    spec, _ = plan_of(base)
    spec = {k: v for k, v in spec.items() if v}
    old = spec.get("cache") or {}
    name = policy or old.get("policy")
    if name is None:
        raise AttnswapError("this model has no cache policy; give --policy (see 'attnswap list')")
    same = name == old.get("policy")
    spec["cache"] = {"policy": name, "options": {**(old.get("options", {}) if same else {}), **options}}
    keep = same and not options.get("params")
    state = {k: v.clone() for k, v in base.state_dict().items()
             if any(o in k for o in OWN) and (keep or f".{ATTRS['cache']}." not in k)}
    versions = base.config.attnswap.get("versions") if getattr(base.config, "attnswap", None) else None
    revert(base)
    convert(base, spec)
    with torch.no_grad():
        base.load_state_dict(state, strict=False)
    if versions:
        base.config.attnswap["versions"] = versions
    return model


@contextlib.contextmanager
def bypassed(model: nn.Module):
    """Within the block every attention method computes the original attention (the distillation teacher)."""
    methods = list(method_modules(model).values())
    for m in methods:
        m.bypass = True
    try:
        yield model
    finally:
        for m in methods:
            m.bypass = False


def revert(model: nn.Module) -> nn.Module:
    """Remove every attached method and hook and restore SDPA attention: the original model again."""
    base = base_model(model)
    for handle in getattr(base, "_attnswap_hooks", []):
        handle.remove()
    base._attnswap_hooks = []
    if hasattr(base, "_attnswap_member_axis"):
        del base._attnswap_member_axis
    for kind, attr in ATTRS.items():
        for path in method_modules(base, kind):
            delattr(base.get_submodule(path), attr)
    if base.config._attn_implementation == IMPLEMENTATION:
        original = getattr(base, "_attnswap_original_attn", None) or ("sdpa" if base._supports_sdpa else "eager")
        base.set_attn_implementation(original)
    if hasattr(base.config, "attnswap"):
        del base.config.attnswap
    return model


def _versions() -> dict[str, str]:
    import torch
    import transformers

    from . import __version__

    return {"attnswap": __version__, "torch": torch.__version__, "transformers": transformers.__version__}
