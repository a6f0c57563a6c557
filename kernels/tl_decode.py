"""TileLang decode attention (one query token) over the compressed cache: split-KV flash-decoding.

Three kernels, all with symbolic batch, lengths, capacities and split counts (one compilation per
configuration, never per length). Per-sequence lengths are read from device memory and each split's
token range is cut in the kernel (`_split_range`), so one captured CUDA graph replays at every length:
- `full_decode`: the full-precision region (B, Hkv, cap, D) of every KV head, split along tokens;
  block (split 0, head h) also marks every middle split slot of h empty (lse -inf), so that heads
  without a middle group, and groups with fewer splits, leave nothing for `combine` to read;
- `middle_decode`: one head group's middle region: K of the kept channels and V, KIVI codes
  unpacked in the kernel (or read as they are at 16 bits), split along tokens;
- `combine`: merges every split of every query head by log-sum-exp into (B, Hq, D).
The split kernels write partial outputs `o_part` (B, Hq, S, D) float32, normalized within their split,
and `lse_part` (B, Hq, S) float32 in log2 units of the scaled scores (-inf: the split saw no token).
The R = Hq / Hkv query heads of a KV head form the rows of one tile (padded to 16), so K and V are
read once per KV head; both products run on tensor cores (mma), softmax statistics in float32.
Reference: `leank.kernels.reference.compressed_attention`.
"""

import tilelang.language as T

from leank.kernels.quant import PACKABLE_BITS

ACCUM = "float32"
LOG2E = 1.4426950408889634
_MAGIC = {"float16": 0x6400, "bfloat16": 0x4300}  # 1024 (10 mantissa bits), 128 (7 mantissa bits)
_MANTISSA = {"float16": 10, "bfloat16": 7}


def fast_unpack_ok(bits: int, dtype: str) -> bool:
    """Whether `bits`-bit codes unpack exactly through the magic-number trick in `dtype`: a code must fit
    the mantissa below the magic number's exponent (8-bit codes do not in bfloat16)."""
    return bits in PACKABLE_BITS and bits <= _MANTISSA.get(dtype, 0)


