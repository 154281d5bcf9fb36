"""Architecture adapters: one small file per family."""
from . import bert, distilbert, gpt2, gpt_neox, llama, modernbert, phi3  # noqa: F401  (registers the adapters)
from .base import ArchAdapter, Geometry, Projection, Site
from .registry import ARCHITECTURES, adapter_for, find_adapter, is_causal_lm, position_kind

__all__ = ["ARCHITECTURES", "ArchAdapter", "Geometry", "Projection", "Site", "adapter_for", "find_adapter",
           "is_causal_lm", "position_kind"]
