"""Find attention sites, attach a variant to the chosen ones, record what was swapped; and undo it."""
from __future__ import annotations

import contextlib
from typing import Any

from torch import nn

from .arch import adapter_for
from .attention import IMPLEMENTATION, ensure_registered
from .errors import AttnswapError
from .variants.registry import get_variant


def parse_layers(spec: str | list[int] | None, n_layers: int) -> list[int]:
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
        raise AttnswapError(f"bad --layers '{spec}': use numbers and ranges like '0-5,10'") from None
    bad = sorted(i for i in layers if not 0 <= i < n_layers)
    if bad or not layers:
        raise AttnswapError(f"bad --layers '{spec}': the model has layers 0-{n_layers - 1}")
    return sorted(layers)


def _base(model: nn.Module) -> nn.Module:
    # a PEFT wrapper keeps the transformers model one level down
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def variant_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Attention-module path -> attached variant, for every swapped site."""
    return {path.rsplit(".", 1)[0]: m for path, m in _base(model).named_modules() if path.endswith(".attnswap")}


def convert(model: nn.Module, variant: str, layers: str | list[int] | None = None, *, calibration=None,
            **options: Any) -> nn.Module:
    """Swap the self-attention of `layers` (default: all) for `variant`, in place; returns the model.

    The original projections stay where they were; the variant is attached to each attention module as its
    `attnswap` submodule and the model's attention implementation becomes "attnswap". `revert` undoes it.
    `calibration` (`attnswap.data.calibration(...)`) is text for variants that measure the original model
    first (dex's head selection); the measured choice is stored in the options.
    """
    base = _base(model)
    if getattr(base.config, "attnswap", None):
        done = base.config.attnswap["variant"]
        raise AttnswapError(f"this model is already converted to '{done}'; convert the original model instead")
    adapter = adapter_for(base.config)
    cls = get_variant(variant)
    opts = cls.parse_options(options)
    cls.check_supported(adapter, opts)
    sites = adapter.sites(base)
    if not sites:
        raise AttnswapError(f"found no attention layers in this {adapter.name} model")
    chosen = parse_layers(layers, len(sites))
    geometry = adapter.geometry(base.config)
    opts, prepared = cls.prepare(model, opts, chosen, calibration)
    ref = next(base.parameters())
    for site in (s for s in sites if s.index in chosen):
        site.module.attnswap = cls(opts, site, geometry, adapter).to(device=ref.device, dtype=ref.dtype)
    base.set_attn_implementation(ensure_registered())
    base._attnswap_hooks = cls.model_hooks(base, adapter, opts)
    base.config.attnswap = {
        "variant": cls.name,
        "options": opts.model_dump(mode="json"),
        "layers": chosen,
        "swapped": [s.path for s in sites if s.index in chosen],
        "versions": _versions(),
        **({"prepared": prepared} if prepared else {}),
    }
    return model


@contextlib.contextmanager
def bypassed(model: nn.Module):
    """Within the block every attached variant computes the original attention (the distillation teacher)."""
    variants = list(variant_modules(model).values())
    for v in variants:
        v.bypass = True
    try:
        yield model
    finally:
        for v in variants:
            v.bypass = False


def revert(model: nn.Module) -> nn.Module:
    """Remove every attached variant and restore SDPA attention: the original model again."""
    base = _base(model)
    for handle in getattr(base, "_attnswap_hooks", []):
        handle.remove()
    base._attnswap_hooks = []
    for path in variant_modules(base):
        del base.get_submodule(path).attnswap
    if base.config._attn_implementation == IMPLEMENTATION:
        base.set_attn_implementation("sdpa")
    if hasattr(base.config, "attnswap"):
        del base.config.attnswap
    return model


def _versions() -> dict[str, str]:
    import torch
    import transformers

    from . import __version__

    return {"attnswap": __version__, "torch": torch.__version__, "transformers": transformers.__version__}
