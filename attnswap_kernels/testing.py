"""One comparison helper for kernels against their references (as flash-linear-attention's assert_close)."""
import torch


def rel_rms_error(ref: torch.Tensor, out: torch.Tensor) -> float:
    """RMS(out - ref) / RMS(ref), in float64; 0 for two zero tensors."""
    ref64, out64 = ref.detach().double(), out.detach().double()
    num = (out64 - ref64).pow(2).mean().sqrt()
    den = ref64.pow(2).mean().sqrt()
    return float(num / den) if den > 0 else float(num)


def assert_close(prefix: str, ref: torch.Tensor, out: torch.Tensor, ratio: float) -> None:
    """Fail naming the tensor when its relative RMS error exceeds `ratio` (or it has NaN/inf)."""
    if ref.shape != out.shape:
        raise AssertionError(f"{prefix}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    if not torch.isfinite(out).all():
        raise AssertionError(f"{prefix}: output has NaN/inf")
    err = rel_rms_error(ref, out)
    if err > ratio:
        raise AssertionError(f"{prefix}: relative RMS error {err:.3e} > {ratio:.1e}")
