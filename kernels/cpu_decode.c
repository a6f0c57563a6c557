/* Decode attention over one KV head of the compressed cache, on a CPU, in one pass over the codes.

   Built on first use by leank/kernels/cpu.py (cc -O3 -march=native) and called through ctypes; the torch
   reference in leank/kernels/reference.py defines the result and the tests compare the two.

   Layout (see reference.py): the full region holds F tokens of K and V in float32 or float16 (`half`);
   the middle region M tokens (a multiple of the quantization group G) of K restricted to c kept channels
   and V of all D channels, each either unquantized (16 "bits", the full region's type) or KIVI codes bit-packed along the channel
   axis with float16 scale and min: K per channel over groups of G tokens, V per token over groups of G
   channels. One softmax spans both regions.

   The quantized values are never written out as floats: for K the scale of a token group is folded into
   the query (q_i * scale_i) and its min into a per-group bias (sum_i q_i * min_i); for V the weight of
   a token is folded into its per-group scale (p_t * scale_tg) and the mins are summed separately. Codes
   are expanded a byte at a time through a lookup table into a small tile; float16 rows are converted
   into the same tile, a few tokens at a time, so every sum is in float32 while memory holds half. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_common.h"

#define MAX_D 1024
#define TB 32 /* tokens per tile when summing V */

static float LUT2[256][4];
static float LUT4[256][2];
static int lut_ready = 0;

static void init_luts(void) {
    for (int b = 0; b < 256; b++) {
        for (int i = 0; i < 4; i++) LUT2[b][i] = (float)((b >> (2 * i)) & 3);
        for (int i = 0; i < 2; i++) LUT4[b][i] = (float)((b >> (4 * i)) & 15);
    }
    lut_ready = 1;
}

/* exp(x) for x <= 0 (scores minus their maximum), within 2 ulp; branch-free so loops over it vectorize.
   Range reduction x = n ln2 + r, |r| <= ln2/2, then a degree-6 polynomial for exp(r). */
static inline float exp_nonpos(float x) {
    x = x < -87.0f ? -87.0f : x;
    /* n = round(x / ln2) by the 1.5 * 2^23 trick: t's low mantissa bits then hold n as an integer */
    union { float f; int32_t i; } t = {x * 1.44269504088896341f + 12582912.0f}, scale;
    float n = t.f - 12582912.0f;
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    scale.i = (t.i - 0x4b400000 + 127) << 23;
    return p * scale.f;
}

#if defined(__AVX2__) && defined(__FMA__)
/* the dot products of q with 8 rows (ld floats apart) of n floats (n a multiple of 8), as one vector */
static inline __m256 dots8(const float *restrict q, const float *restrict rows, int64_t ld, int n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    for (int i = 0; i < n; i += 8) {
        __m256 x = _mm256_loadu_ps(q + i);
        a0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(rows + i), a0);
        a1 = _mm256_fmadd_ps(x, _mm256_loadu_ps(rows + ld + i), a1);
        a2 = _mm256_fmadd_ps(x, _mm256_loadu_ps(rows + 2 * ld + i), a2);
        a3 = _mm256_fmadd_ps(x, _mm256_loadu_ps(rows + 3 * ld + i), a3);
        a4 = _mm256_fmadd_ps(x, _mm256_loadu_ps(rows + 4 * ld + i), a4);
        a5 = _mm256_fmadd_ps(x, _mm256_loadu_ps(rows + 5 * ld + i), a5);
        a6 = _mm256_fmadd_ps(x, _mm256_loadu_ps(rows + 6 * ld + i), a6);
        a7 = _mm256_fmadd_ps(x, _mm256_loadu_ps(rows + 7 * ld + i), a7);
    }
    __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}
#endif

static inline void axpy(float *restrict y, float a, const float *restrict x, int n) {
    for (int i = 0; i < n; i++) y[i] += a * x[i];
}

/* codes of one packed row -> floats (a whole number of bytes' worth; the buffer has room) */
static inline void expand(const uint8_t *restrict row, int bits, int n, float *restrict out) {
    if (bits == 2) {
        int w = (n + 3) / 4;
        for (int j = 0; j < w; j++) memcpy(out + 4 * j, LUT2[row[j]], 16);
    } else if (bits == 4) {
        int w = (n + 1) / 2;
        for (int j = 0; j < w; j++) memcpy(out + 2 * j, LUT4[row[j]], 8);
    } else {
        for (int j = 0; j < n; j++) out[j] = (float)row[j];
    }
}

