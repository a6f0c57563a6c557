/* Matrix products from GGUF blocks through ggml's own row kernels, spread over OpenMP threads.

   Built with the other CPU kernels by leank/kernels/cpu.py; leank/kernels/ggml_cpu.py finds ggml's CPU
   library (installed with llama-cpp-python) and passes in its function pointers: `quantize` turns a
   float32 activation row into the 8-bit blocks ggml pairs with the weight type (Q8_0, Q8_1 or Q8_K),
   `dot` is that type's integer dot product of one weight row with one such activation row. These are
   the kernels llama.cpp's matrix products run; this file only decides which rows go to which thread
   and in what order. No ggml header is needed: the two signatures are ggml's `ggml_from_float_t` and
   `ggml_vec_dot_t` (ggml-cpu.h), checked by the Python side against the version it was written for. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

typedef void (*leank_vec_dot_t)(int n, float *s, size_t bs, const void *x, size_t bx, const void *y, size_t by, int nrc);
typedef void (*leank_from_float_t)(const float *x, void *y, int64_t k);

/* weight rows per tile and activation rows per tile of a many-row product (a prompt): a tile's weight
   rows stay in L1 while its activations (TILE_T rows of K 8-bit values) stream from L2 */
#define TILE_N 16
#define TILE_T 32

/* y (T, N; rows ldy floats apart) = x (T, K) . W^T (+ bias). W: N rows of row_bytes bytes, x quantized
   row by row into act_bytes bytes each. Returns 0, or -1 if the work buffer cannot be allocated. */
int leank_ggml_matmul(leank_vec_dot_t dot, leank_from_float_t quantize, int64_t act_bytes, const uint8_t *w,
                      int64_t row_bytes, int N, int K, const float *x, int T, float *y, int64_t ldy,
                      const float *bias, int threads) {
    if (N <= 0 || T <= 0 || K <= 0 || ldy < N || act_bytes <= 0) return -1;
    uint8_t *xq = (uint8_t *)malloc((size_t)act_bytes * (size_t)T);
    if (!xq) return -1;
    const int nt = threads > 0 ? threads : 1;
    if (T == 1) { /* a decode step: one activation row. Rows go out in chunks of 64 as threads ask: on a
                     shared machine a thread that was descheduled then holds up the product by one chunk,
                     not by its whole static share */
        quantize(x, xq, K);
        #pragma omp parallel for num_threads(nt) schedule(dynamic, 64)
        for (int n = 0; n < N; n++) {
            float s;
            dot(K, &s, 0, w + (int64_t)n * row_bytes, 0, xq, 0, 1);
            y[n] = bias ? s + bias[n] : s;
        }
        free(xq);
        return 0;
    }
    #pragma omp parallel num_threads(nt)
    {
        #pragma omp for schedule(static)
        for (int t = 0; t < T; t++) quantize(x + (int64_t)t * K, xq + (int64_t)t * act_bytes, K);
        const int tiles = (N + TILE_N - 1) / TILE_N;
        #pragma omp for schedule(dynamic, 1)
        for (int tile = 0; tile < tiles; tile++) {
            const int n0 = tile * TILE_N, n1 = n0 + TILE_N < N ? n0 + TILE_N : N;
            for (int t0 = 0; t0 < T; t0 += TILE_T) {
                const int t1 = t0 + TILE_T < T ? t0 + TILE_T : T;
                for (int n = n0; n < n1; n++) {
                    const uint8_t *row = w + (int64_t)n * row_bytes;
                    const float b = bias ? bias[n] : 0.0f;
                    for (int t = t0; t < t1; t++) {
                        float s;
                        dot(K, &s, 0, row, 0, xq + (int64_t)t * act_bytes, 0, 1);
                        y[(int64_t)t * ldy + n] = s + b;
                    }
                }
            }
        }
    }
    free(xq);
    return 0;
}
