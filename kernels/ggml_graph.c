/* Matrix products from GGUF blocks through ggml's own matrix multiply (ggml_mul_mat in a one-node graph
   per matrix part), on ggml's CPU thread pool.

   Built by leank/kernels/ggml_cpu.py against the headers and libraries that llama-cpp-python installs
   (site-packages/include, llama_cpp/lib: libggml-base, libggml-cpu), for the version it checked. The
   weights are never copied: each matrix is a ggml tensor over leank's own bytes (the memory-mapped
   GGUF file's blocks), wrapped by ggml_backend_cpu_buffer_from_ptr. For a many-row product (a prompt)
   ggml then quantizes the activations once and runs its tiled integer kernels; for one row (a decode
   step) its vec_dot kernels, exactly as llama.cpp computes the same product. */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ggml.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"

/* ggml's TENSOR_ALIGNMENT (ggml-impl.h, not public): ggml_backend_cpu_buffer_from_ptr aborts the
   process on a pointer that is not aligned to it, so weights are checked first */
#define LEANK_GGML_ALIGN 32
#define LEANK_MAX_PARTS 8

typedef struct {
    struct ggml_context *ctx;
    struct ggml_tensor *w;
    ggml_backend_buffer_t buf;
    int repacked; /* 1: the tensor is ggml's own interleaved copy; 0: it points at the caller's bytes */
} leank_weight;

static void quiet(enum ggml_log_level level, const char *text, void *user) {
    (void)level; (void)text; (void)user;
}

/* one product at a time: the pool and the work buffer are shared by every matrix */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct ggml_threadpool *pool;
static int pool_threads;
static uint8_t *work;
static size_t work_size;
static ggml_backend_buffer_type_t repack_buft; /* ggml's "CPU_REPACK" buffer type, when this CPU has one */

int leank_ggml_init(void) {
    ggml_cpu_init();
    ggml_backend_reg_t reg = ggml_backend_cpu_reg();
    ggml_backend_dev_t dev = ggml_backend_reg_dev_get(reg, 0);
    ggml_backend_dev_get_extra_bufts_t get =
        (ggml_backend_dev_get_extra_bufts_t)ggml_backend_reg_get_proc_address(reg, "ggml_backend_dev_get_extra_bufts");
    for (ggml_backend_buffer_type_t *b = get ? get(dev) : NULL; b && *b; b++)
        if (strcmp(ggml_backend_buft_name(*b), "CPU_REPACK") == 0) repack_buft = *b;
    return 0;
}

/* A handle on `rows` rows of `k` values of GGML type `type`, `row_bytes` each, at `data`; NULL when
   ggml cannot take them as they are (unknown type, a row length that is not whole blocks, a row size
   that is not ggml's, misaligned data). With `repack`, and where ggml has an interleaved layout for
   the type on this CPU (Q4_0 and Q4_K on an AVX2 or AVX-512 x86: its "CPU_REPACK" buffer, which llama.cpp uses by
   default), the tensor is ggml's own copy in that layout and `data` may go; otherwise it points at
   `data`, which must outlive the handle. */
void *leank_ggml_weight(int type, const void *data, int64_t rows, int64_t k, int64_t row_bytes, int repack) {
    if (type < 0 || type >= GGML_TYPE_COUNT || rows <= 0 || k <= 0 || !data) return NULL;
    const int64_t blck = ggml_blck_size((enum ggml_type)type);
    if (blck <= 0 || k % blck || ggml_type_size((enum ggml_type)type) == 0) return NULL;
    if ((int64_t)ggml_row_size((enum ggml_type)type, k) != row_bytes) return NULL;
    if ((uintptr_t)data % LEANK_GGML_ALIGN) return NULL;
    leank_weight *h = calloc(1, sizeof *h);
    if (!h) return NULL;
    struct ggml_init_params p = {ggml_tensor_overhead() + 64, NULL, true};
    h->ctx = ggml_init(p);
    if (!h->ctx) { free(h); return NULL; }
    h->w = ggml_new_tensor_2d(h->ctx, (enum ggml_type)type, k, rows);
    if (repack && repack_buft) { /* a copy in ggml's interleaved layout, where it has one for the type */
        h->buf = ggml_backend_buft_alloc_buffer(repack_buft, ggml_backend_buft_get_alloc_size(repack_buft, h->w));
        if (h->buf && ggml_backend_tensor_alloc(h->buf, h->w, ggml_backend_buffer_get_base(h->buf)) == GGML_STATUS_SUCCESS
            && h->w->extra) {
            ggml_log_callback was;
            void *was_data;
            ggml_log_get(&was, &was_data);
            ggml_log_set(quiet, NULL); /* ggml says "repack: repack tensor ..." for every matrix */
            ggml_backend_tensor_set(h->w, data, 0, ggml_nbytes(h->w));
            ggml_log_set(was, was_data);
            h->repacked = 1;
            return h;
        }
        if (h->buf) ggml_backend_buffer_free(h->buf);
        h->w->buffer = NULL;
        h->w->data = NULL;
        h->w->extra = NULL;
    }
    h->buf = ggml_backend_cpu_buffer_from_ptr((void *)data, ggml_nbytes(h->w));
    if (!h->buf || ggml_backend_tensor_alloc(h->buf, h->w, (void *)data) != GGML_STATUS_SUCCESS) {
        if (h->buf) ggml_backend_buffer_free(h->buf);
        ggml_free(h->ctx);
        free(h);
        return NULL;
    }
    return h;
}