/* o[r][d] += sum over t < nt of w[r*wr + (d/G)*wg + t] * rows[t*ld + d]; D and G multiples of 8.
   Output channels stay in registers while the tokens stream by. */
#if defined(__AVX2__) && defined(__FMA__)
static void accumulate(float *restrict o, int R, int D, int G, const float *restrict w, int64_t wr, int64_t wg,
                       const float *restrict rows, int64_t ld, int nt) {
    int r = 0;
    if (G % 32 == 0 && D % 32 == 0)
        for (; r + 3 <= R; r += 3) /* three query rows share every load of V: 12 accumulators */
            for (int d = 0; d < D; d += 32) {
                const float *w0 = w + r * wr + (d / G) * wg, *w1 = w0 + wr, *w2 = w1 + wr;
                __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00,
                       a13 = a00, a20 = a00, a21 = a00, a22 = a00, a23 = a00;
                for (int t = 0; t < nt; t++) {
                    const float *row = rows + t * ld + d;
                    __m256 v0 = _mm256_loadu_ps(row), v1 = _mm256_loadu_ps(row + 8), v2 = _mm256_loadu_ps(row + 16),
                           v3 = _mm256_loadu_ps(row + 24);
                    __m256 x = _mm256_broadcast_ss(w0 + t);
                    a00 = _mm256_fmadd_ps(x, v0, a00); a01 = _mm256_fmadd_ps(x, v1, a01);
                    a02 = _mm256_fmadd_ps(x, v2, a02); a03 = _mm256_fmadd_ps(x, v3, a03);
                    x = _mm256_broadcast_ss(w1 + t);
                    a10 = _mm256_fmadd_ps(x, v0, a10); a11 = _mm256_fmadd_ps(x, v1, a11);
                    a12 = _mm256_fmadd_ps(x, v2, a12); a13 = _mm256_fmadd_ps(x, v3, a13);
                    x = _mm256_broadcast_ss(w2 + t);
                    a20 = _mm256_fmadd_ps(x, v0, a20); a21 = _mm256_fmadd_ps(x, v1, a21);
                    a22 = _mm256_fmadd_ps(x, v2, a22); a23 = _mm256_fmadd_ps(x, v3, a23);
                }
                float *y = o + r * D + d;
                __m256 acc[12] = {a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23};
                for (int i = 0; i < 12; i++) {
                    float *yi = y + (i / 4) * D + (i % 4) * 8;
                    _mm256_storeu_ps(yi, _mm256_add_ps(_mm256_loadu_ps(yi), acc[i]));
                }
            }
    for (; r < R; r++) {
        int d = 0;
        if (G % 32 == 0)
            for (; d + 32 <= D; d += 32) {
                const float *wt = w + r * wr + (d / G) * wg;
                __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                for (int t = 0; t < nt; t++) {
                    __m256 x = _mm256_broadcast_ss(wt + t);
                    const float *row = rows + t * ld + d;
                    a0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(row), a0);
                    a1 = _mm256_fmadd_ps(x, _mm256_loadu_ps(row + 8), a1);
                    a2 = _mm256_fmadd_ps(x, _mm256_loadu_ps(row + 16), a2);
                    a3 = _mm256_fmadd_ps(x, _mm256_loadu_ps(row + 24), a3);
                }
                float *y = o + r * D + d;
                _mm256_storeu_ps(y, _mm256_add_ps(_mm256_loadu_ps(y), a0));
                _mm256_storeu_ps(y + 8, _mm256_add_ps(_mm256_loadu_ps(y + 8), a1));
                _mm256_storeu_ps(y + 16, _mm256_add_ps(_mm256_loadu_ps(y + 16), a2));
                _mm256_storeu_ps(y + 24, _mm256_add_ps(_mm256_loadu_ps(y + 24), a3));
            }
        for (; d < D; d += 8) {
            const float *wt = w + r * wr + (d / G) * wg;
            __m256 a = _mm256_setzero_ps();
            for (int t = 0; t < nt; t++) a = _mm256_fmadd_ps(_mm256_broadcast_ss(wt + t), _mm256_loadu_ps(rows + t * ld + d), a);
            _mm256_storeu_ps(o + r * D + d, _mm256_add_ps(_mm256_loadu_ps(o + r * D + d), a));
        }
    }
}
#else
static void accumulate(float *restrict o, int R, int D, int G, const float *restrict w, int64_t wr, int64_t wg,
                       const float *restrict rows, int64_t ld, int nt) {
    for (int r = 0; r < R; r++)
        for (int d = 0; d < D; d += 8) {
            const float *wt = w + r * wr + (d / G) * wg;
            float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            for (int t = 0; t < nt; t++)
                for (int k = 0; k < 8; k++) acc[k] += wt[t] * rows[t * ld + d + k];
            for (int k = 0; k < 8; k++) o[r * D + d + k] += acc[k];
        }
}
#endif

