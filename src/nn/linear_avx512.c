/*
 * linear_avx512.c - the linear layer's forward and backward on register-blocked
 * AVX-512 kernels (what em_linear_* run in an AVX-512 build; linear.c keeps the
 * OpenBLAS tiles for other builds).
 *
 * Why not OpenBLAS. At the DLRM's shapes (a batch of 2048 against 13..512-wide layers)
 * OpenBLAS spends ~15% of a training step packing its operands, again for every tile
 * (each W is re-packed once per row tile), and the bias copy, the ReLU and the ReLU
 * mask of the backward are extra passes over every activation. Here every product is
 * made of 12 x 32 blocks of outputs in 24 zmm accumulators:
 *
 *  - forward  out = relu?(in W^T + b): W packed once per call into panels of 32 (or
 *    16) output columns, k-major, zero-padded; 12 rows of `in` read in place
 *    (broadcasts) against every panel, the panel prefetched PF_K rows ahead into L1;
 *    the accumulators start from the bias and the ReLU is applied as they are stored.
 *  - backward din = dout W (* (in > 0)): the same with W packed by input columns; the
 *    ReLU mask of the layer below (its output is this layer's input) applied at the
 *    store, so dlrm.c needs no separate masking pass.
 *  - backward dW = dout^T in: the batch is walked in chunks of KC rows; a task (one
 *    tall block of output rows per worker, all input columns when there are enough
 *    blocks) packs each chunk row by row - dout's segment as blocks of 12 columns
 *    (12 consecutive floats per k: the broadcasts), in's as 32-column panels - then
 *    runs every (12-row block, panel) pair on the chunk; the same pass sums db.
 *  - O = 1 (the logit layer): a dot product per row, an outer product, a column sum.
 * The backward's kinds of task share one atomic counter (one pool launch after the
 * packing launch), so the uneven mix stays balanced. The MLP chains (em_mlp_*) run the
 * same kernels, a block of rows through every layer per task (see em__mlp_fwd_avx512).
 *
 * Determinism. Every output element is init + sum_k a_k b_k with one FMA per k in
 * order k = 0..K-1 (init: the bias, zero, or the element's old value when
 * accumulating; dW's chunks continue from the stored partial sum, which is the same
 * float), whatever task, row block or worker computes it: results are bitwise
 * independent of the thread count and of the tiling. They differ from the OpenBLAS
 * path's only by float rounding.
 *
 * Workspace: the packed weights and the dW chunk buffers live in a buffer owned by the
 * calling thread (grown on demand, huge pages advised, freed when the thread exits),
 * so a steady-state step allocates nothing; if it cannot be grown the caller falls
 * back to OpenBLAS.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "core/simd.h"
#include "nn/linear_impl.h"

#if defined(__AVX512F__)
#include <immintrin.h>

#define MR 12      /* rows per register block */
#define RB 48      /* forward / din: rows per task */
#define OB_MAX 264 /* dW: most output rows per task */
#define KC 128     /* dW: batch rows per chunk */
#define DB_COLS 256
#define SMALL_FMAS (1 << 17) /* below this many FMAs a call runs on the caller alone */
#define PF_K 16    /* packed weight rows (k) prefetched into L1 ahead of the loads */
#define PF_PAD (32 * PF_K) /* floats past the packed weights that those prefetches may touch */

static int cdiv(int a, int b) { return (a + b - 1) / b; }

/* ------------------------------------------------------------ workspace */

typedef struct {
    float *p;
    size_t cap;
} wspace;

static pthread_key_t ws_key;
static pthread_once_t ws_once = PTHREAD_ONCE_INIT;
static int ws_ok;

static void ws_destroy(void *p) {
    wspace *w = p;
    free(w->p);
    free(w);
}
static void ws_init(void) { ws_ok = pthread_key_create(&ws_key, ws_destroy) == 0; }

/* The calling thread's buffer of at least n floats, 64-byte aligned; NULL if none. */
static float *ws_get(size_t n) {
    pthread_once(&ws_once, ws_init);
    if (!ws_ok) return NULL;
    wspace *w = pthread_getspecific(ws_key);
    if (!w) {
        if (!(w = calloc(1, sizeof *w))) return NULL;
        if (pthread_setspecific(ws_key, w)) {
            free(w);
            return NULL;
        }
    }
    if (w->cap < n) {
        free(w->p);
        w->p = NULL, w->cap = 0;
        void *q;
        if (posix_memalign(&q, 64, (n + 16 + PF_PAD) * sizeof(float))) return NULL; /* + the prefetches past the end */
        em_advise_huge(q, (n + 16 + PF_PAD) * sizeof(float));
        w->p = q, w->cap = n;
    }
    return w->p;
}

/* ------------------------------------------------------------ kernels */

static inline __mmask16 cmask(int n) { return n >= 16 ? (__mmask16)0xffff : n <= 0 ? 0 : (__mmask16)((1u << n) - 1); }

/* acc[r][v] += sum_{k<K} A[k ak + r ar] * P[k pk + 16 v .. +16) for r < mr, v < NV;
 * P's loads masked by lm0 / lm1. mr and NV are constants after inlining. */
static inline __attribute__((always_inline)) void kloop(const int mr, const int NV, const float *A, size_t ak,
                                                        size_t ar, const float *P, size_t pk, __mmask16 lm0,
                                                        __mmask16 lm1, int K, __m512 acc[MR][2], const int pf) {
    for (int k = 0; k < K; k++) {
        const float *pp = P + (size_t)k * pk, *aa = A + (size_t)k * ak;
        if (pf) { /* the packed panel (in L2) PF_K rows ahead into L1, as em_infer's kernel */
            _mm_prefetch((const char *)(pp + PF_K * pk), _MM_HINT_T0);
            if (NV > 1) _mm_prefetch((const char *)(pp + PF_K * pk + 16), _MM_HINT_T0);
        }
        const __m512 w0 = _mm512_maskz_loadu_ps(lm0, pp);
        const __m512 w1 = NV > 1 ? _mm512_maskz_loadu_ps(lm1, pp + 16) : w0;
#pragma GCC unroll 12
        for (int r = 0; r < mr; r++) {
            const __m512 a = _mm512_set1_ps(aa[(size_t)r * ar]);
            acc[r][0] = _mm512_fmadd_ps(a, w0, acc[r][0]);
            if (NV > 1) acc[r][1] = _mm512_fmadd_ps(a, w1, acc[r][1]);
        }
    }
}