def unpack_channel(p, bits: int):
    """The channel that column p of a fast-unpacked tile holds (p: int or TIR expression).

    A 32-bit word of codes (4 bytes, 32 // bits channels) unpacks as pairs of 16-bit lanes: pair j takes
    code k = j % per of byte hb = j // per in its low lane and code k of byte hb + 2 in its high lane
    (per = 8 // bits codes per byte). Columns 2j, 2j + 1 hold pair j; channels are permuted within the
    word, never across words (a word never straddles a V scale group)."""
    per = 8 // bits
    cpw = 4 * per
    q = p % cpw
    return (p // cpw) * cpw + per * (q // (2 * per) + 2 * (q % 2)) + (q // 2) % per


def _unpack_source(bits: int, dtype: str) -> tuple[str, str, str]:
    """CUDA for unpacking one 32-bit word of `bits`-bit codes into 32 // bits values of `dtype` (in
    `unpack_channel` order), dequantized as code * scale + min with packed half2/bfloat162 arithmetic:
    (word >> shift) & mask | magic is the number magic + code exactly (one LOP3 after a shift), an FMA
    subtracts the magic number exactly, a second applies scale and min. No int -> float conversions.
    Returns (K function name, V function name, source). K: per-column scales and mins (local arrays in
    column order), rows past the valid length are zeros; V: one scale and min for the word."""
    per = 8 // bits
    npairs = 2 * per
    mask = ((1 << bits) - 1) * 0x00010001
    magic = _MAGIC[dtype] * 0x00010001
    neg_magic = magic | 0x80008000
    one = {"float16": 0x3C00, "bfloat16": 0x3F80}[dtype] * 0x00010001
    ty = "bf16x2" if dtype == "bfloat16" else "f16x2"
    tag = f"{bits}_{'bf16' if dtype == 'bfloat16' else 'f16'}"
    fk, fv = f"leank_unpack_k{tag}", f"leank_unpack_v{tag}"

    def body(scale: str, mn: str) -> str:
        lines = []
        for j in range(npairs):
            hb, k = divmod(j, per)
            shift = 8 * hb + bits * k
            x = f"(w >> {shift}u)" if shift else "w"
            lines.append(f"    o[{j}] = leank_fma2_{tag}(leank_fma2_{tag}(({x} & 0x{mask:08x}u) | 0x{magic:08x}u, "
                         f"0x{one:08x}u, 0x{neg_magic:08x}u), {scale.format(j=j)}, {mn.format(j=j)});")
        return "\n".join(lines)

    src = f"""
#ifndef LEANK_FMA2_{tag}
#define LEANK_FMA2_{tag}
__device__ __forceinline__ unsigned leank_fma2_{tag}(unsigned a, unsigned b, unsigned c) {{
  unsigned d;
  asm("fma.rn.{ty} %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}}
__device__ __forceinline__ void {fk}(unsigned w, const void* sp, const void* mp, void* op, int valid) {{
  const unsigned* s = reinterpret_cast<const unsigned*>(sp);
  const unsigned* m = reinterpret_cast<const unsigned*>(mp);
  unsigned* o = reinterpret_cast<unsigned*>(op);
  if (!valid) {{
#pragma unroll
    for (int j = 0; j < {npairs}; ++j) o[j] = 0u;
    return;
  }}
{body("s[{j}]", "m[{j}]")}
}}
template <typename T>
__device__ __forceinline__ void {fv}(unsigned w, T scale, T mn, void* op) {{
  unsigned short sb, mb;
  memcpy(&sb, &scale, 2);
  memcpy(&mb, &mn, 2);
  const unsigned s2 = (unsigned)sb * 0x00010001u, m2 = (unsigned)mb * 0x00010001u;
  unsigned* o = reinterpret_cast<unsigned*>(op);
{body("s2", "m2")}
}}
#endif
"""
    return fk, fv, src


def _v_word(i, words: int):
    """(row, word) of the V tile that linear index i unpacks. Eight consecutive threads (one shared-store
    phase) take the first half of two rows' words, then the second half: with TileLang's swizzled tile
    (16-byte chunk ^ row % 8 within 128-byte rows), an even and an odd row land on distinct banks. Row by
    row, a 256-byte row's two 128-byte panels collided pairwise (ncu on an H100: a 2-way conflict on every
    V store, 39 % of all shared-store wavefronts; bench/KERNEL_NOTES.md)."""
    if words % 2:
        return i // words, i % words
    half = words // 2
    j = i % (2 * words)
    q = j // half
    return i // (2 * words) * 2 + q % 2, q // 2 * half + j % half


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _rows(gqa: int) -> int:
    """Tile rows for the R query heads of one KV head (mma needs 16)."""
    return _round_up(max(gqa, 1), 16)


def full_decode(head_dim: int, gqa: int, dtype: str, has_lens: bool, block_n: int = 64, threads: int = 128,
                min_blocks: int = 1):
    """Split decode attention over the full region; writes split slots [0, n_splits) of o_part/lse_part
    and marks slots [n_splits, S) empty."""
    D, R, BN = head_dim, gqa, block_n
    BH = _rows(R)
    B, HQ, HKV, CAP, S = T.dynamic("B, HQ, HKV, CAP, S")
    LB = T.dynamic("LB")

    @T.prim_func
    def kernel(
        q: T.Tensor((B, HQ, D), dtype),
        k: T.Tensor((B, HKV, CAP, D), dtype),
        v: T.Tensor((B, HKV, CAP, D), dtype),
        lens: T.Tensor((LB,), "int32"),
        o_part: T.Tensor((B, HQ, S, D), ACCUM),
        lse_part: T.Tensor((B, HQ, S), ACCUM),
        length: T.int32,
        n_splits: T.int32,
        min_chunk: T.int32,
        scale_log2: T.float32,
    ):
        # splits vary slowest: a sequence shorter than the plan leaves its last splits empty, and those
        # then come last in the launch instead of taking slots in every wave (`_split_range`)
        with T.Kernel(HKV, B, n_splits, threads=threads) as (h, b, sid):
            if min_blocks > 1:
                T.annotate_min_blocks_per_sm(min_blocks)
            q_s = T.alloc_shared((BH, D), dtype)
            k_s = T.alloc_shared((BN, D), dtype)
            v_s = T.alloc_shared((BN, D), dtype)
            p_s = T.alloc_shared((BH, BN), dtype)
            acc_s, acc_o, m, m_prev, alpha, row_sum, l = _softmax_state(BH, BN, D)

            n = T.alloc_var("int32")
            if has_lens:
                n = T.min(lens[b], length)
            else:
                n = length
            start, end, n_blocks = _split_range(n, sid, n_splits, min_chunk, BN)

            for r, d in T.Parallel(BH, D):
                q_s[r, d] = T.if_then_else(r < R, q[b, h * R + T.min(r, R - 1), d], T.cast(0, dtype))
            _softmax_init(acc_o, l, m)
            for kb in T.serial(n_blocks):
                t0 = start + kb * BN
                for t, d in T.Parallel(BN, D):
                    k_s[t, d] = T.if_then_else(t0 + t < end, k[b, h, T.min(t0 + t, CAP - 1), d], T.cast(0, dtype))
                for t, d in T.Parallel(BN, D):
                    v_s[t, d] = T.if_then_else(t0 + t < end, v[b, h, T.min(t0 + t, CAP - 1), d], T.cast(0, dtype))
                T.clear(acc_s)
                T.gemm(q_s, k_s, acc_s, transpose_B=True, policy=T.GemmWarpPolicy.FullCol)
                _softmax_step(acc_s, acc_o, m, m_prev, alpha, row_sum, l, p_s, t0, end, scale_log2, BH, BN, D)
                T.gemm(p_s, v_s, acc_o, policy=T.GemmWarpPolicy.FullCol)
            _write_split(acc_o, l, m, o_part, lse_part, b, h, sid, R, BH, D)
            if sid == 0:  # mark the middle slots of this KV head's query heads empty
                for r, s in T.Parallel(BH, 4):
                    if r < R:
                        for s0 in T.serial(T.ceildiv(S - n_splits, 4)):
                            if n_splits + s0 * 4 + s < S:
                                lse_part[b, h * R + r, n_splits + s0 * 4 + s] = -T.infinity(ACCUM)

    return kernel


def middle_decode(head_dim: int, gqa: int, dtype: str, n_channels: int, k_bits: int, v_bits: int, group: int,
                  has_lens: bool, block_n: int = 64, threads: int = 128, stages: int = 0, min_blocks: int = 1,
                  prefetch: bool = False, fast: bool = False):
    """Split decode attention over one head group's middle region; writes split slots
    [split_offset, split_offset + n_splits) of the group's query heads.

    fast: KIVI codes unpack through `_unpack_source` (shift, LOP3 with the magic number, two packed FMAs
    per pair of values; no int -> float conversions), where `fast_codes` allows; K and V codes are then
    passed as int32 words (`fast_codes` says which) and tile columns hold channels in `unpack_channel`
    order (q gathered in that order for K; V's output columns mapped back when written).
    stages > 0: codes and scales arrive by asynchronous bulk copies, `stages` tiles in flight, while
    earlier tiles are unpacked and multiplied (T.Pipelined; on Hopper TileLang makes it a producer warp
    group with TMA loads; 20-35 % slower on an H200, kept for experiments, not covered by the tests).
    min_blocks > 1 caps registers so that that many blocks fit on an SM.
    prefetch (fast K and V, or unquantized K and V): the next tile's codes, scales and mins (or K and V)
    are loaded into registers right after the current tile's reach shared memory, so the loads overlap
    its unpacking and matmuls."""
    D, R, C, G = head_dim, gqa, n_channels, group
    BH = _rows(R)
    BN = _round_up(max(block_n, G), G)
    CP = _round_up(C, 16)  # K tile width: kept channels padded with zeros for the mma
    k_quant, v_quant = k_bits < 16, v_bits < 16
    k_per = 8 // k_bits if k_quant else 1
    v_per = 8 // v_bits if v_quant else 1
    KW = (C + k_per - 1) // k_per if k_quant else C
    VW = (D + v_per - 1) // v_per if v_quant else D
    k_fast, v_fast = fast_codes(D, C, k_bits, v_bits, group, dtype) if fast and not stages else (False, False)
    k_dtype = "int32" if k_fast else "uint8" if k_quant else dtype
    v_dtype = "int32" if v_fast else "uint8" if v_quant else dtype
    if k_fast:
        KW = KW // 4  # int32 words per K row
    if v_fast:
        VW = VW // 4
    KCPW = 32 // k_bits if k_fast else 1  # codes per word
    VCPW = 32 // v_bits if v_fast else 1
    KWW = CP // KCPW  # words per row of the K tile (>= KW; the rest read as zero codes)
    VG = max(D // G, 1)
    BG = BN // G  # K scale rows per tile
    # the prefetch's register fragments must spread evenly over the threads (TileLang finds no layout for,
    # e.g., 2 scale rows of 96 channels over 128 threads: groups of 64 with 96 kept channels)
    even = all(n % threads == 0 or threads % n == 0 for n in (BG * CP, BN * KWW, BN * VW, BN * VG))
    pf = prefetch and k_fast and v_fast and even
    # the same for unquantized K and V, where the tile fits 48 registers a thread (more spilled at c = 96)
    pf16 = prefetch and not k_quant and not v_quant and not stages and (CP + D) * BN * 2 <= 192 * threads
    k_mask = (1 << k_bits) - 1 if k_quant else 0
    v_mask = (1 << v_bits) - 1 if v_quant else 0
    src = ""
    if k_fast:
        name_k, _, s_k = _unpack_source(k_bits, dtype)
        src += s_k
    if v_fast:
        _, name_v, s_v = _unpack_source(v_bits, dtype)
        src += s_v

    def kch(j):  # channel of K tile column j
        return unpack_channel(j, k_bits) if k_fast else j

    def vch(d):  # channel of V tile column d
        return unpack_channel(d, v_bits) if v_fast else d

    B, HQ, NH, CAPK, CAPKS, CAPV, CAPVS, S = T.dynamic("B, HQ, NH, CAPK, CAPKS, CAPV, CAPVS, S")
    LB = T.dynamic("LB")
    # unquantized K or V has no scales: those parameters take any placeholder tensor
    ks_shape = (B, NH, CAPKS, C) if k_quant else T.dynamic("KS0, KS1, KS2, KS3")
    vs_shape = (B, NH, CAPVS, VG) if v_quant else T.dynamic("VS0, VS1, VS2, VS3")

    @T.prim_func
    def kernel(
        q: T.Tensor((B, HQ, D), dtype),
        heads: T.Tensor((NH,), "int64"),
        channels: T.Tensor((NH, C), "int64"),
        k: T.Tensor((B, NH, CAPK, KW), k_dtype),
        k_scale: T.Tensor(ks_shape, "float16"),
        k_min: T.Tensor(ks_shape, "float16"),
        v: T.Tensor((B, NH, CAPV, VW), v_dtype),
        v_scale: T.Tensor(vs_shape, "float16"),
        v_min: T.Tensor(vs_shape, "float16"),
        lens: T.Tensor((LB,), "int32"),
        o_part: T.Tensor((B, HQ, S, D), ACCUM),
        lse_part: T.Tensor((B, HQ, S), ACCUM),
        length: T.int32,
        n_splits: T.int32,
        min_chunk: T.int32,
        split_offset: T.int32,
        scale_log2: T.float32,
    ):
        with T.Kernel(NH, B, n_splits, threads=threads) as (hi, b, sid):  # splits slowest, as in full_decode
            if min_blocks > 1:
                T.annotate_min_blocks_per_sm(min_blocks)
            if k_fast or v_fast:
                T.import_source(src)
            tx = T.get_thread_binding()
            q_s = T.alloc_shared((BH, CP), dtype)
            k_s = T.alloc_shared((BN, CP), dtype)
            v_s = T.alloc_shared((BN, D), dtype)
            p_s = T.alloc_shared((BH, BN), dtype)
            # scales and mins wait in shared memory in the compute dtype: codes unpack with one multiply-add
            # in that dtype (two lanes per instruction), no float32 round trip
            if k_quant:
                if k_fast:
                    kc_s = T.alloc_shared((BN, KWW), "int32")
                    ks_s = T.alloc_shared((BG, CP), dtype)
                    km_s = T.alloc_shared((BG, CP), dtype)
                    ks_l = T.alloc_local((KCPW,), dtype)
                    km_l = T.alloc_local((KCPW,), dtype)
                    kv_l = T.alloc_local((KCPW,), dtype)
                else:
                    kc_s = T.alloc_shared((BN, KW), "uint8")
                    ks_s = T.alloc_shared((BG, C), dtype)
                    km_s = T.alloc_shared((BG, C), dtype)
            if v_quant:
                vc_s = T.alloc_shared((BN, VW), v_dtype)
                vs_s = T.alloc_shared((BN, VG), dtype)
                vm_s = T.alloc_shared((BN, VG), dtype)
                if v_fast:
                    vv_l = T.alloc_local((VCPW,), dtype)
            if pf:  # next tile's codes, scales and mins, in registers, as loaded (no use may wait for them)
                kc_r = T.alloc_fragment((BN, KWW), "int32")
                ks_r = T.alloc_fragment((BG, CP), "float16")
                km_r = T.alloc_fragment((BG, CP), "float16")
                vc_r = T.alloc_fragment((BN, VW), "int32")
                vs_r = T.alloc_fragment((BN, VG), "float16")
                vm_r = T.alloc_fragment((BN, VG), "float16")
            if pf16:
                k_r = T.alloc_fragment((BN, CP), dtype)
                v_r = T.alloc_fragment((BN, D), dtype)
            acc_s, acc_o, m, m_prev, alpha, row_sum, l = _softmax_state(BH, BN, D)

            h = heads[hi]
            n = T.alloc_var("int32")
            if has_lens:
                n = T.min(lens[b], length)
            else:
                n = length
            start, end, n_blocks = _split_range(n, sid, n_splits, min_chunk, BN)

            for r, j in T.Parallel(BH, CP):
                q_s[r, j] = T.if_then_else(
                    (r < R) & (kch(j) < C),
                    q[b, h * R + T.min(r, R - 1), channels[hi, T.min(kch(j), C - 1)]],
                    T.cast(0, dtype),
                )
            _softmax_init(acc_o, l, m)
            # tile 0, loaded only where the split has a tile: in a CUDA graph planned for a capacity, a short
            # sequence leaves many splits empty (addresses are clamped in any case)
            if pf or pf16:
                if n_blocks > 0:
                    if pf:
                        for t, w in T.Parallel(BN, KWW):
                            if KWW == KW:
                                kc_r[t, w] = k[b, hi, T.min(start + t, CAPK - 1), w]
                            else:
                                kc_r[t, w] = T.if_then_else(
                                    w < KW, k[b, hi, T.min(start + t, CAPK - 1), T.min(w, KW - 1)], 0)
                        for g, j in T.Parallel(BG, CP):
                            ks_r[g, j] = k_scale[b, hi, T.min(start // G + g, CAPKS - 1), T.min(kch(j), C - 1)]
                            km_r[g, j] = k_min[b, hi, T.min(start // G + g, CAPKS - 1), T.min(kch(j), C - 1)]
                        for t, w in T.Parallel(BN, VW):
                            vc_r[t, w] = v[b, hi, T.min(start + t, CAPV - 1), w]
                        for t, g in T.Parallel(BN, VG):
                            vs_r[t, g] = v_scale[b, hi, T.min(start + t, CAPVS - 1), g]
                            vm_r[t, g] = v_min[b, hi, T.min(start + t, CAPVS - 1), g]
                    if pf16:
                        for t, j in T.Parallel(BN, CP):
                            k_r[t, j] = k[b, hi, T.min(start + t, CAPK - 1), T.min(j, C - 1)]
                        for t, d in T.Parallel(BN, D):
                            v_r[t, d] = v[b, hi, T.min(start + t, CAPV - 1), d]
            for kb in T.Pipelined(n_blocks, num_stages=stages):
                t0 = start + kb * BN
                if pf16:  # this tile: registers -> shared memory (rows past the end and padding: 0), then the next
                    for t, j in T.Parallel(BN, CP):
                        k_s[t, j] = T.if_then_else((t0 + t < end) & (j < C), k_r[t, j], T.cast(0, dtype))
                    for t, d in T.Parallel(BN, D):
                        v_s[t, d] = T.if_then_else(t0 + t < end, v_r[t, d], T.cast(0, dtype))
                    T.sync_threads()
                    if kb + 1 < n_blocks:
                        for t, j in T.Parallel(BN, CP):
                            k_r[t, j] = k[b, hi, T.min(t0 + BN + t, CAPK - 1), T.min(j, C - 1)]
                        for t, d in T.Parallel(BN, D):
                            v_r[t, d] = v[b, hi, T.min(t0 + BN + t, CAPV - 1), d]
                if pf:  # this tile: registers -> shared memory; then the next tile's loads are issued
                    for t, w in T.Parallel(BN, KWW):
                        kc_s[t, w] = kc_r[t, w]
                    for g, j in T.Parallel(BG, CP):
                        ks_s[g, j] = T.if_then_else(kch(j) < C, T.cast(ks_r[g, j], dtype), T.cast(0, dtype))
                        km_s[g, j] = T.if_then_else(kch(j) < C, T.cast(km_r[g, j], dtype), T.cast(0, dtype))
                    for t, w in T.Parallel(BN, VW):
                        vc_s[t, w] = vc_r[t, w]
                    for t, g in T.Parallel(BN, VG):
                        vs_s[t, g] = T.if_then_else(t0 + t < end, T.cast(vs_r[t, g], dtype), T.cast(0, dtype))
                        vm_s[t, g] = T.if_then_else(t0 + t < end, T.cast(vm_r[t, g], dtype), T.cast(0, dtype))
                    T.sync_threads()
                    if kb + 1 < n_blocks:
                        for t, w in T.Parallel(BN, KWW):
                            if KWW == KW:
                                kc_r[t, w] = k[b, hi, T.min(t0 + BN + t, CAPK - 1), w]
                            else:
                                kc_r[t, w] = T.if_then_else(
                                    w < KW, k[b, hi, T.min(t0 + BN + t, CAPK - 1), T.min(w, KW - 1)], 0)
                        for g, j in T.Parallel(BG, CP):
                            ks_r[g, j] = k_scale[b, hi, T.min((t0 + BN) // G + g, CAPKS - 1), T.min(kch(j), C - 1)]
                            km_r[g, j] = k_min[b, hi, T.min((t0 + BN) // G + g, CAPKS - 1), T.min(kch(j), C - 1)]
                        for t, w in T.Parallel(BN, VW):
                            vc_r[t, w] = v[b, hi, T.min(t0 + BN + t, CAPV - 1), w]
                        for t, g in T.Parallel(BN, VG):
                            vs_r[t, g] = v_scale[b, hi, T.min(t0 + BN + t, CAPVS - 1), g]
                            vm_r[t, g] = v_min[b, hi, T.min(t0 + BN + t, CAPVS - 1), g]
                # --- K tile (kept channels): unpack codes, code * scale + min per channel and token group
                if k_fast:
                    if not pf:
                        for t, w in T.Parallel(BN, KWW):
                            if KWW == KW:
                                kc_s[t, w] = k[b, hi, T.min(t0 + t, CAPK - 1), w]
                            else:
                                kc_s[t, w] = T.if_then_else(
                                    w < KW, k[b, hi, T.min(t0 + t, CAPK - 1), T.min(w, KW - 1)], 0)
                        # scales and mins in tile-column order; columns past the kept channels get 0 (value 0)
                        for g, j in T.Parallel(BG, CP):
                            ks_s[g, j] = T.if_then_else(
                                kch(j) < C,
                                T.cast(k_scale[b, hi, T.min(t0 // G + g, CAPKS - 1), T.min(kch(j), C - 1)], dtype),
                                T.cast(0, dtype))
                            km_s[g, j] = T.if_then_else(
                                kch(j) < C,
                                T.cast(k_min[b, hi, T.min(t0 // G + g, CAPKS - 1), T.min(kch(j), C - 1)], dtype),
                                T.cast(0, dtype))
                        T.sync_threads()
                    for it in T.serial(T.ceildiv(BN * KWW, threads)):
                        if it * threads + tx < BN * KWW:
                            for e in T.vectorized(KCPW):
                                ks_l[e] = ks_s[(it * threads + tx) // KWW // G, (it * threads + tx) % KWW * KCPW + e]
                                km_l[e] = km_s[(it * threads + tx) // KWW // G, (it * threads + tx) % KWW * KCPW + e]
                            T.call_extern("handle", name_k, kc_s[(it * threads + tx) // KWW, (it * threads + tx) % KWW],
                                          T.address_of(ks_l[0]), T.address_of(km_l[0]), T.address_of(kv_l[0]),
                                          T.cast(t0 + (it * threads + tx) // KWW < end, "int32"))
                            for e in T.vectorized(KCPW):
                                k_s[(it * threads + tx) // KWW, (it * threads + tx) % KWW * KCPW + e] = kv_l[e]
                elif k_quant:
                    if stages:
                        T.copy(k[b, hi, t0 : t0 + BN, :], kc_s)
                        T.copy(k_scale[b, hi, t0 // G : t0 // G + BG, :], ks_s)
                        T.copy(k_min[b, hi, t0 // G : t0 // G + BG, :], km_s)
                    else:
                        for t, w in T.Parallel(BN, KW):
                            kc_s[t, w] = k[b, hi, T.min(t0 + t, CAPK - 1), w]
                        for g, j in T.Parallel(BG, C):
                            ks_s[g, j] = T.cast(k_scale[b, hi, T.min(t0 // G + g, CAPKS - 1), j], dtype)
                            km_s[g, j] = T.cast(k_min[b, hi, T.min(t0 // G + g, CAPKS - 1), j], dtype)
                    for t, j in T.Parallel(BN, CP):
                        jc = T.min(j, C - 1)
                        code = (kc_s[t, jc // k_per] >> ((jc % k_per) * k_bits)) & k_mask
                        k_s[t, j] = T.if_then_else((t0 + t < end) & (j < C),
                                                   T.cast(code, dtype) * ks_s[t // G, jc] + km_s[t // G, jc],
                                                   T.cast(0, dtype))
                elif not pf16:
                    for t, j in T.Parallel(BN, CP):
                        k_s[t, j] = T.if_then_else((t0 + t < end) & (j < C),
                                                   k[b, hi, T.min(t0 + t, CAPK - 1), T.min(j, C - 1)], T.cast(0, dtype))
                # --- V tile: unpack codes, code * scale + min per token and channel group
                if v_quant:
                    if stages:
                        T.copy(v[b, hi, t0 : t0 + BN, :], vc_s)
                        T.copy(v_scale[b, hi, t0 : t0 + BN, :], vs_s)
                        T.copy(v_min[b, hi, t0 : t0 + BN, :], vm_s)
                        for t, g in T.Parallel(BN, VG):
                            vs_s[t, g] = T.if_then_else(t0 + t < end, vs_s[t, g], T.cast(0, dtype))
                            vm_s[t, g] = T.if_then_else(t0 + t < end, vm_s[t, g], T.cast(0, dtype))
                    elif not pf:
                        for t, w in T.Parallel(BN, VW):
                            vc_s[t, w] = v[b, hi, T.min(t0 + t, CAPV - 1), w]
                        # rows past `end` (whose scales may be anything) dequantize to exact zeros
                        for t, g in T.Parallel(BN, VG):
                            vs_s[t, g] = T.if_then_else(
                                t0 + t < end, T.cast(v_scale[b, hi, T.min(t0 + t, CAPVS - 1), g], dtype), T.cast(0, dtype))
                            vm_s[t, g] = T.if_then_else(
                                t0 + t < end, T.cast(v_min[b, hi, T.min(t0 + t, CAPVS - 1), g], dtype), T.cast(0, dtype))
                    if v_fast:
                        if not pf:
                            T.sync_threads()
                        for it in T.serial(T.ceildiv(BN * VW, threads)):
                            if it * threads + tx < BN * VW:
                                vrow, vword = _v_word(it * threads + tx, VW)
                                T.call_extern("handle", name_v, vc_s[vrow, vword],
                                              vs_s[vrow, vword * VCPW // G], vm_s[vrow, vword * VCPW // G],
                                              T.address_of(vv_l[0]))
                                for e in T.vectorized(VCPW):
                                    v_s[vrow, vword * VCPW + e] = vv_l[e]
                    else:
                        for t, d in T.Parallel(BN, D):
                            code = (vc_s[t, d // v_per] >> ((d % v_per) * v_bits)) & v_mask
                            v_s[t, d] = T.cast(code, dtype) * vs_s[t, d // G] + vm_s[t, d // G]
                elif not pf16:
                    for t, d in T.Parallel(BN, D):
                        v_s[t, d] = T.if_then_else(t0 + t < end, v[b, hi, T.min(t0 + t, CAPV - 1), d],
                                                   T.cast(0, dtype))
                T.clear(acc_s)
                T.gemm(q_s, k_s, acc_s, transpose_B=True, policy=T.GemmWarpPolicy.FullCol)
                _softmax_step(acc_s, acc_o, m, m_prev, alpha, row_sum, l, p_s, t0, end, scale_log2, BH, BN, D)
                T.gemm(p_s, v_s, acc_o, policy=T.GemmWarpPolicy.FullCol)
            if v_fast:  # tile column d holds channel vch(d)
                for r, d in T.Parallel(BH, D):
                    if r < R:
                        o_part[b, h * R + r, split_offset + sid, vch(d)] = T.if_then_else(
                            l[r] > 0, acc_o[r, d] / l[r], T.cast(0, ACCUM))
                for r in T.Parallel(BH):
                    if r < R:
                        lse_part[b, h * R + r, split_offset + sid] = T.if_then_else(
                            l[r] > 0, T.log2(l[r]) + m[r], -T.infinity(ACCUM))
            else:
                _write_split(acc_o, l, m, o_part, lse_part, b, h, split_offset + sid, R, BH, D)

    return kernel


def fast_codes(head_dim: int, n_channels: int, k_bits: int, v_bits: int, group: int, dtype: str) -> tuple[bool, bool]:
    """(K, V): whether the fast unpack covers them; those codes go to the kernel as int32 words."""
    k_fast = k_bits < 16 and fast_unpack_ok(k_bits, dtype) and (n_channels * k_bits) % 32 == 0
    v_fast = (v_bits < 16 and fast_unpack_ok(v_bits, dtype) and (head_dim * v_bits) % 32 == 0
              and group % (32 // v_bits) == 0)
    return k_fast, v_fast


def _split_range(n, sid, n_splits, min_chunk, block_n: int):
    """(start, end, tiles) of split `sid` of `n` valid tokens cut into at most `n_splits` and at most
    ceil(n / min_chunk) chunks of whole tiles (`min_chunk`: a multiple of the tile).

    The cut comes from the sequence's own length, in the kernel, not from the host: the split count is
    the only host-side plan (fixed by the capacity when a CUDA graph is captured), so one graph replays at
    every length with balanced splits; a short sequence uses fewer splits (the others are empty and cost
    the merge nothing but a skipped slot), and with per-sequence lengths each sequence gets its own cut.
    With n_splits and min_chunk from `tilelang_ops._splits` this is the host's own plan: the same count of
    non-empty splits, chunks of ceil(n / splits) rounded up to whole tiles, covering n."""
    used = T.max(T.min(n_splits, T.ceildiv(n, min_chunk)), 1)
    chunk = T.ceildiv(T.ceildiv(n, used), block_n) * block_n
    start = sid * chunk
    end = T.min(start + chunk, n)
    return start, end, T.ceildiv(T.max(end - start, 0), block_n)


def _softmax_state(BH: int, BN: int, D: int) -> tuple:
    """The online softmax's fragments, allocated where this is called (in a kernel's body): a tile's
    scores (BH, BN), the output (BH, D), and per row the running max, the previous max, the rescale, the
    tile's sum and the running sum."""
    return (T.alloc_fragment((BH, BN), ACCUM), T.alloc_fragment((BH, D), ACCUM), T.alloc_fragment((BH,), ACCUM),
            T.alloc_fragment((BH,), ACCUM), T.alloc_fragment((BH,), ACCUM), T.alloc_fragment((BH,), ACCUM),
            T.alloc_fragment((BH,), ACCUM))


@T.macro
def _softmax_init(acc_o, l, m):
    T.fill(acc_o, 0)
    T.fill(l, 0)
    T.fill(m, -T.infinity(ACCUM))


@T.macro
def _softmax_step(acc_s, acc_o, m, m_prev, alpha, row_sum, l, p_s, t0, end, scale_log2, BH, BN, D):
    """Online softmax over one tile of scores (log2 units); leaves the tile's probabilities in p_s.
    Every tile holds at least one valid token, so m is finite after the first."""
    for r, t in T.Parallel(BH, BN):
        acc_s[r, t] = T.if_then_else(t0 + t < end, acc_s[r, t] * scale_log2, -T.infinity(ACCUM))
    T.copy(m, m_prev)
    T.reduce_max(acc_s, m, dim=1, clear=False)
    for r in T.Parallel(BH):
        alpha[r] = T.exp2(m_prev[r] - m[r])
    for r, t in T.Parallel(BH, BN):
        acc_s[r, t] = T.exp2(acc_s[r, t] - m[r])
    T.reduce_sum(acc_s, row_sum, dim=1)
    for r in T.Parallel(BH):
        l[r] = l[r] * alpha[r] + row_sum[r]
    for r, d in T.Parallel(BH, D):
        acc_o[r, d] = acc_o[r, d] * alpha[r]
    T.copy(acc_s, p_s)


@T.macro
def _write_split(acc_o, l, m, o_part, lse_part, b, h, slot, R, BH, D):
    """Normalized partial output and its lse; an empty split (l == 0) writes 0 and -inf."""
    for r, d in T.Parallel(BH, D):
        if r < R:
            o_part[b, h * R + r, slot, d] = T.if_then_else(l[r] > 0, acc_o[r, d] / l[r], T.cast(0, ACCUM))
    for r in T.Parallel(BH):
        if r < R:
            lse_part[b, h * R + r, slot] = T.if_then_else(l[r] > 0, T.log2(l[r]) + m[r], -T.infinity(ACCUM))


def combine(head_dim: int, dtype: str, threads: int = 256, unroll: int = 4):
    """out[b, h] = sum over splits of o_part * 2^(lse - lse_total); 0 where no split saw a token.

    The splits are spread over the threads: first the largest lse (each thread a strided share, then a
    tree in shared memory), then the weighted sum, where each row of D / 4 threads takes every
    (threads / (D / 4))-th split, four channels a thread, `unroll` splits' loads issued before they are
    used; the rows' sums meet in shared memory. The first version had each thread walk every split twice,
    one dependent load after another: at batch 1, 32K (~270 splits) this one took LeanK+KIVI-2 from 0.058
    to 0.038 ms on an H200 (bench/KERNEL_NOTES.md)."""
    D, VEC, U = head_dim, 4, unroll
    LANES = D // VEC
    ROWS = threads // LANES
    assert D % VEC == 0 and threads % LANES == 0 and ROWS >= 1 and threads & (threads - 1) == 0
    STEPS = tuple(threads >> k for k in range(1, threads.bit_length()))  # tree of the max: 128, 64, ..., 1
    B, HQ, S = T.dynamic("B, HQ, S")

    @T.prim_func
    def kernel(
        o_part: T.Tensor((B, HQ, S, D), ACCUM),
        lse_part: T.Tensor((B, HQ, S), ACCUM),
        out: T.Tensor((B, HQ, D), dtype),
    ):
        with T.Kernel(HQ, B, threads=threads) as (h, b):
            tx = T.get_thread_binding()
            red = T.alloc_shared((threads,), ACCUM)
            part = T.alloc_shared((ROWS, D), ACCUM)
            tot = T.alloc_shared((ROWS,), ACCUM)
            acc = T.alloc_local((VEC,), ACCUM)
            ov = T.alloc_local((U * VEC,), ACCUM)
            lw = T.alloc_local((U,), ACCUM)
            mx = T.alloc_var(ACCUM)
            total = T.alloc_var(ACCUM)
            mx = -T.infinity(ACCUM)
            for i in T.serial(T.ceildiv(S, threads)):
                if i * threads + tx < S:
                    mx = T.max(mx, lse_part[b, h, i * threads + tx])
            red[tx] = mx
            T.sync_threads()
            for step in STEPS:
                if tx < step:
                    red[tx] = T.max(red[tx], red[tx + step])
                T.sync_threads()
            mx = red[0]  # -inf when no split saw a token: every weight below is NaN then, and skipped
            total = 0
            for e in T.serial(VEC):
                acc[e] = 0
            r = tx // LANES
            c = tx % LANES
            for i in T.serial(T.ceildiv(S, ROWS * U)):
                for u in T.unroll(U):
                    lw[u] = lse_part[b, h, T.min((i * U + u) * ROWS + r, S - 1)]
                    for e in T.vectorized(VEC):
                        ov[u * VEC + e] = o_part[b, h, T.min((i * U + u) * ROWS + r, S - 1), c * VEC + e]
                for u in T.unroll(U):
                    # empty splits (lse -inf: weight 0) may hold anything in o_part: never multiplied
                    lw[u] = T.if_then_else((i * U + u) * ROWS + r < S, T.exp2(lw[u] - mx), T.cast(0, ACCUM))
                    if lw[u] > 0:
                        total = total + lw[u]
                        for e in T.unroll(VEC):
                            acc[e] = acc[e] + lw[u] * ov[u * VEC + e]
            for e in T.vectorized(VEC):
                part[r, c * VEC + e] = acc[e]
            if c == 0:
                tot[r] = total
            T.sync_threads()
            if tx < D:
                mx = 0
                total = 0
                for j in T.unroll(ROWS):
                    mx = mx + part[j, tx]
                    total = total + tot[j]
                out[b, h, tx] = T.if_then_else(total > 0, T.cast(mx / total, dtype), T.cast(0, dtype))

    return kernel
