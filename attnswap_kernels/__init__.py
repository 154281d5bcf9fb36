"""attnswap's kernels (import name `attnswap_kernels`): each op has a PyTorch reference beside its Triton code.

Dispatch rule for every op: CUDA tensors run the Triton kernel, CPU tensors the PyTorch reference.
The tests call the Triton entry points directly on CPU tensors with TRITON_INTERPRET=1 set before
triton is imported: Triton's interpreter then runs the kernels on the CPU, against the references.
"""
import torch

from .testing import assert_close, rel_rms_error

# tests set this (monkeypatch): every kernel output buffer is then allocated full of NaN, so an element a kernel
# fails to write shows as NaN instead of whatever the allocator left there
POISON = False


def per_query_head(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Keys, values or per-KV-head tensors [B, Hkv, ...] repeated for grouped-query attention to [B, heads, ...] (as
    they are when Hkv = heads)."""
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def kernel_output(*shape, dtype=torch.float32, device=None) -> torch.Tensor:
    """An output buffer that a Triton kernel writes completely: uninitialised, or NaN under POISON."""
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)

def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(*tensors) -> bool:
    """True when an op should run its Triton kernel for these tensors (all on a CUDA device)."""
    return all(t.is_cuda for t in tensors) and triton_available()


__all__ = ["POISON", "assert_close", "kernel_output", "per_query_head", "rel_rms_error", "triton_available", "use_triton"]
