"""The "attnswap" attention implementation registered with transformers.

Every attention module of a converted model calls `attnswap_attention`; a module that carries a variant
(its `attnswap` submodule) is computed by that variant, any other module by plain SDPA. Registration
happens when a model is converted or loaded, never on `import attnswap`.
"""
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

IMPLEMENTATION = "attnswap"
# the attribute of an attention module that holds the probes attached to it for a while (attnswap.analysis:
# recording, head masking): each probe is called as probe(module, out, query, key, value) -> out
PROBES = "attnswap_probes"


def attnswap_attention(module, query, key, value, attention_mask, **kwargs):
    variant = getattr(module, "attnswap", None)
    if variant is None or variant.bypass:
        out = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    else:
        out = variant(module, query, key, value, attention_mask, **kwargs)
    for probe in getattr(module, PROBES, ()):
        out = probe(module, out, query, key, value)
    return out


def ensure_registered() -> str:
    # The mask function must be registered too, or transformers builds no mask and causality is lost.
    # SDPA's mask: None where `is_causal` can be used, else a boolean [B, 1, Tq, Tk] (True = attend).
    AttentionInterface.register(IMPLEMENTATION, attnswap_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
    return IMPLEMENTATION
