/* What cpu_decode.c, cpu_quant.c and cpu_matmul.c share: float16 -> float32, float32 dot products, and the
   per (sequence, KV head) table of a layer's middle-region buffers (kernels/cpu.py's _heads_table). */
#ifndef LEANK_CPU_COMMON_H
#define LEANK_CPU_COMMON_H

#include <stdint.h>
#include <string.h>
#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

#if defined(__F16C__)
static inline float leank_half_to_float(uint16_t h) { return _cvtsh_ss(h); }
#else
static inline float leank_half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: renormalize */
            int e = -1;
            do { man <<= 1; e++; } while (!(man & 0x400));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}
#endif

/* n float16 values -> float32 (F16C: eight per instruction) */
static inline void leank_halves_to_floats(const uint16_t *restrict h, float *restrict f, int n) {
    int i = 0;
#if defined(__F16C__) && defined(__AVX__)
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(f + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
#endif
    for (; i < n; i++) f[i] = leank_half_to_float(h[i]);
}

#if defined(__AVX2__) && defined(__FMA__)
static inline float leank_hsum(__m256 acc) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
}
#endif

/* sum of a[i] * b[i], i < n */
static inline float leank_dot(const float *restrict a, const float *restrict b, int n) {
    int i = 0;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 a0 = _mm256_setzero_ps(), a1 = a0;
    for (; i + 16 <= n; i += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), a1);
    }
    for (; i + 8 <= n; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), a0);
    float s = leank_hsum(_mm256_add_ps(a0, a1));
#else
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0}; /* eight partial sums: the compiler vectorizes them */
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) acc[k] += a[i + k] * b[i + k];
    float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
#endif
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* Fields of one (sequence, KV head) entry of the `heads` table that leank_attend_layer,
   leank_attend_chunk and leank_compact_layer read: the head's middle K (codes or values, at token 0) and
   its token stride in elements, K scale and min, kept channel indices and their count (0: no middle),
   middle V and its stride, V scale and min. */
enum { H_MK, H_MK_STRIDE, H_KS, H_KM, H_CH, H_C, H_MV, H_MV_STRIDE, H_VS, H_VM, H_FIELDS };

#endif
