"""TileLang KIVI quantize-and-pack: the codes, scales and mins of `leank.kernels.quant`, bit for bit.

The arithmetic follows the reference step by step in float32: min/max of the group, min rounded to
float16 and stepped down when rounding went up, scale = span / levels rounded to float16 and stepped up
when it falls short, code = rint((x - min) / scale) clamped (IEEE division: TileLang compiles without
--use_fast_math), packed little-endian within each byte along the channel axis.
Lengths and the number of rows are symbolic: one compilation per (channels, bits, group, dtype).
"""
import tilelang.language as T

F32 = "float32"


def _fp16_step(h, up: bool):
    """The float16 next to float16 `h` toward +inf (up) or -inf, through its bit pattern (as
    `leank.kernels.quant._fp16_toward`)."""
    bits = T.cast(T.reinterpret(h, "int16"), "int32")
    if up:
        nxt = T.if_then_else(bits == -32768, 1, T.if_then_else(bits >= 0, bits + 1, bits - 1))
    else:
        nxt = T.if_then_else(bits == 0, -32767, T.if_then_else(bits >= 0, bits - 1, bits + 1))
    return T.reinterpret(T.cast(nxt, "int16"), "float16")


def _min16(lo):
    """float16 min at or below float32 `lo`, as float32 (quant_params: rounded, stepped down if above)."""
    m16 = T.cast(lo, "float16")
    return T.cast(T.if_then_else(T.cast(m16, F32) > lo, _fp16_step(m16, up=False), m16), F32)


def _scale16(span, levels: int):
    """float16 scale with scale * levels >= float32 `span`, as float32 (quant_params)."""
    s16 = T.cast(span / T.cast(levels, F32), "float16")
    return T.cast(T.if_then_else(T.cast(s16, F32) * T.cast(levels, F32) < span, _fp16_step(s16, up=True), s16), F32)


def _code(x, mn, scale, levels: int):
    """rint((x - min) / scale) clamped to [0, levels] (scale 0 divides by 1), as int32."""
    div = T.if_then_else(scale > 0, scale, T.cast(1, F32))
    q = T.nearbyint((x - mn) / div)
    return T.cast(T.max(T.min(q, T.cast(levels, F32)), T.cast(0, F32)), "int32")


