from .base import ArchAdapter
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

    def projection_modules(self, model, site):
        a = site.module
        dense = model.get_submodule(site.path.rsplit(".", 1)[0] + ".output.dense")
        return {"q": (a.query, slice(None)), "k": (a.key, slice(None)), "v": (a.value, slice(None)),
                "o": (dense, slice(None))}