/* Forward / din block of MRC rows (a constant): rows of A read in place (lda apart),
 * the panel packed 16 NV wide. C[r, 0..ncol) =
 *   forward (bias): relu?(bias + A[r, :] . panel)
 *   din (no bias):  (C[r, :] when accumulate) + (A[r, :] . panel) * (M[r, c] > 0 when M). */
static inline __attribute__((always_inline)) void row_blk(const int MRC, const int NV, const float *A, size_t lda,
                                                          const float *P, int K, const float *bias, float *C,
                                                          size_t ldc, const float *M, size_t ldm, int ncol, int relu,
                                                          int accumulate) {
    __m512 acc[MR][2];
    const __m512 z = _mm512_setzero_ps();
    const __m512 b0 = bias ? _mm512_loadu_ps(bias) : z, b1 = bias && NV > 1 ? _mm512_loadu_ps(bias + 16) : b0;
#pragma GCC unroll 12
    for (int r = 0; r < MRC; r++) acc[r][0] = b0, acc[r][1] = b1;
    kloop(MRC, NV, A, 1, lda, P, (size_t)16 * NV, 0xffff, 0xffff, K, acc, 1);
    const __mmask16 m0 = cmask(ncol), m1 = cmask(ncol - 16);
#pragma GCC unroll 12
    for (int r = 0; r < MRC; r++) {
        __m512 v0 = acc[r][0], v1 = acc[r][1];
        float *c = C + (size_t)r * ldc;
        if (relu) v0 = _mm512_max_ps(v0, z), v1 = _mm512_max_ps(v1, z);
        if (M) {
            const float *mm = M + (size_t)r * ldm;
            v0 = _mm512_maskz_mov_ps(_mm512_mask_cmp_ps_mask(m0, _mm512_maskz_loadu_ps(m0, mm), z, _CMP_GT_OQ), v0);
            if (NV > 1)
                v1 = _mm512_maskz_mov_ps(_mm512_mask_cmp_ps_mask(m1, _mm512_maskz_loadu_ps(m1, mm + 16), z, _CMP_GT_OQ),
                                         v1);
        }
        if (accumulate) {
            v0 = _mm512_add_ps(_mm512_maskz_loadu_ps(m0, c), v0);
            if (NV > 1) v1 = _mm512_add_ps(_mm512_maskz_loadu_ps(m1, c + 16), v1);
        }
        _mm512_mask_storeu_ps(c, m0, v0);
        if (NV > 1) _mm512_mask_storeu_ps(c + 16, m1, v1);
    }
}

typedef void (*row_fn)(const float *A, size_t lda, const float *P, int K, const float *bias, float *C, size_t ldc,
                       const float *M, size_t ldm, int ncol, int relu, int accumulate);
#define ROW_FN(m, nv)                                                                                              \
    static void row_blk_##m##_##nv(const float *A, size_t lda, const float *P, int K, const float *bias, float *C, \
                                   size_t ldc, const float *M, size_t ldm, int ncol, int relu, int accumulate) {    \
        row_blk(m, nv, A, lda, P, K, bias, C, ldc, M, ldm, ncol, relu, accumulate);                               \
    }
ROW_FN(12, 2) ROW_FN(8, 2) ROW_FN(4, 2) ROW_FN(2, 2) ROW_FN(1, 2)
ROW_FN(12, 1) ROW_FN(8, 1) ROW_FN(4, 1) ROW_FN(2, 1) ROW_FN(1, 1)
static const row_fn row_fns[2][5] = {{row_blk_12_1, row_blk_8_1, row_blk_4_1, row_blk_2_1, row_blk_1_1},
                                     {row_blk_12_2, row_blk_8_2, row_blk_4_2, row_blk_2_2, row_blk_1_2}};

/* Panel p covers columns [32 p, 32 p + 32); the last one is 16 wide when at most 16
 * columns are left. Panel p starts at 32 K p. */
static int panel_w(int ncols, int p) { return ncols - 32 * p > 16 ? 32 : 16; }

/* Rows [0, mr) of a panel as 12 / 8 / 4 / 2 / 1-row blocks. */
static void row_panel(int mr, int nv, const float *A, size_t lda, const float *P, int K, const float *bias, float *C,
                      size_t ldc, const float *M, size_t ldm, int ncol, int relu, int accumulate) {
    while (mr > 0) {
        const int n = mr >= 12 ? 12 : mr >= 8 ? 8 : mr >= 4 ? 4 : mr >= 2 ? 2 : 1;
        const int i = n == 12 ? 0 : n == 8 ? 1 : n == 4 ? 2 : n == 2 ? 3 : 4;
        row_fns[nv - 1][i](A, lda, P, K, bias, C, ldc, M, ldm, ncol, relu, accumulate);
        A += (size_t)n * lda, C += (size_t)n * ldc, mr -= n;
        if (M) M += (size_t)n * ldm;
    }
}

/* Rows [r0, r1) x panels [p0, p1) of one product through row_panel: A rows lda apart,
 * panel q at pk + 32 K q, its outputs at C + 32 q (ncols columns in all); bias and M
 * (the ReLU mask rows) optional, offset like C. */
