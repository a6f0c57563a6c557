"""TileLang decode attention (one query token) over the compressed cache: split-KV flash-decoding.

Three kernels, all with symbolic batch, lengths, capacities and split counts (one compilation per
configuration, never per length):
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

ACCUM = "float32"
LOG2E = 1.4426950408889634


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
        chunk: T.int32,
        n_splits: T.int32,
        scale_log2: T.float32,
    ):
        with T.Kernel(n_splits, HKV, B, threads=threads) as (sid, h, b):
            if min_blocks > 1:
                T.annotate_min_blocks_per_sm(min_blocks)
            q_s = T.alloc_shared((BH, D), dtype)
            k_s = T.alloc_shared((BN, D), dtype)
            v_s = T.alloc_shared((BN, D), dtype)
            p_s = T.alloc_shared((BH, BN), dtype)
            acc_s = T.alloc_fragment((BH, BN), ACCUM)
            acc_o = T.alloc_fragment((BH, D), ACCUM)
            m = T.alloc_fragment((BH,), ACCUM)
            m_prev = T.alloc_fragment((BH,), ACCUM)
            alpha = T.alloc_fragment((BH,), ACCUM)
            row_sum = T.alloc_fragment((BH,), ACCUM)
            l = T.alloc_fragment((BH,), ACCUM)

            n = T.alloc_var("int32")
            if has_lens:
                n = T.min(lens[b], length)
            else:
                n = length
            start = sid * chunk
            end = T.min(start + chunk, n)
            n_blocks = T.ceildiv(T.max(end - start, 0), BN)

            for r, d in T.Parallel(BH, D):
                q_s[r, d] = T.if_then_else(r < R, q[b, h * R + T.min(r, R - 1), d], T.cast(0, dtype))
            T.fill(acc_o, 0)
            T.fill(l, 0)
            T.fill(m, -T.infinity(ACCUM))
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
                  has_lens: bool, block_n: int = 64, threads: int = 128, stages: int = 0, min_blocks: int = 1):
    """Split decode attention over one head group's middle region; writes split slots
    [split_offset, split_offset + n_splits) of the group's query heads.

    stages > 0: codes and scales arrive by asynchronous bulk copies, `stages` tiles in flight, while
    earlier tiles are unpacked and multiplied (T.Pipelined; on Hopper TileLang makes it a producer warp
    group with TMA loads; 20-35 % slower on an H200, kept for experiments, not covered by the tests).
    min_blocks > 1 caps registers so that that many blocks fit on an SM."""
    D, R, C, G = head_dim, gqa, n_channels, group
    BH = _rows(R)
    BN = _round_up(max(block_n, G), G)
    CP = _round_up(C, 16)  # K tile width: kept channels padded with zeros for the mma
    k_quant, v_quant = k_bits < 16, v_bits < 16
    k_per = 8 // k_bits if k_quant else 1
    v_per = 8 // v_bits if v_quant else 1
    KW = (C + k_per - 1) // k_per if k_quant else C
    VW = (D + v_per - 1) // v_per if v_quant else D
    k_dtype = "uint8" if k_quant else dtype
    v_dtype = "uint8" if v_quant else dtype
    k_mask = (1 << k_bits) - 1 if k_quant else 0
    v_mask = (1 << v_bits) - 1 if v_quant else 0
    VG = max(D // G, 1)
    BG = BN // G  # K scale rows per tile
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
        chunk: T.int32,
        n_splits: T.int32,
        split_offset: T.int32,
        scale_log2: T.float32,
    ):
        with T.Kernel(n_splits, NH, B, threads=threads) as (sid, hi, b):
            if min_blocks > 1:
                T.annotate_min_blocks_per_sm(min_blocks)
            q_s = T.alloc_shared((BH, CP), dtype)
            k_s = T.alloc_shared((BN, CP), dtype)
            v_s = T.alloc_shared((BN, D), dtype)
            p_s = T.alloc_shared((BH, BN), dtype)
            # scales and mins wait in shared memory in the compute dtype: codes unpack with one multiply-add
            # in that dtype (two lanes per instruction), no float32 round trip
            if k_quant:
                kc_s = T.alloc_shared((BN, KW), "uint8")
                ks_s = T.alloc_shared((BG, C), dtype)
                km_s = T.alloc_shared((BG, C), dtype)
            if v_quant:
                vc_s = T.alloc_shared((BN, VW), "uint8")
                vs_s = T.alloc_shared((BN, VG), dtype)
                vm_s = T.alloc_shared((BN, VG), dtype)
            acc_s = T.alloc_fragment((BH, BN), ACCUM)
            acc_o = T.alloc_fragment((BH, D), ACCUM)
            m = T.alloc_fragment((BH,), ACCUM)
            m_prev = T.alloc_fragment((BH,), ACCUM)
            alpha = T.alloc_fragment((BH,), ACCUM)
            row_sum = T.alloc_fragment((BH,), ACCUM)
            l = T.alloc_fragment((BH,), ACCUM)

            h = heads[hi]
            n = T.alloc_var("int32")
            if has_lens:
                n = T.min(lens[b], length)
            else:
                n = length
            start = sid * chunk
            end = T.min(start + chunk, n)
            n_blocks = T.ceildiv(T.max(end - start, 0), BN)

            for r, j in T.Parallel(BH, CP):
                q_s[r, j] = T.if_then_else(
                    (r < R) & (j < C),
                    q[b, h * R + T.min(r, R - 1), channels[hi, T.min(j, C - 1)]],
                    T.cast(0, dtype),
                )
            T.fill(acc_o, 0)
            T.fill(l, 0)
            T.fill(m, -T.infinity(ACCUM))
            for kb in T.Pipelined(n_blocks, num_stages=stages):
                t0 = start + kb * BN
                # --- K tile (kept channels): unpack codes, code * scale + min per channel and token group
                if k_quant:
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
                else:
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
                    else:
                        for t, w in T.Parallel(BN, VW):
                            vc_s[t, w] = v[b, hi, T.min(t0 + t, CAPV - 1), w]
                        # rows past `end` (whose scales may be anything) dequantize to exact zeros
                        for t, g in T.Parallel(BN, VG):
                            vs_s[t, g] = T.if_then_else(
                                t0 + t < end, T.cast(v_scale[b, hi, T.min(t0 + t, CAPVS - 1), g], dtype), T.cast(0, dtype))
                            vm_s[t, g] = T.if_then_else(
                                t0 + t < end, T.cast(v_min[b, hi, T.min(t0 + t, CAPVS - 1), g], dtype), T.cast(0, dtype))
                    for t, d in T.Parallel(BN, D):
                        code = (vc_s[t, d // v_per] >> ((d % v_per) * v_bits)) & v_mask
                        v_s[t, d] = T.cast(code, dtype) * vs_s[t, d // G] + vm_s[t, d // G]
                else:
                    for t, d in T.Parallel(BN, D):
                        v_s[t, d] = T.if_then_else(t0 + t < end, v[b, hi, T.min(t0 + t, CAPV - 1), d],
                                                   T.cast(0, dtype))
                T.clear(acc_s)
                T.gemm(q_s, k_s, acc_s, transpose_B=True, policy=T.GemmWarpPolicy.FullCol)
                _softmax_step(acc_s, acc_o, m, m_prev, alpha, row_sum, l, p_s, t0, end, scale_log2, BH, BN, D)
                T.gemm(p_s, v_s, acc_o, policy=T.GemmWarpPolicy.FullCol)
            _write_split(acc_o, l, m, o_part, lse_part, b, h, split_offset + sid, R, BH, D)

    return kernel


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


def combine(head_dim: int, dtype: str, threads: int | None = None):
    """out[b, h] = sum over splits of o_part * 2^(lse - lse_total); 0 where no split saw a token."""
    D = head_dim
    threads = threads or min(128, D)
    B, HQ, S = T.dynamic("B, HQ, S")

    @T.prim_func
    def kernel(
        o_part: T.Tensor((B, HQ, S, D), ACCUM),
        lse_part: T.Tensor((B, HQ, S), ACCUM),
        out: T.Tensor((B, HQ, D), dtype),
    ):
        with T.Kernel(HQ, B, threads=threads) as (h, b):
            acc = T.alloc_fragment((D,), ACCUM)
            lse_max = T.alloc_var(ACCUM)
            total = T.alloc_var(ACCUM)
            w = T.alloc_var(ACCUM)
            lse_max = -T.infinity(ACCUM)
            for s in T.serial(S):
                lse_max = T.max(lse_max, lse_part[b, h, s])
            total = 0
            T.clear(acc)
            for s in T.serial(S):
                w = T.if_then_else(lse_part[b, h, s] > -T.infinity(ACCUM), T.exp2(lse_part[b, h, s] - lse_max),
                                   T.cast(0, ACCUM))
                total = total + w
                for d in T.Parallel(D):
                    acc[d] = acc[d] + T.if_then_else(w > 0, w * o_part[b, h, s, d], T.cast(0, ACCUM))
            for d in T.Parallel(D):
                out[b, h, d] = T.if_then_else(total > 0, T.cast(acc[d] / total, dtype), T.cast(0, dtype))

    return kernel


