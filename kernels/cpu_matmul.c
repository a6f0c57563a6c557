/* Matrix-vector products straight from GGUF's quantized blocks, on a CPU.

   Built with cpu_decode.c by leank/kernels/cpu.py. A decode step multiplies one token's activations by
   every weight matrix, so it is bound by the bytes of weights read: GGUF's 4.5-5 bit blocks are 3x
   fewer bytes than the float16 copies torch would multiply. Weights are decoded exactly as ggml
   dequantizes them (d * q + m in float32) and multiplied with float32 activations, which are not
   quantized. The block layouts are ggml's (ggml-common.h); gguf-py's dequantizers are the oracle in
   the tests. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "cpu_common.h"
#if defined(_OPENMP)
#include <omp.h>
#endif

static inline float h2f(const uint8_t *p) { /* a float16 field of a block */
    uint16_t h;
    memcpy(&h, p, 2);
    return leank_half_to_float(h);
}

/* GGML type ids */
enum { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14 };

/* weights per block and bytes per block; 0 for a type this file does not know */
static int block_size(int type) {
    switch (type) {
    case Q4_0: case Q4_1: case Q5_0: case Q5_1: case Q8_0: return 32;
    case Q4_K: case Q5_K: case Q6_K: return 256;
    default: return 0;
    }
}

static int block_bytes(int type) {
    switch (type) {
    case Q4_0: return 18;
    case Q4_1: return 20;
    case Q5_0: return 22;
    case Q5_1: return 24;
    case Q8_0: return 34;
    case Q4_K: return 144;
    case Q5_K: return 176;
    case Q6_K: return 210;
    default: return 0;
    }
}