static void panel_rows(const float *A, size_t lda, const float *pk, int K, const float *bias, float *C, size_t ldc,
                       const float *M, size_t ldm, int ncols, int relu, int accumulate, int r0, int r1, int p0, int p1) {
    for (int r = r0; r < r1; r += MR) {
        const int mr = r1 - r < MR ? r1 - r : MR;
        for (int q = p0; q < p1; q++)
            row_panel(mr, panel_w(ncols, q) / 16, A + (size_t)r * lda, lda, pk + (size_t)32 * K * q, K,
                      bias ? bias + 32 * q : NULL, C + (size_t)r * ldc + 32 * q, ldc, M ? M + (size_t)r * ldm + 32 * q : NULL,
                      ldm, ncols - 32 * q, relu, accumulate);
    }
}

/* Task t of a rows x panel-groups split: rows [*r0, *r1), panels [*p0, *p1). */
static void task_span(int t, int ngr, int pg, int np, int B, int *r0, int *r1, int *p0, int *p1) {
    const int rb = t / ngr, g = t % ngr;
    *r0 = rb * RB, *r1 = *r0 + RB < B ? *r0 + RB : B;
    *p0 = g * pg, *p1 = *p0 + pg < np ? *p0 + pg : np;
}

/* dW block: C[r, 0..ncol) = (load ? C[r, :] : 0) + sum_{k<K} Ap[k 12 + r] Xp[k 16 NV + c]
 * for r < mr; Ap (12 rows, zero beyond mr) and Xp (16 NV columns, zero beyond ncol)
 * packed. */
static inline __attribute__((always_inline)) void dw_blk(const int NV, const float *Ap, const float *Xp, int K,
                                                         float *C, size_t ldc, int mr, int ncol, int load) {
    __m512 acc[MR][2];
    const __mmask16 m0 = cmask(ncol), m1 = cmask(ncol - 16);
#pragma GCC unroll 12
    for (int r = 0; r < MR; r++) {
        const int in = load && r < mr;
        acc[r][0] = in ? _mm512_maskz_loadu_ps(m0, C + (size_t)r * ldc) : _mm512_setzero_ps();
        acc[r][1] = in && NV > 1 ? _mm512_maskz_loadu_ps(m1, C + (size_t)r * ldc + 16) : _mm512_setzero_ps();
    }
    kloop(MR, NV, Ap, MR, 1, Xp, (size_t)16 * NV, 0xffff, 0xffff, K, acc, 0);
#pragma GCC unroll 12
    for (int r = 0; r < MR; r++) {
        if (r >= mr) break;
        _mm512_mask_storeu_ps(C + (size_t)r * ldc, m0, acc[r][0]);
        if (NV > 1) _mm512_mask_storeu_ps(C + (size_t)r * ldc + 16, m1, acc[r][1]);
    }
}
static void dw_blk2(const float *Ap, const float *Xp, int K, float *C, size_t ldc, int mr, int ncol, int load) {
    dw_blk(2, Ap, Xp, K, C, ldc, mr, ncol, load);
}
static void dw_blk1(const float *Ap, const float *Xp, int K, float *C, size_t ldc, int mr, int ncol, int load) {
    dw_blk(1, Ap, Xp, K, C, ldc, mr, ncol, load);
}

/* ------------------------------------------------------------ packing */


typedef struct {
    float *pk;
    const float *W;
    int I, O;
    int by_in; /* 0: panels of output columns, k over I (forward); 1: of input columns, k over O (din) */
    int np;
    atomic_int next;
} pack_arg;

static void pack_panel(const pack_arg *a, int p) {
    if (!a->by_in) { /* P[k pw + c] = W[(32 p + c) I + k]: written in order, read as pw streams */
        const int K = a->I, pw = panel_w(a->O, p), n = a->O - 32 * p < pw ? a->O - 32 * p : pw;
        float *P = a->pk + (size_t)32 * K * p;
        const float *w = a->W + (size_t)32 * p * K;
        for (int k = 0; k < K; k++) {
            float *d = P + (size_t)k * pw;
            for (int c = 0; c < n; c++) d[c] = w[(size_t)c * K + k];
            for (int c = n; c < pw; c++) d[c] = 0.f;
        }
    } else { /* P[k pw + c] = W[k I + 32 p + c] */
        const int K = a->O, pw = panel_w(a->I, p), n = a->I - 32 * p < pw ? a->I - 32 * p : pw;
        float *P = a->pk + (size_t)32 * K * p;
        for (int k = 0; k < K; k++) {
            memcpy(P + (size_t)k * pw, a->W + (size_t)k * a->I + 32 * p, (size_t)n * sizeof(float));
            for (int c = n; c < pw; c++) P[(size_t)k * pw + c] = 0.f;
        }
    }
}

static void pack_task(void *p, int ith, int nth) {
    (void)ith, (void)nth;
    pack_arg *a = p;
    for (int k; (k = atomic_fetch_add_explicit(&a->next, 1, memory_order_relaxed)) < a->np;) pack_panel(a, k);
}

static void pack_weights(float *pk, const float *W, int I, int O, int by_in, em_pool *pool) {
    pack_arg a = {.pk = pk, .W = W, .I = I, .O = O, .by_in = by_in, .np = cdiv(by_in ? I : O, 32)};
    atomic_init(&a.next, 0);
    em_pool_run((size_t)I * (size_t)O >= 32768 ? pool : NULL, pack_task, &a);
}

/* Row blocks x panel groups: enough tasks to balance nth workers. */
static int panel_group(int nrb, int np, int nth) {
    int pg = np;
    while (pg > 1 && nrb * cdiv(np, pg) < 4 * nth) pg = cdiv(pg, 2);
    return pg;
}

/* ------------------------------------------------------- one output (O = 1) */
/* A 12 x 32 block would be 1/16 useful at O = 1 (the logit layer), so that layer is a
 * dot product per row (forward), an outer product (din) and a column sum of rows
 * scaled by dout (dW), vectorized along I. Fixed order: forward sums k in 16 lanes
 * (lane j takes k = j, j + 16, ...) then adds the lanes in a fixed tree and the bias;
 * dW sums b = 0..B-1 per element. */

