"""Cache policies: each decides which KV entries a layer keeps during prefill and decoding (one file per
policy; a policy with machinery of its own, like namm, is a folder). `pruned.PrunedLayer` is the cache layer
they all run in; `tasks` measures a model under one (`attnswap eval memory`); `evolve` searches the parameters
of a policy that has them (`attnswap evolve`)."""
from .. import Registry
from .base import CachePolicy

REGISTRY = Registry("cache", __name__, CachePolicy)
register = REGISTRY.register

__all__ = ["REGISTRY", "CachePolicy", "register"]
