"""attnswap's kernels (import name `attnswap_kernels`): each op has a PyTorch reference beside its Triton code.

Dispatch rule for every op: CUDA tensors run the Triton kernel; CPU tensors run the reference, unless
TRITON_INTERPRET=1 was set before this package was imported, in which case Triton's interpreter runs
the kernel on the CPU (how the tests check kernels against references here).
"""
import os

from .testing import assert_close, rel_rms_error

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(*tensors) -> bool:
    """True when an op should run its Triton kernel for these tensors."""
    if not triton_available():
        return False
    return INTERPRET or all(t.is_cuda for t in tensors)


__all__ = ["INTERPRET", "assert_close", "rel_rms_error", "triton_available", "use_triton"]