#define O1_ROWS 64   /* rows per task */
#define O1_COLS 256  /* dW columns per task (16 zmm accumulators) */

typedef struct {
    float *out, *din, *dW, *db;
    const float *in, *W, *b, *dout;
    int B, I, relu, accumulate, mask_in;
    int nrow, ncol; /* tasks: row blocks (forward / din), column blocks (dW) */
    atomic_int next;
} o1_arg;

/* out[r] = relu?(bias + x[r, :] . w) for rows [r0, r1). */
static void o1_fwd_rows(float *out, const float *in, const float *w, const float *b, int K, int relu, int r0, int r1) {
    const float bias = b ? b[0] : 0.f;
    for (int r = r0; r < r1; r++) {
        const float *x = in + (size_t)r * K;
        __m512 acc = _mm512_setzero_ps();
        for (int k = 0; k < K; k += 16) {
            const __mmask16 m = cmask(K - k);
            acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x + k), _mm512_maskz_loadu_ps(m, w + k), acc);
        }
        float v = _mm512_reduce_add_ps(acc) + bias;
        out[r] = relu && !(v > 0.f) ? 0.f : v;
    }
}

/* din[r, :] (+)= dout[r] w (* (in[r, :] > 0) when mask_in) for rows [r0, r1). */
static void o1_din_rows(float *din, const float *dout, const float *w, const float *in, int I, int mask_in,
                        int accumulate, int r0, int r1) {
    const __m512 z = _mm512_setzero_ps();
    for (int r = r0; r < r1; r++) {
        const __m512 g = _mm512_set1_ps(dout[r]);
        float *d = din + (size_t)r * I;
        const float *x = in + (size_t)r * I;
        for (int i = 0; i < I; i += 16) {
            const __mmask16 m = cmask(I - i);
            __m512 v = _mm512_mul_ps(g, _mm512_maskz_loadu_ps(m, w + i));
            if (mask_in) v = _mm512_maskz_mov_ps(_mm512_mask_cmp_ps_mask(m, _mm512_maskz_loadu_ps(m, x + i), z, _CMP_GT_OQ), v);
            if (accumulate) v = _mm512_add_ps(_mm512_maskz_loadu_ps(m, d + i), v);
            _mm512_mask_storeu_ps(d + i, m, v);
        }
    }
}

static void o1_fwd_task(void *p, int ith, int nth) {
    (void)ith, (void)nth;
    o1_arg *a = p;
    for (int t; (t = atomic_fetch_add_explicit(&a->next, 1, memory_order_relaxed)) < a->nrow;)
        o1_fwd_rows(a->out, a->in, a->W, a->b, a->I, a->relu, t * O1_ROWS,
                    (t + 1) * O1_ROWS < a->B ? (t + 1) * O1_ROWS : a->B);
}

/* One task of an O = 1 backward: a row block of din, a column block of dW, or db. */
static void o1_bwd_one(o1_arg *a, int t) {
    const __m512 z = _mm512_setzero_ps();
    if (t < a->nrow) {
        o1_din_rows(a->din, a->dout, a->W, a->in, a->I, a->mask_in, a->accumulate, t * O1_ROWS,
                    (t + 1) * O1_ROWS < a->B ? (t + 1) * O1_ROWS : a->B);
    } else if (t < a->nrow + a->ncol) { /* dW[c0:c1) (+)= sum_b dout[b] in[b, c0:c1) */
        const int c0 = (t - a->nrow) * O1_COLS, c1 = c0 + O1_COLS < a->I ? c0 + O1_COLS : a->I;
        const int nv = (c1 - c0 + 15) / 16;
        __m512 acc[O1_COLS / 16];
        for (int j = 0; j < nv; j++) acc[j] = a->accumulate ? _mm512_maskz_loadu_ps(cmask(c1 - c0 - 16 * j), a->dW + c0 + 16 * j) : z;
        for (int b = 0; b < a->B; b++) {
            const __m512 g = _mm512_set1_ps(a->dout[b]);
            const float *x = a->in + (size_t)b * a->I + c0;
            if (nv == O1_COLS / 16) {
#pragma GCC unroll 16
                for (int j = 0; j < O1_COLS / 16; j++) acc[j] = _mm512_fmadd_ps(g, _mm512_loadu_ps(x + 16 * j), acc[j]);
            } else {
                for (int j = 0; j < nv; j++)
                    acc[j] = _mm512_fmadd_ps(g, _mm512_maskz_loadu_ps(cmask(c1 - c0 - 16 * j), x + 16 * j), acc[j]);
            }
        }
        for (int j = 0; j < nv; j++) _mm512_mask_storeu_ps(a->dW + c0 + 16 * j, cmask(c1 - c0 - 16 * j), acc[j]);
    } else { /* db (+)= sum_b dout[b] */
        float sum = 0.f;
        for (int b = 0; b < a->B; b++) sum += a->dout[b];
        a->db[0] = a->accumulate ? a->db[0] + sum : sum;
    }
}

static int o1_bwd_count(const o1_arg *a) { return a->nrow + a->ncol + (a->db ? 1 : 0); }

static void o1_bwd_task(void *p, int ith, int nth) {
    (void)ith, (void)nth;
    o1_arg *a = p;
    const int n = o1_bwd_count(a);
    for (int t; (t = atomic_fetch_add_explicit(&a->next, 1, memory_order_relaxed)) < n;) o1_bwd_one(a, t);
}

/* ------------------------------------------------------------ forward */

typedef struct {
    float *out;
    const float *in;
    const float *pk; /* packed W */
    float *bias;     /* padded bias (32 np) */
    int B, I, O, relu;
    int np, pg, ngr, ntask;
    atomic_int next;
} fwd_arg;

