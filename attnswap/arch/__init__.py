"""Architecture adapters: one small file per family."""
from . import bert, gpt2, llama  # noqa: F401  (registers the adapters)
from .base import ArchAdapter, Geometry, Projection, Site
from .registry import ARCHITECTURES, adapter_for

__all__ = ["ARCHITECTURES", "ArchAdapter", "Geometry", "Projection", "Site", "adapter_for"]
