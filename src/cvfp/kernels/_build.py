"""Builds and loads the CUDA extension (scan.cu + binding.cpp) on first use, never at import.

`torch.utils.cpp_extension.load` compiles with the machine's nvcc and ninja into a cached build
folder: `CVFP_KERNEL_BUILD_DIR`, else `~/.cache/cvfp/kernels/<hash>`, where the hash covers the
sources, the torch version and the flags, so a changed source never loads a stale module.
A failed build is remembered for the process (with its reason) and not retried.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCES = ("scan.cu", "binding.cpp")
ARCH = "-gencode=arch=compute_90a,code=sm_90a"
CUDA_FLAGS = ["-O3", "-std=c++17", ARCH, "-lineinfo", "-Xptxas=-v"]
CXX_FLAGS = ["-O3", "-std=c++17"]

_lock = threading.Lock()
_state: dict = {"module": None, "error": None, "log": None}


class KernelUnavailable(RuntimeError):
    """The extension cannot be built or loaded here; the message says why."""


def source_hash() -> str:
    import torch

    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((HERE / name).read_bytes())
    digest.update(torch.__version__.encode())
    digest.update(" ".join(CUDA_FLAGS + CXX_FLAGS).encode())
    return digest.hexdigest()[:16]


def build_dir() -> Path:
    env = os.environ.get("CVFP_KERNEL_BUILD_DIR")
    folder = Path(env) if env else Path.home() / ".cache" / "cvfp" / "kernels"
    return folder / source_hash()


def toolchain_problem() -> str | None:
    """Why no build can be attempted here (no nvcc, no ninja), or None."""
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None and shutil.which("nvcc") is None:
        return "no CUDA toolkit: nvcc not found (set CUDA_HOME)"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return None


def load(verbose: bool = False):
    """The compiled module (built on first call); raises KernelUnavailable with the reason."""
    with _lock:
        if _state["module"] is not None:
            return _state["module"]
        if _state["error"] is not None:
            raise KernelUnavailable(_state["error"])
        problem = toolchain_problem()
        if problem is not None:
            _state["error"] = problem
            raise KernelUnavailable(problem)
        from torch.utils import cpp_extension

        folder = build_dir()
        folder.mkdir(parents=True, exist_ok=True)
        try:
            module = cpp_extension.load(
                name=f"cvfp_scan_{source_hash()}",
                sources=[str(HERE / name) for name in SOURCES],
                extra_cuda_cflags=CUDA_FLAGS,
                extra_cflags=CXX_FLAGS,
                build_directory=str(folder),
                verbose=verbose,
            )
        except Exception as err:  # compiler errors, a missing header, an ABI mismatch
            _state["error"] = f"build failed: {type(err).__name__}: {err}"
            raise KernelUnavailable(_state["error"]) from err
        _state["module"] = module
        return module


def loaded() -> bool:
    return _state["module"] is not None


def build_error() -> str | None:
    return _state["error"]
