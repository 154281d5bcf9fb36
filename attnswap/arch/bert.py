from .base import ArchAdapter, Geometry, Projection
from .registry import register_arch


@register_arch
class BertAdapter(ArchAdapter):
    """BERT family: bidirectional encoder, absolute positions; o lives in the sibling `attention.output.dense`."""

    name = "bert"
    model_types = ("bert", "roberta", "xlm-roberta")
    causal = False
    positions = "absolute"
    attention_path = r"layer\.(\d+)\.attention\.self"
    lora_targets = ("query", "key", "value", "attention.output.dense")

    def geometry(self, config):
        h = config.hidden_size
        return Geometry(config.num_attention_heads, config.num_attention_heads, h // config.num_attention_heads, h)

    def projections(self, model, site):
        a = site.module
        dense = model.get_submodule(site.path.rsplit(".", 1)[0] + ".output.dense")
        return {
            "q": Projection(a.query.weight, a.query.bias),
            "k": Projection(a.key.weight, a.key.bias),
            "v": Projection(a.value.weight, a.value.bias),
            "o": Projection(dense.weight, dense.bias),
        }

    def projection_modules(self, model, site):
        a = site.module
        dense = model.get_submodule(site.path.rsplit(".", 1)[0] + ".output.dense")
        return {"q": (a.query, slice(None)), "k": (a.key, slice(None)), "v": (a.value, slice(None)),
                "o": (dense, slice(None))}
