from .base import ArchAdapter
from .registry import register_arch


@register_arch
class Phi3Adapter(ArchAdapter):
    """Phi-3: Llama-like, with q|k|v fused in one `qkv_proj` (rows: the query heads, then the key heads, then the
    value heads)."""

    name = "phi3"
    model_types = ("phi3",)
    causal = True
    positions = "rope"
    attention_path = r"layers\.(\d+)\.self_attn"
    lora_targets = ("qkv_proj", "o_proj")

    def _slices(self, config) -> dict[str, slice]:
        g = self.geometry(config)
        q, kv = g.num_heads * g.head_dim, g.num_kv_heads * g.head_dim
        return {"q": slice(0, q), "k": slice(q, q + kv), "v": slice(q + kv, q + 2 * kv)}

    def projection_modules(self, model, site):
        a = site.module
        return {**{n: (a.qkv_proj, sl) for n, sl in self._slices(a.config).items()}, "o": (a.o_proj, slice(None))}
