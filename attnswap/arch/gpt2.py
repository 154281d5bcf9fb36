from .base import ArchAdapter, Projection
from .registry import register_arch


@register_arch
class GPT2Adapter(ArchAdapter):
    """GPT-2: learned absolute positions, fused `c_attn` (Conv1D, weight [in, 3*hidden])."""

    name = "gpt2"
    model_types = ("gpt2",)
    causal = True
    positions = "absolute"
    attention_path = r"h\.(\d+)\.attn"
    lora_targets = ("c_attn", "c_proj")

    def projections(self, model, site):
        a = site.module
        h = a.embed_dim
        # Conv1D stores [in, out]; transpose to the nn.Linear layout, then split the fused q|k|v columns.
        w = a.c_attn.weight.t()
        b = a.c_attn.bias
        out = {n: Projection(w[i * h : (i + 1) * h], b[i * h : (i + 1) * h]) for i, n in enumerate("qkv")}
        out["o"] = Projection(a.c_proj.weight.t(), a.c_proj.bias)
        return out

    def projection_modules(self, model, site):
        a, h = site.module, site.module.embed_dim
        out = {n: (a.c_attn, slice(i * h, (i + 1) * h)) for i, n in enumerate("qkv")}
        out["o"] = (a.c_proj, slice(None))
        return out
