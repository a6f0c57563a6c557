"""CPU kernels in C, compiled on first use with the system's C compiler and called through ctypes.

Torch on an AVX2 CPU runs a decode step as hundreds of small operations, each a pass over memory:
attending over 2-bit codes means expanding them to float32, scaling, then multiplying. The kernels in
`cpu_decode.c` do it in one pass. They are an accelerator, never a requirement: without a compiler
(or with LEANK_CPU_KERNELS=0) leank uses the torch reference (`leank.kernels.reference`), which
defines the results; the tests compare the two on random data.

The shared library is built once per source version, compiler and CPU into
`$LEANK_CACHE_DIR` (default `~/.cache/leank`) / cpu-kernels/, written to a temporary name and
renamed, so concurrent first runs never load a half-written file.
"""
from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import weakref
from pathlib import Path

import torch
from gguf.constants import GGMLQuantizationType

from leank.kernels import reference
from leank.kernels import quant
from leank.kernels.quant import packed_width

SOURCES = ("cpu_decode.c", "cpu_quant.c", "cpu_matmul.c")
HEADERS = ("cpu_common.h",)
HERE = Path(__file__).resolve().parent

_state: dict = {}


def switched_off(name: str) -> bool:
    """Whether environment switch `name` (on by default) is set to 0, no, off or false."""
    return os.environ.get(name, "1").strip().lower() in ("0", "no", "off", "false")


