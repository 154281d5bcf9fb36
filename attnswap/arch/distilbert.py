from .base import ArchAdapter, Geometry, Projection
from .registry import register_arch


@register_arch
class DistilBertAdapter(ArchAdapter):
    """DistilBERT: a bidirectional encoder with learned absolute positions; `q_lin`, `k_lin`, `v_lin`,
    `out_lin` in `transformer.layer.N.attention`."""

    name = "distilbert"
    model_types = ("distilbert",)
    causal = False
    positions = "absolute"
    attention_path = r"layer\.(\d+)\.attention"
    lora_targets = ("q_lin", "k_lin", "v_lin", "out_lin")

    def geometry(self, config):
        h = config.dim
        return Geometry(config.n_heads, config.n_heads, h // config.n_heads, h)

    def projections(self, model, site):
        a = site.module
        return {n: Projection(getattr(a, f"{m}_lin").weight, getattr(a, f"{m}_lin").bias)
                for n, m in zip("qkvo", ("q", "k", "v", "out"))}

    def projection_modules(self, model, site):
        return {n: (getattr(site.module, f"{m}_lin"), slice(None)) for n, m in zip("qkvo", ("q", "k", "v", "out"))}
