from ..errors import AttnswapError

ARCHITECTURES: dict[str, type] = {}


def register_arch(cls):
    ARCHITECTURES[cls.name] = cls
    return cls


def adapter_for(config):
    """The adapter for a model config, or a one-line error naming what is supported."""
    model_type = getattr(config, "model_type", None)
    for cls in ARCHITECTURES.values():
        if model_type in cls.model_types:
            return cls()
    known = ", ".join(t for c in ARCHITECTURES.values() for t in c.model_types)
    raise AttnswapError(f"unsupported architecture '{model_type}'; attnswap supports: {known}")