static void fwd_task(void *p, int ith, int nth) {
    (void)ith, (void)nth;
    fwd_arg *a = p;
    for (int t; (t = atomic_fetch_add_explicit(&a->next, 1, memory_order_relaxed)) < a->ntask;) {
        int r0, r1, p0, p1;
        task_span(t, a->ngr, a->pg, a->np, a->B, &r0, &r1, &p0, &p1);
        panel_rows(a->in, (size_t)a->I, a->pk, a->I, a->bias, a->out, (size_t)a->O, NULL, 0, a->O, a->relu, 0, r0, r1, p0, p1);
    }
}

int em__linear_fwd_avx512(float *out, const float *in, const float *W, const float *b, int B, int I, int O, int relu,
                          em_pool *pool) {
    if (B <= 0 || O <= 0) return 0; /* nothing to do (also: em_linear_impl's probe) */
    const double fmas = (double)B * I * O;
    if (fmas < SMALL_FMAS) pool = NULL;
    if (O == 1) {
        o1_arg a = {.out = out, .in = in, .W = W, .b = b, .B = B, .I = I, .relu = relu, .nrow = cdiv(B, O1_ROWS)};
        atomic_init(&a.next, 0);
        em_pool_run(a.nrow > 1 ? pool : NULL, o1_fwd_task, &a);
        return 0;
    }
    const int nth = em_pool_nth(pool), np = cdiv(O, 32), K = I > 0 ? I : 1;
    const size_t npk = (size_t)32 * np * (size_t)K;
    float *ws = ws_get(npk + (size_t)32 * np);
    if (!ws) return -1;
    fwd_arg a = {.out = out, .in = in, .pk = ws, .bias = ws + npk, .B = B, .I = I, .O = O, .relu = relu, .np = np};
    if (I > 0) pack_weights(ws, W, I, O, 0, pool);
    else memset(ws, 0, npk * sizeof(float));
    memset(a.bias, 0, (size_t)32 * np * sizeof(float));
    if (b) memcpy(a.bias, b, (size_t)O * sizeof(float));
    const int nrb = cdiv(B, RB);
    a.pg = panel_group(nrb, np, nth);
    a.ngr = cdiv(np, a.pg);
    a.ntask = nrb * a.ngr;
    atomic_init(&a.next, 0);
    if (a.ntask == 1) fwd_task(&a, 0, 1);
    else em_pool_run(pool, fwd_task, &a);
    return 0;
}

/* ------------------------------------------------------------ backward */

typedef struct {
    float *din, *dW, *db;
    const float *dout, *in;
    const float *pk; /* W packed by input columns (din), NULL without din */
    float *wk;       /* dW: per-worker packed chunks, wk_per floats each */
    size_t wk_per;
    int B, I, O, accumulate, mask_in;
    int ob, nw_i, nw_pg, nw_g, nw;   /* dW tasks: ob-row blocks of O x groups of nw_pg 32-column panels of I */
    int np, pg, ngr, ni;             /* din tasks: row blocks x panel groups */
    int nb;                          /* db tasks (without dW; with it the dW tasks sum db) */
    atomic_int next;
} bwd_arg;

#define PF_ROWS 6  /* dW packing: rows prefetched ahead */

/* dW[o0:o1, panels p0..p1) (+)= dout[:, o0:o1]^T in[:, panels], the batch in chunks of
 * KC rows: dout's chunk packed as ob/12 blocks of [k][12] (reused by every panel),
 * in's as [k][32] per panel (reused by every row block). */
static void dw_task(bwd_arg *a, int t, int ith) {
    const int ob = t / a->nw_g, g = t % a->nw_g;
    const int o0 = ob * a->ob, o1 = o0 + a->ob < a->O ? o0 + a->ob : a->O;
    const int p0 = g * a->nw_pg, p1 = p0 + a->nw_pg < a->nw_i ? p0 + a->nw_pg : a->nw_i;
    const int c0 = 32 * p0, c1 = 32 * p1 < a->I ? 32 * p1 : a->I; /* the task's columns of in */
    float *Ap = a->wk + (size_t)ith * a->wk_per, *Xp = Ap + OB_MAX * KC;
    const int nob = cdiv(o1 - o0, MR);
    /* db[o0:o1) is summed here by the first panel group's task, from the dout rows it
     * packs anyway, in batch order b = 0..B-1 as db_task would */
    float sdb[OB_MAX] __attribute__((aligned(64)));
    const int with_db = a->db && g == 0;
    if (with_db) memset(sdb, 0, sizeof sdb);
    for (int k0 = 0; k0 < a->B; k0 += KC) {
        const int kc = a->B - k0 < KC ? a->B - k0 : KC;
        const int load = k0 > 0 || a->accumulate;
        /* Pack the chunk row by row (sequential reads; rows PF_ROWS ahead prefetched):
         * dout's row segment [o0, o1) as ob/12 blocks of 12, in's [c0, c1) as the
         * panels' 32 (or 16) columns. */
        for (int k = 0; k < kc; k++) {
            if (k0 + k + PF_ROWS < a->B) {
                const float *d = a->dout + (size_t)(k0 + k + PF_ROWS) * a->O;
                for (int o = o0; o < o1; o += 16) _mm_prefetch((const char *)(d + o), _MM_HINT_T0);
                _mm_prefetch((const char *)(d + o1 - 1), _MM_HINT_T0);
                const float *x = a->in + (size_t)(k0 + k + PF_ROWS) * a->I;
                for (int c = c0; c < c1; c += 16) _mm_prefetch((const char *)(x + c), _MM_HINT_T0);
                _mm_prefetch((const char *)(x + c1 - 1), _MM_HINT_T0);
            }
            const float *d = a->dout + (size_t)(k0 + k) * a->O;
            for (int sb = 0; sb < nob; sb++) {
                const int r0 = o0 + sb * MR, mr = o1 - r0 < MR ? o1 - r0 : MR;
                _mm512_mask_storeu_ps(Ap + ((size_t)sb * KC + k) * MR, 0x0fff, _mm512_maskz_loadu_ps(cmask(mr), d + r0));
            }
            if (with_db)
                for (int o = o0; o < o1; o += 16) {
                    const __mmask16 m = cmask(o1 - o);
                    _mm512_mask_storeu_ps(sdb + (o - o0), m,
                                          _mm512_add_ps(_mm512_maskz_loadu_ps(m, sdb + (o - o0)), _mm512_maskz_loadu_ps(m, d + o)));
                }
            const float *x = a->in + (size_t)(k0 + k) * a->I;
            for (int q = p0; q < p1; q++) {
                const int i0 = 32 * q, ncol = a->I - i0, nv = ncol > 16 ? 2 : 1;
                float *X = Xp + (size_t)(q - p0) * KC * 32 + (size_t)k * 16 * nv;
                _mm512_storeu_ps(X, _mm512_maskz_loadu_ps(cmask(ncol), x + i0));
                if (nv > 1) _mm512_storeu_ps(X + 16, _mm512_maskz_loadu_ps(cmask(ncol - 16), x + i0 + 16));
            }
        }
        for (int q = p0; q < p1; q++) {
            const int i0 = 32 * q, ncol = a->I - i0;
            const float *X = Xp + (size_t)(q - p0) * KC * 32;
            for (int sb = 0; sb < nob; sb++) {
                const int r0 = o0 + sb * MR, mr = o1 - r0 < MR ? o1 - r0 : MR;
                (ncol > 16 ? dw_blk2 : dw_blk1)(Ap + (size_t)sb * KC * MR, X, kc, a->dW + (size_t)r0 * a->I + i0,
                                                (size_t)a->I, mr, ncol, load);
            }
        }
    }
    if (with_db)
        for (int o = o0; o < o1; o++) a->db[o] = a->accumulate ? a->db[o] + sdb[o - o0] : sdb[o - o0];
}

