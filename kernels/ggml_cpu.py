"""ggml's CPU matrix multiply (the one llama.cpp runs), borrowed from llama-cpp-python's install.

llama-cpp-python ships ggml's CPU backend (`llama_cpp/lib/libggml-cpu.so`, built for the machine it was
installed on) and its headers (`site-packages/include`). `kernels/ggml_graph.c`, compiled here against
those headers and linked to those libraries, multiplies a quantized matrix by float32 activations as a
one-node ggml graph (`ggml_mul_mat`, `ggml_graph_compute` on ggml's thread pool): the activations are
quantized to 8 bits per block and multiplied by ggml's integer kernels, row by row for a decode step,
tiled for a prompt. Each matrix is a ggml tensor over leank's bytes (the memory-mapped file's blocks),
or, for the types ggml interleaves on this CPU (Q4_0 and Q4_K on an AVX2 or AVX-512 x86, among others),
ggml's repacked copy, as llama.cpp's CPU backend holds them by default: on the 1.5B Qwen2.5-Coder
(mostly Q4_K) a decode step takes 92 ms instead of 120 (2 threads), a 512-token prompt ~50 % longer
(41.5 against 62.8 tok/s, 1 thread; bench/RESULTS.md). LEANK_GGML_REPACK=0 keeps every matrix in the file's layout.

Why borrow rather than write: on the 1.5B Qwen2.5-Coder (Q4_K + Q6_K) leank's float32-activation C
kernels read the weights at 1.3-3.9 GB/s on this project's 2-core VM, llama.cpp at ~30 (issue 16); a
512-row prompt through ggml's multiply takes half the time of decoding the matrix to float32 for BLAS
(bench/RESULTS.md). Its integer kernels are per-ISA SIMD that llama.cpp keeps current. The cost: the
activations are quantized to 8 bits per block, exactly as llama.cpp does (fidelity then matches
llama.cpp's own), and products are not bitwise the same for a row fed alone and within a prompt
(llama.cpp's are not either).

`Program` strings many such nodes (products, RMSNorm, SwiGLU, adds, RoPE) into segments, each one graph
planned once and computed every step: a whole decode step in n_layers + 1 graphs
(`runtime/model/transformer.py`, `CpuDecodeStep`).

Only the llama-cpp-python versions in ABI_CHECKED are used (the headers are compiled against, but
the library must be the one they describe); anything else, missing headers, libraries or compiler, or
LEANK_GGML=0, falls back to leank's own kernels (`cpu_matmul.c`; `unavailable_reason()` says why).
"""
from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
from pathlib import Path

import torch

from leank.kernels import cpu

# llama-cpp-python versions whose headers and ggml library this module was written and tested against
ABI_CHECKED = ("0.3.36",)

# GGML type ids this module multiplies (the same set as cpu_matmul.c)
TYPES = cpu.BLOCK_TYPES

# ggml_backend_cpu_buffer_from_ptr wants this alignment (ggml's TENSOR_ALIGNMENT); see ggml_graph.c
ALIGN = 32

_state: dict = {}


def _site() -> Path | None:
    spec = importlib.util.find_spec("llama_cpp")  # without importing it: its import loads libllama too
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def _lib_dir() -> Path | None:
    site = _site()
    return None if site is None else site / "lib"


