"""ggml's CPU row kernels (the ones llama.cpp multiplies with), borrowed from llama-cpp-python's install.

llama-cpp-python ships ggml's CPU backend as `llama_cpp/lib/libggml-cpu.so`, built for the machine it
was installed on. `ggml_get_type_traits_cpu(type)` gives, per weight type, the dot product of a weight
row with an activation row quantized to 8 bits (`vec_dot`), the activation type it pairs with
(`vec_dot_type`: Q8_0, Q8_1 or Q8_K) and, through that type's own traits, the quantizer (`from_float`).
`kernels/ggml_matmul.c` (built with leank's other CPU kernels) calls the two over OpenMP threads.

Why borrow rather than write: on the 1.5B Qwen2.5-Coder (Q4_K + Q6_K) leank's float32-activation C
kernels read the weights at 1.3-3.9 GB/s on this project's 2-core VM, llama.cpp at ~30 (issue 16);
its integer kernels are per-ISA SIMD that llama.cpp keeps current. The cost: the activations are
quantized to 8 bits per block, exactly as llama.cpp does (fidelity then matches llama.cpp's own).

The struct read here is `ggml_type_traits_cpu` from `ggml-cpu.h` of llama-cpp-python 0.3.36 (ggml
0.25.3; the header is installed with the package, in site-packages/include): from_float, vec_dot
(pointers), vec_dot_type (enum, int), nrows (int64). Another version may lay it out differently, so
only the versions in ABI_CHECKED are used; anything else, a missing library or symbol, or
LEANK_GGML=0, falls back to `cpu_matmul.c` (`unavailable_reason()` says why).
"""
from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
from pathlib import Path

import torch

from leank.kernels import cpu

# llama-cpp-python versions whose ggml-cpu.h was read for the struct below (and tested)
ABI_CHECKED = ("0.3.36",)

# GGML type ids this module multiplies (the same set as cpu_matmul.c)
TYPES = cpu.BLOCK_TYPES


class _TypeTraitsCpu(ctypes.Structure):
    _fields_ = [("from_float", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p),
                ("vec_dot_type", ctypes.c_int), ("nrows", ctypes.c_int64)]


_state: dict = {}


def _lib_dir() -> Path | None:
    spec = importlib.util.find_spec("llama_cpp")  # without importing it: its import loads libllama too
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "lib"


def _load():
    if os.environ.get("LEANK_GGML", "1").lower() in ("0", "no", "off", "false"):
        return None, "disabled by LEANK_GGML"
    if cpu.library() is None:
        return None, f"leank's C kernels are unavailable ({cpu.unavailable_reason()})"
    try:
        version = importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        return None, "llama-cpp-python is not installed"
    if version not in ABI_CHECKED:
        return None, f"llama-cpp-python {version} is not a version whose ggml ABI leank was checked against ({', '.join(ABI_CHECKED)})"
    d = _lib_dir()
    path = None if d is None else d / "libggml-cpu.so"
    if path is None or not path.exists():
        return None, f"no libggml-cpu.so in llama-cpp-python's install ({d})"
    try:
        lib = ctypes.CDLL(str(path))
        base = ctypes.CDLL(str(d / "libggml-base.so"))
        lib.ggml_cpu_init.restype = None
        lib.ggml_cpu_init()
        lib.ggml_get_type_traits_cpu.restype = ctypes.POINTER(_TypeTraitsCpu)
        lib.ggml_get_type_traits_cpu.argtypes = [ctypes.c_int]
        base.ggml_row_size.restype = ctypes.c_size_t
        base.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    except (OSError, AttributeError) as e:
        return None, f"ggml's CPU library could not be used: {e}"
    kernels = {}
    for t in TYPES:
        tr = lib.ggml_get_type_traits_cpu(t).contents
        act = lib.ggml_get_type_traits_cpu(tr.vec_dot_type).contents
        if tr.vec_dot and act.from_float:
            kernels[t] = (tr.vec_dot, act.from_float, tr.vec_dot_type)
    if not kernels:
        return None, "ggml's CPU library has no row kernels for leank's block types"
    return (lib, base, kernels), None


def _loaded():
    if "loaded" not in _state:
        _state["loaded"], _state["why"] = _load()
    return _state["loaded"]


def available() -> bool:
    return _loaded() is not None


def unavailable_reason() -> str | None:
    _loaded()
    return _state.get("why")


def version() -> str:
    return importlib.metadata.version("llama_cpp_python")


def bind(qtype: int, blocks: torch.Tensor, k: int):
    """(C function, its leading arguments) multiplying `blocks` (rows, row bytes) of GGML type `qtype`
    by ggml's kernels, or None when ggml is unavailable or has no kernel for the type. The call then
    takes (x, T, y, ldy, bias, threads), the same trailing arguments as `leank_qmatmul`."""
    loaded = _loaded()
    if loaded is None or qtype not in loaded[2]:
        return None
    _, base, kernels = loaded
    dot, quantize, act_type = kernels[qtype]
    if base.ggml_row_size(qtype, k) != blocks.shape[1]:  # ggml's idea of a row must be the file's
        return None
    fn = cpu.library().leank_ggml_matmul
    return fn, (dot, quantize, base.ggml_row_size(act_type, k), blocks.data_ptr(), blocks.shape[1], blocks.shape[0], k)


def matmul_path() -> str:
    """Which kernels multiply quantized matrices on a CPU, for `leank info`."""
    if available():
        return f"ggml's CPU kernels (llama-cpp-python {version()}; activations quantized to 8 bits, as llama.cpp)"
    return f"leank's C kernels (float32 activations; ggml's unavailable: {unavailable_reason()})"
