from ..errors import AttnswapError

ARCHITECTURES: dict[str, type] = {}


def register_arch(cls):
    ARCHITECTURES[cls.name] = cls
    return cls


def find_adapter(config):
    """The adapter for a model config, or None: a model without one is still loaded and evaluated as-is."""
    model_type = getattr(config, "model_type", None)
    for cls in ARCHITECTURES.values():
        if model_type in cls.model_types:
            return cls()
    return None


def adapter_for(config):
    """The adapter for a model config (what conversion needs), or a one-line error naming what is supported."""
    adapter = find_adapter(config)
    if adapter is None:
        model_type = getattr(config, "model_type", None)
        known = ", ".join(t for c in ARCHITECTURES.values() for t in c.model_types)
        raise AttnswapError(f"cannot convert architecture '{model_type}' (no attnswap adapter; an original model of "
                            f"it can still be evaluated); conversion supports: {known}")
    return adapter


def is_causal_lm(config) -> bool:
    """A causal LM (next-token logits) or an encoder: the adapter says, else transformers' own model mapping. A
    checkpoint with a sequence-classification head is not one, whatever its backbone."""
    from ..classification import is_classifier

    if is_classifier(config):
        return False
    adapter = find_adapter(config)
    if adapter is not None:
        return adapter.causal
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return getattr(config, "model_type", None) in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def position_kind(config) -> str:
    """"rope" or "absolute" (learned positions, which end at the maximum): the adapter says, else the config."""
    adapter = find_adapter(config)
    if adapter is not None:
        return adapter.positions
    rotary = any(hasattr(config, k) for k in ("rope_theta", "rope_parameters", "rotary_pct", "rotary_emb_base"))
    return "rope" if rotary else "absolute"
