"""Batched LoRA over a member axis (LoRA-Ensemble): the batched op and its one-member-at-a-time reference.

No Triton kernel: the op is two `torch.bmm` calls, each one batched GEMM launch on GPU (cuBLAS) and on CPU;
a fused Triton version would only pay if shown faster on a GPU, and this project has not had one to measure
it on (docs/variants/lora-ensemble.md).
"""
from .reference import batched_lora, batched_lora_naive

__all__ = ["batched_lora", "batched_lora_naive"]