def cache_dir() -> Path:
    root = os.environ.get("LEANK_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "leank")
    return Path(root) / "cpu-kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU model and flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def _build(cc: str) -> Path:
    return build_library(cc, "leank-cpu", [HERE / s for s in SOURCES], [HERE / h for h in HEADERS])


# -march=native first; without it when the compiler refuses; plain -O3 last (no OpenMP: one thread)
# -fno-trapping-math lets the branch-free exp vectorize (no code here reads floating-point flags)
FLAG_SETS = (["-O3", "-fno-trapping-math", "-march=native", "-fopenmp"],
             ["-O3", "-fno-trapping-math", "-fopenmp"], ["-O3"])


def build_library(cc: str, name: str, sources: list[Path], headers: list[Path], compile_args: tuple[str, ...] = (),
                  link_args: tuple[str, ...] = (), flag_sets=FLAG_SETS, key_extra: str = "") -> Path:
    """Compile `sources` into `cache_dir()/name-KEY.so` (KEY: a hash of the sources, headers, compiler,
    CPU, flags and `key_extra`), unless that file exists; the first flag set that compiles wins.
    OpenMP links against the libgomp torch has already loaded (same soname), so both share one pool."""
    src = b"".join(f.read_bytes() for f in [*sources, *headers])
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(src + version.encode() + _cpu_signature().encode() + repr(flag_sets).encode()
                         + repr((compile_args, link_args)).encode() + key_extra.encode()).hexdigest()[:16]
    out = cache_dir() / f"{name}-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    if sys.stderr.isatty():  # a few seconds, once per machine: say so on a terminal, stay quiet in pipelines
        print(f"leank: building {name} (once, a few seconds)...", file=sys.stderr, flush=True)
    errors = []
    for flags in flag_sets:
        fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=out.parent)
        os.close(fd)
        cmd = [cc, *flags, "-std=c11", "-shared", "-fPIC", *compile_args, "-o", tmp, *map(str, sources), *link_args, "-lm"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if r.returncode == 0:
            os.replace(tmp, out)
            return out
        os.unlink(tmp)
        errors.append(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}")
    raise RuntimeError("; ".join(errors))


def _declare(lib: ctypes.CDLL) -> None:
    p, i, i64, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
    fn = lib.leank_attend_layer
    fn.restype = i
    fn.argtypes = [p, p, i, i, i, i, f,  # q, out, B, Hkv, R, D, scale
                   p, p, i, i64, i64, i64, i,  # full k, v, float16?, strides (sequence, head, token), F
                   i, i, i, i, p, i]  # M, G, k_bits, v_bits, heads table, threads
    fn = lib.leank_attend_chunk
    fn.restype = i
    fn.argtypes = [p, p, i, i, i, i, i, f,  # q, out, B, Hkv, R, T, D, scale
                   p, p, i, i64, i64, i64, i,  # full k, v, float16?, strides (sequence, head, token), F
                   i, i, i, i, p, i]  # M, G, k_bits, v_bits, heads table, threads
    fn = lib.leank_quantize_k
    fn.restype = i
    fn.argtypes = [p, i, i64, i64, i64, p, p, i64,  # src, float16?, strides (sequence, head, token), heads, channels, its row stride
                   i, i, i, i, i, i,  # B, H, n, C, bits, G
                   p, i64, i64, i64, p, p, i64, i64, i64]  # codes and strides, scale, min and strides
    fn = lib.leank_quantize_v
    fn.restype = i
    fn.argtypes = [p, i, i64, i64, i64, p,  # src, float16?, strides, heads
                   i, i, i, i, i, i,  # B, H, n, D, bits, G
                   p, i64, i64, i64, p, p, i64, i64, i64]
    fn = lib.leank_compact_layer
    fn.restype = i
    fn.argtypes = [p, p, i, i64, i64, i64, i, i, i,  # full k, v, float16?, strides, B, Hkv, D
                   i, i, i, i, i, i, i, p]  # S, n, keep, M0, G, k_bits, v_bits, heads table
    fn = lib.leank_qmatmul
    fn.restype = i
    fn.argtypes = [i, p, i64, i, i, p, i, p, i64, p, i]  # type, w, row bytes, N, K, x, T, y, ldy, bias, threads
    fn = lib.leank_dequantize_rows
    fn.restype = i
    fn.argtypes = [i, p, i64, i, i, p, i, p, i]  # type, w, row bytes, N, K, ids, n, out, threads
    fn = lib.leank_rms_norm
    fn.restype = None
    fn.argtypes = [p, p, f, i, i, p]  # x, w, eps, rows, dim, y
    fn = lib.leank_dequantize
    fn.restype = i
    fn.argtypes = [i, p, i64, i, i, p, i]  # type, w, row bytes, N, K, out, threads


def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (and `unavailable_reason()` says why)."""
    if "lib" in _state:
        return _state["lib"]
    lib, why = None, None
    if switched_off("LEANK_CPU_KERNELS"):
        why = "disabled by LEANK_CPU_KERNELS"
    elif (cc := _compiler()) is None:
        why = "no C compiler (cc, gcc or clang) found"
    else:
        try:
            lib = ctypes.CDLL(str(_build(cc)))
            _declare(lib)
        except Exception as e:  # a broken toolchain must not stop leank: fall back to torch
            lib, why = None, f"build failed: {e}"
    _state["lib"], _state["why"] = lib, why
    return lib


def unavailable_reason() -> str | None:
    library()
    return _state.get("why")


def _ptr(t: torch.Tensor, *index: int) -> int:
    """Address of element t[index] (leading indices; the rest zero)."""
    off = sum(i * s for i, s in zip(index, t.stride()))
    return t.data_ptr() + off * t.element_size()


def _supported(q, full_k, full_v, groups, middle_len, k_bits, v_bits, group, full_lens, middle_lens) -> bool:
    if q.device.type != "cpu" or q.shape[2] != 1 or full_lens is not None or middle_lens is not None:
        return False
    # K/V in float32, or float16 (the CPU cache's storage, `leank.runtime.cache.kv_dtype`): read as
    # float16, summed in float32
    if q.dtype != torch.float32 or full_k.dtype not in (torch.float32, torch.float16) or full_v.dtype != full_k.dtype:
        return False
    if full_k.stride() != full_v.stride() or full_k.stride(3) != 1:
        return False
    D, R = q.shape[3], q.shape[1] // full_k.shape[1]
    if R > 64 or D > 1024 or D % 8 or group % 8 or D % group or D // group > 64 or q.shape[0] * full_k.shape[1] > 4096:
        return False
    if middle_len:
        for g in groups:
            for t, bits in ((g.k, k_bits), (g.v, v_bits)):
                if t.stride(3) != 1 or (bits == 16 and t.dtype != full_k.dtype) or (bits < 16 and t.dtype != torch.uint8):
                    return False
            for t in (g.k_scale, g.k_min, g.v_scale, g.v_min):
                if t is not None and (t.dtype != torch.float16 or t.stride(3) != 1 or t.stride(2) != t.shape[3]):
                    return False
            if not g.channels.is_contiguous() or g.channels.dtype != torch.int64:
                return False
    return True


# fields of one (sequence, KV head) row of the table leank_attend_layer reads (see cpu_decode.c)
_FIELDS = 10
# id(a layer's first MiddleGroup) -> (weak reference to it, buffer addresses, table): the kernel's state
# kept here, not on the reference layout
_TABLES: dict = {}


def _heads_table(groups, B: int, Hkv: int, middle_len: int):
    """The per-head table of middle-region addresses. It is kept per layer (keyed by the layer's first
    group, dropped with it) and rebuilt only when a buffer moved (buffers grow geometrically: almost every
    decode step reuses it)."""
    if not middle_len or not groups:
        key = (B, Hkv)
        zeros = _state.setdefault("zeros", {})
        if key not in zeros:
            zeros[key] = (ctypes.c_int64 * (B * Hkv * _FIELDS))()
        return zeros[key]
    key = (B, Hkv) + tuple(t.data_ptr() if t is not None else 0
                           for g in groups for t in (g.k, g.v, g.k_scale, g.k_min, g.v_scale, g.v_min))
    first = groups[0]
    cached = _TABLES.get(id(first))
    if cached is not None and cached[0]() is first and cached[1] == key:
        return cached[2]
    rows = [[0] * _FIELDS for _ in range(B * Hkv)]
    for g in groups:
        c = g.channels.shape[1]
        for i, h in enumerate(g.heads.tolist()):
            for b in range(B):
                rows[b * Hkv + h] = [
                    _ptr(g.k, b, i), g.k.stride(2),
                    0 if g.k_scale is None else _ptr(g.k_scale, b, i),
                    0 if g.k_min is None else _ptr(g.k_min, b, i),
                    _ptr(g.channels, i), c,
                    _ptr(g.v, b, i), g.v.stride(2),
                    0 if g.v_scale is None else _ptr(g.v_scale, b, i),
                    0 if g.v_min is None else _ptr(g.v_min, b, i)]
    table = (ctypes.c_int64 * (B * Hkv * _FIELDS))(*(x for row in rows for x in row))
    if id(first) not in _TABLES:
        weakref.finalize(first, _TABLES.pop, id(first), None)
    _TABLES[id(first)] = (weakref.ref(first), key, table)
    return table


def compressed_attention(q: torch.Tensor, full_k: torch.Tensor, full_v: torch.Tensor, groups, middle_len: int,
                         k_bits: int, v_bits: int, group: int, scale: float | None = None,
                         full_lens: torch.Tensor | None = None, middle_lens: torch.Tensor | None = None) -> torch.Tensor:
    """`reference.compressed_attention`, one C call per layer for float32 decoding on CPU. Up to
    MULTI_QUERY_TOKENS query tokens (a chat turn after a compressed past) take one C call too
    (`leank_attend_chunk`): token i of T sees the whole middle region and the full region's first
    F - T + i + 1 tokens (the reference's causal rule), the codes expanded a tile at a time for a block
    of tokens, never into float32 K/V. Anything else (per-sequence lengths, other dtypes, longer chunks)
    goes to the reference."""
    lib = library()
    T = q.shape[2]
    one = q if T == 1 else q[:, :, :1]
    if (lib is None or T > MULTI_QUERY_TOKENS or T > full_k.shape[2]
            or not _supported(one, full_k, full_v, groups, middle_len, k_bits, v_bits, group, full_lens, middle_lens)):
        return reference.compressed_attention(q, full_k, full_v, groups, middle_len, k_bits, v_bits, group, scale,
                                              full_lens, middle_lens)
    out = torch.empty(q.shape, dtype=torch.float32)
    _attend(lib, q, full_k, full_v, groups, middle_len, k_bits, v_bits, group, scale, out)
    return out


# query tokens compressed_attention takes to the C kernel in one call: the runtime's QUERY_CHUNK
# (`leank.runtime.cache.base`), so a prompt pasted into a later turn goes through C a chunk a call
MULTI_QUERY_TOKENS = 1024


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor | None:
    """One decode step of plain (dense) attention, q (B, Hq, 1, D) over k, v (B, Hkv, S, D), in C; None when
    the kernels cannot take it (the caller then uses torch)."""
    if q.device.type != "cpu" or (lib := library()) is None:  # never build CPU kernels for a GPU run
        return None
    # no middle region: the group size only has to divide D (checked like any other)
    if not _supported(q, k, v, [], 0, 16, 16, 8, None, None):
        return None
    out = torch.empty(q.shape, dtype=torch.float32)
    _attend(lib, q, k, v, [], 0, 16, 16, 8, scale, out)
    return out


def _attend(lib, q, full_k, full_v, groups, middle_len, k_bits, v_bits, group, scale, out, threads=None) -> None:
    """Write the attention of the T query tokens q (B, Hq, T, D), the full region's last T tokens, into `out`
    (same shape, float32, contiguous): `leank_attend_layer` for one token, `leank_attend_chunk` for more."""
    B, Hq, T, D = q.shape
    Hkv, F = full_k.shape[1], full_k.shape[2]
    R = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qc = q.contiguous()  # (B, Hkv, R, T, D) in memory: query head h reads KV head h // R
    if not (out.is_contiguous() and out.dtype == torch.float32 and out.shape == q.shape):
        raise ValueError("out must be a contiguous float32 tensor shaped like q")
    table = _heads_table(groups, B, Hkv, middle_len)
    sb, sh, st, _ = full_k.stride()
    cache = (full_k.data_ptr(), full_v.data_ptr(), int(full_k.dtype == torch.float16), sb, sh, st, F, middle_len, group,
             k_bits, v_bits, table, torch.get_num_threads() if threads is None else threads)
    if T == 1:
        rc, name = lib.leank_attend_layer(qc.data_ptr(), out.data_ptr(), B, Hkv, R, D, scale, *cache), "leank_attend_layer"
    else:
        rc, name = lib.leank_attend_chunk(qc.data_ptr(), out.data_ptr(), B, Hkv, R, T, D, scale, *cache), "leank_attend_chunk"
    if rc != 0:
        raise RuntimeError(f"{name} rejected its arguments (B={B}, Hkv={Hkv}, R={R}, T={T}, D={D}, G={group})")


# --- KIVI quantization (cpu_quant.c), bit for bit quant.py ------------------------------------------------
def _quant_source(x: torch.Tensor):
    if x.dtype not in (torch.float32, torch.float16) or x.dim() != 4 or x.stride(3) != 1:
        raise ValueError("the C quantizer reads (B, H, T, D) float32 or float16 rows with unit channel stride")
    return x.data_ptr(), int(x.dtype == torch.float16), *x.stride()[:3]


def _check_out(t: torch.Tensor, dtype: torch.dtype, shape: tuple) -> None:
    if t.dtype != dtype or tuple(t.shape) != shape or t.stride(3) != 1:
        raise ValueError(f"quantizer output must be {dtype} {shape} with unit last stride, got {t.dtype} {tuple(t.shape)}")


def quantize_k_into(src: torch.Tensor, bits: int, group: int, codes: torch.Tensor, scale: torch.Tensor,
                    mn: torch.Tensor, heads: torch.Tensor | None = None, channels: torch.Tensor | None = None) -> None:
    """`quant.quantize_k` of src[:, heads][..., channels] (src (B, Hs, T, D); heads (H,) and channels (H, C)
    int64, or None for all) written into codes (B, H, T, w), scale and mn (B, H, T/group, C): views of a
    middle group's buffers, so moving tokens into the middle region copies nothing else."""
    lib = library()
    p, half, ssb, ssh, sst = _quant_source(src)
    B, T = src.shape[0], src.shape[2]
    H = src.shape[1] if heads is None else heads.numel()
    C = src.shape[3] if channels is None else channels.shape[1]
    _check_out(codes, torch.uint8, (B, H, T, packed_width(C, bits)))
    for t in (scale, mn):
        _check_out(t, torch.float16, (B, H, T // group, C))
    if scale.stride() != mn.stride():
        raise ValueError("scale and mn must share strides")
    for t in (heads, channels):
        if t is not None and (t.dtype != torch.int64 or not t.is_contiguous()):
            raise ValueError("heads and channels must be contiguous int64")
    rc = lib.leank_quantize_k(p, half, ssb, ssh, sst, 0 if heads is None else heads.data_ptr(),
                              0 if channels is None else channels.data_ptr(), C, B, H, T, C, bits, group,
                              codes.data_ptr(), *codes.stride()[:3], scale.data_ptr(), mn.data_ptr(), *scale.stride()[:3])
    if rc != 0:
        raise RuntimeError(f"leank_quantize_k rejected its arguments (T={T}, C={C}, bits={bits}, group={group})")


def quantize_v_into(src: torch.Tensor, bits: int, group: int, codes: torch.Tensor, scale: torch.Tensor,
                    mn: torch.Tensor, heads: torch.Tensor | None = None) -> None:
    """`quant.quantize_v` of src[:, heads] (src (B, Hs, T, D)) written into codes (B, H, T, w), scale and mn
    (B, H, T, D/group)."""
    lib = library()
    p, half, ssb, ssh, sst = _quant_source(src)
    B, T, D = src.shape[0], src.shape[2], src.shape[3]
    H = src.shape[1] if heads is None else heads.numel()
    _check_out(codes, torch.uint8, (B, H, T, packed_width(D, bits)))
    for t in (scale, mn):
        _check_out(t, torch.float16, (B, H, T, D // group))
    if scale.stride() != mn.stride():
        raise ValueError("scale and mn must share strides")
    if heads is not None and (heads.dtype != torch.int64 or not heads.is_contiguous()):
        raise ValueError("heads must be contiguous int64")
    rc = lib.leank_quantize_v(p, half, ssb, ssh, sst, 0 if heads is None else heads.data_ptr(), B, H, T, D, bits, group,
                              codes.data_ptr(), *codes.stride()[:3], scale.data_ptr(), mn.data_ptr(), *scale.stride()[:3])
    if rc != 0:
        raise RuntimeError(f"leank_quantize_v rejected its arguments (T={T}, D={D}, bits={bits}, group={group})")


def compact_layer(full_k: torch.Tensor, full_v: torch.Tensor, sink: int, n: int, keep: int, groups, middle_len: int,
                  k_bits: int, v_bits: int, group: int) -> bool:
    """One layer's move into the middle region in one C call (`CompressedCache._compact`): the full region's
    tokens [sink, sink + n) of every head into middle tokens [middle_len, middle_len + n) of its group (buffers
    already grown, contiguous as the cache makes them), then tokens [sink + n, sink + n + keep) down to `sink`.
    full_k, full_v: the layer's whole buffers (B, Hkv, cap, D). False, and nothing done, where the C kernel
    does not take it (the caller then uses torch)."""
    if (full_k.dtype not in (torch.float32, torch.float16) or full_v.dtype != full_k.dtype or full_k.stride() != full_v.stride()
            or full_k.stride(3) != 1 or full_k.shape[3] > 1024 or (lib := library()) is None):
        return False
    for g in groups:
        for t in (g.k, g.v, g.k_scale, g.k_min, g.v_scale, g.v_min):
            if t is not None and not t.is_contiguous():
                return False
        if (k_bits == 16 and g.k.dtype != full_k.dtype) or (v_bits == 16 and g.v.dtype != full_k.dtype):
            return False
        if not g.channels.is_contiguous() or g.channels.dtype != torch.int64:
            return False
    B, Hkv, _, D = full_k.shape
    table = _heads_table(groups, B, Hkv, middle_len + n)
    sb, sh, st, _ = full_k.stride()
    rc = lib.leank_compact_layer(full_k.data_ptr(), full_v.data_ptr(), int(full_k.dtype == torch.float16), sb, sh, st,
                                 B, Hkv, D, sink, n, keep, middle_len, group, k_bits, v_bits, table)
    if rc != 0:
        raise RuntimeError(f"leank_compact_layer rejected its arguments (n={n}, middle={middle_len}, G={group})")
    return True


def _as_planes(x: torch.Tensor) -> torch.Tensor:
    """(..., T, C) -> (B, H, T, C), B and H the leading dimensions flattened (1 where there are none)."""
    if x.dim() >= 4:
        return x.reshape(-1, 1, *x.shape[-2:]) if x.dim() > 4 else x
    return x.reshape(*([1] * (4 - x.dim())), *x.shape)


def _quantized(x: torch.Tensor, bits: int, group: int, grouped: int, into, reference):
    """`reference(x, bits, group)` (quant.quantize_k or _v) in C, bit for bit, x (..., T, C) float32 or
    float16 on CPU; `grouped`: the axis the scales group (-2: tokens, K; -1: channels, V); `into`: the C
    writer. Anything else goes to `reference`."""
    *lead, T, C = x.shape
    if (x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float16) or bits not in quant.PACKABLE_BITS
            or x.shape[grouped] % group or not 0 < C <= 1024 or library() is None):
        return reference(x, bits, group)
    planes = _as_planes(x.contiguous())
    B, H = planes.shape[:2]
    tail = (T // group, C) if grouped == -2 else (T, C // group)
    codes = torch.empty(B, H, T, packed_width(C, bits), dtype=torch.uint8)
    scale = torch.empty(B, H, *tail, dtype=torch.float16)
    mn = torch.empty_like(scale)
    into(planes, bits, group, codes, scale, mn)
    return codes.view(*lead, T, -1), scale.view(*lead, *tail), mn.view(*lead, *tail)


def quantize_k(k: torch.Tensor, bits: int, group: int):
    """`quant.quantize_k` in C: K (..., T, C) -> (codes, scale, min), scales over groups of tokens."""
    return _quantized(k, bits, group, -2, quantize_k_into, quant.quantize_k)


def quantize_v(v: torch.Tensor, bits: int, group: int):
    """`quant.quantize_v` in C: V (..., T, D) -> (codes, scale, min), scales over groups of channels."""
    return _quantized(v, bits, group, -1, quantize_v_into, quant.quantize_v)


# --- matrices in GGUF's quantized blocks -------------------------------------------------------------
# GGML type id -> name, for the block types cpu_matmul.c decodes (ggml's layouts); ids from gguf-py
BLOCK_TYPES = {int(GGMLQuantizationType[name]): name
               for name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")}


def dequantize(blocks: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    """The whole matrix as float32 (N, K)."""
    lib = library()
    out = torch.empty(blocks.shape[0], k, dtype=torch.float32)
    if lib.leank_dequantize(qtype, blocks.data_ptr(), blocks.shape[1], blocks.shape[0], k, out.data_ptr(),
                            torch.get_num_threads()):
        raise RuntimeError("leank_dequantize rejected its arguments")
    return out


def dequantize_rows(blocks: torch.Tensor, qtype: int, k: int, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` (any shape, int64) as float32 (*ids.shape, K); IndexError for an id out of range."""
    lib = library()
    flat = ids.reshape(-1).to(torch.int64).contiguous()
    out = torch.empty(flat.numel(), k, dtype=torch.float32)
    if lib.leank_dequantize_rows(qtype, blocks.data_ptr(), blocks.shape[1], blocks.shape[0], k, flat.data_ptr(),
                                 flat.numel(), out.data_ptr(), torch.get_num_threads()):
        bad = next(i for i in flat.tolist() if not 0 <= i < blocks.shape[0])  # the only argument callers pass unchecked
        raise IndexError(f"token id {bad} is out of range for a vocabulary of {blocks.shape[0]}")
    return out.view(*ids.shape, k)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """RMSNorm over the last dimension for small float32 CPU inputs (a decode step), or None when the
    caller should use torch (no kernels, other dtypes or devices, or a large input torch does well)."""
    if (x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32
            or x.numel() > 65536 or not weight.is_contiguous() or (lib := library()) is None):
        return None
    x = x.contiguous()
    y = torch.empty_like(x)
    dim = x.shape[-1]
    lib.leank_rms_norm(x.data_ptr(), weight.data_ptr(), eps, x.numel() // dim, dim, y.data_ptr())
    return y