def _load():
    if cpu.switched_off("LEANK_GGML"):
        return None, "disabled by LEANK_GGML"
    try:
        version = importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        return None, "llama-cpp-python is not installed"
    if version not in ABI_CHECKED:
        return None, f"llama-cpp-python {version} is not a version whose ggml ABI leank was checked against ({', '.join(ABI_CHECKED)})"
    lib_dir = _lib_dir()
    include = None if lib_dir is None else lib_dir.parent.parent / "include"
    if lib_dir is None or not (lib_dir / "libggml-cpu.so").exists():
        return None, f"no libggml-cpu.so in llama-cpp-python's install ({lib_dir})"
    if not (include / "ggml-cpu.h").exists():
        return None, f"no ggml headers in llama-cpp-python's install ({include})"
    cc = cpu._compiler()
    if cc is None:
        return None, "no C compiler (cc, gcc or clang) found"
    try:
        path = cpu.build_library(
            cc, "leank-ggml", [cpu.HERE / "ggml_graph.c"], [], compile_args=("-I", str(include)),
            link_args=(f"-L{lib_dir}", "-lggml-base", "-lggml-cpu", "-lpthread", f"-Wl,-rpath,{lib_dir}"),
            flag_sets=(["-O2"],), key_extra=f"{version} {lib_dir}")
        lib = ctypes.CDLL(str(path))
    except Exception as e:  # a broken toolchain must not stop leank
        return None, f"ggml's CPU library could not be used: {e}"
    p, i, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    lib.leank_ggml_init.restype = i
    lib.leank_ggml_weight.restype = p
    lib.leank_ggml_weight.argtypes = [i, p, i64, i64, i64, i]  # type, data, rows, k, row bytes, repack
    lib.leank_ggml_weight_repacked.restype = i
    lib.leank_ggml_weight_repacked.argtypes = [p]
    lib.leank_ggml_weight_free.restype = None
    lib.leank_ggml_weight_free.argtypes = [p]
    lib.leank_ggml_mul.restype = i
    lib.leank_ggml_mul.argtypes = [p, i, p, i64, p, i64, i]  # weights, parts, x, T, y, ldy, threads
    lib.leank_ggml_prog_new.restype = p
    lib.leank_ggml_prog_new.argtypes = [i, i, i]  # max nodes, max segments, slots
    lib.leank_ggml_prog_free.restype = None
    lib.leank_ggml_prog_free.argtypes = [p]
    lib.leank_ggml_prog_input.argtypes = [p, i, i64, i64]  # slot, cols, rows
    lib.leank_ggml_prog_input_i32.argtypes = [p, i, i64]  # slot, n
    lib.leank_ggml_prog_constant.argtypes = [p, p, i64]
    lib.leank_ggml_prog_reshape.argtypes = [p, i, i64, i64, i64]
    f = ctypes.c_float
    lib.leank_ggml_prog_rope.argtypes = [p, i, i, i, i, i, i, f, f, f, f, f, f]
    lib.leank_ggml_prog_mul_mat.argtypes = [p, p, i]  # weight handle, x
    lib.leank_ggml_prog_rms_norm.argtypes = [p, i, i, ctypes.c_float]
    lib.leank_ggml_prog_add.argtypes = [p, i, i]
    lib.leank_ggml_prog_swiglu.argtypes = [p, i, i]
    lib.leank_ggml_prog_bind.argtypes = [p, i, i, i64, i64]  # node, slot, byte offset, row stride (floats)
    lib.leank_ggml_prog_end_segment.argtypes = [p]
    lib.leank_ggml_prog_finish.argtypes = [p]
    lib.leank_ggml_prog_run.argtypes = [p, i, p, i]  # segment, slot pointers, threads
    for f in ("input", "input_i32", "reshape", "rope", "constant", "mul_mat", "rms_norm", "add", "swiglu", "bind", "end_segment", "finish", "run"):
        getattr(lib, f"leank_ggml_prog_{f}").restype = i
    lib.leank_ggml_init()
    return lib, None


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


def aligned(blocks: torch.Tensor) -> torch.Tensor:
    """`blocks` itself when ggml can take its address, else an aligned copy."""
    if blocks.data_ptr() % ALIGN == 0 and blocks.is_contiguous():
        return blocks
    raw = torch.empty(blocks.numel() + ALIGN, dtype=torch.uint8)
    off = (-raw.data_ptr()) % ALIGN
    return raw[off : off + blocks.numel()].view(blocks.shape).copy_(blocks)


