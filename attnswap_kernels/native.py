"""Compiled CPU kernels: a C++ source beside its op, built on first use by the system C++ compiler into attnswap's
cache and loaded with ctypes.

Why not a torch C++ extension: the kernels take raw pointers only, so they need no PyTorch headers, and a plain
shared library builds in about a second instead of a minute. The library is linked against libgomp by soname,
so inside a process where PyTorch has loaded its own libgomp both share one OpenMP runtime.

Where: $ATTNSWAP_CACHE/kernels or ~/.cache/attnswap/kernels, one file per source, compiler and CPU (the build
targets the CPU it runs on, `-march=native`), written to a temporary name and renamed (a build that fails or is
interrupted leaves nothing under the final name). No compiler, a failed build or ATTNSWAP_NATIVE=0: `library`
returns None and the op keeps its PyTorch path (no compiler and a failed build warn once per source).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

# GCC's default 256-bit vectors on this AVX-512 machine: -mprefer-vector-width=512 made the sparse forward slower
# (1,024 tokens of SmolLM2's attention: 3.7 -> 4.1-4.2 ms, two runs; 16,384: 127 -> 133 ms)
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]


def cache_dir() -> Path:
    root = os.environ.get("ATTNSWAP_CACHE") or Path.home() / ".cache" / "attnswap"
    return Path(root).expanduser() / "kernels"


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


@functools.lru_cache(maxsize=None)
def library(source: Path) -> ctypes.CDLL | None:
    """The shared library built from `source` (cached), or None where it cannot be built here."""
    if os.environ.get("ATTNSWAP_NATIVE", "1") == "0":
        return None
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        warnings.warn(f"attnswap: no C++ compiler (g++) found to build {source.name}, using the slower PyTorch path",
                      stacklevel=2)
        return None
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    text = source.read_bytes()
    for name in re.findall(rb'^#include "([^"]+)"', text, flags=re.M):  # local headers are part of the build
        text += (source.parent / name.decode()).read_bytes()
    key = hashlib.sha256(b"\0".join([text, " ".join(FLAGS).encode(), version.encode(), _cpu_id().encode()]))
    target = cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"
    if not target.exists():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", prefix=f".{target.stem}-", dir=target.parent)
            os.close(fd)
            try:
                done = subprocess.run([cxx, *FLAGS, str(source), "-o", tmp], capture_output=True, text=True,
                                      timeout=600)
                if done.returncode:
                    last = (done.stderr.strip().splitlines() or ["no message"])[-1]
                    warnings.warn(f"attnswap: building {source.name} failed, using the PyTorch path: {last}",
                                  stacklevel=2)
                    return None
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except (OSError, subprocess.SubprocessError) as err:
            warnings.warn(f"attnswap: cannot build {source.name} ({err}), using the PyTorch path", stacklevel=2)
            return None
    return ctypes.CDLL(str(target))


def per_dtype(lib: ctypes.CDLL, name: str, argtypes: list) -> dict:
    """{torch.float32: lib.<name>_f32, torch.float64: lib.<name>_f64}, each declared with `argtypes` and an int
    result (0: success), the C entry points a source defines once per dtype."""
    import torch

    fns = {}
    for dtype, suffix in ((torch.float32, "f32"), (torch.float64, "f64")):
        fn = getattr(lib, f"{name}_{suffix}")
        fn.argtypes, fn.restype = argtypes, ctypes.c_int
        fns[dtype] = fn
    return fns


def pointer(x) -> ctypes.c_void_p:
    """A tensor's data pointer for a ctypes call (None: a null pointer)."""
    return ctypes.c_void_p(None if x is None else x.data_ptr())
