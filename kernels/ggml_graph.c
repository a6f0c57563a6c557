/* Matrix products from GGUF blocks through ggml's own matrix multiply (ggml_mul_mat in a one-node graph
   per matrix part), on ggml's CPU thread pool.

   Built by leank/kernels/ggml_cpu.py against the headers and libraries that llama-cpp-python installs
   (site-packages/include, llama_cpp/lib: libggml-base, libggml-cpu), for the version it checked. The
   weights are never copied: each matrix is a ggml tensor over leank's own bytes (the memory-mapped
   GGUF file's blocks), wrapped by ggml_backend_cpu_buffer_from_ptr. For a many-row product (a prompt)
   ggml then quantizes the activations once and runs its tiled integer kernels; for one row (a decode
   step) its vec_dot kernels, exactly as llama.cpp computes the same product.

   A decode step can also run as a program (leank_ggml_prog_*): many ggml nodes (products, RMSNorm,
   SwiGLU, residual adds) cut into segments, one planned ggml graph each, built once and computed every
   step; between segments the caller does what ggml does not (RoPE, the cache's attention). Per call a
   one-node graph costs a graph build, a plan and a wake-up of the pool's workers; on SmolLM2 that is
   121 graphs a step (see ggml_cpu.py). */
#include <pthread.h>
#include <stdbool.h>
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
static ggml_backend_buffer_type_t repack_buft;
/* the pool, made again for another thread count (under `lock`); NULL when ggml cannot make one. Between
   graphs its workers sleep (poll 0): torch's own threads need the cores then, and spinning workers
   (poll 1-10) measured no faster on a decode step of SmolLM2 (2 threads, issue 16). */