static void din_task(bwd_arg *a, int t) {
    int r0, r1, p0, p1;
    task_span(t, a->ngr, a->pg, a->np, a->B, &r0, &r1, &p0, &p1);
    panel_rows(a->dout, (size_t)a->O, a->pk, a->O, NULL, a->din, (size_t)a->I, a->mask_in ? a->in : NULL, (size_t)a->I, a->I, 0,
               a->accumulate, r0, r1, p0, p1);
}

/* db[c0:c1) (+)= sum_b dout[b, c0:c1), each column summed in order b = 0..B-1. */
static void db_task(bwd_arg *a, int t) {
    float s[DB_COLS];
    const int c0 = t * DB_COLS, c1 = c0 + DB_COLS < a->O ? c0 + DB_COLS : a->O;
    const size_t n = (size_t)(c1 - c0);
    memset(s, 0, n * sizeof(float));
    for (int r = 0; r < a->B; r++) em_vadd(s, a->dout + (size_t)r * a->O + c0, n);
    if (a->accumulate) em_vadd(a->db + c0, s, n);
    else memcpy(a->db + c0, s, n * sizeof(float));
}

static void bwd_one(bwd_arg *a, int t, int ith) {
    if (t < a->nw) dw_task(a, t, ith);
    else if (t < a->nw + a->ni) din_task(a, t - a->nw);
    else db_task(a, t - a->nw - a->ni);
}

static void bwd_task(void *p, int ith, int nth) {
    (void)nth;
    bwd_arg *a = p;
    const int n = a->nw + a->ni + a->nb;
    for (int t; (t = atomic_fetch_add_explicit(&a->next, 1, memory_order_relaxed)) < n;) bwd_one(a, t, ith);
}

/* The dW tiling of one layer (sets ob, nw_i, nw_pg, nw_g, nw, wk_per). */
static void dw_plan(bwd_arg *a, int nth) {
    a->nw_i = cdiv(a->I, 32);
    /* Few, tall row blocks: every block reads all of its columns of `in` again (from
     * L3), so one per worker (the other layers' tasks fill in behind them; two per
     * worker cost 20-25% more time in the packing loads, measured). */
    a->ob = MR * cdiv(cdiv(a->O, MR), nth);
    if (a->ob > OB_MAX) a->ob = OB_MAX;
    const int nob = cdiv(a->O, a->ob);
    a->nw_pg = nob >= nth ? a->nw_i : panel_group(nob, a->nw_i, nth); /* whole rows of `in` when there are enough row blocks */
    a->nw_g = cdiv(a->nw_i, a->nw_pg);
    a->nw = nob * a->nw_g;
    a->wk_per = (size_t)OB_MAX * KC + (size_t)KC * 32 * a->nw_pg;
}

int em__linear_bwd_avx512(float *din, float *dW, float *db, const float *dout, const float *in, const float *W, int B,
                          int I, int O, int accumulate, int mask_in, em_pool *pool) {
    const double fmas = (double)B * I * O * ((din ? 1 : 0) + (dW ? 1 : 0));
    if (fmas < SMALL_FMAS) pool = NULL;
    const int nth = em_pool_nth(pool);
    bwd_arg a = {.din = din, .dW = dW, .db = db, .dout = dout, .in = in, .B = B, .I = I, .O = O,
                 .accumulate = accumulate, .mask_in = mask_in};
    if (I <= 0) din = dW = NULL, a.din = a.dW = NULL;
    if (O == 1) {
        o1_arg o = {.din = din, .dW = dW, .db = db, .in = in, .W = W, .dout = dout, .B = B, .I = I,
                    .accumulate = accumulate, .mask_in = mask_in, .nrow = din ? cdiv(B, O1_ROWS) : 0,
                    .ncol = dW ? cdiv(I, O1_COLS) : 0};
        atomic_init(&o.next, 0);
        em_pool_run(o1_bwd_count(&o) > 1 ? pool : NULL, o1_bwd_task, &o);
        return 0;
    }
    const int np = din ? cdiv(I, 32) : 0;
    if (dW) dw_plan(&a, nth);
    const size_t npk = (size_t)32 * np * (size_t)O;
    float *ws = ws_get(npk + (dW ? a.wk_per * nth : 0) + 1);
    if (!ws) return -1;
    if (din) {
        pack_weights(ws, W, I, O, 1, pool);
        a.pk = ws, a.np = np;
        const int nrb = cdiv(B, RB);
        a.pg = panel_group(nrb, np, nth);
        a.ngr = cdiv(np, a.pg);
        a.ni = nrb * a.ngr;
    }
    if (dW) a.wk = ws + npk;
    a.nb = db && !dW ? cdiv(O, DB_COLS) : 0;
    atomic_init(&a.next, 0);
    if (a.nw + a.ni + a.nb == 1) bwd_task(&a, 0, 1);
    else if (a.nw + a.ni + a.nb > 1) em_pool_run(pool, bwd_task, &a);
    return 0;
}