typedef struct {
    const float *q;
    int R, D;
    float scale;
    int half; /* full region and unquantized middle rows are float16 (else float32) */
    const void *fk, *fv;
    int64_t f_stride;
    int F, M, G;
    const void *mk;
    int64_t mk_stride;
    int k_bits;
    const uint16_t *ks, *km;
    const int64_t *ch;
    int c;
    const void *mv;
    int64_t mv_stride;
    int v_bits;
    const uint16_t *vs, *vm;
    const int *lim; /* per query row: it sees full-region tokens t < lim[r] (causal); NULL: every one */
} Head;

/* rows [t, t + n) of a region whose rows are ld elements apart, d values each, as float32: the rows
   themselves (ld floats apart) when the region is float32, else converted into buf (d floats apart) */
static inline const float *float_rows(const void *base, int half, int64_t t, int64_t ld, int n, int d, float *buf,
                                      int64_t *ld_out) {
    if (!half) {
        *ld_out = ld;
        return (const float *)base + t * ld;
    }
    const uint16_t *h = (const uint16_t *)base + t * ld;
    for (int i = 0; i < n; i++) leank_halves_to_floats(h + i * ld, buf + (int64_t)i * d, d);
    *ld_out = d;
    return buf;
}

/* Softmax pieces over tokens [t0, t1) of the sequence full ++ middle (middle bounds multiples of G):
   per query row the maximum score m, the sum l of exp(score - m) and o = sum exp(score - m) v.
   work: work_floats(R, t1 - t0, D, G) floats. A row that attends nothing gets m = -inf, l = 0 (NaN scores: NaN). */
static size_t work_floats(int R, int n, int D, int G) {
    size_t c8 = (size_t)((D + 7) & ~7);
    return (size_t)R * n + 2 * (size_t)R * c8 + (size_t)R * (D / G) * TB + (size_t)TB * (D + 8) + (size_t)R * (1 + D / G);
}