class Matrix:
    """Parts of one matrix (rows of GGUF blocks, each part of one type, stacked along the output rows)
    as ggml tensors over their bytes; `matmul(x)` multiplies them all in one graph."""

    def __init__(self, parts: list[tuple[torch.Tensor, int]], k: int):
        lib = _loaded()
        self._lib, self.k = lib, k
        self.parts = [(aligned(b), t) for b, t in parts]  # held: the handles point into them
        self.out_features = sum(b.shape[0] for b, _ in self.parts)
        repack = int(not cpu.switched_off("LEANK_GGML_REPACK"))
        handles = [lib.leank_ggml_weight(t, b.data_ptr(), b.shape[0], k, b.shape[1], repack) for b, t in self.parts]
        self._handles = (ctypes.c_void_p * len(handles))(*handles)
        if not all(handles):
            self.close()
            raise ValueError("ggml cannot take these blocks")
        # per part: True when ggml holds its own interleaved copy (the blocks then only serve `rows`)
        self.repacked = [bool(lib.leank_ggml_weight_repacked(h)) for h in handles]

    def matmul(self, x: torch.Tensor, threads: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """(T, out_features) float32 = x (T, k) float32 contiguous times the matrix's transpose (into
        `out`, a contiguous float32 (T, out_features) tensor, when given)."""
        T = x.shape[0]
        if x.dtype != torch.float32 or not x.is_contiguous() or x.shape != (T, self.k):
            raise ValueError(f"expected a contiguous float32 ({T}, {self.k}) tensor")
        y = torch.empty(T, self.out_features) if out is None else out
        if y.dtype != torch.float32 or not y.is_contiguous() or y.shape != (T, self.out_features):
            raise ValueError(f"out must be a contiguous float32 ({T}, {self.out_features}) tensor")
        rc = self._lib.leank_ggml_mul(self._handles, len(self.parts), x.data_ptr(), T, y.data_ptr(),
                                      self.out_features, threads)
        if rc:
            raise RuntimeError("ggml's matrix multiply rejected its arguments")
        return y

    def close(self) -> None:
        handles, self._handles = self._handles, None
        for h in handles or ():
            if h:
                self._lib.leank_ggml_weight_free(h)

    def __del__(self):
        if getattr(self, "_handles", None) is not None:
            self.close()


class Program:
    """Segments of ggml nodes (products, RMSNorm, SwiGLU, adds), each one ggml graph built and planned
    once and computed by `run(segment, ptrs)` as often as wanted: a decode step's products without a
    graph, a plan and a wake-up of ggml's workers per product (kernels/ggml_graph.c).

    Nodes are ints. Inputs and bound outputs are read from and written to `slots` caller pointers given
    at each run; constants are float32 vectors the program holds; everything else lives in memory the
    program owns, so a node of one segment can feed a later one (a bound output cannot)."""

    def __init__(self, max_nodes: int, max_segments: int, slots: int):
        lib = _loaded()
        if lib is None:
            raise RuntimeError(f"ggml unavailable: {unavailable_reason()}")
        self._lib, self.slots = lib, slots
        self._h = lib.leank_ggml_prog_new(max_nodes, max_segments, slots)
        if not self._h:
            raise RuntimeError("ggml program: no memory")
        self._held: list = []  # constants and matrices the program's nodes point into
        self.segments = 0

    def _node(self, i: int) -> int:
        if i < 0:
            raise ValueError("ggml program: node refused (shapes, a bound node read later, or out of room)")
        return i

    def input(self, slot: int, cols: int, rows: int) -> int:
        """A (rows, cols) contiguous float32 input read from the slot's pointer at each run."""
        return self._node(self._lib.leank_ggml_prog_input(self._h, slot, cols, rows))

    def input_i32(self, slot: int, n: int) -> int:
        """`n` int32 (positions) read from the slot's pointer at each run."""
        return self._node(self._lib.leank_ggml_prog_input_i32(self._h, slot, n))

    def reshape(self, x: int, *shape: int) -> int:
        """x (contiguous, not bound) seen as (rows, heads, head_dim) (torch order)."""
        rows, heads, d = shape
        return self._node(self._lib.leank_ggml_prog_reshape(self._h, x, d, heads, rows))

    def rope(self, x: int, positions: int, head_dim: int, neox: bool, freq_base: float, freq_scale: float = 1.0,
             ext_factor: float = 0.0, attn_factor: float = 1.0, beta_fast: float = 32.0, beta_slow: float = 1.0,
             n_ctx_orig: int = 0, freq_factors: torch.Tensor | None = None) -> int:
        """RoPE of x (rows, heads, head_dim) at `positions` (an int32 input, one a row), as llama.cpp
        computes it (ggml_rope_ext: angles in float32); neox pairs (i, i + d/2), else (2i, 2i + 1)."""
        ff = -1 if freq_factors is None else self.constant(freq_factors)
        return self._node(self._lib.leank_ggml_prog_rope(
            self._h, x, positions, ff, head_dim, 2 if neox else 0, n_ctx_orig, freq_base, freq_scale, ext_factor,
            attn_factor, beta_fast, beta_slow))

    def constant(self, v: torch.Tensor) -> int:
        v = v.detach().float().contiguous().reshape(-1)
        self._held.append(v)
        return self._node(self._lib.leank_ggml_prog_constant(self._h, v.data_ptr(), v.numel()))

    def matmul(self, m: Matrix, x: int) -> list[int]:
        """x times each part of `m` (transposed): one node per part, (rows of x, rows of the part)."""
        self._held.append(m)
        return [self._node(self._lib.leank_ggml_prog_mul_mat(self._h, h, x)) for h in m._handles]

    def rms_norm(self, x: int, weight: torch.Tensor, eps: float) -> int:
        return self._node(self._lib.leank_ggml_prog_rms_norm(self._h, x, self.constant(weight), eps))

    def add(self, a: int, b: int) -> int:
        return self._node(self._lib.leank_ggml_prog_add(self._h, a, b))

    def swiglu(self, gate: int, up: int) -> int:
        """silu(gate) * up."""
        return self._node(self._lib.leank_ggml_prog_swiglu(self._h, gate, up))

    def bind(self, node: int, slot: int, ld: int, col: int = 0) -> None:
        """Write `node` ((rows, n) or (rows, heads, head_dim)) at float32 column `col` of the slot's tensor,
        rows `ld` floats apart."""
        self._node(self._lib.leank_ggml_prog_bind(self._h, node, slot, 4 * col, ld))

    def end_segment(self) -> int:
        seg = self._node(self._lib.leank_ggml_prog_end_segment(self._h))
        self.segments = seg + 1
        return seg

    def finish(self) -> None:
        if self._lib.leank_ggml_prog_finish(self._h):
            raise RuntimeError("ggml program: could not be finished (no memory, or no segment)")

    def run(self, segment: int, ptrs, threads: int) -> None:
        """Compute `segment`; `ptrs`: a ctypes array of `slots` pointers (data_ptr()s)."""
        if self._lib.leank_ggml_prog_run(self._h, segment, ptrs, threads):
            raise RuntimeError("ggml program: a run was refused (a slot it uses is NULL, or ggml failed)")

    def pointers(self):
        """An empty ctypes array of `slots` pointers for `run`."""
        return (ctypes.c_void_p * self.slots)()

    def close(self) -> None:
        h, self._h = self._h, None
        if h:
            self._lib.leank_ggml_prog_free(h)

    def __del__(self):
        if getattr(self, "_h", None):
            self.close()


def matrix(parts: list[tuple[torch.Tensor, int]], k: int) -> Matrix | None:
    """A `Matrix` over `parts`, or None when ggml is unavailable or takes neither a part's type nor its
    layout (the caller then uses leank's own kernels)."""
    if _loaded() is None or len(parts) > 8 or any(t not in TYPES for _, t in parts):
        return None
    try:
        return Matrix(parts, k)
    except ValueError:
        return None


def matmul_path() -> str:
    """Which kernels multiply quantized matrices on a CPU, for `leank info`."""
    if available():
        return f"ggml's CPU matrix multiply (llama-cpp-python {version()}; activations quantized to 8 bits, as llama.cpp)"
    return f"leank's C kernels (float32 activations; ggml's unavailable: {unavailable_reason()})"
