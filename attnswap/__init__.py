"""attnswap: swap the self-attention of pretrained transformers for efficient or improved methods.

    import attnswap
    model = attnswap.load_model("smollm2-135m")
    attnswap.convert(model, method, window=256, sinks=4)   # one method (attnswap.list_methods()), every layer
    attnswap.convert(other, plan)                           # a plan: a dict as in a plan YAML (attnswap.plan)
    attnswap.save(model, "runs/converted", tokenizer=attnswap.load_tokenizer("smollm2-135m"))
    again = attnswap.load("runs/converted")
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