static void partial(const Head *h, int t0, int t1, float *restrict m_out, float *restrict l_out,
                    float *restrict o, float *restrict work) {
    const int R = h->R, D = h->D, G = h->G, F = h->F, n = t1 - t0;
    const int c = h->c, c8 = (c + 7) & ~7, NG = D / G;
    float *scores = work, *qc = work + (size_t)R * n, *qs = qc + (size_t)R * c8;
    float *wv = qs + (size_t)R * c8, *tile = wv + (size_t)R * NG * TB; /* R*NG*TB weights, TB*D codes */
    float *bias = tile + (size_t)TB * (D + 8), *mterm = bias + R; /* R, R*NG */
    /* scores: full region, eight keys at a time where AVX2 is there */
    int t = t0;
    const int fend = t1 < F ? t1 : F;
#if defined(__AVX2__) && defined(__FMA__)
    for (; t + 8 <= fend; t += 8) {
        int64_t ld;
        const float *k = float_rows(h->fk, h->half, t, h->f_stride, 8, D, tile, &ld);
        for (int r = 0; r < R; r++) {
            __m256 s8 = dots8(h->q + r * D, k, ld, D);
            _mm256_storeu_ps(scores + r * n + t - t0, _mm256_mul_ps(s8, _mm256_set1_ps(h->scale)));
        }
    }
#endif
    for (; t < fend; t++) {
        int64_t ld;
        const float *k = float_rows(h->fk, h->half, t, h->f_stride, 1, D, tile, &ld);
        for (int r = 0; r < R; r++) scores[r * n + t - t0] = leank_dot(h->q + r * D, k, D) * h->scale;
    }
    if (h->lim) /* causal rows: the full region's tokens past a row's own position score -inf */
        for (int r = 0; r < R; r++)
            for (int u = h->lim[r] > t0 ? h->lim[r] : t0; u < fend; u++) scores[r * n + u - t0] = -INFINITY;
    /* scores: middle region, tokens [m0, m1) */
    int m0 = (t0 > F ? t0 : F) - F, m1 = t1 - F;
    if (m1 > m0) {
        for (int r = 0; r < R; r++) {
            for (int i = 0; i < c; i++) qc[r * c8 + i] = h->q[r * D + h->ch[i]];
            for (int i = c; i < c8; i++) qc[r * c8 + i] = 0.0f, qs[r * c8 + i] = 0.0f;
        }
        if (h->k_bits == 16) {
            for (int t = m0; t < m1; t++) {
                int64_t ld;
                const float *k = float_rows(h->mk, h->half, t, h->mk_stride, 1, c, tile, &ld);
                for (int r = 0; r < R; r++) scores[r * n + F + t - t0] = leank_dot(qc + r * c8, k, c) * h->scale;
            }
        } else {
            const uint8_t *K = (const uint8_t *)h->mk;
            for (int j = m0 / G; j < m1 / G; j++) {
                /* fold this token group's per-channel scale into the query, its min into a bias */
                float sc[MAX_D], mn[MAX_D];
                for (int i = 0; i < c; i++) {
                    sc[i] = leank_half_to_float(h->ks[(int64_t)j * c + i]) * h->scale;
                    mn[i] = leank_half_to_float(h->km[(int64_t)j * c + i]) * h->scale;
                }
                for (int r = 0; r < R; r++) {
                    float b = 0.0f;
                    for (int i = 0; i < c; i++) {
                        qs[r * c8 + i] = qc[r * c8 + i] * sc[i];
                        b += qc[r * c8 + i] * mn[i];
                    }
                    bias[r] = b;
                }
#if defined(__AVX2__) && defined(__FMA__)
                if (j == m0 / G) /* expand writes whole bytes' worth of codes: zero the rest of each c8 row */
                    memset(tile, 0, sizeof(float) * 8 * (size_t)c8);
                for (int t = j * G; t < (j + 1) * G; t += 8) { /* G is a multiple of 8 */
                    for (int u = 0; u < 8; u++) expand(K + (int64_t)(t + u) * h->mk_stride, h->k_bits, c, tile + u * c8);
                    for (int r = 0; r < R; r++) {
                        __m256 s8 = _mm256_add_ps(dots8(qs + r * c8, tile, c8, c8), _mm256_set1_ps(bias[r]));
                        _mm256_storeu_ps(scores + r * n + F + t - t0, s8);
                    }
                }
#else
                if (j == m0 / G) /* expand writes whole bytes' worth of codes: zero the rest of the c8 row */
                    memset(tile, 0, sizeof(float) * (size_t)c8);
                for (int t = j * G; t < (j + 1) * G; t++) {
                    expand(K + (int64_t)t * h->mk_stride, h->k_bits, c, tile);
                    for (int r = 0; r < R; r++) scores[r * n + F + t - t0] = leank_dot(qs + r * c8, tile, c8) + bias[r];
                }
#endif
            }
        }
    }
    /* exp(score - max), in place */
    for (int r = 0; r < R; r++) {
        float *s = scores + (size_t)r * n;
        float lanes[8] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY};
        int n8 = n & ~7, nan = 0;
        for (int t = 0; t < n8; t += 8)
            for (int k = 0; k < 8; k++) lanes[k] = s[t + k] > lanes[k] ? s[t + k] : lanes[k];
        float mx = -INFINITY;
        for (int k = 0; k < 8; k++) mx = lanes[k] > mx ? lanes[k] : mx;
        for (int t = n8; t < n; t++) mx = s[t] > mx ? s[t] : mx;
        for (int t = 0; t < n; t++) nan |= s[t] != s[t];
        if (nan) mx = NAN;
        m_out[r] = mx;
        if (!(mx > -INFINITY)) { /* -inf (nothing) or NaN: make the row contribute nothing / NaN */
            l_out[r] = mx == mx ? 0.0f : mx;
            for (int t = 0; t < n; t++) s[t] = 0.0f;
            continue;
        }
        for (int t = 0; t < n; t++) s[t] = exp_nonpos(s[t] - mx);
        if (h->lim) /* exp_nonpos clamps at exp(-87): a masked token must weigh exactly nothing */
            for (int u = h->lim[r] > t0 ? h->lim[r] : t0; u < fend; u++) s[u - t0] = 0.0f;
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0}, tail = 0.0f;
        for (int t = 0; t < n8; t += 8)
            for (int k = 0; k < 8; k++) acc[k] += s[t + k];
        for (int t = n8; t < n; t++) tail += s[t];
        l_out[r] = tail + ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    }
    /* o = sum p v, a tile of TB tokens at a time */
    for (int i = 0; i < R * D; i++) o[i] = 0.0f;
    for (int t = t0; t < (t1 < F ? t1 : F); t += TB) {
        int nt = (t1 < F ? t1 : F) - t;
        nt = nt < TB ? nt : TB;
        int64_t ld;
        const float *v = float_rows(h->fv, h->half, t, h->f_stride, nt, D, tile, &ld);
        accumulate(o, R, D, G, scores + (t - t0), n, 0, v, ld, nt);
    }
    if (m1 > m0) {
        if (h->v_bits == 16) {
            for (int t = m0; t < m1; t += TB) {
                int nt = m1 - t < TB ? m1 - t : TB;
                int64_t ld;
                const float *v = float_rows(h->mv, h->half, t, h->mv_stride, nt, D, tile, &ld);
                accumulate(o, R, D, G, scores + (F + t - t0), n, 0, v, ld, nt);
            }
        } else {
            const uint8_t *V = (const uint8_t *)h->mv;
            for (int i = 0; i < R * NG; i++) mterm[i] = 0.0f;
            for (int t = m0; t < m1; t += TB) {
                int nt = m1 - t < TB ? m1 - t : TB;
                for (int u = 0; u < nt; u++) {
                    expand(V + (int64_t)(t + u) * h->mv_stride, h->v_bits, D, tile + u * D);
                    for (int g = 0; g < NG; g++) {
                        float s = leank_half_to_float(h->vs[(int64_t)(t + u) * NG + g]);
                        float m = leank_half_to_float(h->vm[(int64_t)(t + u) * NG + g]);
                        for (int r = 0; r < R; r++) {
                            float p = scores[r * n + F + t + u - t0];
                            wv[(r * NG + g) * TB + u] = p * s;
                            mterm[r * NG + g] += p * m;
                        }
                    }
                }
                accumulate(o, R, D, G, wv, NG * TB, TB, tile, D, nt);
            }
            for (int r = 0; r < R; r++)
                for (int d = 0; d < D; d++) o[r * D + d] += mterm[r * NG + d / G];
        }
    }
}