/* ------------------------------------------------------------ MLP chains */

#define CHAIN_MAX 16

/* Pack jobs of several layers behind one counter (one pool launch). */
typedef struct {
    pack_arg a[CHAIN_MAX];
    int n, start[CHAIN_MAX + 1];
    atomic_int next;
} pack_multi;

static void pack_multi_task(void *p, int ith, int nth) {
    (void)ith, (void)nth;
    pack_multi *m = p;
    for (int t; (t = atomic_fetch_add_explicit(&m->next, 1, memory_order_relaxed)) < m->start[m->n];) {
        int l = 0;
        while (t >= m->start[l + 1]) l++;
        pack_panel(&m->a[l], t - m->start[l]);
    }
}

typedef struct {
    const em_mlp_layer *L;
    int n, B, rb, nrb, lo;
    const float *in, *dout;
    const float *pk[CHAIN_MAX];   /* packed W (forward: by output columns; backward: by input columns) */
    const float *bias[CHAIN_MAX]; /* forward: padded biases */
    atomic_int next;
} chain_arg;

/* Rows per chain task: up to RB, fewer when the batch would give under 4 per worker. */
static int chain_rows(int B, int nth) {
    int rb = RB;
    while (rb > MR && cdiv(B, rb) < 4 * nth) rb -= MR;
    return rb;
}

static void chain_fwd_task(void *p, int ith, int nth) {
    (void)ith, (void)nth;
    chain_arg *c = p;
    for (int t; (t = atomic_fetch_add_explicit(&c->next, 1, memory_order_relaxed)) < c->nrb;) {
        const int r0 = t * c->rb, r1 = r0 + c->rb < c->B ? r0 + c->rb : c->B;
        for (int l = 0; l < c->n; l++) {
            const em_mlp_layer *y = &c->L[l];
            const float *A = l ? c->L[l - 1].out : c->in;
            const int K = y->I, O = y->O;
            if (O == 1) {
                o1_fwd_rows(y->out, A, y->W, y->b, K, y->relu, r0, r1);
                continue;
            }
            panel_rows(A, (size_t)K, c->pk[l], K, c->bias[l], y->out, (size_t)O, NULL, 0, O, y->relu, 0, r0, r1, 0, cdiv(O, 32));
        }
    }
}

/* Two pool launches: the packing jobs of every layer, then the chain over row blocks. */
static void pack_then_chain(pack_multi *pm, chain_arg *c, em_task_fn fn, int nth, em_pool *pool) {
    atomic_init(&pm->next, 0);
    em_pool_run(pm->start[pm->n] > 1 ? pool : NULL, pack_multi_task, pm);
    c->rb = chain_rows(c->B, nth);
    c->nrb = cdiv(c->B, c->rb);
    atomic_init(&c->next, 0);
    em_pool_run(c->nrb > 1 ? pool : NULL, fn, c);
}

static int chain_ok(const em_mlp_layer *L, int n) {
    if (n > CHAIN_MAX) return 0;
    for (int l = 0; l < n; l++)
        if (L[l].I <= 0 || L[l].O <= 0 || (l && L[l].I != L[l - 1].O)) return 0;
    return 1;
}

int em__mlp_fwd_avx512(const em_mlp_layer *L, int n, const float *in, int B, em_pool *pool) {
    if (!chain_ok(L, n)) return -1;
    double fmas = 0;
    size_t need = 0;
    for (int l = 0; l < n; l++) {
        fmas += (double)B * L[l].I * L[l].O;
        if (L[l].O > 1) need += (size_t)32 * cdiv(L[l].O, 32) * ((size_t)L[l].I + 1);
    }
    if (fmas < SMALL_FMAS) pool = NULL;
    const int nth = em_pool_nth(pool);
    float *ws = ws_get(need + 1);
    if (!ws) return -1;
    chain_arg c = {.L = L, .n = n, .B = B, .in = in};
    pack_multi pm = {.n = n};
    size_t off = 0;
    for (int l = 0; l < n; l++) {
        const int np = L[l].O > 1 ? cdiv(L[l].O, 32) : 0;
        pm.a[l] = (pack_arg){.pk = ws + off, .W = L[l].W, .I = L[l].I, .O = L[l].O, .by_in = 0, .np = np};
        pm.start[l + 1] = pm.start[l] + np;
        c.pk[l] = ws + off;
        off += (size_t)32 * np * (size_t)L[l].I;
        float *pb = ws + off;
        c.bias[l] = pb;
        off += (size_t)32 * np;
        if (np) {
            memset(pb, 0, (size_t)32 * np * sizeof(float));
            if (L[l].b) memcpy(pb, L[l].b, (size_t)L[l].O * sizeof(float));
        }
    }
    pack_then_chain(&pm, &c, chain_fwd_task, nth, pool);
    return 0;
}

/* The din chain: a block of rows through layers n-1..lo, each layer's input gradient
 * (masked by the ReLU of the layer below) being the next one's output gradient. */
