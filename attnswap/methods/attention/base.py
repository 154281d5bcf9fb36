"""The attention-method interface: one subclass per file, registered by name in `attention.REGISTRY`."""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ...arch import ArchAdapter, Geometry, Site
from .. import Method, Options


class AttentionMethod(Method, nn.Module):
    """One attention method for one attention site.

    An instance is attached to an attention module as its `attnswap` submodule; transformers then calls
    `forward(module, query, key, value, attention_mask, **kwargs)` through the "attnswap" attention
    implementation, with query [B, H, Tq, D] and key/value [B, Hkv, Tk, D] (after RoPE, after the cache
    update), and expects (output [B, Tq, H, D], weights or None) back. New parameters live on the instance;
    `trainable_parameters()` says which of them fine-tuning and distillation update.

    Optional, each a method's own: a decoding cache layer (`make_cache_layer`), parameters to train, a schedule
    during fine-tuning (`on_train_step`), a measurement before conversion (`prepare`).
    """

    # True if the method computes over the layer's whole KV cache by index (so a cache policy may prune that
    # cache: the method then runs over the kept entries, in position order); False for a method with a
    # decoding state of its own (`make_cache_layer`), which no cache policy touches
    prunable: ClassVar[bool] = True
    # True for a method that computes exactly the original attention (a cache policy then treats the layer as
    # an original one: it may run without a budget there)
    exact: ClassVar[bool] = False
    # True if the method applies transformers' attention mask, so a layer's own sliding window (Gemma's local
    # layers, ModernBERT's, Mistral's), which arrives in that mask, holds; False for one that reads only the
    # padding from it (it cannot be placed on such a layer)
    uses_mask: ClassVar[bool] = True
    # True if the method forms explicit softmax scores and hands them to the layer's score modifier (it passes
    # the attention function's keyword arguments on to `exact_attention`, which applies it)
    takes_scores: ClassVar[bool] = False
    # True if the method honours the model's soft-capping of the attention logits (Gemma 2's `softcap`)
    softcap: ClassVar[bool] = False

    def __init__(self, options: Options, site: Site, geometry: Geometry, adapter: ArchAdapter):
        super().__init__()
        self.options = options
        # when set, the attention function computes the original (exact SDPA) attention instead:
        # the teacher of `attnswap distill`
        self.bypass = False
        self.layer_index = site.index
        self.geometry = geometry
        self.causal = adapter.causal
        self._check_layer(site, adapter)

    def _check_layer(self, site: Site, adapter: ArchAdapter) -> None:
        """One-line error where this layer asks for what the method cannot do."""
        from ...errors import AttnswapError

        window = adapter.layer_window(site)
        if window is not None and not self.uses_mask:
            types = getattr(getattr(site.module, "config", None), "layer_types", None) or []
            full = [i for i, t in enumerate(types) if t == "full_attention"]
            hint = f" (--layers {','.join(map(str, full))})" if full else ""
            raise AttnswapError(f"{self.name} cannot keep layer {site.index}'s own sliding window of {window} tokens "
                                f"({adapter.name} family): convert only the layers that attend the whole context{hint}")
        cap = adapter.softcap(site)
        if cap is not None and not self.softcap:
            raise AttnswapError(f"{self.name} cannot apply the soft-capping of the attention logits (at {cap}) that "
                                f"layer {site.index} uses ({adapter.name} family)")

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())

    def on_train_step(self, step: int, total: int) -> dict[str, float]:
        """Called by `finetune` before optimizer step `step` (0-based) of `total`, on every rank and on resume.

        For schedules of the method's own (e.g. an annealed coefficient); returns values to show in the
        progress bar (averaged over layers), {} by default.
        """
        return {}

    def make_cache_layer(self):
        """A transformers cache layer for decoding with this method, or None for the default growing KV cache.
        The attention function hands it back to the layer's `attend` on every call (an explicit argument)."""
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