#define MAX_ITEMS 4096

/* The bit widths (when a middle region exists) and every head's kept-channel count of a layer's table. */
static int heads_ok(int M, int k_bits, int v_bits, const int64_t *heads, int BH, int D) {
    if (M > 0 && !((k_bits == 2 || k_bits == 4 || k_bits == 8 || k_bits == 16) &&
                   (v_bits == 2 || v_bits == 4 || v_bits == 8 || v_bits == 16)))
        return 0;
    for (int i = 0; i < BH; i++) {
        int64_t c = heads[(int64_t)i * H_FIELDS + H_C];
        if (c < 0 || c > D) return 0;
    }
    return 1;
}

/* Decode attention of one layer: every sequence b < B and KV head h < Hkv, R query rows each.
   q, out: (B, Hkv, R, D) float32 contiguous. Full region: K/V element (b, h, t, d) at
   b*sb + h*sh + t*st + d elements from fk/fv, float16 when `half` (as are unquantized middle rows).
   Middle region: M tokens; heads[(b*Hkv + h)*H_FIELDS + ...]
   gives each head's buffers (H_C = 0: the head keeps no channel and attends to the full region only).
   The tokens of every head are cut into chunks spread over `threads` OpenMP threads, then merged by
   log-sum-exp. Returns 0, or -1 for arguments it does not handle (the caller checks them first). */
