"""Attention methods: each computes a layer's attention from its q, k, v (one file per method)."""
from .. import Registry
from .base import AttentionMethod

REGISTRY = Registry("attention", __name__, AttentionMethod)
register = REGISTRY.register

__all__ = ["REGISTRY", "AttentionMethod", "register"]