static inline void scale_min_k4(int j, const uint8_t *q, uint8_t *d, uint8_t *m) {
    if (j < 4) {
        *d = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *d = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

/* one block -> block_size(type) floats */
static void decode_block(int type, const uint8_t *b, float *y) {
    switch (type) {
    case Q4_0: {
        float d = h2f(b);
        const uint8_t *qs = b + 2;
        for (int j = 0; j < 16; j++) {
            y[j] = d * (float)((qs[j] & 0xF) - 8);
            y[j + 16] = d * (float)((qs[j] >> 4) - 8);
        }
        break;
    }
    case Q4_1: {
        float d = h2f(b), m = h2f(b + 2);
        const uint8_t *qs = b + 4;
        for (int j = 0; j < 16; j++) {
            y[j] = d * (float)(qs[j] & 0xF) + m;
            y[j + 16] = d * (float)(qs[j] >> 4) + m;
        }
        break;
    }
    case Q5_0: case Q5_1: {
        float d = h2f(b), m = type == Q5_1 ? h2f(b + 2) : 0.0f;
        const uint8_t *p = b + (type == Q5_1 ? 4 : 2);
        uint32_t qh;
        memcpy(&qh, p, 4);
        const uint8_t *qs = p + 4;
        int off = type == Q5_0 ? 16 : 0;
        for (int j = 0; j < 16; j++) {
            int x0 = (qs[j] & 0xF) | (((qh >> j) << 4) & 0x10);
            int x1 = (qs[j] >> 4) | ((qh >> (j + 12)) & 0x10);
            y[j] = d * (float)(x0 - off) + m;
            y[j + 16] = d * (float)(x1 - off) + m;
        }
        break;
    }
    case Q8_0: {
        float d = h2f(b);
        const int8_t *qs = (const int8_t *)(b + 2);
        for (int j = 0; j < 32; j++) y[j] = d * (float)qs[j];
        break;
    }
    case Q4_K: {
        float d = h2f(b), dmin = h2f(b + 2);
        const uint8_t *sc = b + 4, *q = b + 16;
        for (int j = 0, is = 0; j < 256; j += 64, is += 2, q += 32) {
            uint8_t s, m;
            scale_min_k4(is, sc, &s, &m);
            float d1 = d * s, m1 = dmin * m;
            scale_min_k4(is + 1, sc, &s, &m);
            float d2 = d * s, m2 = dmin * m;
            for (int l = 0; l < 32; l++) y[j + l] = d1 * (float)(q[l] & 0xF) - m1;
            for (int l = 0; l < 32; l++) y[j + 32 + l] = d2 * (float)(q[l] >> 4) - m2;
        }
        break;
    }
    case Q5_K: {
        float d = h2f(b), dmin = h2f(b + 2);
        const uint8_t *sc = b + 4, *qh = b + 16, *ql = b + 48;
        uint8_t u1 = 1, u2 = 2;
        for (int j = 0, is = 0; j < 256; j += 64, is += 2, ql += 32, u1 <<= 2, u2 <<= 2) {
            uint8_t s, m;
            scale_min_k4(is, sc, &s, &m);
            float d1 = d * s, m1 = dmin * m;
            scale_min_k4(is + 1, sc, &s, &m);
            float d2 = d * s, m2 = dmin * m;
            for (int l = 0; l < 32; l++) y[j + l] = d1 * (float)((ql[l] & 0xF) + (qh[l] & u1 ? 16 : 0)) - m1;
            for (int l = 0; l < 32; l++) y[j + 32 + l] = d2 * (float)((ql[l] >> 4) + (qh[l] & u2 ? 16 : 0)) - m2;
        }
        break;
    }
    case Q6_K: {
        const uint8_t *ql = b, *qh = b + 128;
        const int8_t *sc = (const int8_t *)(b + 192);
        float d = h2f(b + 208);
        for (int n = 0; n < 256; n += 128, ql += 64, qh += 32, sc += 8) {
            for (int l = 0; l < 32; l++) {
                int is = l / 16;
                int q1 = (int)((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
                int q2 = (int)((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
                int q3 = (int)((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                int q4 = (int)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                y[n + l] = d * sc[is] * q1;
                y[n + l + 32] = d * sc[is + 2] * q2;
                y[n + l + 64] = d * sc[is + 4] * q3;
                y[n + l + 96] = d * sc[is + 6] * q4;
            }
        }
        break;
    }
    }
}

#if defined(__AVX2__) && defined(__FMA__)
static inline __m256 bytes_to_ps(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)); }

/* one row of Q4_0 / Q4_1 / Q8_0 blocks . x, eight lanes per step, without a decoded copy */
static float row_dot_fast(int type, const uint8_t *row, int nb, const float *x) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
    const __m128i low = _mm_set1_epi8(0x0F);
    if (type == Q8_0) {
        for (int i = 0; i < nb; i++, row += 34, x += 32) {
            __m256 d = _mm256_set1_ps(h2f(row));
            const uint8_t *q = row + 2;
            __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)q)));
            __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8))));
            __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + 16))));
            __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + 24))));
            acc0 = _mm256_fmadd_ps(_mm256_mul_ps(d, w0), _mm256_loadu_ps(x), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_mul_ps(d, w1), _mm256_loadu_ps(x + 8), acc1);
            acc2 = _mm256_fmadd_ps(_mm256_mul_ps(d, w2), _mm256_loadu_ps(x + 16), acc2);
            acc3 = _mm256_fmadd_ps(_mm256_mul_ps(d, w3), _mm256_loadu_ps(x + 24), acc3);
        }
    } else {
        /* sum_i x_i (d q_i + m) = d sum_i x_i q_i + m sum_i x_i; for Q4_0, m = -8 d */
        const int bb = type == Q4_1 ? 20 : 18, qoff = type == Q4_1 ? 4 : 2;
        for (int i = 0; i < nb; i++, row += bb, x += 32) {
            float d = h2f(row), m = type == Q4_1 ? h2f(row + 2) : -8.0f * d;
            __m128i v = _mm_loadu_si128((const __m128i *)(row + qoff));
            __m128i lo = _mm_and_si128(v, low), hi = _mm_and_si128(_mm_srli_epi16(v, 4), low);
            __m256 xa = _mm256_loadu_ps(x), xb = _mm256_loadu_ps(x + 8), xc = _mm256_loadu_ps(x + 16),
                   xd = _mm256_loadu_ps(x + 24);
            __m256 blk = _mm256_mul_ps(bytes_to_ps(lo), xa);
            blk = _mm256_fmadd_ps(bytes_to_ps(_mm_srli_si128(lo, 8)), xb, blk);
            __m256 blk2 = _mm256_mul_ps(bytes_to_ps(hi), xc);
            blk2 = _mm256_fmadd_ps(bytes_to_ps(_mm_srli_si128(hi, 8)), xd, blk2);
            __m256 dd = _mm256_set1_ps(d);
            acc0 = _mm256_fmadd_ps(dd, blk, acc0);
            acc1 = _mm256_fmadd_ps(dd, blk2, acc1);
            /* the block's sum of x, for the min term */
            __m256 xs = _mm256_add_ps(_mm256_add_ps(xa, xb), _mm256_add_ps(xc, xd));
            acc2 = _mm256_fmadd_ps(_mm256_set1_ps(m), xs, acc2);
        }
    }
    return leank_hsum(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
}
#endif