int leank_attend_layer(const float *q, float *out, int B, int Hkv, int R, int D, float scale,
                       const void *fk, const void *fv, int half, int64_t sb, int64_t sh, int64_t st, int F,
                       int M, int G, int k_bits, int v_bits, const int64_t *heads, int threads) {
    if (!lut_ready) init_luts();
    if (B <= 0 || Hkv <= 0 || R <= 0 || R > 64 || D <= 0 || D > MAX_D || D % 8 || F < 0 || M < 0 || G <= 0 ||
        G % 8 || M % G || D % G || D / G > 64 || F + M <= 0)
        return -1;
    if (!heads_ok(M, k_bits, v_bits, heads, B * Hkv, D)) return -1;
    const int BH = B * Hkv;
    /* chunks per head: enough to give every thread work, none shorter than 256 tokens */
    int nt = threads < 1 ? 1 : threads;
    int per = 1;
    while (per < 16 && BH * per < 2 * nt && (F + M) / (per + 1) >= 256) per++;
    if ((int64_t)BH * per > MAX_ITEMS) per = 1;
    if (BH > MAX_ITEMS) return -1;
    const int S = F + M;
    size_t stride = 0; /* floats per item: m, l (R each), o (R*D), then the work area */
    {
        int longest = S / per + G + 2;
        stride = (size_t)R * (D + 2) + work_floats(R, longest, D, G);
    }
    float *mem = (float *)malloc(sizeof(float) * stride * (size_t)BH * per);
    if (!mem) return -1;
    int bounds[17];
    bounds[0] = 0;
    for (int i = 1; i < per; i++) {
        int b = (int)((int64_t)S * i / per);
        if (b > F) b = F + (b - F) / G * G;
        bounds[i] = b < bounds[i - 1] ? bounds[i - 1] : b;
    }
    bounds[per] = S;
    #pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (int item = 0; item < BH * per; item++) {
        int bh = item / per, chunk = item % per, b = bh / Hkv, hh = bh % Hkv;
        const int64_t *e = heads + (int64_t)bh * H_FIELDS;
        int c = (int)e[H_C];
        int hasmid = c > 0 && M > 0;
        const int64_t off = b * sb + hh * sh, esz = half ? 2 : 4;
        Head h = {q + (int64_t)bh * R * D, R, D, scale, half, (const char *)fk + off * esz,
                  (const char *)fv + off * esz, st, F,
                  hasmid ? M : 0, G, (const void *)(intptr_t)e[H_MK], e[H_MK_STRIDE], k_bits,
                  (const uint16_t *)(intptr_t)e[H_KS], (const uint16_t *)(intptr_t)e[H_KM],
                  (const int64_t *)(intptr_t)e[H_CH], c, (const void *)(intptr_t)e[H_MV], e[H_MV_STRIDE], v_bits,
                  (const uint16_t *)(intptr_t)e[H_VS], (const uint16_t *)(intptr_t)e[H_VM], NULL};
        int t0 = bounds[chunk], t1 = bounds[chunk + 1];
        if (!hasmid) { /* full region only: clip the chunk to it */
            t0 = t0 < F ? t0 : F;
            t1 = t1 < F ? t1 : F;
        }
        float *base = mem + stride * (size_t)item;
        if (t1 > t0) {
            partial(&h, t0, t1, base, base + R, base + 2 * R, base + (size_t)R * (D + 2));
        } else {
            for (int r = 0; r < R; r++) base[r] = -INFINITY, base[R + r] = 0.0f;
        }
    }
    /* merge the chunks of every head by log-sum-exp */
    for (int bh = 0; bh < BH; bh++) {
        for (int r = 0; r < R; r++) {
            float mx = -INFINITY, l = 0.0f;
            int nan = 0;
            for (int i = 0; i < per; i++) {
                float m = mem[stride * (size_t)(bh * per + i) + r];
                nan |= m != m;
                mx = m > mx ? m : mx;
            }
            float *y = out + ((int64_t)bh * R + r) * D;
            for (int d = 0; d < D; d++) y[d] = 0.0f;
            for (int i = 0; i < per && !nan; i++) {
                float *base = mem + stride * (size_t)(bh * per + i);
                if (!(base[r] > -INFINITY)) continue;
                float w = expf(base[r] - mx);
                l += w * base[R + r];
                axpy(y, w, base + 2 * R + (size_t)r * D, D);
            }
            float inv = nan ? NAN : 1.0f / l;
            for (int d = 0; d < D; d++) y[d] *= inv;
        }
    }
    free(mem);
    return 0;
}

