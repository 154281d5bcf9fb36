"""attnswap's kernels (import name `attnswap_kernels`): each op has a PyTorch reference beside its Triton code.

Dispatch rule for every op: CUDA tensors run the Triton kernel, CPU tensors the PyTorch reference.
The tests call the Triton entry points directly on CPU tensors with TRITON_INTERPRET=1 set before
triton is imported: Triton's interpreter then runs the kernels on the CPU, against the references.
"""
from .testing import assert_close, rel_rms_error

def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(*tensors) -> bool:
    """True when an op should run its Triton kernel for these tensors (all on a CUDA device)."""
    return all(t.is_cuda for t in tensors) and triton_available()


__all__ = ["assert_close", "rel_rms_error", "triton_available", "use_triton"]
