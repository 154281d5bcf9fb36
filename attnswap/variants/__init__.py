"""Attention variants. Each module in this package defines one `Variant` subclass decorated with `@register`."""
from .base import Variant, VariantOptions
from .registry import VARIANTS, get_variant, register

__all__ = ["VARIANTS", "Variant", "VariantOptions", "get_variant", "register"]
