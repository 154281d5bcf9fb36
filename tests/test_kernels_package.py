import pytest
import torch

import attnswap_kernels
from attnswap_kernels import assert_close, rel_rms_error


def test_triton_is_installed_and_the_package_imports():
    import triton

    assert attnswap_kernels.triton_available()
    assert int(triton.__version__.split(".")[0]) >= 3


def test_cpu_tensors_take_the_reference_path():
    assert not attnswap_kernels.use_triton(torch.zeros(3))


def test_assert_close_names_the_failing_tensor():
    ref = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    assert_close("o", ref, ref + 1e-7, ratio=1e-5)
    assert rel_rms_error(ref, ref * 1.01) == pytest.approx(0.01, rel=1e-4)
    with pytest.raises(AssertionError, match="dq: relative RMS error"):
        assert_close("dq", ref, ref * 1.1, ratio=1e-3)
    with pytest.raises(AssertionError, match="do: output has NaN"):
        assert_close("do", ref, torch.full_like(ref, float("nan")), ratio=1.0)
