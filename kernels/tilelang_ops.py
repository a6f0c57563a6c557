"""The CUDA path of the cache's hot operations: TileLang kernels behind the reference's signatures.

`ops()` is what `leank.kernels.dispatch` returns on a CUDA device when TileLang is installed:
- `compressed_attention`: decode (T == 1) over the compressed cache with `tl_decode`'s kernels: one
  launch for the full region (every KV head), one per head group for the middle region, one to merge;
  anything else (T > 1, float32, shapes the kernels do not cover) goes to the torch reference;
- `quantize_k`, `quantize_v`: `tl_quant`'s kernels, bit-identical to `leank.kernels.quant`.

Kernels are compiled once per configuration (bits, head_dim, kept channels, group size, dtype, GQA
ratio), never per length or batch: lengths, capacities, batch and split counts are symbolic. Compiled
kernels are kept in this process (`_KERNELS`) and on disk by TileLang's own cache
(`TILELANG_CACHE_DIR`, default ~/.tilelang/cache), so a second process loads them instead of compiling.
TileLang is imported only by this module and the `tl_*` modules it imports, only on the CUDA path.
"""
from __future__ import annotations

import math
import multiprocessing as mp
import os
from types import SimpleNamespace

import torch

from leank.kernels import gguf_cuda, quant, reference

LOG2E = 1.4426950408889634
_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
# Blocks each decode launch aims for, per streaming multiprocessor: enough splits along the tokens to
# fill the card when batch x heads is small, few when it is large (each split costs a partial output).
# LEANK_TL_BLOCKS_PER_SM overrides it (for tuning).
BLOCKS_PER_SM = 8
FULL_BLOCK = 64  # tokens per tile in the full region
# At most ceil(tiles / MIN_TILES) splits (`_splits`): at batch 1 / 32K on an H200, LeanK+KIVI-2 took
# 0.0390 ms with one-tile splits, 0.0343 with 2, 0.0438 with 4 (LeanK fp16: 0.048-0.050 whatever the value).
MIN_TILES = 2
WAVE_FILL = 0.9  # least fill of a launch's last wave of blocks that `_splits` aims for
# Wave-aware split counts (`_splits`; LEANK_TL_WAVES=0 turns them off). Alone they took LeanK fp16 at batch
# 1 / 32K from 0.083 to 0.097 ms (one-tile splits: twice the partials to merge); with the MIN_TILES floor
# batch 1 is unchanged and batch 64 gains: LeanK fp16 1.385 -> 1.273 ms, LeanK+KIVI-4 1.291 -> 1.266 on an
# H200 (2026-12-02, bench/KERNEL_NOTES.md).
WAVES = True


# Decode kernel tuning; see bench/KERNEL_NOTES.md for how these were chosen.
# Middle region, for unquantized (bits 16) and quantized K/V: (tokens per tile, threads, pipeline
# stages, minimum resident blocks per SM: caps registers so that more blocks hide memory latency,
# register prefetch of the next tile: 0/1; quantized: fast-unpacked K and V only).
MIDDLE_TUNING = {False: (64, 128, 0, 4, 1), True: (128, 128, 0, 4, 1)}
# Quantized heads that keep at least WIDE_K channels use WIDE_K_TILE-token tiles: on an H200 (2026-12-02,
# 32K) KIVI-2 without a mask (c = 128) took 2.52 -> 2.28 ms at batch 64, 0.368 -> 0.330 at batch 8 and
# 0.059 -> 0.053 at batch 1 with 64-token tiles, while the pruned heads (c = 32, 64) were 7-27 % slower.
WIDE_K, WIDE_K_TILE = 128, 64
FULL_MIN_BLOCKS = 4
# KIVI codes unpack through the magic-number trick (no int -> float conversions; `tl_decode.middle_decode`'s
# `fast`) where the configuration allows it. LEANK_TL_FAST=0 selects the first version's unpacking.
FAST_UNPACK = True