static void chain_din_task(void *p, int ith, int nth) {
    (void)ith, (void)nth;
    chain_arg *c = p;
    for (int t; (t = atomic_fetch_add_explicit(&c->next, 1, memory_order_relaxed)) < c->nrb;) {
        const int r0 = t * c->rb, r1 = r0 + c->rb < c->B ? r0 + c->rb : c->B;
        for (int l = c->n - 1; l >= c->lo; l--) {
            const em_mlp_layer *y = &c->L[l];
            const float *g = l == c->n - 1 ? c->dout : c->L[l + 1].din, *x = l ? c->L[l - 1].out : c->in;
            const int I = y->I, O = y->O, mask = l > 0 && c->L[l - 1].relu;
            if (O == 1) {
                o1_din_rows(y->din, g, y->W, x, I, mask, 0, r0, r1);
                continue;
            }
            panel_rows(g, (size_t)O, c->pk[l], O, NULL, y->din, (size_t)I, mask ? x : NULL, (size_t)I, I, 0, 0, r0, r1, 0,
                       cdiv(I, 32));
        }
    }
}

/* dW and db of every layer behind one counter. */
typedef struct {
    bwd_arg b[CHAIN_MAX];
    o1_arg o[CHAIN_MAX];
    int n, start[CHAIN_MAX + 1];
    atomic_int next;
} dw_multi;

static void dw_multi_task(void *p, int ith, int nth) {
    (void)nth;
    dw_multi *m = p;
    for (int t; (t = atomic_fetch_add_explicit(&m->next, 1, memory_order_relaxed)) < m->start[m->n];) {
        int l = 0;
        while (t >= m->start[l + 1]) l++;
        if (m->b[l].O == 1) o1_bwd_one(&m->o[l], t - m->start[l]);
        else bwd_one(&m->b[l], t - m->start[l], ith);
    }
}

int em__mlp_bwd_avx512(const em_mlp_layer *L, int n, const float *in, const float *dout, int B, em_pool *pool) {
    if (!chain_ok(L, n)) return -1;
    for (int l = 1; l < n; l++)
        if (!L[l].din) return -1;
    double fmas = 0;
    for (int l = 0; l < n; l++) fmas += 2.0 * B * L[l].I * L[l].O;
    if (fmas < SMALL_FMAS) pool = NULL;
    const int nth = em_pool_nth(pool);
    const int lo = L[0].din ? 0 : 1;
    /* plan dW/db first: the workspace holds the din packs and the dW chunk buffers */
    dw_multi dmv, *dm = &dmv;
    memset(dm, 0, sizeof *dm);
    dm->n = n;
    size_t need = 0, wk_per = 0;
    for (int l = 0; l < n; l++) {
        const int I = L[l].I, O = L[l].O;
        const float *x = l ? L[l - 1].out : in, *g = l == n - 1 ? dout : L[l + 1].din;
        bwd_arg *a = &dm->b[l];
        a->dW = L[l].dW, a->db = L[l].db, a->dout = g, a->in = x, a->B = B, a->I = I, a->O = O;
        int cnt;
        if (O == 1) {
            dm->o[l] = (o1_arg){.dW = L[l].dW, .db = L[l].db, .in = x, .W = L[l].W, .dout = g, .B = B, .I = I,
                                .ncol = L[l].dW ? cdiv(I, O1_COLS) : 0};
            cnt = o1_bwd_count(&dm->o[l]);
        } else {
            if (a->dW) {
                dw_plan(a, nth);
                if (a->wk_per > wk_per) wk_per = a->wk_per;
            }
            a->nb = a->db && !a->dW ? cdiv(O, DB_COLS) : 0;
            cnt = a->nw + a->nb;
            if (l >= lo) need += (size_t)32 * cdiv(I, 32) * (size_t)O;
        }
        dm->start[l + 1] = dm->start[l] + cnt;
    }
    float *ws = ws_get(need + wk_per * nth + 1);
    if (!ws) return -1;
    chain_arg c = {.L = L, .n = n, .B = B, .lo = lo, .in = in, .dout = dout};
    pack_multi pm = {.n = n};
    size_t off = 0;
    for (int l = 0; l < n; l++) {
        const int np = l >= lo && L[l].O > 1 ? cdiv(L[l].I, 32) : 0;
        pm.a[l] = (pack_arg){.pk = ws + off, .W = L[l].W, .I = L[l].I, .O = L[l].O, .by_in = 1, .np = np};
        pm.start[l + 1] = pm.start[l] + np;
        c.pk[l] = ws + off;
        off += (size_t)32 * np * (size_t)L[l].O;
    }
    for (int l = 0; l < n; l++) dm->b[l].wk = ws + off, dm->b[l].wk_per = wk_per;
    pack_then_chain(&pm, &c, chain_din_task, nth, pool);
    atomic_init(&dm->next, 0);
    em_pool_run(dm->start[n] > 1 ? pool : NULL, dw_multi_task, dm);
    return 0;
}

#else /* no AVX-512: linear.c runs OpenBLAS */

int em__linear_fwd_avx512(float *out, const float *in, const float *W, const float *b, int B, int I, int O, int relu,
                          em_pool *pool) {
    (void)out, (void)in, (void)W, (void)b, (void)B, (void)I, (void)O, (void)relu, (void)pool;
    return -1;
}
int em__linear_bwd_avx512(float *din, float *dW, float *db, const float *dout, const float *in, const float *W, int B,
                          int I, int O, int accumulate, int mask_in, em_pool *pool) {
    (void)din, (void)dW, (void)db, (void)dout, (void)in, (void)W, (void)B, (void)I, (void)O, (void)accumulate;
    (void)mask_in, (void)pool;
    return -1;
}
int em__mlp_fwd_avx512(const em_mlp_layer *L, int n, const float *in, int B, em_pool *pool) {
    (void)L, (void)n, (void)in, (void)B, (void)pool;
    return -1;
}
int em__mlp_bwd_avx512(const em_mlp_layer *L, int n, const float *in, const float *dout, int B, em_pool *pool) {
    (void)L, (void)n, (void)in, (void)dout, (void)B, (void)pool;
    return -1;
}
#endif