def _packed_byte(x_s, m_s, s_s, t, j, per: int, bits: int, n: int, levels: int, group: int = 0):
    """One packed byte of row t: codes of channels j*per .. j*per+per-1 (0 past channel n-1),
    little-endian. Scale/min per channel (K, group == 0) or per channel group of row t (V).
    A plain-Python loop, unrolled at trace time."""
    byte = T.cast(0, "int32")
    for i in range(per):
        ch = T.min(j * per + i, n - 1)
        if group:
            code = _code(x_s[t, ch], m_s[t, ch // group], s_s[t, ch // group], levels)
        else:
            code = _code(x_s[t, ch], m_s[ch], s_s[ch], levels)
        byte = byte | (T.if_then_else(j * per + i < n, code, 0) << (i * bits))
    return T.cast(byte, "uint8")


def quantize_k(n_channels: int, bits: int, group: int, in_dtype: str, threads: int = 128):
    """x (L, T, C), T a multiple of `group` -> packed (L, T, W) uint8, scale and min (L, T/group, C) f16.

    The per-channel stages run over CP = C rounded up to whole warps (lanes past C repeat channel C - 1
    and store nothing): with C = 48, say, threads 0-47 alone would meet the barriers between the stages,
    which no warp-uniform barrier allows (TileLang refuses: 'not warp-uniform, Condition: tx < 48')."""
    C, G = n_channels, group
    CP = -(-C // 32) * 32
    per = 8 // bits
    W = (C + per - 1) // per
    levels = (1 << bits) - 1
    L, TT, NG = T.dynamic("L, TT, NG")

    @T.prim_func
    def kernel(
        x: T.Tensor((L, TT, C), in_dtype),
        packed: T.Tensor((L, TT, W), "uint8"),
        scale: T.Tensor((L, NG, C), "float16"),
        mn: T.Tensor((L, NG, C), "float16"),
    ):
        with T.Kernel(NG, L, threads=threads) as (g, l):
            x_s = T.alloc_shared((G, C), F32)
            lo_s = T.alloc_shared((CP,), F32)
            hi_s = T.alloc_shared((CP,), F32)
            s_s = T.alloc_shared((CP,), F32)
            m_s = T.alloc_shared((CP,), F32)
            for t, c in T.Parallel(G, C):
                x_s[t, c] = T.cast(x[l, g * G + t, c], F32)
            for c in T.Parallel(CP):
                lo_s[c] = x_s[0, T.min(c, C - 1)]
                hi_s[c] = x_s[0, T.min(c, C - 1)]
                for t in T.serial(1, G):
                    lo_s[c] = T.min(lo_s[c], x_s[t, T.min(c, C - 1)])
                    hi_s[c] = T.max(hi_s[c], x_s[t, T.min(c, C - 1)])
            # in stages through shared memory, so that no expression is traced twice
            for c in T.Parallel(CP):
                m_s[c] = _min16(lo_s[c])
            for c in T.Parallel(CP):
                hi_s[c] = T.max(hi_s[c] - m_s[c], T.cast(0, F32))  # the span
            for c in T.Parallel(CP):
                s_s[c] = _scale16(hi_s[c], levels)
            for c in T.Parallel(CP):
                if c < C:
                    scale[l, g, c] = T.cast(s_s[c], "float16")
                    mn[l, g, c] = T.cast(m_s[c], "float16")
            for t, j in T.Parallel(G, W):
                packed[l, g * G + t, j] = _packed_byte(x_s, m_s, s_s, t, j, per, bits, C, levels)

    return kernel


def quantize_v(head_dim: int, bits: int, group: int, in_dtype: str, block_tokens: int = 16, threads: int = 128):
    """x (L, T, D), D a multiple of `group` -> packed (L, T, W) uint8, scale and min (L, T, D/group) f16."""
    D, G, TB = head_dim, group, block_tokens
    NGC = D // G
    per = 8 // bits
    W = (D + per - 1) // per
    levels = (1 << bits) - 1
    L, TT = T.dynamic("L, TT")

    @T.prim_func
    def kernel(
        x: T.Tensor((L, TT, D), in_dtype),
        packed: T.Tensor((L, TT, W), "uint8"),
        scale: T.Tensor((L, TT, NGC), "float16"),
        mn: T.Tensor((L, TT, NGC), "float16"),
    ):
        with T.Kernel(T.ceildiv(TT, TB), L, threads=threads) as (tb, l):
            x_s = T.alloc_shared((TB, D), F32)
            lo_s = T.alloc_shared((TB, NGC), F32)
            hi_s = T.alloc_shared((TB, NGC), F32)
            s_s = T.alloc_shared((TB, NGC), F32)
            m_s = T.alloc_shared((TB, NGC), F32)
            t0 = tb * TB
            for t, d in T.Parallel(TB, D):
                x_s[t, d] = T.if_then_else(t0 + t < TT, T.cast(x[l, T.min(t0 + t, TT - 1), d], F32), T.cast(0, F32))
            for t, gi in T.Parallel(TB, NGC):
                lo_s[t, gi] = x_s[t, gi * G]
                hi_s[t, gi] = x_s[t, gi * G]
                for c in T.serial(1, G):
                    lo_s[t, gi] = T.min(lo_s[t, gi], x_s[t, gi * G + c])
                    hi_s[t, gi] = T.max(hi_s[t, gi], x_s[t, gi * G + c])
            for t, gi in T.Parallel(TB, NGC):
                m_s[t, gi] = _min16(lo_s[t, gi])
            for t, gi in T.Parallel(TB, NGC):
                hi_s[t, gi] = T.max(hi_s[t, gi] - m_s[t, gi], T.cast(0, F32))  # the span
            for t, gi in T.Parallel(TB, NGC):
                s_s[t, gi] = _scale16(hi_s[t, gi], levels)
            for t, gi in T.Parallel(TB, NGC):
                if t0 + t < TT:
                    scale[l, t0 + t, gi] = T.cast(s_s[t, gi], "float16")
                    mn[l, t0 + t, gi] = T.cast(m_s[t, gi], "float16")
            for t, j in T.Parallel(TB, W):
                if t0 + t < TT:
                    packed[l, t0 + t, j] = _packed_byte(x_s, m_s, s_s, t, j, per, bits, D, levels, G)

    return kernel
