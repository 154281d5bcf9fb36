from .base import ArchAdapter, Geometry, Projection
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

    def geometry(self, config):
        h = config.hidden_size
        return Geometry(config.num_attention_heads, config.num_attention_heads, h // config.num_attention_heads, h)

    def layer_window(self, site):
        w = site.module.sliding_window  # transformers stores the half-window + 1 (flash attention's bounds)
        return None if w is None else 2 * (w - 1)

    def projections(self, model, site):
        a, h = site.module, site.module.config.hidden_size
        b = a.Wqkv.bias
        out = {n: Projection(a.Wqkv.weight[i * h:(i + 1) * h], None if b is None else b[i * h:(i + 1) * h])
               for i, n in enumerate("qkv")}
        out["o"] = Projection(a.Wo.weight, a.Wo.bias)
        return out

    def projection_modules(self, model, site):
        a, h = site.module, site.module.config.hidden_size
        return {**{n: (a.Wqkv, slice(i * h, (i + 1) * h)) for i, n in enumerate("qkv")}, "o": (a.Wo, slice(None))}
