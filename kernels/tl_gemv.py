"""TileLang kernels for matrices kept in GGUF's quantized blocks on CUDA (issue 14).

Two kernels per block type, decoding blocks in registers with `leank.kernels.gguf_cuda`'s device functions
(bit for bit gguf-py's dequantizers):
- `quantize_x` + `gemv`: y[t, col0 + n] = sum_k x[t, k] * W[n, k] for up to `maxm` rows of activations (a
  decode step, or a few sequences of a batch). The activations are first quantized to 8 bits per group of
  32 (as llama.cpp's CUDA kernels do); then one warp per output row, its lanes taking the row's units in
  turn: the weights' codes as signed bytes, multiplied four at a time with the activations' (dp4a), the
  blocks' scales applied per run of 16 in float32, the lanes summed by shuffles.
- `rmsnorm_qx`, `silu_mul_qx`, `rope_qk`: a decode step's small operations around the matrices, fused
  (`gguf_cuda.STEP`): RMSNorm or SiLU(gate) * up straight into the 8-bit activations `gemv` reads, RoPE of
  q and k from the projected rows.
- `dequantize`: rows `ids` of W decoded to float32 / float16 / bfloat16, one thread per unit (prompts
  multiply a decoded slice of the matrix with cuBLAS; embedding lookups decode their tokens' rows).
Rows, widths and lengths are symbolic: one compilation per (type, dtype, maxm).
"""
import tilelang.language as T

from leank.kernels.gguf_cuda import (STEP_THREADS, TYPES, dequant_name, dequant_source, gemv1_name, gemv1_source,
                                     gemv_name, gemv_source, quant_x_name, quant_x_source, step_names, step_source)

WARPS = 4  # output rows per block of the gemv kernel (one per warp)
DEQ_THREADS = 128
QX_THREADS = 128


def quantize_x(dtype: str):
    """x (M, K) `dtype`, K a multiple of 32 -> xq (M, K) int8 codes, xd (M, K / 32) float32 scales: 8 bits
    per group of 32 activations (scale amax / 127), one thread per group."""
    name, src = quant_x_name(dtype), quant_x_source(dtype)
    M, K, KG = T.dynamic("M, K, KG")

    @T.prim_func
    def kernel(x: T.Tensor((M, K), dtype), xq: T.Tensor((M, K), "int8"), xd: T.Tensor((M, KG), "float32")):
        with T.Kernel(T.ceildiv(M * KG, QX_THREADS), threads=QX_THREADS) as bg:
            T.import_source(src)
            tx = T.get_thread_binding()
            T.call_extern("handle", name, T.address_of(x[0, 0]), T.address_of(xq[0, 0]), T.address_of(xd[0, 0]),
                          M * KG, bg * QX_THREADS + tx)

    return kernel


