"""Compiled CPU kernels (`attnswap_kernels.native`): built once into attnswap's cache, nothing left behind by a
failed build, and switched off by ATTNSWAP_NATIVE=0."""
import ctypes

import pytest

from attnswap_kernels import native


def test_a_source_builds_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNSWAP_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "add.cpp"
    src.write_text('extern "C" int add(int a, int b) { return a + b; }\n')
    lib = native.library(src)
    assert lib is not None
    lib.add.argtypes, lib.add.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    assert lib.add(40, 2) == 42
    built = sorted(p.name for p in (tmp_path / "cache" / "kernels").iterdir())
    assert len(built) == 1 and built[0].startswith("add-") and built[0].endswith(".so")
    native.library.cache_clear()
    mtime = (tmp_path / "cache" / "kernels" / built[0]).stat().st_mtime_ns
    assert native.library(src) is not None  # the cached file is loaded, not rebuilt
    assert (tmp_path / "cache" / "kernels" / built[0]).stat().st_mtime_ns == mtime


def test_a_failed_build_warns_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNSWAP_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "broken.cpp"
    src.write_text("this is not C++\n")
    with pytest.warns(UserWarning, match="building broken.cpp failed, using the PyTorch path"):
        assert native.library(src) is None
    assert list((tmp_path / "cache" / "kernels").iterdir()) == []


def test_switched_off(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNSWAP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ATTNSWAP_NATIVE", "0")
    src = tmp_path / "off.cpp"
    src.write_text('extern "C" int one() { return 1; }\n')
    assert native.library(src) is None
    assert not (tmp_path / "cache").exists()


def test_no_compiler_warns_once_and_leaves_the_pytorch_path(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNSWAP_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    src = tmp_path / "nocxx.cpp"
    src.write_text('extern "C" int one() { return 1; }\n')
    with pytest.warns(UserWarning, match="no C.. compiler .g... found to build nocxx.cpp"):
        assert native.library(src) is None
    assert not (tmp_path / "cache").exists()