static struct ggml_threadpool *pool_for(int nt) {
    if (!pool || pool_threads != nt) {
        if (pool) ggml_threadpool_free(pool);
        struct ggml_threadpool_params tp = ggml_threadpool_params_default(nt);
        tp.poll = 0;
        pool = ggml_threadpool_new(&tp);
        pool_threads = pool ? nt : 0;
    }
    return pool;
}

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
    if (pool_for(nt)) {
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

/* ---- programs: segments of ggml nodes, each one graph planned once and computed every decode step ----

   Nodes are numbered in creation order. A node is a leaf (an input bound per run to a caller's slot
   pointer, or a constant float32 vector that the caller keeps alive) or an op over earlier nodes. Op
   results live in memory the program owns, unless bound to a slot (written straight into the caller's
   tensor, `ld` floats a row). An op that reads a node computed in an earlier segment reads it through a
   leaf aliasing its memory (so no graph recomputes another segment's nodes); a bound result cannot be
   read by a later segment. */

#define LEANK_PROG_GRAPH 256 /* nodes + leaves of one segment's graph */

typedef struct {
    struct ggml_tensor *t;
    int seg;       /* the segment that computes it (-1: a leaf) */
    int slot;      /* >= 0: its data is ptrs[slot] + offset at each run */
    size_t offset;
    int alias_of;  /* >= 0: a leaf over that node's memory (a node of an earlier segment) */
    int alias;     /* the leaf aliasing this node in the segment `alias_seg`, or -1 */
    int alias_seg;
    int bound_seg; /* the last segment whose bindings list this node (dedupe) */
    int rows_dim;  /* the dimension that counts rows: 1 for (n, rows), 2 for (head_dim, heads, rows) */
} prog_node;

typedef struct {
    int node, slot;
    size_t offset;
} prog_binding;

typedef struct {
    struct ggml_context *ctx;
    prog_node *nodes;
    int n_nodes, max_nodes;
    int n_slots;
    int seg, max_segs;           /* the segment being built */
    struct ggml_cgraph **graphs; /* one per ended segment */
    prog_binding *bindings;      /* grouped by segment: binding_start[s] .. binding_start[s + 1] */
    int *binding_seg;
    int n_bindings, max_bindings;
    int *binding_start;
    void **owned;
    int n_owned;
    struct ggml_cplan *plans;
    int plan_threads;
    int finished, failed;
} leank_prog;

void leank_ggml_prog_free(void *handle) {
    leank_prog *p = handle;
    if (!p) return;
    for (int i = 0; i < p->n_owned; i++) free(p->owned[i]);
    free(p->owned);
    free(p->nodes);
    free(p->graphs);
    free(p->bindings);
    free(p->binding_seg);
    free(p->binding_start);
    free(p->plans);
    if (p->ctx) ggml_free(p->ctx);
    free(p);
}

/* a program of at most `max_nodes` nodes, `max_segs` segments and `n_slots` caller pointers per run */
void *leank_ggml_prog_new(int max_nodes, int max_segs, int n_slots) {
    if (max_nodes <= 0 || max_segs <= 0 || n_slots < 0) return NULL;
    leank_prog *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    p->max_nodes = 2 * max_nodes; /* room for the aliases */
    p->max_segs = max_segs;
    p->n_slots = n_slots;
    p->max_bindings = 4 * max_nodes;
    struct ggml_init_params ip = {
        ggml_tensor_overhead() * (size_t)p->max_nodes + ggml_graph_overhead_custom(LEANK_PROG_GRAPH, false) * (size_t)max_segs + 1024,
        NULL, true};
    p->ctx = ggml_init(ip);
    p->nodes = calloc((size_t)p->max_nodes, sizeof *p->nodes);
    p->graphs = calloc((size_t)max_segs, sizeof *p->graphs);
    p->bindings = calloc((size_t)p->max_bindings, sizeof *p->bindings);
    p->binding_seg = calloc((size_t)p->max_bindings, sizeof *p->binding_seg);
    p->binding_start = calloc((size_t)max_segs + 1, sizeof *p->binding_start);
    p->owned = calloc((size_t)p->max_nodes, sizeof *p->owned);
    p->plans = calloc((size_t)max_segs, sizeof *p->plans);
    if (!p->ctx || !p->nodes || !p->graphs || !p->bindings || !p->binding_seg || !p->binding_start || !p->owned || !p->plans) {
        leank_ggml_prog_free(p);
        return NULL;
    }
    return p;
}

static int prog_add(leank_prog *p, struct ggml_tensor *t, int seg) {
    if (!t || p->n_nodes >= p->max_nodes) { p->failed = 1; return -1; }
    prog_node *n = &p->nodes[p->n_nodes];
    n->t = t;
    n->seg = seg;
    n->slot = -1;
    n->alias_of = n->alias = -1;
    n->alias_seg = n->bound_seg = -1;
    n->rows_dim = 1;
    return p->n_nodes++;
}

static int prog_open(leank_prog *p) {
    return p && !p->failed && !p->finished && p->seg < p->max_segs;
}

/* the tensor through which the segment being built reads node `i`, or NULL */
static struct ggml_tensor *prog_src(leank_prog *p, int i) {
    if (i < 0 || i >= p->n_nodes || p->nodes[i].alias_of >= 0) return NULL;
    prog_node *n = &p->nodes[i];
    if (n->seg < 0 || n->seg == p->seg) return n->t;
    if (n->slot >= 0) return NULL; /* written into a caller's tensor: not kept for later segments */
    if (n->alias_seg == p->seg) return p->nodes[n->alias].t;
    struct ggml_tensor *a = ggml_new_tensor(p->ctx, n->t->type, GGML_MAX_DIMS, n->t->ne);
    int j = prog_add(p, a, -1);
    if (j < 0) return NULL;
    p->nodes[j].alias_of = i;
    p->nodes[i].alias = j; /* `n` may not be used after prog_add: nodes do not move, but be plain */
    p->nodes[i].alias_seg = p->seg;
    return a;
}

/* an input leaf of `cols` x `rows` float32 (row-major, contiguous), read from ptrs[slot] at each run */
int leank_ggml_prog_input(void *handle, int slot, int64_t cols, int64_t rows) {
    leank_prog *p = handle;
    if (!prog_open(p) || slot < 0 || slot >= p->n_slots || cols <= 0 || rows <= 0) return -1;
    int i = prog_add(p, ggml_new_tensor_2d(p->ctx, GGML_TYPE_F32, cols, rows), -1);
    if (i >= 0) p->nodes[i].slot = slot;
    return i;
}

/* an input leaf of `n` int32 (positions), read from ptrs[slot] at each run */
int leank_ggml_prog_input_i32(void *handle, int slot, int64_t n) {
    leank_prog *p = handle;
    if (!prog_open(p) || slot < 0 || slot >= p->n_slots || n <= 0) return -1;
    int i = prog_add(p, ggml_new_tensor_1d(p->ctx, GGML_TYPE_I32, n), -1);
    if (i >= 0) p->nodes[i].slot = slot;
    return i;
}

/* a constant leaf: `n` float32 at `data`, which the caller keeps alive and unchanged */
int leank_ggml_prog_constant(void *handle, const float *data, int64_t n) {
    leank_prog *p = handle;
    if (!prog_open(p) || !data || n <= 0) return -1;
    struct ggml_tensor *t = ggml_new_tensor_1d(p->ctx, GGML_TYPE_F32, n);
    if (!t) return -1;
    t->data = (void *)data;
    return prog_add(p, t, -1);
}

static int prog_op(leank_prog *p, struct ggml_tensor *t) {
    if (!t) { p->failed = 1; return -1; }
    return prog_add(p, t, p->seg);
}

/* weight (a leank_ggml_weight handle) times node x: (rows of the weight) x (rows of x) */
int leank_ggml_prog_mul_mat(void *handle, void *weight, int x) {
    leank_prog *p = handle;
    if (!prog_open(p) || !weight) return -1;
    struct ggml_tensor *X = prog_src(p, x), *W = ((leank_weight *)weight)->w;
    if (!X || X->type != GGML_TYPE_F32 || X->ne[0] != W->ne[0]) return -1;
    return prog_op(p, ggml_mul_mat(p->ctx, W, X));
}

/* x / sqrt(mean(x^2) + eps) * weight (a constant node of x's row length), per row, as llama.cpp does */
int leank_ggml_prog_rms_norm(void *handle, int x, int weight, float eps) {
    leank_prog *p = handle;
    if (!prog_open(p)) return -1;
    struct ggml_tensor *X = prog_src(p, x), *Wn = prog_src(p, weight);
    if (!X || !Wn || Wn->ne[0] != X->ne[0] || ggml_nelements(Wn) != Wn->ne[0]) return -1;
    struct ggml_tensor *n = ggml_rms_norm(p->ctx, X, eps);
    int i = prog_op(p, n);
    if (i < 0) return -1;
    int j = prog_op(p, ggml_mul(p->ctx, p->nodes[i].t, Wn));
    if (j >= 0) p->nodes[i].rows_dim = p->nodes[j].rows_dim = p->nodes[x].rows_dim; /* per head: x was reshaped */
    return j;
}

/* a + b, b broadcast over a's rows when it is one row (a bias) */
int leank_ggml_prog_add(void *handle, int a, int b) {
    leank_prog *p = handle;
    if (!prog_open(p)) return -1;
    struct ggml_tensor *A = prog_src(p, a), *B = prog_src(p, b);
    if (!A || !B || A->ne[0] != B->ne[0] || !ggml_can_repeat(B, A)) return -1;
    return prog_op(p, ggml_add(p->ctx, A, B));
}

/* node x (contiguous, unbound) seen as (ne0, ne1, ne2): heads of a row, for RMSNorm per head and RoPE */
int leank_ggml_prog_reshape(void *handle, int x, int64_t ne0, int64_t ne1, int64_t ne2) {
    leank_prog *p = handle;
    if (!prog_open(p) || x < 0 || x >= p->n_nodes || p->nodes[x].slot >= 0) return -1;
    struct ggml_tensor *X = prog_src(p, x);
    if (!X || !ggml_is_contiguous(X) || ne0 <= 0 || ne1 <= 0 || ne2 <= 0 || ne0 * ne1 * ne2 != ggml_nelements(X)) return -1;
    int i = prog_op(p, ggml_reshape_3d(p->ctx, X, ne0, ne1, ne2)); /* a view: its data is set by finish */
    if (i >= 0) p->nodes[i].rows_dim = 2;
    return i;
}

/* RoPE of x (head_dim, heads, rows) at positions pos (an int32 input, one a row), as llama.cpp
   (ggml_rope_ext; mode 0 pairs (2i, 2i+1), GGML_ROPE_TYPE_NEOX pairs (i, i + n_dims/2)); freq_factors: a
   constant node of n_dims/2 or -1 */
int leank_ggml_prog_rope(void *handle, int x, int pos, int freq_factors, int n_dims, int mode, int n_ctx_orig,
                         float freq_base, float freq_scale, float ext_factor, float attn_factor, float beta_fast,
                         float beta_slow) {
    leank_prog *p = handle;
    if (!prog_open(p) || (mode != 0 && mode != GGML_ROPE_TYPE_NEOX)) return -1;
    struct ggml_tensor *X = prog_src(p, x), *Pos = prog_src(p, pos), *Ff = NULL;
    if (freq_factors >= 0 && !(Ff = prog_src(p, freq_factors))) return -1;
    if (!X || !Pos || X->type != GGML_TYPE_F32 || Pos->type != GGML_TYPE_I32 || Pos->ne[0] != X->ne[2] || X->ne[3] != 1
        || n_dims != X->ne[0] || n_dims % 2 || (Ff && (Ff->type != GGML_TYPE_F32 || Ff->ne[0] < n_dims / 2)))
        return -1;
    int i = prog_op(p, ggml_rope_ext(p->ctx, X, Pos, Ff, n_dims, mode, n_ctx_orig, freq_base, freq_scale, ext_factor,
                                     attn_factor, beta_fast, beta_slow));
    if (i >= 0) p->nodes[i].rows_dim = 2;
    return i;
}

/* silu(gate) * up, elementwise */
int leank_ggml_prog_swiglu(void *handle, int gate, int up) {
    leank_prog *p = handle;
    if (!prog_open(p)) return -1;
    struct ggml_tensor *G = prog_src(p, gate), *U = prog_src(p, up);
    if (!G || !U || !ggml_are_same_shape(G, U)) return -1;
    return prog_op(p, ggml_swiglu_split(p->ctx, G, U));
}

/* node i (an op of the segment being built, 2-D (n, rows) or 3-D (n0, n1, rows)) is written at
   ptrs[slot] + offset bytes, rows `ld` floats apart, instead of into the program's memory */
int leank_ggml_prog_bind(void *handle, int i, int slot, int64_t offset, int64_t ld) {
    leank_prog *p = handle;
    if (!prog_open(p) || i < 0 || i >= p->n_nodes || slot < 0 || slot >= p->n_slots || offset < 0) return -1;
    prog_node *n = &p->nodes[i];
    struct ggml_tensor *t = n->t;
    if (n->seg != p->seg || n->slot >= 0 || n->alias >= 0 || t->view_src || t->type != GGML_TYPE_F32
        || !ggml_is_contiguous(t) || t->ne[3] != 1 || offset % sizeof(float))
        return -1;
    const int rd = n->rows_dim;
    if (ld < t->ne[0] * (rd == 2 ? t->ne[1] : 1)) return -1;
    for (int j = 0; j < p->n_nodes; j++) /* a view of it would keep the program's memory */
        if (p->nodes[j].t->view_src == t) return -1;
    n->slot = slot;
    n->offset = (size_t)offset;
    t->nb[rd] = (size_t)ld * sizeof(float);
    for (int d = rd + 1; d < GGML_MAX_DIMS; d++) t->nb[d] = t->nb[d - 1] * (size_t)t->ne[d - 1];
    return 0;
}

static int prog_bindings_of(leank_prog *p, struct ggml_tensor *t, int seg) {
    for (int i = 0; i < p->n_nodes; i++) {
        prog_node *n = &p->nodes[i];
        if (n->t != t || n->slot < 0 || n->bound_seg == seg) continue;
        if (p->n_bindings >= p->max_bindings) return -1;
        p->bindings[p->n_bindings] = (prog_binding){i, n->slot, n->offset};
        p->binding_seg[p->n_bindings++] = seg;
        n->bound_seg = seg;
    }
    return 0;
}

/* ends the segment being built: its graph computes every op node created since the last one. Returns
   the segment's index, or -1. */
int leank_ggml_prog_end_segment(void *handle) {
    leank_prog *p = handle;
    if (!prog_open(p)) return -1;
    struct ggml_cgraph *gf = ggml_new_graph_custom(p->ctx, LEANK_PROG_GRAPH, false);
    if (!gf) { p->failed = 1; return -1; }
    int ops = 0;
    for (int i = 0; i < p->n_nodes; i++)
        if (p->nodes[i].seg == p->seg && p->nodes[i].alias_of < 0) {
            ggml_build_forward_expand(gf, p->nodes[i].t);
            ops++;
        }
    if (!ops) { p->failed = 1; return -1; }
    /* the slots this graph reads or writes: its nodes and their sources */
    for (int k = 0; k < ggml_graph_n_nodes(gf); k++) {
        struct ggml_tensor *t = ggml_graph_node(gf, k);
        if (prog_bindings_of(p, t, p->seg)) { p->failed = 1; return -1; }
        for (int s = 0; s < GGML_MAX_SRC && t->src[s]; s++)
            if (prog_bindings_of(p, t->src[s], p->seg)) { p->failed = 1; return -1; }
    }
    p->graphs[p->seg] = gf;
    p->binding_start[p->seg + 1] = p->n_bindings;
    return p->seg++;
}

/* gives every unbound op node its memory (64-byte aligned) and every alias its node's; no more nodes
   after this. A node that a later segment reads (through an alias) has memory of its own; the others
   live only while their segment computes, so every segment's share one scratch buffer (the size of the
   largest segment's): on the 1.5B Qwen2.5-Coder a program holds ~0.3 MiB a row instead of ~4 MiB.
   Returns 0 or -1. */
int leank_ggml_prog_finish(void *handle) {
    leank_prog *p = handle;
    if (!p || p->failed || p->finished || p->seg == 0) return -1;
    size_t *off = calloc((size_t)p->n_nodes, sizeof *off);
    unsigned char *keep = calloc((size_t)p->n_nodes, 1);
    size_t *used = calloc((size_t)p->seg, sizeof *used);
    if (!off || !keep || !used) { free(off); free(keep); free(used); return -1; }
    for (int i = 0; i < p->n_nodes; i++) {
        if (p->nodes[i].alias < 0) continue;
        keep[i] = 1;
        for (struct ggml_tensor *v = p->nodes[i].t->view_src; v; v = v->view_src) /* a view's source too */
            for (int j = 0; j < i; j++)
                if (p->nodes[j].t == v) keep[j] = 1;
    }
    size_t scratch = 0;
    for (int i = 0; i < p->n_nodes; i++) { /* segment-local nodes: offsets into the scratch buffer */
        prog_node *n = &p->nodes[i];
        if (n->seg < 0 || n->slot >= 0 || n->t->view_src || keep[i]) continue;
        off[i] = used[n->seg];
        used[n->seg] += (ggml_nbytes(n->t) + 63) / 64 * 64;
        scratch = used[n->seg] > scratch ? used[n->seg] : scratch;
    }
    void *mem = NULL;
    int rc = posix_memalign(&mem, 64, scratch ? scratch : 64) ? -1 : 0;
    if (!rc) p->owned[p->n_owned++] = mem;
    for (int i = 0; i < p->n_nodes && !rc; i++) {
        prog_node *n = &p->nodes[i];
        if (n->seg < 0 || n->slot >= 0 || n->t->view_src) continue;
        if (!keep[i]) {
            n->t->data = (uint8_t *)mem + off[i];
            continue;
        }
        void *own = NULL;
        if (posix_memalign(&own, 64, (ggml_nbytes(n->t) + 63) / 64 * 64)) { rc = -1; break; }
        p->owned[p->n_owned++] = own;
        n->t->data = own;
    }
    free(off);
    free(keep);
    free(used);
    if (rc) return -1;
    for (int i = 0; i < p->n_nodes; i++) /* views (reshapes), in creation order: their sources come first */
        if (p->nodes[i].t->view_src) p->nodes[i].t->data = (uint8_t *)p->nodes[i].t->view_src->data + p->nodes[i].t->view_offs;
    for (int i = 0; i < p->n_nodes; i++)
        if (p->nodes[i].alias_of >= 0) p->nodes[i].t->data = p->nodes[p->nodes[i].alias_of].t->data;
    p->finished = 1;
    return 0;
}

int leank_ggml_prog_segments(void *handle) {
    leank_prog *p = handle;
    return p && p->finished ? p->seg : -1;
}

/* computes segment `seg` with the slots' pointers `ptrs` (n_slots of them; those it uses not NULL) */
int leank_ggml_prog_run(void *handle, int seg, void *const *ptrs, int threads) {
    leank_prog *p = handle;
    if (!p || !p->finished || seg < 0 || seg >= p->seg || !ptrs) return -1;
    for (int b = p->binding_start[seg]; b < p->binding_start[seg + 1]; b++)
        if (!ptrs[p->bindings[b].slot]) return -1;
    int rc = -1;
    const int nt = threads > 0 ? threads : 1;
    pthread_mutex_lock(&lock); /* the bindings too: one run of a program at a time */
    for (int b = p->binding_start[seg]; b < p->binding_start[seg + 1]; b++) {
        prog_binding *bd = &p->bindings[b];
        p->nodes[bd->node].t->data = (uint8_t *)ptrs[bd->slot] + bd->offset;
    }
    if (pool_for(nt) && p->plan_threads != nt) { /* once, or when the thread count changes */
        for (int s = 0; s < p->seg; s++) p->plans[s] = ggml_graph_plan(p->graphs[s], nt, pool);
        p->plan_threads = nt;
    }
    if (pool) {
        struct ggml_cplan *plan = &p->plans[seg];
        plan->threadpool = pool;
        if (plan->work_size > work_size) {
            uint8_t *grown = realloc(work, plan->work_size);
            if (grown) { work = grown; work_size = plan->work_size; }
        }
        if (plan->work_size <= work_size) {
            plan->work_data = work;
            rc = ggml_graph_compute(p->graphs[seg], plan) == GGML_STATUS_SUCCESS ? 0 : -1;
        }
    }
    pthread_mutex_unlock(&lock);
    return rc;
}