def gemv(type_name: str, dtype: str, maxm: int):
    """w (N, row bytes) uint8 blocks; xq (M, K) int8 and xd (M, K / 32) float32, activations quantized by
    `quantize_x`; y (M, NY) `dtype`: columns col0 .. col0 + N - 1 of y's first m rows (m <= maxm) get
    x @ W^T, plus (add != 0) r's same columns (r (MR, NR): a residual with ldr = NY, or a bias with ldr = 0).
    K a multiple of the block size."""
    name, src = gemv_name(type_name, dtype, maxm), gemv_source(type_name, dtype, maxm)
    N, RB, M, K, KG, NY, MR, NR = T.dynamic("N, RB, M, K, KG, NY, MR, NR")

    @T.prim_func
    def kernel(w: T.Tensor((N, RB), "uint8"), xq: T.Tensor((M, K), "int8"), xd: T.Tensor((M, KG), "float32"),
               y: T.Tensor((M, NY), dtype), r: T.Tensor((MR, NR), dtype), m: T.int32, col0: T.int32, ldr: T.int32,
               add: T.int32):
        with T.Kernel(T.ceildiv(N, WARPS), threads=WARPS * 32) as bn:
            T.import_source(src)
            tx = T.get_thread_binding()
            T.call_extern("handle", name, T.address_of(w[0, 0]), T.address_of(xq[0, 0]), T.address_of(xd[0, 0]),
                          T.address_of(y[0, 0]), T.address_of(r[0, 0]), N, m, K, RB, NY, ldr, add, col0,
                          bn * WARPS + tx // 32, tx % 32)

    return kernel


def gemv1(type_name: str, dtype: str, nr: int):
    """`gemv` for one row of activations (m = 1), `nr` weight rows per warp (`gguf_cuda.GEMV1`)."""
    name, src = gemv1_name(type_name, dtype, nr), gemv1_source(type_name, dtype, nr)
    N, RB, M, K, KG, NY, MR, NR = T.dynamic("N, RB, M, K, KG, NY, MR, NR")

    @T.prim_func
    def kernel(w: T.Tensor((N, RB), "uint8"), xq: T.Tensor((M, K), "int8"), xd: T.Tensor((M, KG), "float32"),
               y: T.Tensor((M, NY), dtype), r: T.Tensor((MR, NR), dtype), col0: T.int32, add: T.int32):
        with T.Kernel(T.ceildiv(N, WARPS * nr), threads=WARPS * 32) as bn:
            T.import_source(src)
            tx = T.get_thread_binding()
            T.call_extern("handle", name, T.address_of(w[0, 0]), T.address_of(xq[0, 0]), T.address_of(xd[0, 0]),
                          T.address_of(y[0, 0]), T.address_of(r[0, 0]), N, K, RB, add, col0, bn * WARPS + tx // 32,
                          tx % 32)

    return kernel


def rmsnorm_qx(dtype: str):
    """x (M, K) `dtype`, w (K,) float32 -> xq (M, K) int8, xd (M, K / 32) float32: quantize_x(RMSNorm(x) * w),
    one block per row. K a multiple of 32."""
    name, src = step_names(dtype)["norm"], step_source(dtype)
    M, K, KG = T.dynamic("M, K, KG")

    @T.prim_func
    def kernel(x: T.Tensor((M, K), dtype), w: T.Tensor((K,), "float32"), xq: T.Tensor((M, K), "int8"),
               xd: T.Tensor((M, KG), "float32"), eps: T.float32):
        with T.Kernel(M, threads=STEP_THREADS) as row:
            T.import_source(src)
            tx = T.get_thread_binding()
            T.call_extern("handle", name, T.address_of(x[0, 0]), T.address_of(w[0]), T.address_of(xq[0, 0]),
                          T.address_of(xd[0, 0]), K, eps, row, tx)

    return kernel


def silu_mul_qx(dtype: str):
    """gu (M, 2F) `dtype` (gate | up) -> xq (M, F) int8, xd (M, F / 32): quantize_x(SiLU(gate) * up)."""
    name, src = step_names(dtype)["silu"], step_source(dtype)
    M, F2, F, FG = T.dynamic("M, F2, F, FG")

    @T.prim_func
    def kernel(gu: T.Tensor((M, F2), dtype), xq: T.Tensor((M, F), "int8"), xd: T.Tensor((M, FG), "float32")):
        with T.Kernel(T.ceildiv(M * FG * 4, QX_THREADS), threads=QX_THREADS) as bg:  # a thread per 8 activations
            T.import_source(src)
            tx = T.get_thread_binding()
            T.call_extern("handle", name, T.address_of(gu[0, 0]), T.address_of(xq[0, 0]), T.address_of(xd[0, 0]),
                          F, M * FG * 4, bg * QX_THREADS + tx)

    return kernel


def rope_qk(dtype: str, neox: bool):
    """qkv (M, L) `dtype` rows (q heads, k heads, ...), pos (M,) int64, cos/sin (P, D / 2) float32 ->
    q (M, Hq, D), k (M, Hkv, D) rotated at each row's position (every position < P)."""
    name, src = step_names(dtype)["rope"], step_source(dtype)
    M, L, P, Hq, Hkv, D, D2 = T.dynamic("M, L, P, Hq, Hkv, D, D2")

    @T.prim_func
    def kernel(qkv: T.Tensor((M, L), dtype), pos: T.Tensor((M,), "int64"), cs: T.Tensor((P, D2), "float32"),
               sn: T.Tensor((P, D2), "float32"), q: T.Tensor((M, Hq, D), dtype), k: T.Tensor((M, Hkv, D), dtype)):
        with T.Kernel(T.ceildiv(M * (Hq + Hkv) * D2, QX_THREADS), threads=QX_THREADS) as bi:
            T.import_source(src)
            tx = T.get_thread_binding()
            T.call_extern("handle", name, T.address_of(qkv[0, 0]), T.address_of(pos[0]), T.address_of(cs[0, 0]),
                          T.address_of(sn[0, 0]), T.address_of(q[0, 0, 0]), T.address_of(k[0, 0, 0]), Hq, Hkv, D, L,
                          int(neox), M * (Hq + Hkv) * D2, bi * QX_THREADS + tx)

    return kernel


def dequantize(type_name: str, out_dtype: str):
    """w (N, row bytes) uint8 blocks, ids (R,) int32 row numbers -> out (R, K) `out_dtype`."""
    name, src = dequant_name(type_name, out_dtype), dequant_source(type_name, out_dtype)
    N, RB, R, K = T.dynamic("N, RB, R, K")
    qk, _, upb, _ = TYPES[type_name]

    @T.prim_func
    def kernel(w: T.Tensor((N, RB), "uint8"), ids: T.Tensor((R,), "int32"), out: T.Tensor((R, K), out_dtype)):
        with T.Kernel(T.ceildiv(K // qk * upb, DEQ_THREADS), R, threads=DEQ_THREADS) as (bu, r):
            T.import_source(src)
            tx = T.get_thread_binding()
            T.call_extern("handle", name, T.address_of(w[0, 0]), T.address_of(ids[0]), T.address_of(out[0, 0]),
                          K, RB, r, bu * DEQ_THREADS + tx)

    return kernel
