from .base import ArchAdapter
from .registry import register_arch


@register_arch
class ModernBertAdapter(ArchAdapter):
    """ModernBERT: a bidirectional encoder with RoPE; q|k|v fused in `Wqkv` (rows: q, k, v), output `Wo`; every
    third layer global, the others local (a window of `local_attention` tokens, passed in the mask)."""

    name = "modernbert"
    model_types = ("modernbert",)
    causal = False
    positions = "rope"
    attention_path = r"layers\.(\d+)\.attn"
    lora_targets = ("Wqkv", "Wo")

    def layer_window(self, site):
        w = site.module.sliding_window  # transformers stores the half-window + 1 (flash attention's bounds)
        return None if w is None else 2 * (w - 1)

    def projection_modules(self, model, site):
        a, h = site.module, site.module.config.hidden_size
        return {**{n: (a.Wqkv, slice(i * h, (i + 1) * h)) for i, n in enumerate("qkv")}, "o": (a.Wo, slice(None))}