int leank_ggml_weight_repacked(void *handle) {
    return handle ? ((leank_weight *)handle)->repacked : 0;
}

void leank_ggml_weight_free(void *handle) {
    leank_weight *h = handle;
    if (!h) return;
    ggml_backend_buffer_free(h->buf);  /* a buffer from a pointer frees nothing of the pointer's memory */
    ggml_free(h->ctx);
    free(h);
}

/* y (T rows, `ldy` floats apart) = x (T, K float32, contiguous) . [W_0; W_1; ...]^T: the parts' outputs
   side by side, part p's columns after part p-1's. Every part has K columns. Returns 0, or -1 (bad
   arguments, no memory, ggml failed). */
int leank_ggml_mul(void *const *weights, int parts, const float *x, int64_t T, float *y, int64_t ldy, int threads) {
    if (parts <= 0 || parts > LEANK_MAX_PARTS || T <= 0 || !x || !y) return -1;
    const int64_t K = ((leank_weight *)weights[0])->w->ne[0];
    int64_t cols = 0;
    for (int i = 0; i < parts; i++) {
        if (!weights[i] || ((leank_weight *)weights[i])->w->ne[0] != K) return -1;
        cols += ((leank_weight *)weights[i])->w->ne[1];
    }
    if (ldy < cols) return -1;
    /* the graph's tensors and nodes live in a small context on the stack: nothing is allocated by ggml */
    _Alignas(64) uint8_t mem[16384];
    const size_t need = ggml_tensor_overhead() * (parts + 1) + ggml_graph_overhead_custom(2 * LEANK_MAX_PARTS, false) + 256;
    if (need > sizeof mem) return -1;
    struct ggml_init_params p = {sizeof mem, mem, true};
    struct ggml_context *ctx = ggml_init(p);
    if (!ctx) return -1;
    struct ggml_tensor *X = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, K, T);
    X->data = (void *)x;
    struct ggml_cgraph *gf = ggml_new_graph_custom(ctx, 2 * LEANK_MAX_PARTS, false);
    int64_t col = 0;
    for (int i = 0; i < parts; i++) {
        struct ggml_tensor *W = ((leank_weight *)weights[i])->w;
        struct ggml_tensor *Y = ggml_mul_mat(ctx, W, X); /* (rows_i, T): written in place into y's columns */
        Y->data = y + col;
        Y->nb[1] = (size_t)ldy * sizeof(float);
        Y->nb[2] = Y->nb[3] = Y->nb[1] * (size_t)T;
        ggml_build_forward_expand(gf, Y);
        col += W->ne[1];
    }
    int rc = -1;
    pthread_mutex_lock(&lock);
    const int nt = threads > 0 ? threads : 1;
    if (!pool || pool_threads != nt) {
        if (pool) ggml_threadpool_free(pool);
        struct ggml_threadpool_params tp = ggml_threadpool_params_default(nt);
        tp.poll = 0; /* between products the workers sleep: torch's own threads need the cores then */
        pool = ggml_threadpool_new(&tp);
        pool_threads = pool ? nt : 0;
    }
    if (pool) {
        struct ggml_cplan plan = ggml_graph_plan(gf, nt, pool);
        if (plan.work_size > work_size) {
            uint8_t *grown = realloc(work, plan.work_size);
            if (grown) { work = grown; work_size = plan.work_size; }
        }
        if (plan.work_size <= work_size) {
            plan.work_data = work;
            rc = ggml_graph_compute(gf, &plan) == GGML_STATUS_SUCCESS ? 0 : -1;
        }
    }
    pthread_mutex_unlock(&lock);
    ggml_free(ctx);
    return rc;
}