/* Attention of T query tokens of one layer over its compressed cache, in one call (a chat turn's new
   tokens after a compressed past; before this, one leank_attend_layer call a token: 780 calls for 26
   tokens on SmolLM2's 30 layers). q, out: (B, Hkv, R, T, D) float32 contiguous; the full region and
   `heads` as for leank_attend_layer. Query token i is the full region's token F - T + i: it sees full
   tokens t <= F - T + i and every middle token. Work items are (sequence and KV head, block of query
   tokens): the codes of a block's middle region are expanded once for all its R * block rows, and
   blocks are small enough (<= 256 rows) that the score rows stay bounded. Returns 0, or -1 for
   arguments it does not handle. */
int leank_attend_chunk(const float *q, float *out, int B, int Hkv, int R, int T, int D, float scale,
                       const void *fk, const void *fv, int half, int64_t sb, int64_t sh, int64_t st, int F,
                       int M, int G, int k_bits, int v_bits, const int64_t *heads, int threads) {
    if (!lut_ready) init_luts();
    if (B <= 0 || Hkv <= 0 || R <= 0 || R > 256 || T <= 0 || T > F || D <= 0 || D > MAX_D || D % 8 || M < 0 ||
        G <= 0 || G % 8 || M % G || D % G || D / G > 64)
        return -1;
    if (!heads_ok(M, k_bits, v_bits, heads, B * Hkv, D)) return -1;
    const int BH = B * Hkv;
    int nt = threads < 1 ? 1 : threads;
    /* blocks per head: at least two items a thread where the tokens allow, at most 256 rows a block */
    int nb = 1;
    while (nb < T && (BH * nb < 2 * nt || (int64_t)R * ((T + nb - 1) / nb) > 256)) nb++;
    const int qb = (T + nb - 1) / nb;
    nb = (T + qb - 1) / qb;
    const int S = F + M;
    int failed = 0;
    #pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (int item = 0; item < BH * nb; item++) {
        int bh = item / nb, i0 = (item % nb) * qb, i1 = i0 + qb < T ? i0 + qb : T, n = i1 - i0, rows = R * n;
        int b = bh / Hkv, hh = bh % Hkv;
        const int64_t *e = heads + (int64_t)bh * H_FIELDS;
        int c = (int)e[H_C];
        int hasmid = c > 0 && M > 0;
        const int64_t off = b * sb + hh * sh, esz = half ? 2 : 4;
        const int t1 = hasmid ? S : F;
        float *mem = (float *)malloc(sizeof(float) * ((size_t)rows * (2 * D + 2) + work_floats(rows, t1, D, G)) +
                                     sizeof(int) * (size_t)rows);
        if (!mem) {
            #pragma omp atomic write
            failed = 1;
            continue;
        }
        /* the block's rows, row r * n + j for head row r and token i0 + j */
        float *qrows = mem, *m = qrows + (size_t)rows * D, *l = m + rows, *o = l + rows, *work = o + (size_t)rows * D;
        int *lim = (int *)(work + work_floats(rows, t1, D, G));
        for (int r = 0; r < R; r++)
            for (int j = 0; j < n; j++) {
                memcpy(qrows + ((size_t)r * n + j) * D, q + (((int64_t)bh * R + r) * T + i0 + j) * D, sizeof(float) * D);
                lim[r * n + j] = F - T + i0 + j + 1;
            }
        Head h = {qrows, rows, D, scale, half, (const char *)fk + off * esz, (const char *)fv + off * esz, st, F,
                  hasmid ? M : 0, G, (const void *)(intptr_t)e[H_MK], e[H_MK_STRIDE], k_bits,
                  (const uint16_t *)(intptr_t)e[H_KS], (const uint16_t *)(intptr_t)e[H_KM],
                  (const int64_t *)(intptr_t)e[H_CH], c, (const void *)(intptr_t)e[H_MV], e[H_MV_STRIDE], v_bits,
                  (const uint16_t *)(intptr_t)e[H_VS], (const uint16_t *)(intptr_t)e[H_VM], lim};
        partial(&h, 0, t1, m, l, o, work);
        for (int r = 0; r < R; r++)
            for (int j = 0; j < n; j++) {
                const float *x = o + ((size_t)r * n + j) * D;
                float inv = 1.0f / l[r * n + j]; /* every row sees at least its own token; NaN stays NaN */
                float *y = out + (((int64_t)bh * R + r) * T + i0 + j) * D;
                for (int d = 0; d < D; d++) y[d] = x[d] * inv;
            }
        free(mem);
    }
    return failed ? -1 : 0;
}
