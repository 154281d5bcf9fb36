"""The variant interface: one subclass per file, registered by name."""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from ..arch import ArchAdapter, Geometry, Site
from ..errors import AttnswapError, did_you_mean, first_validation_error


class VariantOptions(BaseModel):
    """Options of a variant. Subclasses declare fields with `Field(description=...)`: that text is the help."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class Variant(nn.Module):
    """One attention variant for one attention site.

    An instance is attached to an attention module as its `attnswap` submodule; transformers then calls
    `forward(module, query, key, value, attention_mask, **kwargs)` through the "attnswap" attention
    implementation, with query [B, H, Tq, D] and key/value [B, Hkv, Tk, D] (after RoPE, after the cache
    update), and expects (output [B, Tq, H, D], weights or None) back. New parameters live on the instance;
    `trainable_parameters()` says which of them fine-tuning and distillation update.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    Options: ClassVar[type[VariantOptions]] = VariantOptions
    # which attention directions the method is defined for
    directions: ClassVar[frozenset[str]] = frozenset({"causal", "bidirectional"})
    # what the conversion adds, for `attnswap list` and the docs
    adds: ClassVar[str] = "no new parameters"
    # True for a variant that is itself a low-rank adapter of the projections (lora-ensemble): finetune trains
    # only the variant's parameters and adds no PEFT LoRA on top
    is_adapter: ClassVar[bool] = False

    def __init__(self, options: VariantOptions, site: Site, geometry: Geometry, adapter: ArchAdapter):
        super().__init__()
        self.options = options
        # when set, the attention function computes the original (exact SDPA) attention instead:
        # the teacher of `attnswap distill`
        self.bypass = False
        self.layer_index = site.index
        self.geometry = geometry
        self.causal = adapter.causal
        # models whose variants carry N > 1 members run every input as N stacked copies (attnswap.members)
        self.members = 1

    @classmethod
    def parse_options(cls, values: dict[str, Any]) -> VariantOptions:
        """Validate user options (strings from --set, or typed values from a recipe/API)."""
        fields = cls.Options.model_fields
        for key in values:
            if key not in fields:
                names = ", ".join(fields) or "none"
                raise AttnswapError(
                    f"unknown option '{key}' for variant '{cls.name}'{did_you_mean(key, fields)}; options: {names}"
                )
        try:
            return cls.Options(**values)
        except ValidationError as e:
            loc, msg, given = first_validation_error(e)
            where = ".".join(str(p) for p in loc)
            raise AttnswapError(
                f"bad value for option '{where}' of variant '{cls.name}': {msg} (got {given!r})"
            ) from None

    @classmethod
    def check_supported(cls, adapter: ArchAdapter, options: VariantOptions | None = None) -> None:
        """Raise a one-line error if this variant (with these options) cannot run on this architecture."""
        if adapter.direction not in cls.directions:
            raise AttnswapError(
                f"variant '{cls.name}' supports {'/'.join(sorted(cls.directions))} attention only, "
                f"but {adapter.name} models are {adapter.direction}"
            )

    @classmethod
    def prepare(cls, model: nn.Module, options: VariantOptions, layers: list[int],
                calibration=None) -> tuple[VariantOptions, dict]:
        """Before the swap, on the original model: resolve options that come from measuring it.

        `calibration` is an `attnswap.data.Calibration` (token windows) or None. Returns the options to store
        (fully resolved, so loading a checkpoint never measures again) and a record of the measurement for the
        checkpoint's `attnswap` section and model card ({} when nothing was measured).
        """
        return options, {}

    @classmethod
    def describe(cls, section: dict) -> list[str]:
        """Lines for the model card and `attnswap list SOURCE` about a converted model's section."""
        return []

    @classmethod
    def model_hooks(cls, model: nn.Module, adapter: ArchAdapter, options: VariantOptions) -> list:
        """After the swap: hooks on modules outside the attention function (projections, the model's forward).

        Returns their removable handles; `attnswap.revert` removes them. None by default.
        """
        return []

    def merge_member(self, member: int, projections: dict) -> None:
        """Fold member `member`'s weights into the backbone `projections` (arch `projections()` views)."""
        raise AttnswapError(f"variant '{self.name}' has no members to extract")

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())

    def on_train_step(self, step: int, total: int) -> dict[str, float]:
        """Called by `finetune` before optimizer step `step` (0-based) of `total`, on every rank and on resume.

        For schedules of the variant's own (e.g. an annealed coefficient); returns values to show in the
        progress bar (averaged over layers), {} by default.
        """
        return {}

    def make_cache_layer(self):
        """A transformers cache layer for decoding with this variant, or None for the default growing KV cache."""
        return None

    def forward(self, module, query, key, value, attention_mask, **kwargs) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.options.model_dump().items())


def key_padding_keep(attention_mask):
    """[B, Tk] True for real keys, from transformers' boolean [B, 1, Tq, Tk] mask (None: no padding).

    Causal models get a causal boolean mask here only when padding is present, so a key column that no
    query may see is padding.
    """
    if attention_mask is None or attention_mask.dtype != torch.bool:
        return None
    return attention_mask.any(dim=-2)[:, 0]