/* y (T, N; rows ldy floats apart) = x (T, K) . W^T (+ bias), W: N rows of row_bytes bytes of `type`
   blocks. OpenMP over rows. Returns 0, or -1 for a type or shape it does not handle. */
int leank_qmatmul(int type, const uint8_t *w, int64_t row_bytes, int N, int K, const float *x, int T, float *y,
                  int64_t ldy, const float *bias, int threads) {
    int bs = block_size(type), bb = block_bytes(type);
    if (!bs || K % bs || row_bytes != (int64_t)(K / bs) * bb || N <= 0 || T <= 0 || ldy < N) return -1;
    const int nb = K / bs;
    int fast = 0;
#if defined(__AVX2__) && defined(__FMA__)
    fast = type == Q4_0 || type == Q4_1 || type == Q8_0;
#endif
    float *tmp = NULL;
    if (!fast) { /* one decoded row per thread */
        tmp = (float *)malloc(sizeof(float) * (size_t)K * (size_t)(threads > 0 ? threads : 1));
        if (!tmp) return -1;
    }
    #pragma omp parallel for num_threads(threads > 0 ? threads : 1) schedule(static)
    for (int n = 0; n < N; n++) {
        const uint8_t *row = w + (int64_t)n * row_bytes;
        float b = bias ? bias[n] : 0.0f;
#if defined(__AVX2__) && defined(__FMA__)
        if (fast) {
            for (int t = 0; t < T; t++) y[(int64_t)t * ldy + n] = row_dot_fast(type, row, nb, x + (int64_t)t * K) + b;
            continue;
        }
#endif
        int me = 0;
#if defined(_OPENMP)
        me = omp_get_thread_num();
#endif
        float *dec = tmp + (size_t)me * K;
        for (int i = 0; i < nb; i++) decode_block(type, row + (int64_t)i * bb, dec + (int64_t)i * bs);
        for (int t = 0; t < T; t++) y[(int64_t)t * ldy + n] = leank_dot(dec, x + (int64_t)t * K, K) + b;
    }
    free(tmp);
    return 0;
}

/* rows `ids` (n of them) of W, decoded to float32 into out (n, K); an id out of range gives -1 */
int leank_dequantize_rows(int type, const uint8_t *w, int64_t row_bytes, int N, int K, const int64_t *ids, int n,
                          float *out, int threads) {
    int bs = block_size(type), bb = block_bytes(type);
    if (!bs || K % bs || row_bytes != (int64_t)(K / bs) * bb) return -1;
    for (int i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= N) return -1;
    #pragma omp parallel for num_threads(threads > 0 ? threads : 1) schedule(static)
    for (int i = 0; i < n; i++) {
        const uint8_t *row = w + ids[i] * row_bytes;
        for (int j = 0; j < K / bs; j++) decode_block(type, row + (int64_t)j * bb, out + (int64_t)i * K + (int64_t)j * bs);
    }
    return 0;
}

/* the whole matrix: out (N, K) */
int leank_dequantize(int type, const uint8_t *w, int64_t row_bytes, int N, int K, float *out, int threads) {
    int bs = block_size(type), bb = block_bytes(type);
    if (!bs || K % bs || row_bytes != (int64_t)(K / bs) * bb) return -1;
    #pragma omp parallel for num_threads(threads > 0 ? threads : 1) schedule(static)
    for (int n = 0; n < N; n++) {
        const uint8_t *row = w + (int64_t)n * row_bytes;
        for (int j = 0; j < K / bs; j++) decode_block(type, row + (int64_t)j * bb, out + (int64_t)n * K + (int64_t)j * bs);
    }
    return 0;
}

/* y = x / sqrt(mean(x^2) + eps) * w for `rows` rows of `dim` floats; the sum of squares in double, as
   ggml's rms_norm. Small vectors: no threads. */
void leank_rms_norm(const float *x, const float *w, float eps, int rows, int dim, float *y) {
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (int64_t)r * dim;
        float *yr = y + (int64_t)r * dim;
        double sum = 0.0;
        for (int i = 0; i < dim; i++) sum += (double)(xr[i] * xr[i]);
        float scale = 1.0f / sqrtf((float)(sum / dim) + eps);
        for (int i = 0; i < dim; i++) yr[i] = xr[i] * scale * w[i];
    }
}
