"""The "attnswap" attention implementation registered with transformers.

Every attention module of a converted model calls `attnswap_attention`; a module that carries a variant
(its `attnswap` submodule) is computed by that variant, any other module by plain SDPA. Registration
happens when a model is converted or loaded, never on `import attnswap`.
"""
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

IMPLEMENTATION = "attnswap"
# lists that attnswap.analysis.recording() hands out: each attention call appends
# (module, output [B, T, H, D], (query, key, value)) with the inputs as the variant received them
RECORDERS: list[list] = []
# id(attention module) -> [H] multipliers of its head outputs (attnswap.analysis.heads_scaled: head masking)
HEAD_SCALES: dict[int, torch.Tensor] = {}


def attnswap_attention(module, query, key, value, attention_mask, **kwargs):
    variant = getattr(module, "attnswap", None)
    if variant is None or variant.bypass:
        out = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    else:
        out = variant(module, query, key, value, attention_mask, **kwargs)
    scale = HEAD_SCALES.get(id(module))
    if scale is not None:
        out = (out[0] * scale.to(out[0].dtype).view(1, 1, -1, 1), *out[1:])
    for rec in RECORDERS:
        rec.append((module, out[0].detach(), (query.detach(), key.detach(), value.detach())))
    return out


def ensure_registered() -> str:
    # The mask function must be registered too, or transformers builds no mask and causality is lost.
    # SDPA's mask: None where `is_causal` can be used, else a boolean [B, 1, Tq, Tk] (True = attend).
    AttentionInterface.register(IMPLEMENTATION, attnswap_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
    return IMPLEMENTATION
