"""attnswap: swap the self-attention of pretrained transformers for efficient or improved methods.

    import attnswap
    model = attnswap.load_model("smollm2-135m")
    attnswap.convert(model, "sliding-window", window=256, sinks=4)          # one method, every layer
    attnswap.convert(other, {"attention": [{"layers": "0-9", "method": "linear"}],
                             "cache": {"policy": "h2o", "budget": 0.25}})   # a plan
    attnswap.save(model, "runs/smollm2-sw", tokenizer=attnswap.load_tokenizer("smollm2-135m"))
    again = attnswap.load("runs/smollm2-sw")
"""
__version__ = "0.1.0"

from .errors import AttnswapError  # noqa: E402


_API = {
    "load_model": ("models", "load_model"),
    "load": ("models", "load_model"),
    "load_tokenizer": ("models", "load_tokenizer"),
    "convert": ("surgery", "convert"),
    "revert": ("surgery", "revert"),
    "save": ("checkpoint", "save"),
    "perplexity": ("evaluate", "perplexity"),
    "list_methods": ("commands", "list_methods"),
    "plan_of": ("surgery", "plan_of"),
}


def __getattr__(name):
    # Lazy public API: `import attnswap` stays cheap and free of side effects.
    if name not in _API:
        raise AttributeError(f"module 'attnswap' has no attribute '{name}'")
    import importlib

    module, attr = _API[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), attr)


__all__ = ["AttnswapError", *_API]
