"""Batched LoRA over a member axis: N low-rank updates of one frozen projection, in one call.

x [N*b, ..., in] holds N stacked copies of a batch of b rows, member-major (rows m*b .. m*b+b-1 belong to
member m); member m's update is (x_m @ A[m]) @ B[m] * scale with A [N, in, r], B [N, r, out].
"""
import torch


def batched_lora(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """All members in two batched matmuls (one GEMM launch each): [N*b, ..., in] -> [N*b, ..., out]."""
    n = a.shape[0]
    rows = x.shape[0]
    if rows % n:
        raise ValueError(f"batched_lora: {rows} rows are not a multiple of the {n} members")
    xs = x.reshape(n, -1, x.shape[-1])  # [N, b*..., in]: member-major rows stay contiguous
    out = torch.bmm(torch.bmm(xs, a.to(x.dtype)), b.to(x.dtype)) * scale
    return out.reshape(*x.shape[:-1], b.shape[-1])


def batched_lora_naive(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """The definition, one member at a time (the reference the batched op is tested against)."""
    n = a.shape[0]
    chunks = x.chunk(n, dim=0)
    return torch.cat([(c @ a[m].to(x.dtype)) @ b[m].to(x.dtype) * scale for m, c in enumerate(chunks)], dim=0)
