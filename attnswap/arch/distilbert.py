from .base import ArchAdapter
from .registry import register_arch


@register_arch
class DistilBertAdapter(ArchAdapter):
    """DistilBERT: a bidirectional encoder with learned absolute positions; `q_lin`, `k_lin`, `v_lin`,
    `out_lin` in `transformer.layer.N.attention` (its config maps `dim`, `n_heads` to the standard names)."""

    name = "distilbert"
    model_types = ("distilbert",)
    causal = False
    positions = "absolute"
    attention_path = r"layer\.(\d+)\.attention"
    lora_targets = ("q_lin", "k_lin", "v_lin", "out_lin")

    def projection_modules(self, model, site):
        return {n: (getattr(site.module, f"{m}_lin"), slice(None)) for n, m in zip("qkvo", ("q", "k", "v", "out"))}