def middle_tuning(k_bits: int, v_bits: int, group: int, n_channels: int = 0) -> tuple:
    """(tokens per tile, threads, stages, min blocks per SM, prefetch) of the middle kernel for heads that
    keep `n_channels` K channels. Tiles hold whole K scale rows (a multiple of the group size).
    LEANK_TL_MIDDLE / LEANK_TL_MIDDLE16="tile,threads,stages,min_blocks[,prefetch]" override the quantized /
    unquantized entry for every kept count (for tuning)."""
    quantized = min(k_bits, v_bits) < 16
    tile, threads, stages, min_blocks, prefetch = MIDDLE_TUNING[quantized]
    if quantized and n_channels >= WIDE_K:
        tile = WIDE_K_TILE
    env = os.environ.get("LEANK_TL_MIDDLE" if quantized else "LEANK_TL_MIDDLE16")
    if env:
        tile, threads, stages, min_blocks, prefetch = ([int(x) for x in env.split(",")] + [0])[:5]
    return math.ceil(max(tile, group) / group) * group, threads, stages, min_blocks, bool(prefetch)


def full_min_blocks() -> int:
    return int(os.environ.get("LEANK_TL_FULL", FULL_MIN_BLOCKS))


def fast_unpack() -> bool:
    return os.environ.get("LEANK_TL_FAST", "1" if FAST_UNPACK else "0") != "0"


_FAST: dict = {}


def _fast_codes(head_dim: int, n_channels: int, k_bits: int, v_bits: int, group: int, dtype: str) -> tuple:
    """(K, V): whether the middle kernel takes those codes as int32 words (fast unpack)."""
    key = (head_dim, n_channels, k_bits, v_bits, group, dtype)
    if key not in _FAST:
        from leank.kernels import tl_decode  # imports TileLang: only on the CUDA path (module docstring)

        _FAST[key] = tl_decode.fast_codes(*key)
    return _FAST[key]


