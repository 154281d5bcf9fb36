"""Sparse causal attention (hash buckets, query/key dropping): the PyTorch reference that defines it. The Triton
flash kernel of issue 18's `sparse` method is to be checked against it."""
from .reference import allowed, lsh_buckets, sparse_attention_reference

__all__ = ["allowed", "lsh_buckets", "sparse_attention_reference"]
