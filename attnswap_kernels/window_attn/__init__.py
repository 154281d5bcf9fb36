"""Exact softmax terms over a causal window plus sinks (unnormalised, for merging with linear terms)."""
from .reference import window_softmax_naive, window_softmax_terms

__all__ = ["window_softmax_naive", "window_softmax_terms"]