def _empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Every buffer a kernel writes comes from here (tests poison them to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


_KERNELS: dict = {}
_SM_COUNT: dict = {}
_DUMMY: dict = {}


def _target():
    """TileLang target: the current device ("auto"), or LEANK_TL_ARCH=sm_90 to compile without a GPU."""
    arch = os.environ.get("LEANK_TL_ARCH")
    return {"kind": "cuda", "arch": arch} if arch else "auto"


def build(spec: tuple):
    """The prim_func of a kernel spec (kind, *configuration), named after its kind (and block type) so that
    profiles tell the kernels apart (`leank_gemv_Q4_K_kernel`, `leank_middle_kernel`, ...)."""
    kind, *cfg = spec
    name = f"leank_{kind}_{cfg[0]}" if kind in ("gemv", "gemv1", "dequant") else f"leank_{kind}"
    return _build(kind, cfg).with_attr("global_symbol", name)


def _build(kind: str, cfg: list):
    from leank.kernels import tl_decode, tl_gemv, tl_quant  # import TileLang, as above

    if kind == "full":
        return tl_decode.full_decode(*cfg)
    if kind == "middle":
        return tl_decode.middle_decode(*cfg)
    if kind == "combine":
        return tl_decode.combine(*cfg)
    if kind == "quantize_k":
        return tl_quant.quantize_k(*cfg)
    if kind == "quantize_v":
        return tl_quant.quantize_v(*cfg)
    if kind == "gemv":
        return tl_gemv.gemv(*cfg)
    if kind == "gemv1":
        return tl_gemv.gemv1(*cfg)
    if kind == "dequant":
        return tl_gemv.dequantize(*cfg)
    if kind == "quantize_x":
        return tl_gemv.quantize_x(*cfg)
    if kind == "rmsnorm_qx":
        return tl_gemv.rmsnorm_qx(*cfg)
    if kind == "silu_mul_qx":
        return tl_gemv.silu_mul_qx(*cfg)
    if kind == "rope_qk":
        return tl_gemv.rope_qk(*cfg)
    raise ValueError(f"unknown kernel kind {kind!r}")


def kernel(spec: tuple):
    """The compiled kernel of `spec`, from this process, TileLang's disk cache, or a fresh compile."""
    k = _KERNELS.get(spec)
    if k is None:
        import tilelang  # optional: the CUDA path only

        k = _KERNELS[spec] = tilelang.compile(build(spec), target=_target(), execution_backend="tvm_ffi")
    return k


def _compile_some(specs: list) -> list:
    """Compile `specs` here; returns (spec, error message) for those that fail."""
    failed = []
    for spec in specs:
        try:
            kernel(spec)
        except Exception as e:  # noqa: BLE001 - reported by precompile; the spec's caller gets the error
            failed.append((spec, f"{type(e).__name__}: {str(e)[-2000:]}"))
    return failed


def precompile(specs, workers: int | None = None) -> list:
    """Compile `specs` into TileLang's disk cache with several processes (nvcc is single-threaded),
    then load them here. Returns (spec, error) for the specs that failed to compile."""
    specs = [s for s in dict.fromkeys(specs) if s not in _KERNELS]
    workers = min(workers or max(1, (os.cpu_count() or 2) - 2), len(specs))
    failed = []
    if workers > 1:
        chunks = [specs[i::workers] for i in range(workers)]
        with mp.get_context("spawn").Pool(workers) as pool:
            failed = [f for part in pool.map(_compile_some, chunks) for f in part]
    bad = {spec for spec, _ in failed}
    failed += _compile_some([s for s in specs if s not in bad])
    for spec, err in failed:
        print(f"leank: TileLang kernel {spec} failed to compile: {err}")
    return failed


# --- quantize ------------------------------------------------------------------------------------------
def _quant_supported(x: torch.Tensor, bits: int) -> bool:
    return x.is_cuda and x.dtype in _DTYPES and bits in quant.PACKABLE_BITS and x.dim() >= 2


def quantize_k(k: torch.Tensor, bits: int, group: int):
    """As `leank.kernels.quant.quantize_k`, on the GPU."""
    *lead, T, C = k.shape
    if not _quant_supported(k, bits) or T % group:
        return quant.quantize_k(k, bits, group)
    x = k.reshape(-1, T, C).contiguous()
    L = x.shape[0]
    packed = _empty((L, T, quant.packed_width(C, bits)), torch.uint8, k.device)
    scale = _empty((L, T // group, C), torch.float16, k.device)
    mn = _empty((L, T // group, C), torch.float16, k.device)
    if L and T:
        kernel(("quantize_k", C, bits, group, _DTYPES[k.dtype]))(x, packed, scale, mn)
    return packed.view(*lead, T, -1), scale.view(*lead, T // group, C), mn.view(*lead, T // group, C)


def quantize_v(v: torch.Tensor, bits: int, group: int):
    """As `leank.kernels.quant.quantize_v`, on the GPU."""
    *lead, T, D = v.shape
    if not _quant_supported(v, bits) or D % group:
        return quant.quantize_v(v, bits, group)
    x = v.reshape(-1, T, D).contiguous()
    L = x.shape[0]
    packed = _empty((L, T, quant.packed_width(D, bits)), torch.uint8, v.device)
    scale = _empty((L, T, D // group), torch.float16, v.device)
    mn = _empty((L, T, D // group), torch.float16, v.device)
    if L and T:
        kernel(("quantize_v", D, bits, group, _DTYPES[v.dtype]))(x, packed, scale, mn)
    return packed.view(*lead, T, -1), scale.view(*lead, T, D // group), mn.view(*lead, T, D // group)


# --- decode attention ------------------------------------------------------------------------------------
def _sm_count(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _dummy(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A placeholder for parameters a configuration does not read (lengths, scales at 16 bits)."""
    key = (device, dtype)
    if key not in _DUMMY:
        _DUMMY[key] = torch.zeros(1, 1, 1, 1, dtype=dtype, device=device)
    return _DUMMY[key]


def _capacity_view(x: torch.Tensor) -> torch.Tensor:
    """A contiguous (B, H, cap, D) view of the buffer that x = buf[:, :, :n] was sliced from (the cache
    passes its full region that way), so the kernel reads it in place; a copy if x is anything else."""
    if x.is_contiguous():
        return x
    B, H, _, D = x.shape
    s0, s1, s2, s3 = x.stride()
    if s3 == 1 and s2 == D and s1 % D == 0 and s0 == H * s1:
        cap = s1 // D
        need = (x.storage_offset() + B * s0) * x.element_size()
        if x.untyped_storage().nbytes() >= need:
            return x.as_strided((B, H, cap, D), (s0, s1, s2, s3))
    return x.contiguous()


def _splits(length: int, rows: int, block: int, sm_count: int, resident: int = 0) -> tuple[int, int]:
    """(number of splits, least tokens per split) for `length` tokens and `rows` (batch x heads) blocks.

    The count aims at BLOCKS_PER_SM blocks per SM, but at most ceil(tiles / MIN_TILES) splits: at batch 1
    the aim alone gave one-tile splits whose merge cost more than their parallelism gained. With WAVES
    (LEANK_TL_WAVES=1) and `resident` blocks per SM (the kernel's min-blocks cap), the count may grow by
    up to half so that the last wave of blocks is at least WAVE_FILL full (blocks of a launch take about
    equally long: 5 splits of 256 rows on 4 x 132 slots leave the third wave 42 % full, 6 fill it to
    97 %). The kernels cut each sequence's chunks from its own length and these two numbers
    (`tl_decode._split_range`)."""
    min_tiles = max(1, int(os.environ.get("LEANK_TL_MIN_TILES", MIN_TILES)))
    if length <= 0:
        return 1, min_tiles * block
    per_sm = int(os.environ.get("LEANK_TL_BLOCKS_PER_SM", BLOCKS_PER_SM))
    tiles = math.ceil(length / block)
    most = math.ceil(tiles / min_tiles)  # as the kernel's cap: ceil(n / (min_tiles * block))
    want = min(max(1, math.ceil(per_sm * sm_count / max(rows, 1))), most)

    def used(n: int) -> int:  # non-empty splits of n, as the kernel cuts them
        return math.ceil(length / (math.ceil(math.ceil(length / n) / block) * block))

    n = used(want)
    if resident > 0 and os.environ.get("LEANK_TL_WAVES", "1" if WAVES else "0") != "0":
        slots = resident * sm_count
        for cand in range(want, min(most, math.ceil(1.5 * want)) + 1):
            nc = used(cand)
            if rows * nc >= WAVE_FILL * math.ceil(rows * nc / slots) * slots:
                n = nc
                break
    return n, min_tiles * block


def _words(codes: torch.Tensor) -> torch.Tensor | None:
    """uint8 codes (..., w) as int32 words (..., w / 4), or None where the view is impossible."""
    try:
        return codes.view(torch.int32)
    except RuntimeError:
        return None


def decode_supported(q, full_k, groups, k_bits, v_bits, group) -> bool:
    """Whether the kernels cover this call (else the reference runs)."""
    B, Hq, T, D = q.shape
    Hkv = full_k.shape[1]
    if T != 1 or not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16) or full_k.dtype != q.dtype:
        return False
    if Hq % Hkv or Hq // Hkv > 16 or D % 16 or D > 256:
        return False
    if (k_bits < 16 or v_bits < 16) and (group < 1 or D % group):
        return False
    for g in groups:
        if k_bits == 16 and g.k.dtype != q.dtype or v_bits == 16 and g.v.dtype != q.dtype:
            return False
    return True


def compressed_attention(q: torch.Tensor, full_k: torch.Tensor, full_v: torch.Tensor, groups: list, middle_len: int,
                         k_bits: int, v_bits: int, group: int, scale: float | None = None,
                         full_lens: torch.Tensor | None = None, middle_lens: torch.Tensor | None = None) -> torch.Tensor:
    """As `leank.kernels.reference.compressed_attention`; decode (T == 1) runs on TileLang kernels.

    Inside a CUDA graph (one capture replayed at every length): pass the full region's capacity buffers
    as `full_k`/`full_v`, the middle capacity as `middle_len`, and the lengths as device tensors
    `full_lens`/`middle_lens` (updated in place between replays). Everything decided on the host (split
    counts, workspace shapes, kernel choice) then depends on shapes and capacities only; the kernels read
    each sequence's lengths and cut its chunks themselves (`tl_decode._split_range`)."""
    if not decode_supported(q, full_k, groups, k_bits, v_bits, group):
        return reference.compressed_attention(q, full_k, full_v, groups, middle_len, k_bits, v_bits, group, scale,
                                              full_lens, middle_lens)
    B, Hq, _, D = q.shape
    Hkv = full_k.shape[1]
    R = Hq // Hkv
    dt = _DTYPES[q.dtype]
    dev = q.device
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    sl2 = float(scale * LOG2E)
    sms = _sm_count(dev)
    qf = q.reshape(B, Hq, D).contiguous()
    fk, fv = _capacity_view(full_k), _capacity_view(full_v)
    F = full_k.shape[2]
    lens_dummy = _dummy(dev, torch.int32).view(1)
    f_lens = full_lens.to(device=dev, dtype=torch.int32).contiguous() if full_lens is not None else lens_dummy
    m_lens = middle_lens.to(device=dev, dtype=torch.int32).contiguous() if middle_lens is not None else lens_dummy

    n_full, min_full = _splits(F, B * Hkv, FULL_BLOCK, sms, full_min_blocks())
    mid = []
    if middle_len > 0:
        for g in groups:
            tuning = middle_tuning(k_bits, v_bits, group, g.channels.shape[1])
            mid.append((g, *_splits(middle_len, B * g.heads.shape[0], tuning[0], sms, tuning[3]), tuning))
    n_mid = max((m[1] for m in mid), default=0)
    S = n_full + n_mid
    o_part = _empty((B, Hq, S, D), torch.float32, dev)
    lse_part = _empty((B, Hq, S), torch.float32, dev)
    out = _empty((B, Hq, D), q.dtype, dev)

    kernel(("full", D, R, dt, full_lens is not None, FULL_BLOCK, 128, full_min_blocks()))(
        qf, fk, fv, f_lens, o_part, lse_part, F, n_full, min_full, sl2)
    f16_dummy = _dummy(dev, torch.float16)
    for g, n, min_chunk, tuning in mid:
        c = g.channels.shape[1]
        ks, km = (g.k_scale, g.k_min) if k_bits < 16 else (f16_dummy, f16_dummy)
        vs, vm = (g.v_scale, g.v_min) if v_bits < 16 else (f16_dummy, f16_dummy)
        fast = fast_unpack() and tuning[2] == 0
        kf, vf = _fast_codes(D, c, k_bits, v_bits, group, dt) if fast else (False, False)
        gk, gv = _words(g.k) if kf else g.k, _words(g.v) if vf else g.v  # fast unpack: 32-bit words
        use_fast = fast and gk is not None and gv is not None
        if not use_fast:
            gk, gv = g.k, g.v
        spec = ("middle", D, R, dt, c, k_bits, v_bits, group, middle_lens is not None, *tuning, use_fast)
        kernel(spec)(qf, g.heads, g.channels, gk, ks, km, gv, vs, vm, m_lens, o_part, lse_part, middle_len, n,
                     min_chunk, n_full, sl2)
    kernel(("combine", D, dt))(o_part, lse_part, out)
    return out.view(B, Hq, 1, D)


def decode_specs(head_dim: int, gqa: int, dtype: torch.dtype, kept_counts, k_bits: int, v_bits: int, group: int,
                 per_sequence_lengths: bool = False) -> list[tuple]:
    """The kernel specs one decode configuration uses (for `precompile`)."""
    dt = _DTYPES[dtype]
    specs = [("full", head_dim, gqa, dt, per_sequence_lengths, FULL_BLOCK, 128, full_min_blocks()),
             ("combine", head_dim, dt)]
    for c in sorted(set(int(c) for c in kept_counts if c > 0)):
        tuning = middle_tuning(k_bits, v_bits, group, c)
        specs.append(("middle", head_dim, gqa, dt, c, k_bits, v_bits, group, per_sequence_lengths, *tuning,
                      fast_unpack() and tuning[2] == 0))
    return specs


def quantize_specs(n_channels: int, bits: int, group: int, dtype: torch.dtype, kind: str) -> tuple:
    return (kind, n_channels, bits, group, _DTYPES[dtype])


# --- matrices in GGUF blocks -----------------------------------------------------------------------------
# Rows of activations up to which `gemv` decodes the blocks in registers once per row; more rows multiply
# a decoded slice of the matrix (`dequantize`) with cuBLAS. Two compilations per type and dtype: one row
# (a decode step) and up to GEMV_ROWS.
GEMV_ROWS = 8
# Weight rows per warp of the one-row gemv (`tl_gemv.gemv1`): the activations' loads shared by that many rows.
GEMV_RPW = 2


def quantize_x(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) float16/bfloat16, contiguous, 16-byte aligned, K a multiple of 32 -> (xq (M, K) int8,
    xd (M, K / 32) float32): the 8-bit activations `gemv` multiplies."""
    M, K = x.shape
    xq = _empty((M, K), torch.int8, x.device)
    xd = _empty((M, K // 32), torch.float32, x.device)
    kernel(("quantize_x", _DTYPES[x.dtype]))(x, xq, xd)
    return xq, xd


def gemv(blocks: torch.Tensor, type_name: str, xq: torch.Tensor, xd: torch.Tensor, y: torch.Tensor, col0: int = 0,
         add: torch.Tensor | None = None) -> None:
    """y[:, col0 : col0 + N] = x @ W^T (+ add[:, col0 : col0 + N]) for W = `blocks` ((N, row bytes) uint8 on
    the GPU, GGUF type `type_name`) and x as `quantize_x` gives it (M <= GEMV_ROWS rows); y (M, >= col0 + N)
    contiguous, float16 or bfloat16; other columns of y are left as they are. `add`: a residual shaped as y,
    or a bias (NY,) added to every row; it may be y itself."""
    m = xq.shape[0]
    if add is None:
        r, ldr, flag = y, 0, 0
    elif add.dim() == 1:
        r, ldr, flag = add.view(1, -1), 0, 1
    else:
        r, ldr, flag = add, add.shape[1], 1
    if m == 1:  # a decode step of one sequence: several weight rows per warp
        kernel(("gemv1", type_name, _DTYPES[y.dtype], gemv_rows_per_warp()))(blocks, xq, xd, y, r, col0, flag)
        return
    kernel(("gemv", type_name, _DTYPES[y.dtype], GEMV_ROWS))(blocks, xq, xd, y, r, m, col0, ldr, flag)


def gemv_rows_per_warp() -> int:
    """Weight rows per warp of the one-row gemv (GEMV_RPW; LEANK_TL_GEMV_RPW overrides it, for tuning)."""
    return int(os.environ.get("LEANK_TL_GEMV_RPW", GEMV_RPW))


def rmsnorm_qx(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_x(RMSNorm(x) * weight) in one kernel: x (M, K) float16/bfloat16 contiguous, weight (K,)
    float32; the norm rounded to x's dtype before it is quantized, as the unfused ops round."""
    M, K = x.shape
    xq = _empty((M, K), torch.int8, x.device)
    xd = _empty((M, K // 32), torch.float32, x.device)
    kernel(("rmsnorm_qx", _DTYPES[x.dtype]))(x, weight, xq, xd, eps)
    return xq, xd


def silu_mul_qx(gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_x(SiLU(gate) * up) for gate_up (M, 2F) = (gate | up), float16/bfloat16 contiguous."""
    M, F = gate_up.shape[0], gate_up.shape[1] // 2
    xq = _empty((M, F), torch.int8, gate_up.device)
    xd = _empty((M, F // 32), torch.float32, gate_up.device)
    kernel(("silu_mul_qx", _DTYPES[gate_up.dtype]))(gate_up, xq, xd)
    return xq, xd


def rope_qk(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int,
            n_kv_heads: int, head_dim: int, neox: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotated q (M, Hq, D) and k (M, Hkv, D) heads of projected rows qkv (M, >= (Hq + Hkv) D)
    (contiguous, float16/bfloat16), row t at position positions[t] ((M,) int64 on the device, below the
    tables' length: read there, never checked on the host); cos/sin (P, D / 2) float32."""
    M = qkv.shape[0]
    q = _empty((M, n_heads, head_dim), qkv.dtype, qkv.device)
    k = _empty((M, n_kv_heads, head_dim), qkv.dtype, qkv.device)
    kernel(("rope_qk", _DTYPES[qkv.dtype], bool(neox)))(qkv, positions, cos, sin, q, k)
    return q, k


def dequantize(blocks: torch.Tensor, type_name: str, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows `ids` ((R,) int32 on the GPU, each in [0, N)) of W = `blocks`, decoded: (R, K) `dtype`."""
    qk, nbytes, _, _ = gguf_cuda.TYPES[type_name]
    K = blocks.shape[1] // nbytes * qk
    out = _empty((ids.shape[0], K), dtype, blocks.device)
    if ids.shape[0]:
        kernel(("dequant", type_name, _DTYPES[dtype]))(blocks, ids, out)
    return out


def gemv_specs(type_names, dtype: torch.dtype) -> list[tuple]:
    """The kernel specs a model whose matrices are of `type_names` uses (for `precompile`)."""
    dt = _DTYPES[dtype]
    return [("quantize_x", dt)] + [spec for t in sorted(set(type_names)) for spec in
                                   (("gemv1", t, dt, gemv_rows_per_warp()), ("gemv", t, dt, GEMV_ROWS),
                                    ("dequant", t, dt))]


def step_specs(dtype: torch.dtype, neox: bool) -> list[tuple]:
    """The fused step kernels (`rmsnorm_qx`, `silu_mul_qx`, `rope_qk`) of a model (for `precompile`)."""
    dt = _DTYPES[dtype]
    return [("rmsnorm_qx", dt), ("silu_mul_qx", dt), ("rope_qk", dt, bool(neox))]


def ops() -> SimpleNamespace:
    """The namespace `leank.kernels.dispatch` hands the cache on CUDA."""
    return SimpleNamespace(name="tilelang", quantize_k=quantize_k, quantize_v=quantize_v,
                           compressed_attention=compressed_attention)
